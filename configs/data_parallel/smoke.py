"""Data-parallel least squares on all devices vs one device (the multi-process check); every
value is the schema's default (experiments/data_parallel.py: config_schema).

  python -m experiments.run configs/data_parallel/smoke.py --cpu-devices 4
  python -m experiments.run configs/data_parallel/smoke.py --processes 2 --cpu-devices 2
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"experiment": "data_parallel"})
