"""The exposure task (image-wide gain, gamma and vignette; research/nonlocal_cnn/data.py): the
two-stage model, its ablation and the plain CNN at equal parameters, three training seeds.

  python -m experiments.run configs/nonlocal_cnn/exposure.py --paper nonlocal_cnn.exposure
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "experiment": "nonlocal_cnn",
      "task": "exposure",
      "models": ("two_stage", "two_stage_kv", "two_stage_film", "plain"),
      "num_seeds": 3,
      "steps": 1000,
      "test_size": 96,
      "tile": 96,
  })
