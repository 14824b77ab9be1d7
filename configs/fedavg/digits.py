"""FedAvg of a 64-128-10 MLP on scikit-learn digits across 10 IID clients, 40 rounds: the
schema's defaults (experiments/fedavg.py: config_schema), which this file does not repeat.

  python -m experiments.run configs/fedavg/digits.py
  python -m experiments.run configs/fedavg/digits.py --paper fedavg.digits    # papers/fedavg.md
  python -m experiments.run configs/fedavg/digits.py --set partition=dirichlet --set rounds=80
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"experiment": "fedavg"})
