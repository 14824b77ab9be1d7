"""The demo's and CI's row: 2 jax processes on one Ray node, 10 steps, one process killed
(kill -9) and the job restarted from the node's local memory; the final state
must equal, bit for bit, the same computation in one process (2 devices: a sum of two is the
same in any order). No orbax, no node loss (configs/checkpoint/faults.py and tests/checkpoint
cover them). The rest as the schema in experiments/checkpoint.py.

  python -m experiments.run configs/checkpoint/smoke.py
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "experiment": "checkpoint", "nodes": 1, "spare_nodes": 0, "steps": 10, "persist_every": 0,
      "min_step_seconds": 0.03, "faults": ("kill_process",), "reference": "in_process"})
