"""Non-local CNN smoke setting (the demo's row): sigma 25, 60 steps, the two-stage model and the
plain baseline, one 128-pixel crop per held-out image.

  python -m experiments.run configs/nonlocal_cnn/smoke.py
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.experiment = "nonlocal_cnn"
  config.seed = 0
  config.sigmas = (25.0,)
  config.models = ("two_stage", "plain")
  config.steps = 60
  config.test_size = 128
  return config
