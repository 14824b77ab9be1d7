"""FedAvg of a 64-128-10 MLP on scikit-learn digits across 10 IID clients.

  python -m experiments.run configs/fedavg/digits.py
  python -m experiments.run configs/fedavg/digits.py --set partition=dirichlet --set rounds=80
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.experiment = "fedavg"
  config.seed = 0

  # Data and clients.
  config.dataset = "digits"
  config.num_clients = 10
  config.partition = "iid"

  # Model and training.
  config.hidden = (128,)
  config.rounds = 40
  config.local_steps = 10
  config.batch_size = 32
  config.client_learning_rate = 0.05
  config.server_learning_rate = 1.0
  config.centralized_steps = 2000
  return config
