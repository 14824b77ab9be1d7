"""The paper setting on breast cancer: 10 active / 20 passive features, 2048-bit Paillier, the
three methods on seeds 0, 1, 2 (every seed listed in the kept result).

  python -m experiments.run configs/vfl/breast_cancer.py --paper vfl.breast_cancer
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "experiment": "vfl",
      "num_seeds": 3,
  })
