"""The paper setting: breast-cancer diagnosis, real encrypted training of 20 iterations on the 4
features the client selects, simulated encrypted training of 200 iterations on all 30.

  python -m experiments.run configs/fhe/breast_cancer.py
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.experiment = "fhe"
  config.seed = 0
  config.execute_features = 4
  config.execute_iterations = 20
  config.simulate_features = 30
  config.simulate_iterations = 200
  config.eval_every = 10
  config.max_gap_points = 4.0
  return config
