"""The demo's row: the variants trained by configs/edge/trace.py (kept as
papers/artifacts/edge/variants.npz), profiled with fewer repeats and shorter gaps, a 4 s trace (2 s idle, 2 s
with both cores busy) and, as static baselines, the two pipelines the profile would pick for an
idle and for a fully loaded machine.

  python -m experiments.run configs/edge/smoke.py
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "experiment": "edge",
      "params_file": "papers/artifacts/edge/variants.npz",
      "profile": {"repeats": 6, "gap_ms": 20.0},
      "trace": {"phases": ((2.0, 0), (2.0, 2))},
      "statics": "predicted",
  })
