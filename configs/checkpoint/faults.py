"""The paper setting, the schema's defaults (experiments/checkpoint.py: config_schema): 2 nodes x
2 workers, 40 steps, persist every 5; two workers killed, one hung, one node killed after its
newest checkpoint was corrupted.

  python -m experiments.run configs/checkpoint/faults.py
  # the same, kept as papers/results/checkpoint.faults.json, its table in papers/checkpoint.md:
  python -m experiments.run configs/checkpoint/faults.py --paper checkpoint.faults
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"experiment": "checkpoint"})
