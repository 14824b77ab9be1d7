"""The two-process run: the parties as two OS processes talking gRPC with mutual TLS (process 0
active, process 1 passive), PSI then the encrypted protocol; breast cancer, 2 epochs, 1024 bits.

  python -m experiments.run configs/vfl/grpc.py --processes 2
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "experiment": "vfl",
      "methods": ("encrypted",),
      "epochs": 2,
      "he": {"key_bits": 1024, "workers": 1},
  })
