"""The simulated 30-feature fit of the paper setting (200 iterations) on seeds 0-4, without the
real encrypted round trip: how much the seed (batch order, initial weights) and FHE simulation's
sampled bootstrap errors move the accuracy.

  python -m experiments.run configs/fhe/seeds.py
  python -m experiments.run configs/fhe/seeds.py --paper fhe.seeds    # papers/fhe.md
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"experiment": "fhe", "execute_iterations": 0,
                                    "simulate_seeds": 5})
