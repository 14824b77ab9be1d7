"""The smallest FedAvg setting: the demo's and CI's row (digits, 10 clients, 20 rounds).

  python -m experiments.run configs/fedavg/smoke.py
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.experiment = "fedavg"
  config.seed = 0
  config.num_clients = 10
  config.rounds = 20
  config.local_steps = 10
  config.centralized_steps = 1000
  return config
