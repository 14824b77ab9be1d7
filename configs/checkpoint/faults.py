"""The paper setting: 2 nodes x 2 workers, 40 steps, persist every 5; two workers killed, one
hung, one node killed after its newest checkpoint was corrupted.

  python -m experiments.run configs/checkpoint/faults.py
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.experiment = "checkpoint"
  config.seed = 0
  config.steps = 40
  config.persist_every = 5
  config.min_step_seconds = 0.1
  config.worker_failures = 2
  config.hung_workers = 1
  config.agent_failures = 1
  return config
