"""Data-parallel least squares on all devices vs one device (the multi-process check).

  python -m experiments.run configs/data_parallel/smoke.py --cpu-devices 4
  python -m experiments.run configs/data_parallel/smoke.py --processes 2 --cpu-devices 2
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.experiment = "data_parallel"
  config.seed = 0
  config.examples_per_device = 64
  config.features = 16
  config.steps = 50
  config.learning_rate = 0.1
  return config
