"""K-quant on the seeded synthetic set (20 000 x 64, 10 classes), 100 non-IID clients.

  python -m experiments.run configs/kquant/synthetic.py
  python -m experiments.run configs/kquant/synthetic.py --set num_clients=10 --set partition=iid
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.experiment = "kquant"
  config.seed = 0
  config.dataset = "synthetic"
  config.num_clients = 100
  config.partition = "dirichlet"
  config.dirichlet_alpha = 0.1
  config.rounds = 60
  config.methods = ("float32", "kquant:256", "kquant:16", "kquant:16+ef", "kquant:4",
                    "kquant:4+ef", "kquant:2", "kquant:2+ef", "qsgd:4", "terngrad",
                    "terngrad+ef", "sign", "sign+ef")
  config.headline_method = "kquant:16"
  config.target_accuracy = 0.7
  return config
