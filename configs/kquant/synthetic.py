"""K-quant on the seeded synthetic set (20,000 x 64, 10 classes), target accuracy 0.7; the rest
as the schema (experiments/kquant.py: 100 clients, Dirichlet alpha = 0.1, 60 rounds, every
method). The page's synthetic tables (papers/kquant.md):

  python -m experiments.run configs/kquant/synthetic.py --paper kquant.synthetic_100_a0.1
  python -m experiments.run configs/kquant/synthetic.py --set dirichlet_alpha=1.0 --paper kquant.synthetic_100_a1.0
  python -m experiments.run configs/kquant/synthetic.py --set partition=iid --paper kquant.synthetic_100_iid
  python -m experiments.run configs/kquant/synthetic.py --set num_clients=10 --paper kquant.synthetic_10_a0.1
  python -m experiments.run configs/kquant/synthetic.py --set num_clients=10 --set dirichlet_alpha=1.0 --paper kquant.synthetic_10_a1.0
  python -m experiments.run configs/kquant/synthetic.py --set num_clients=10 --set partition=iid --paper kquant.synthetic_10_iid
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"experiment": "kquant", "dataset": "synthetic",
                                    "target_accuracy": 0.7})
