"""K-quant smoke setting (the demo's row): digits, 10 IID clients, 15 rounds.

  python -m experiments.run configs/kquant/smoke.py
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.experiment = "kquant"
  config.seed = 0
  config.num_clients = 10
  config.partition = "iid"
  config.rounds = 15
  config.methods = ("float32", "kquant:16", "kquant:4+ef", "sign+ef")
  config.headline_method = "kquant:16"
  return config
