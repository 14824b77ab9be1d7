"""The synthetic workload: 20,000 samples, 20 active + 200 passive features (each party holding
a random 90 %), one epoch of each method from the same initial weights, AUC on 16 test batches
(1,024 rows); 2048-bit keys.

  python -m experiments.run configs/vfl/synthetic.py --paper vfl.synthetic
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "experiment": "vfl",
      "dataset": "synthetic",
      "epochs": 1,
      "max_eval_batches": 16,
  })
