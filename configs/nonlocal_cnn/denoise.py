"""The paper's denoising run: sigma 15, 25, 50; (a) two-stage and (b) plain at every level, (c)
full-resolution non-local at sigma 25; 2000 Adam steps of 16 patches of 48 x 48 each; held-out
256 x 256 crops as 128 x 128 tiles. On 2 CPU cores (a) and (b) take about 8-12 minutes each per
noise level; (c) is O(N^2) per patch and several times slower.

  python -m experiments.run configs/nonlocal_cnn/denoise.py
  python -m experiments.nonlocal_cnn --paper runs/nonlocal_cnn/<run>
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.experiment = "nonlocal_cnn"
  config.seed = 0
  config.sigmas = (15.0, 25.0, 50.0)
  config.models = ("two_stage", "plain", "full_nonlocal")
  config.steps = 2000
  config.batch_size = 16
  config.patch_size = 48
  return config
