"""The paper's denoising setting: the schema's defaults (experiments/nonlocal_cnn.py:
config_schema), which this file does not repeat: sigma 15, 25, 50; (a) two-stage and (b) plain at
every level, (c) full-resolution non-local at sigma 25 only; 2000 Adam steps of 16 patches of
48 x 48 per model; held-out 256 x 256 center crops denoised as 128 x 128 tiles.

Training the two-stage params kept in papers/artifacts/nonlocal_cnn/ (its README), and the kept
evaluation of them on papers/nonlocal_cnn.md:

  python -m experiments.run configs/nonlocal_cnn/denoise.py --set "sigmas=(25.0,)" --set "models=('two_stage',)" --set save_params=True
  python -m experiments.run configs/nonlocal_cnn/denoise.py --set "sigmas=(25.0,)" --set "models=('two_stage',)" --set steps=0 --set init_params=papers/artifacts/nonlocal_cnn --paper nonlocal_cnn.sigma25_pretrained

Not kept in this version (papers/nonlocal_cnn.md lists them; each is tens of minutes to hours
on 2 CPU cores):

  python -m experiments.run configs/nonlocal_cnn/denoise.py --set "sigmas=(25.0,)" --set "models=('two_stage','plain')" --set save_params=True --paper nonlocal_cnn.sigma25_seed0
  python -m experiments.run configs/nonlocal_cnn/denoise.py --set "sigmas=(25.0,)" --set "models=('two_stage','plain')" --set seed=1 --paper nonlocal_cnn.sigma25_seed1
  python -m experiments.run configs/nonlocal_cnn/denoise.py --set "sigmas=(15.0,50.0)" --set "models=('two_stage','plain')" --paper nonlocal_cnn.sigma15_50_seed0
  python -m experiments.run configs/nonlocal_cnn/denoise.py --set "sigmas=(25.0,)" --set "models=('full_nonlocal',)" --paper nonlocal_cnn.full_nonlocal_sigma25_seed0
  python -m experiments.run configs/nonlocal_cnn/denoise.py     # everything at once
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"experiment": "nonlocal_cnn"})
