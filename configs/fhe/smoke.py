"""FHE smoke setting (the demo's row): a real encrypted round trip on 2 features, 2 iterations;
the simulated run on all 30 features, 40 iterations.

  python -m experiments.run configs/fhe/smoke.py
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.experiment = "fhe"
  config.seed = 0
  config.execute_features = 2
  config.execute_iterations = 2
  config.simulate_features = 30
  config.simulate_iterations = 40
  config.eval_every = 5
  config.max_gap_points = 10.0  # 40 simulated iterations are not the paper setting
  return config
