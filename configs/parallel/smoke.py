"""Parallel smoke setting (the demo's row): the MLP under Megatron tensor parallelism on the
schema's (2, 4) mesh, 50 Adam steps against one-device training, and one sampled rank-2 layout
pair per benchmark mesh (4 pairs) for the bytes headline: ours vs XLA's resharding. The rest as
the schema in experiments/parallel.py (the paper's run is configs/parallel/train.py).

  python -m experiments.run configs/parallel/smoke.py --cpu-devices 8
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"experiment": "parallel", "models": ("mlp",),
                                    "strategies": ("megatron",), "steps": 50, "bench_pairs": 1})
