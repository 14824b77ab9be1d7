"""The paper setting, the schema's defaults (experiments/checkpoint.py: config_schema): 2 jax
processes on 2 nodes of Ray's test cluster plus 2 spare nodes, 24 steps, a snapshot every step,
orbax every 4; faults in turn: kill -9 of a process, a hung process, a lost node (restore from
the peer's replica), a corrupted newest orbax step and then a lost node with its peer (restore
from orbax, the step before the corrupted one). Compared bit for bit with the fault-free job.

  python -m experiments.run configs/checkpoint/faults.py
  # the same, kept as papers/results/checkpoint.faults.json, its table in papers/checkpoint.md:
  python -m experiments.run configs/checkpoint/faults.py --paper checkpoint.faults
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"experiment": "checkpoint"})
