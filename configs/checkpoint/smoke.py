"""The demo's and CI's row: one node x 2 workers, 8 steps, one worker killed (kill -9) and
restored from the node's local memory by its warm spare; both jobs must end bit for bit on the
single-process reference. No node failure (configs/checkpoint/faults.py and tests/checkpoint
cover it). The rest as the schema in experiments/checkpoint.py.

  python -m experiments.run configs/checkpoint/smoke.py
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "experiment": "checkpoint", "num_agents": 1, "steps": 8, "persist_every": 4,
      "min_step_seconds": 0.05, "worker_failures": 1, "hung_workers": 0, "agent_failures": 0})
