"""The demo's row: 4 hosts, 2 apps of 2 services, 6 instances, static load; 10 PPO updates, then
the agents against the MILP optimum on 3 seeds (too little training to mean anything: the row
shows the pipeline end to end).

  python -m experiments.run configs/placement/smoke.py
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "experiment": "placement",
      "topology": {"racks_per_zone": 2, "hosts_per_rack": 2},
      "workload": {"apps": 2, "services_per_app": 2, "instances": 6},
      "train": {"iterations": 10, "envs": 8, "rounds": 12, "pool": 16},
      "eval": {"seeds": 3, "rounds": 12},
  })
