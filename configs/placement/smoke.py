"""The demo's row: the agents trained by configs/placement/small.py (kept as
papers/artifacts/placement/agents_small.npz; shared parameters run on any number of hosts),
on 3 small static problems of 4 hosts, 2 apps of 2 services and 6 instances, against the MILP
optimum and the baselines. No training here (train.iterations 0).

  python -m experiments.run configs/placement/smoke.py
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "experiment": "placement",
      "topology": {"hosts_per_rack": 2},  # 2 racks of 2
      "workload": {"apps": 2, "services_per_app": 2, "instances": 6},
      "agent": {"reward": "difference", "reward_scope": "team", "discount": 0.99,
                "prior_latency": 0.0, "prior_scale": 32.0},
      "weights": {"migration": 0.0},
      "train": {"iterations": 0, "envs": 8, "rounds": 24, "pool": 16,
                "params_file": "papers/artifacts/placement/agents_small.npz"},
      "eval": {"seeds": 3, "rounds": 48},
  })
