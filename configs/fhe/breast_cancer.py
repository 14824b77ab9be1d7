"""The paper setting: breast-cancer diagnosis, real encrypted training of 20 iterations on the 4
features the client selects, simulated encrypted training of 200 iterations on all 30: the
schema's defaults (experiments/fhe.py: config_schema), which this file does not repeat.

  python -m experiments.run configs/fhe/breast_cancer.py
  python -m experiments.run configs/fhe/breast_cancer.py --paper fhe.breast_cancer  # papers/fhe.md
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"experiment": "fhe"})
