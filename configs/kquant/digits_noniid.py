"""K-quant on digits, 100 non-IID clients (Dirichlet alpha = 0.1), 60 rounds, every method: the
page's goal setting, which is the schema's defaults (experiments/kquant.py: config_schema); this
file repeats none of them. The page's digits tables (papers/kquant.md):

  python -m experiments.run configs/kquant/digits_noniid.py --paper kquant.digits_100_a0.1
  python -m experiments.run configs/kquant/digits_noniid.py --set dirichlet_alpha=1.0 --paper kquant.digits_100_a1.0
  python -m experiments.run configs/kquant/digits_noniid.py --set partition=iid --paper kquant.digits_100_iid
  python -m experiments.run configs/kquant/digits_noniid.py --set num_clients=10 --paper kquant.digits_10_a0.1
  python -m experiments.run configs/kquant/digits_noniid.py --set num_clients=10 --set dirichlet_alpha=1.0 --paper kquant.digits_10_a1.0
  python -m experiments.run configs/kquant/digits_noniid.py --set num_clients=10 --set partition=iid --paper kquant.digits_10_iid
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"experiment": "kquant"})
