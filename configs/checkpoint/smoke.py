"""Checkpoint smoke setting (the demo's row): 2 nodes x 2 workers, 12 steps, one worker killed,
one node killed after its newest checkpoint was corrupted.

  python -m experiments.run configs/checkpoint/smoke.py
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.experiment = "checkpoint"
  config.seed = 0
  config.steps = 12
  config.persist_every = 3
  config.min_step_seconds = 0.1
  config.worker_failures = 1
  config.agent_failures = 1
  return config
