"""Non-local CNN smoke setting (the demo's row): no training here; the two-stage model starts
from the params trained at sigma 25, seed 0 and kept in papers/artifacts/nonlocal_cnn/ (its
README gives the command) and is evaluated at sigma 25 on one 128 x 128 center crop per held-out
image, against BM3D, non-local means and the noisy input. The rest as the schema in
experiments/nonlocal_cnn.py.

  python -m experiments.run configs/nonlocal_cnn/smoke.py
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "experiment": "nonlocal_cnn",
      "sigmas": (25.0,),
      "models": ("two_stage",),
      "steps": 0,
      "test_size": 128,
      "init_params": "papers/artifacts/nonlocal_cnn",
  })
