"""The paper setting: 4 denoisers x 4 classifiers trained on noisy digits (16 x 16, sigma 0.25),
frames of 128 images every 50 ms for 16 s under a background-load trace (idle, both cores busy,
idle, one core busy; 4 s each), a 25 ms latency budget; the adaptive pipeline against every
static pipeline on the idle profile's Pareto front.

  python -m experiments.run configs/edge/trace.py --paper edge.trace
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "experiment": "edge",
  })
