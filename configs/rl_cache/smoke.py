"""The demo's row: the cartpole setting cut to 4,096 env steps and one evaluation (CartPole is
not solved yet; the row shows the greedy return learned so far against the untrained policy's).

  python -m experiments.run configs/rl_cache/smoke.py
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "experiment": "rl_cache",
      "total_env_steps": 4_096,
      "eval_every": 4_096,
  })
