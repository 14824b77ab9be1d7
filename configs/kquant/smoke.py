"""K-quant's demo row: K = 16 (4-bit indices; the row's note gives the exact uplink ratio) against
float32 FedAvg on digits, 10 IID clients, 8 rounds; the rest as the schema (experiments/kquant.py).
The page's full comparison is configs/kquant/digits_noniid.py.

  python -m experiments.run configs/kquant/smoke.py
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"experiment": "kquant", "num_clients": 10, "partition": "iid",
                                    "rounds": 8, "methods": ("float32", "kquant:16")})
