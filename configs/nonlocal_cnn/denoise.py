"""The paper's denoising evidence: (a) two-stage and (b) plain at equal parameters, three training
seeds (0, 1, 2), 1000 Adam steps of 16 patches of 48 x 48 per model, one run per noise level;
held-out 256 x 256 center crops denoised as 128 x 128 tiles, against BM3D, non-local means and
the noisy input. The rest as the schema (experiments/nonlocal_cnn.py: config_schema). Each run
takes about 20 minutes on 2 CPU cores (papers/nonlocal_cnn.md gives each kept run's time):

  python -m experiments.run configs/nonlocal_cnn/denoise.py --set "sigmas=(15.0,)" --paper nonlocal_cnn.denoise_sigma15
  python -m experiments.run configs/nonlocal_cnn/denoise.py --set "sigmas=(25.0,)" --paper nonlocal_cnn.denoise_sigma25
  python -m experiments.run configs/nonlocal_cnn/denoise.py --set "sigmas=(50.0,)" --paper nonlocal_cnn.denoise_sigma50

The two-stage params kept in papers/artifacts/nonlocal_cnn/ (2000 steps at sigma 25, seed 0; its
README) and their kept evaluation on papers/nonlocal_cnn.md:

  python -m experiments.run configs/nonlocal_cnn/denoise.py --set "sigmas=(25.0,)" --set "models=('two_stage',)" --set num_seeds=1 --set steps=2000 --set save_params=True
  python -m experiments.run configs/nonlocal_cnn/denoise.py --set "sigmas=(25.0,)" --set "models=('two_stage',)" --set num_seeds=1 --set steps=0 --set init_params=papers/artifacts/nonlocal_cnn --paper nonlocal_cnn.sigma25_pretrained
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "experiment": "nonlocal_cnn",
      "models": ("two_stage", "plain"),
      "num_seeds": 3,
      "steps": 1000,
  })
