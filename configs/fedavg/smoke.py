"""The smallest FedAvg setting: the demo's and CI's row (digits, 10 clients, 20 rounds; the
rest as the schema in experiments/fedavg.py).

  python -m experiments.run configs/fedavg/smoke.py
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"experiment": "fedavg", "rounds": 20,
                                    "centralized_steps": 1000})
