"""The medium dynamic setting: 100 hosts in 2 clusters (2 zones x 5 racks x 5 hosts each, 30 ms
between the clusters), 40 apps of 3 services, 250 instances, each app submitted to one cluster;
a diurnal load trace with bursts over 96 rounds. Agents trained on a 20-host slice of the same
topology (1 rack per zone, 8 apps), then run on 100 hosts against kube-scheduler's
LeastAllocated and MostAllocated, random, and the untrained policy; 5 seeds. SLO-first weights:
an app over its SLO costs 10, a host 0.25, and hosts should stay under 30 % CPU.

  python -m experiments.run configs/placement/medium.py --paper placement.medium
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "experiment": "placement",
      "scenario": "dynamic",
      "topology": {"clusters": 2, "zones_per_cluster": 2, "racks_per_zone": 5,
                   "hosts_per_rack": 5},
      "workload": {"apps": 40, "instances": 250},
      "weights": {"host": 0.25, "slo": 10.0, "rho_max": 0.3},
      "train": {"racks_per_zone": 1, "apps": 8, "rounds": 48, "iterations": 40},
      "eval": {"seeds": 5, "rounds": 96, "warmup_rounds": 48,
               "methods": ("agents", "prior", "least_allocated", "most_allocated", "random")},
  })
