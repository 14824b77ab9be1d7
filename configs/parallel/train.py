"""The paper's training-equality run: both models x three strategy sets, 100 Adam steps each.

  python -m experiments.run configs/parallel/train.py --cpu-devices 8
  python -m experiments.parallel --paper runs/parallel/<run>   # table into papers/parallel.md
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.experiment = "parallel"
  config.seed = 0
  config.steps = 100
  config.bench_pairs = 0
  return config
