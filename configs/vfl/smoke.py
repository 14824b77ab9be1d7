"""The demo's row: breast cancer, the three methods from the same initial weights, 2 training
batches of 64 and 1 test batch, 1024-bit Paillier (reported figures: configs/vfl/breast_cancer.py,
2048 bits, 6 epochs, 3 seeds).

  python -m experiments.run configs/vfl/smoke.py
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "experiment": "vfl",
      "epochs": 1,
      "max_train_batches": 2,
      "max_eval_batches": 1,
      "he": {"key_bits": 1024, "workers": 1},
  })
