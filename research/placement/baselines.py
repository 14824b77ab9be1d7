"""Baselines: kube-scheduler's scoring strategies, random placement, and the exact static optimum.

- `kube_schedule`: Kubernetes' default scheduler (one per cluster: an app with a home cluster
  goes only to that cluster's hosts), one pod at a time in order: filter the hosts whose free
  requests (CPU, memory) and pod slots fit the pod (NodeResourcesFit), score them
  with `LeastAllocated` (spread: the mean over CPU and memory of the free fraction after
  placing) or `MostAllocated` (bin-pack: the mean allocated fraction), take the best, ties
  broken at random (as kube-scheduler does). Running pods are never moved: the placement is
  static. It sees requests only, not actual load or traffic.
- `random_schedule`: each instance on a uniformly random host of its home cluster where it fits
  ("instances first handed to some agents": the agents' starting point).
- `milp_optimum`: the exact optimum of the static placement problem (fixed replicas, load 1)
  with scipy's MILP solver (HiGHS): minimize host x active hosts + network x network cost +
  overload x sum(max(0, rho - rho_max)), the linear part of cluster.terms' cost, subject to
  requests and pod slots within capacity. The network term is linearized exactly through the
  latency hierarchy: for a pair of replicas that call each other, latency = inter-cluster
  latency minus, per level (cluster, zone, rack, host), the step to the next level times "both
  in one group of that level", and that indicator is bounded by both replicas' membership of
  the group (minimization pushes it to its bound). SLO violations are not linear; they are
  checked at the optimum by the caller.

Placement functions are numpy and run once per problem (at load, outside jit).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import scipy.optimize
import scipy.sparse

from research.placement import cluster

STRATEGIES = ("least_allocated", "most_allocated")


def running_instances(problem: cluster.Problem) -> np.ndarray:
  """The instance ids of the initial replicas, in app, service, replica order."""
  num_r = problem.max_replica_slots
  replicas = np.asarray(problem.initial_replicas)
  return np.asarray([s * num_r + r for s in range(problem.num_services)
                     for r in range(int(replicas[s]))], np.int32)


def to_placement(problem: cluster.Problem, owner: dict[int, int] | np.ndarray,
                 slots: int) -> cluster.Placement:
  """The inventories of an instance -> host assignment (`owner[i]` for every running id)."""
  inventory = np.full((problem.num_hosts, slots), -1, np.int32)
  count = np.zeros(problem.num_hosts, int)
  for i, h in (owner.items() if isinstance(owner, dict) else enumerate(owner)):
    if h < 0:
      continue
    if count[h] >= slots:
      raise cluster.SpecError(f"host {h} would hold more than slots_per_host={slots} instances")
    inventory[h, count[h]] = i
    count[h] += 1
  return cluster.Placement(jnp.asarray(inventory))


def _requests(problem: cluster.Problem):
  """(instance id, cpu request, mem request, hosts of its home cluster (bool (H,))) per running
  instance."""
  num_r = problem.max_replica_slots
  ids = running_instances(problem)
  svc = ids // num_r
  home = np.asarray(problem.svc_home_cluster)[svc]
  host_cluster = np.asarray(problem.host_cluster)
  allowed = (home[:, None] < 0) | (host_cluster[None, :] == home[:, None])
  return (ids, np.asarray(problem.svc_cpu_request)[svc], np.asarray(problem.svc_mem_request)[svc],
          allowed)


def _schedule(problem: cluster.Problem, slots: int, choose) -> cluster.Placement:
  """One pod at a time, in order: the hosts of its home cluster where its requests and a pod slot
  still fit, then `choose(fits (H,) bool, used_cpu, used_mem, cpu, mem) -> host`."""
  cap_cpu, cap_mem = np.asarray(problem.host_cpu, float), np.asarray(problem.host_mem, float)
  used_cpu, used_mem = np.zeros_like(cap_cpu), np.zeros_like(cap_mem)
  count = np.zeros(problem.num_hosts, int)
  owner = {}
  for i, cpu, mem, allowed in zip(*_requests(problem)):
    fits = (allowed & (used_cpu + cpu <= cap_cpu + 1e-9) & (used_mem + mem <= cap_mem + 1e-9) &
            (count < slots))
    if not fits.any():
      raise cluster.SpecError(f"instance {i}: unschedulable (no host has cpu {cpu}, mem {mem} "
                              "and a pod slot free); the workload is larger than the cluster")
    h = int(choose(fits, used_cpu, used_mem, cpu, mem))
    owner[int(i)] = h
    used_cpu[h] += cpu
    used_mem[h] += mem
    count[h] += 1
  return to_placement(problem, owner, slots)


def kube_schedule(problem: cluster.Problem, strategy: str, slots: int,
                  seed: int) -> cluster.Placement:
  """kube-scheduler's filter and score (module docstring), pods in order."""
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy {strategy!r}: expected one of {STRATEGIES}")
  rng = np.random.default_rng(seed)
  cap_cpu, cap_mem = np.asarray(problem.host_cpu, float), np.asarray(problem.host_mem, float)

  def score(fits, used_cpu, used_mem, cpu, mem):
    allocated = 0.5 * ((used_cpu + cpu) / cap_cpu + (used_mem + mem) / cap_mem)
    value = np.where(fits, 1.0 - allocated if strategy == "least_allocated" else allocated,
                     -np.inf)
    return rng.choice(np.flatnonzero(value >= value.max() - 1e-12))

  return _schedule(problem, slots, score)


def random_schedule(problem: cluster.Problem, slots: int, seed: int) -> cluster.Placement:
  """Each running instance on a random host of its home cluster where it still fits."""
  rng = np.random.default_rng(seed)
  return _schedule(problem, slots, lambda fits, *_: rng.choice(np.flatnonzero(fits)))


def milp_optimum(problem: cluster.Problem, weights: cluster.Weights, slots: int,
                 time_limit_s: float = 60.0) -> tuple[cluster.Placement, dict]:
  """The exact static optimum (module docstring) and the solver's report."""
  ids, cpu, mem, allowed = _requests(problem)
  if not allowed.all():
    raise ValueError("milp_optimum: apps with a home cluster are not supported (the static "
                     "problem is solved over every host)")
  num_r = problem.max_replica_slots
  svc = ids // num_r
  use = np.asarray(problem.svc_cpu_usage)[svc] / np.asarray(problem.initial_replicas)[svc]
  num_i, num_h = len(ids), problem.num_hosts
  cap_cpu, cap_mem = np.asarray(problem.host_cpu, float), np.asarray(problem.host_mem, float)
  lat = np.asarray(problem.level_latency, float)
  groups = [np.arange(num_h), np.asarray(problem.host_rack), np.asarray(problem.host_zone),
            np.asarray(problem.host_cluster)]  # levels host, rack, zone, cluster
  steps = [lat[1] - lat[0], lat[2] - lat[1], lat[3] - lat[2], lat[4] - lat[3]]
  position = {int(i): j for j, i in enumerate(ids)}
  replicas = np.asarray(problem.initial_replicas)
  pairs = []  # (instance a, instance b, weight)
  for c in range(len(np.asarray(problem.call_src))):
    s, d = int(problem.call_src[c]), int(problem.call_dst[c])
    w = float(problem.call_rate[c]) / (replicas[s] * replicas[d])
    for ra in range(replicas[s]):
      for rb in range(replicas[d]):
        pairs.append((position[s * num_r + ra], position[d * num_r + rb], w))
  # variables: x (I*H), y (H), o (H overload), then w per (pair, level, group)
  x0, y0, o0 = 0, num_i * num_h, num_i * num_h + num_h
  w_index, nvar = [], o0 + num_h
  for p in range(len(pairs)):
    for level, g in enumerate(groups):
      for group in np.unique(g):
        w_index.append((p, level, int(group), nvar))
        nvar += 1
  cost = np.zeros(nvar)
  cost[y0:y0 + num_h] = weights.host
  cost[o0:o0 + num_h] = weights.overload
  constant = weights.network * lat[4] * sum(w for _, _, w in pairs)
  for p, level, _, v in w_index:
    cost[v] = -weights.network * pairs[p][2] * steps[level]
  rows, cols, vals, lo, hi = [], [], [], [], []
  row = 0

  def add(entries, lower, upper):
    nonlocal row
    for col, val in entries:
      rows.append(row)
      cols.append(col)
      vals.append(val)
    lo.append(lower)
    hi.append(upper)
    row += 1

  for i in range(num_i):  # each instance on exactly one host
    add([(x0 + i * num_h + h, 1.0) for h in range(num_h)], 1.0, 1.0)
  for h in range(num_h):
    add([(x0 + i * num_h + h, cpu[i]) for i in range(num_i)] + [(y0 + h, -cap_cpu[h])],
        -np.inf, 0.0)
    add([(x0 + i * num_h + h, mem[i]) for i in range(num_i)] + [(y0 + h, -cap_mem[h])],
        -np.inf, 0.0)
    add([(x0 + i * num_h + h, 1.0) for i in range(num_i)] + [(y0 + h, -float(slots))],
        -np.inf, 0.0)
    # o_h >= sum(use x) / cap - rho_max
    add([(x0 + i * num_h + h, use[i] / cap_cpu[h]) for i in range(num_i)] + [(o0 + h, -1.0)],
        -np.inf, weights.rho_max)
  for p, level, group, v in w_index:  # w <= membership of each end
    members = np.flatnonzero(groups[level] == group)
    for end in pairs[p][:2]:
      add([(v, 1.0)] + [(x0 + end * num_h + h, -1.0) for h in members], -np.inf, 0.0)
  racks = np.asarray(problem.host_rack)
  for h in range(num_h - 1):  # symmetry: hosts of a rack are interchangeable, use them in order
    if racks[h] == racks[h + 1]:
      add([(y0 + h, 1.0), (y0 + h + 1, -1.0)], 0.0, np.inf)
  matrix = scipy.sparse.csr_array((vals, (rows, cols)), shape=(row, nvar))
  integrality = np.zeros(nvar)
  integrality[:o0] = 1
  upper = np.ones(nvar)
  upper[o0:o0 + num_h] = np.inf
  result = scipy.optimize.milp(
      cost, constraints=scipy.optimize.LinearConstraint(matrix, lo, hi),
      integrality=integrality, bounds=scipy.optimize.Bounds(np.zeros(nvar), upper),
      options={"time_limit": time_limit_s, "mip_rel_gap": 0.0})
  if result.x is None:
    raise RuntimeError(f"MILP found no placement: {result.message}")
  assign = result.x[:num_i * num_h].reshape(num_i, num_h).argmax(axis=1)
  placement = to_placement(problem, {int(i): int(h) for i, h in zip(ids, assign)}, slots)
  report = {"objective": float(result.fun + constant), "optimal": bool(result.status == 0),
            "mip_gap": float(getattr(result, "mip_gap", 0.0) or 0.0),
            "message": str(result.message), "variables": int(nvar), "constraints": int(row)}
  return placement, report
