"""The demo's row: the cartpole setting cut to 16,384 env steps (CartPole is not solved yet; the
row shows the greedy return learned so far against the untrained policy's).

  python -m experiments.run configs/rl_cache/smoke.py
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "experiment": "rl_cache",
      "total_env_steps": 16_384,
      "eval_every": 8_192,
  })
