"""The paper setting: 8 actors, a cache tree of depth 2 (root and 2 leaves), DQN on CartPole-v1
until the greedy return over 100 episodes reaches 475 (at most 200,000 env steps).

  python -m experiments.run configs/rl_cache/cartpole.py --paper rl_cache.cartpole
  python -m experiments.run configs/rl_cache/cartpole.py --set backend=processes --paper rl_cache.cartpole_processes
  python -m experiments.run configs/rl_cache/cartpole.py --set backend=ray --paper rl_cache.cartpole_ray
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "experiment": "rl_cache",
  })
