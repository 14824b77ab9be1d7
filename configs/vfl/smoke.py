"""The demo's row: breast cancer, the three methods, 1 epoch, 1024-bit Paillier (reported
figures use 2048 bits: configs/vfl/breast_cancer.py).

  python -m experiments.run configs/vfl/smoke.py
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "experiment": "vfl",
      "epochs": 1,
      "he": {"key_bits": 1024, "workers": 1},
  })
