"""The paper's training-equality run: both models x three strategy sets, 100 Adam steps each on a
(2, 4) mesh: the schema's defaults (experiments/parallel.py: config_schema), not repeated here.

  python -m experiments.run configs/parallel/train.py --cpu-devices 8
  python -m experiments.run configs/parallel/train.py --cpu-devices 8 --paper parallel.train
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"experiment": "parallel"})
