"""The demo's row: the cartpole setting cut to 4,096 env steps (one evaluation, at the end) (CartPole is
not solved yet; the row shows the greedy return learned so far against the untrained policy's).

  python -m experiments.run configs/rl_cache/smoke.py
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "experiment": "rl_cache",
      "total_env_steps": 4_096,
  })
