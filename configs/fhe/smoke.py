"""The demo's row: FHE-simulated encrypted training on all 30 features, 40 iterations, against
clear logistic regression; no real encryption (key generation alone would take the row's time
budget; the paper setting, configs/fhe/breast_cancer.py, runs it).

  python -m experiments.run configs/fhe/smoke.py
  python -m experiments.run configs/fhe/smoke.py --set execute_iterations=2 \
      --set execute_features=2     # plus a real encrypted round trip, 2 features x 2 iterations
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "experiment": "fhe",
      "execute_iterations": 0,
      "simulate_iterations": 40,
      "eval_every": 5,
      "max_gap_points": 10.0,  # 40 simulated iterations are not the paper setting
  })
