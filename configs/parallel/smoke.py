"""Parallel smoke setting (the demo's row): both models under the three strategy sets for 8 steps
on a (2, 4) mesh, and 12 sampled rank-2 layout pairs per benchmark mesh for the bytes headline.

  python -m experiments.run configs/parallel/smoke.py --cpu-devices 8
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.experiment = "parallel"
  config.seed = 0
  config.steps = 8
  config.bench_pairs = 12
  return config
