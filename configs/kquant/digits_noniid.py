"""K-quant on digits, 100 non-IID clients (Dirichlet alpha = 0.1): the issue's goal setting.

  python -m experiments.run configs/kquant/digits_noniid.py
  python -m experiments.run configs/kquant/digits_noniid.py --set dirichlet_alpha=1.0
  python -m experiments.run configs/kquant/digits_noniid.py --set num_clients=10
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.experiment = "kquant"
  config.seed = 0

  # Data and clients.
  config.dataset = "digits"
  config.num_clients = 100
  config.partition = "dirichlet"
  config.dirichlet_alpha = 0.1

  # Training (as configs/fedavg/digits.py).
  config.rounds = 60
  config.local_steps = 10
  config.batch_size = 32

  # Compression: every method of the comparison.
  config.methods = ("float32", "kquant:256", "kquant:16", "kquant:16+ef", "kquant:4",
                    "kquant:4+ef", "kquant:2", "kquant:2+ef", "qsgd:4", "terngrad",
                    "terngrad+ef", "sign", "sign+ef")
  config.headline_method = "kquant:16"
  config.range_policy = "client_minmax"
  config.bucket_size = 256
  config.target_accuracy = 0.9
  return config
