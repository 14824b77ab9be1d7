"""Parallel smoke setting (the demo's row): both models under the three strategy sets for 8 steps
on the schema's (2, 4) mesh, and 12 sampled rank-2 layout pairs per benchmark mesh for the bytes
headline; the rest as the schema in experiments/parallel.py.

  python -m experiments.run configs/parallel/smoke.py --cpu-devices 8
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"experiment": "parallel", "steps": 8, "bench_pairs": 12})
