"""A vectorized cluster simulator: hosts, a network hierarchy, service graphs, load, objective.

The model (everything here is data or a pure function; the simulator steps live in exchange.py):

- Hosts have CPU (cores) and memory (GiB) capacity and sit in a hierarchy cluster > zone > rack.
  The one-way latency between two instances is that of the lowest level the two hosts share
  (`LEVELS`: same host, rack, zone, cluster, or two clusters), so no H x H matrix is stored and a
  latency is O(1) at any scale. Several clusters are several distributed systems: their hosts
  are joined only through gateway links (`cluster_links`), at inter-cluster latency.
- Each host runs one agent. An agent talks only to its neighbours (`Problem.neighbours`, a
  symmetric graph of fixed padded degree: every host of its rack (or a ring in the rack,
  `rack_links`), the same position in the next rack and zone, gateways between linked
  clusters). It must be connected: instances travel between any two hosts by successive
  exchanges.
- An application is a service graph: services with replicas (instances), and calls between
  services (`per_request` calls of the callee per request of the app). A replica reserves its
  service's `cpu_request` and `mem_request` on its host (the capacity that is never exceeded,
  as Kubernetes' requests); its actual CPU use is the service's `cpu_usage` (cores at load 1,
  shared evenly by the replicas) times the app's load, which a seeded trace moves over time
  (diurnal plus bursts, `load_trace`).
- Latency of one request of app a at time t (M/M/1-like, the usual first-order model):
    sum over services s of  base_ms[s] * mean over s's replicas of 1 / max(1 - rho(host), EPS)
  + sum over calls c    of  per_request[c] * mean over replica pairs of latency(host_i, host_j)
  where rho is the host's actual CPU use over its capacity. The app violates its SLO when this
  exceeds `slo_ms`.
- Objective terms: SLO violations (apps over their SLO), active hosts (hosts with >= 1
  instance), network cost (sum over calls of traffic x latency, load-weighted), overload (sum
  over hosts of max(0, rho - rho_max)), migrations. `host_costs` splits the weighted sum over
  hosts exactly (each host pays for its instances' share), which is what gives each agent a
  local reward.

Bad input (an instance larger than every host, a negative demand, a call to an unknown service,
a disconnected topology) is refused where it enters: `build_topology`, `check_apps`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

LEVELS = ("host", "rack", "zone", "cluster", "inter_cluster")
EPS = 0.05  # the least 1 - rho a queue sees: a saturated host multiplies service time by 20


# -- specs (what a config describes) ------------------------------------------------------------


RACK_LINKS = ("clique", "ring")


@dataclasses.dataclass(frozen=True)
class TopologySpec:
  """Identical hosts in a regular hierarchy; latencies (ms, one way) per level of `LEVELS`."""

  clusters: int = 1
  zones_per_cluster: int = 1
  racks_per_zone: int = 2
  hosts_per_rack: int = 4
  cpu: float = 8.0
  mem: float = 32.0
  latency_ms: tuple[float, ...] = (0.02, 0.1, 0.5, 2.0, 30.0)
  # Pairs of clusters joined by gateway hosts (the first host of each rack); None: a ring over
  # the clusters (0-1, 1-2, ...). A cluster no link reaches makes the topology disconnected.
  cluster_links: tuple[tuple[int, int], ...] | None = None
  # The neighbours inside a rack: "clique", every host of the rack (one top-of-rack switch
  # joins them); "ring", the two next to it (a constant degree whatever the rack size).
  rack_links: str = "clique"

  @property
  def num_hosts(self) -> int:
    return self.clusters * self.zones_per_cluster * self.racks_per_zone * self.hosts_per_rack


@dataclasses.dataclass(frozen=True)
class ServiceSpec:
  name: str
  cpu_request: float  # cores reserved per replica
  mem_request: float  # GiB reserved per replica
  cpu_usage: float  # cores the whole service uses at load 1 (shared by its replicas)
  base_ms: float  # time one request spends in the service on an idle host
  replicas: int = 1
  min_replicas: int = 1
  max_replicas: int = 4


@dataclasses.dataclass(frozen=True)
class AppSpec:
  name: str
  slo_ms: float
  services: tuple[ServiceSpec, ...]
  calls: tuple[tuple[str, str, float], ...]  # (caller, callee, calls per request)
  # the cluster the app is submitted to (its instances start there; each cluster's scheduler
  # places only its own apps); -1: any cluster
  home_cluster: int = -1


# -- the flattened problem (arrays; a pytree that jit and vmap take) ---------------------------


class Problem(NamedTuple):
  """Static arrays of one cluster and workload. H hosts, K neighbour slots, S services, R replica
  slots per service, I = S * R instance ids, C calls, P call partners per service, A apps."""

  host_cpu: jax.Array  # (H,) f32 cores
  host_mem: jax.Array  # (H,) f32 GiB
  host_rack: jax.Array  # (H,) i32 global rack id
  host_zone: jax.Array  # (H,) i32 global zone id
  host_cluster: jax.Array  # (H,) i32
  level_latency: jax.Array  # (5,) f32 ms, per LEVELS
  neighbours: jax.Array  # (H, K) i32 host ids, -1 = no neighbour in this slot
  svc_app: jax.Array  # (S,) i32
  svc_cpu_request: jax.Array  # (S,) f32
  svc_mem_request: jax.Array  # (S,) f32
  svc_cpu_usage: jax.Array  # (S,) f32
  svc_base_ms: jax.Array  # (S,) f32
  svc_min_replicas: jax.Array  # (S,) i32
  svc_max_replicas: jax.Array  # (S,) i32
  svc_peer: jax.Array  # (S, P) i32 services s calls or is called by, -1 = none
  svc_peer_rate: jax.Array  # (S, P) f32 calls per request on that edge
  call_src: jax.Array  # (C,) i32 service
  call_dst: jax.Array  # (C,) i32 service
  call_rate: jax.Array  # (C,) f32
  app_slo_ms: jax.Array  # (A,) f32
  initial_replicas: jax.Array  # (S,) i32
  svc_home_cluster: jax.Array  # (S,) i32 the app's home cluster, -1 = any
  svc_slot_open: jax.Array  # (S, R) bool: replica slot r < the service's max_replicas

  @property
  def num_hosts(self) -> int:
    return self.host_cpu.shape[-1]

  @property
  def num_services(self) -> int:
    return self.svc_app.shape[-1]

  @property
  def max_replica_slots(self) -> int:
    return self.svc_slot_open.shape[-1]

  @property
  def num_apps(self) -> int:
    return self.app_slo_ms.shape[-1]


def instance_service(num_services: int, replica_slots: int) -> jax.Array:
  """Instance id i is replica slot i % R of service i // R."""
  return jnp.repeat(jnp.arange(num_services, dtype=jnp.int32), replica_slots)


# -- building and checking ----------------------------------------------------------------------


class SpecError(ValueError):
  """A topology or workload that cannot be simulated; the message names the field."""


def build_topology(spec: TopologySpec) -> dict[str, np.ndarray]:
  """Host arrays and the neighbour graph of `spec`; refuses a disconnected one."""
  for field in ("clusters", "zones_per_cluster", "racks_per_zone", "hosts_per_rack"):
    if getattr(spec, field) < 1:
      raise SpecError(f"topology.{field}: got {getattr(spec, field)}, expected an int >= 1")
  for field in ("cpu", "mem"):
    if not getattr(spec, field) > 0:
      raise SpecError(f"topology.{field}: got {getattr(spec, field)}, expected > 0")
  if spec.rack_links not in RACK_LINKS:
    raise SpecError(f"topology.rack_links: got {spec.rack_links!r}, expected one of {RACK_LINKS}")
  latency = tuple(float(x) for x in spec.latency_ms)
  if len(latency) != len(LEVELS) or any(x < 0 for x in latency) or list(latency) != sorted(latency):
    raise SpecError(f"topology.latency_ms: got {spec.latency_ms}, expected {len(LEVELS)} "
                    f"non-negative, non-decreasing values for levels {LEVELS}")
  c, z, r, n = spec.clusters, spec.zones_per_cluster, spec.racks_per_zone, spec.hosts_per_rack
  index = np.arange(spec.num_hosts).reshape(c, z, r, n)
  edges: set[tuple[int, int]] = set()

  def link(a, b):
    if a != b:
      edges.add((min(a, b), max(a, b)))

  for ci in range(c):
    for zi in range(z):
      for ri in range(r):
        for p in range(n):
          h = index[ci, zi, ri, p]
          for q in (range(n) if spec.rack_links == "clique" else ((p + 1) % n,)):
            link(h, index[ci, zi, ri, q])  # in the rack
          link(h, index[ci, zi, (ri + 1) % r, p])  # same position, next rack of the zone
          link(h, index[ci, (zi + 1) % z, ri, p])  # same position, next zone of the cluster
  links = (tuple((i, i + 1) for i in range(c - 1)) + (((c - 1, 0),) if c > 2 else ())
           if spec.cluster_links is None else tuple(tuple(p) for p in spec.cluster_links))
  for pair in links:
    if len(pair) != 2 or not all(isinstance(x, (int, np.integer)) and 0 <= x < c for x in pair):
      raise SpecError(f"topology.cluster_links: got pair {pair}, expected two cluster ids in "
                      f"[0, {c})")
    a, b = pair
    for zi in range(z):
      for ri in range(r):
        link(index[a, zi, ri, 0], index[b, zi, ri, 0])  # gateways: first host of each rack
  adjacency: list[list[int]] = [[] for _ in range(spec.num_hosts)]
  for a, b in sorted(edges):
    adjacency[a].append(b)
    adjacency[b].append(a)
  degree = max(1, max(len(x) for x in adjacency))
  neighbours = np.full((spec.num_hosts, degree), -1, np.int32)
  for h, peers in enumerate(adjacency):
    neighbours[h, :len(peers)] = peers
  cluster_of = np.repeat(np.arange(c), z * r * n)
  reached = _reachable(adjacency, 0)
  if not reached.all():
    missing = sorted(set(cluster_of[~reached].tolist()))
    raise SpecError(f"topology: disconnected: clusters {missing} cannot be reached from cluster "
                    f"0 (topology.cluster_links={links}); link every cluster to another")
  return {
      "host_cpu": np.full(spec.num_hosts, spec.cpu, np.float32),
      "host_mem": np.full(spec.num_hosts, spec.mem, np.float32),
      "host_rack": np.repeat(np.arange(c * z * r), n).astype(np.int32),
      "host_zone": np.repeat(np.arange(c * z), r * n).astype(np.int32),
      "host_cluster": cluster_of.astype(np.int32),
      "level_latency": np.asarray(latency, np.float32),
      "neighbours": neighbours,
  }


def _reachable(adjacency: list[list[int]], start: int) -> np.ndarray:
  seen = np.zeros(len(adjacency), bool)
  seen[start], stack = True, [start]
  while stack:
    for b in adjacency[stack.pop()]:
      if not seen[b]:
        seen[b] = True
        stack.append(b)
  return seen


def check_apps(apps: Sequence[AppSpec], host_cpu: float, host_mem: float) -> None:
  """Refuses a workload that cannot be placed or simulated, naming the app and service."""
  if not apps:
    raise SpecError("apps: got none, expected at least one application")
  names = [a.name for a in apps]
  if len(set(names)) != len(names):
    raise SpecError(f"apps: duplicate app names in {names}")
  for app in apps:
    where = f"app {app.name!r}"
    if not app.slo_ms > 0:
      raise SpecError(f"{where}: slo_ms {app.slo_ms} must be > 0")
    if not app.services:
      raise SpecError(f"{where}: no services")
    services = [s.name for s in app.services]
    if len(set(services)) != len(services):
      raise SpecError(f"{where}: duplicate service names in {services}")
    for s in app.services:
      at = f"{where} service {s.name!r}"
      for field in ("cpu_request", "mem_request", "cpu_usage", "base_ms"):
        value = getattr(s, field)
        if not np.isfinite(value) or value < 0:
          raise SpecError(f"{at}: {field} = {value} is negative or not finite; expected >= 0")
      if s.cpu_request > host_cpu or s.mem_request > host_mem:
        raise SpecError(f"{at}: one instance (cpu_request {s.cpu_request}, mem_request "
                        f"{s.mem_request}) is larger than any host (cpu {host_cpu}, mem "
                        f"{host_mem})")
      if not 1 <= s.min_replicas <= s.replicas <= s.max_replicas:
        raise SpecError(f"{at}: replicas: expected 1 <= min_replicas ({s.min_replicas}) <= "
                        f"replicas ({s.replicas}) <= max_replicas ({s.max_replicas})")
    for call in app.calls:
      if len(call) != 3:
        raise SpecError(f"{where} calls: got {call!r}, expected (caller, callee, per_request)")
      caller, callee, rate = call
      for name in (caller, callee):
        if name not in services:
          raise SpecError(f"{where} calls: unknown service {name!r} in {call!r} (services: "
                          f"{', '.join(services)})")
      if caller == callee:
        raise SpecError(f"{where} calls: {call!r} calls itself")
      if not np.isfinite(rate) or rate < 0:
        raise SpecError(f"{where} calls: per_request {rate} in {call!r} is negative")


def build_problem(topology: TopologySpec, apps: Sequence[AppSpec],
                  replica_slots: int | None = None, peer_slots: int | None = None) -> Problem:
  """The arrays of one topology and workload, checked. `replica_slots` / `peer_slots` pad to a
  common shape (for vmapping several workloads); default: what this workload needs."""
  hosts = build_topology(topology)
  check_apps(apps, topology.cpu, topology.mem)
  for app in apps:
    if not -1 <= app.home_cluster < topology.clusters:
      raise SpecError(f"app {app.name!r}: home_cluster {app.home_cluster} is not a cluster of "
                      f"the topology (0 ... {topology.clusters - 1}, or -1 for any)")
  services = [(a, s) for a, app in enumerate(apps) for s in app.services]
  index = {(apps[a].name, s.name): i for i, (a, s) in enumerate(services)}
  need_r = max(s.max_replicas for _, s in services)
  replica_slots = need_r if replica_slots is None else replica_slots
  if replica_slots < need_r:
    raise SpecError(f"replica_slots {replica_slots} < the largest max_replicas {need_r}")
  calls = [(index[(app.name, a)], index[(app.name, b)], float(rate))
           for app in apps for a, b, rate in app.calls]
  partners: list[list[tuple[int, float]]] = [[] for _ in services]
  for a, b, rate in calls:
    partners[a].append((b, rate))
    partners[b].append((a, rate))
  need_p = max(1, max(len(p) for p in partners))
  peer_slots = need_p if peer_slots is None else peer_slots
  if peer_slots < need_p:
    raise SpecError(f"peer_slots {peer_slots} < the most call partners of a service {need_p}")
  svc_peer = np.full((len(services), peer_slots), -1, np.int32)
  svc_peer_rate = np.zeros((len(services), peer_slots), np.float32)
  for i, p in enumerate(partners):
    for j, (b, rate) in enumerate(p):
      svc_peer[i, j], svc_peer_rate[i, j] = b, rate
  field = lambda name, dtype: np.asarray([getattr(s, name) for _, s in services], dtype)
  calls_array = np.asarray(calls, np.float64).reshape(-1, 3)
  return Problem(
      **{k: jnp.asarray(v) for k, v in hosts.items()},
      svc_app=jnp.asarray([a for a, _ in services], jnp.int32),
      svc_cpu_request=jnp.asarray(field("cpu_request", np.float32)),
      svc_mem_request=jnp.asarray(field("mem_request", np.float32)),
      svc_cpu_usage=jnp.asarray(field("cpu_usage", np.float32)),
      svc_base_ms=jnp.asarray(field("base_ms", np.float32)),
      svc_min_replicas=jnp.asarray(field("min_replicas", np.int32)),
      svc_max_replicas=jnp.asarray(field("max_replicas", np.int32)),
      svc_peer=jnp.asarray(svc_peer), svc_peer_rate=jnp.asarray(svc_peer_rate),
      call_src=jnp.asarray(calls_array[:, 0].astype(np.int32)),
      call_dst=jnp.asarray(calls_array[:, 1].astype(np.int32)),
      call_rate=jnp.asarray(calls_array[:, 2].astype(np.float32)),
      app_slo_ms=jnp.asarray([a.slo_ms for a in apps], jnp.float32),
      initial_replicas=jnp.asarray(field("replicas", np.int32)),
      svc_home_cluster=jnp.asarray([apps[a].home_cluster for a, _ in services], jnp.int32),
      svc_slot_open=jnp.asarray(np.arange(replica_slots)[None, :] <
                                field("max_replicas", np.int32)[:, None]),
  )


# -- generated workloads ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
  """Random applications of a fixed shape (so that seeds vmap): `apps` apps of
  `services_per_app` services each, a random call tree per app, `instances` replicas in all
  (spread at random, each service between 1 and `max_replicas`)."""

  apps: int = 3
  services_per_app: int = 3
  instances: int = 20
  max_replicas: int = 4
  cpu_per_replica: tuple[float, float] = (0.3, 1.5)  # request = mean use per replica, cores
  mem_per_replica: tuple[float, float] = (0.5, 4.0)  # GiB
  base_ms: tuple[float, float] = (1.0, 4.0)
  calls_per_request: tuple[float, float] = (0.5, 2.0)
  slo_slack: float = 3.0  # SLO = slack x the app's idle service time + calls at zone latency


def with_neighbour_slots(problem: Problem, slots: int) -> Problem:
  """`problem` with its neighbour table padded to `slots` slots (-1: no neighbour).

  Every agent scores every slot, so the slot count sets each agent's work whatever the number
  of hosts; padding changes no decision (the empty slots are never legal targets).
  """
  have = problem.neighbours.shape[-1]
  if slots < have:
    raise SpecError(f"neighbour slots: got {slots}, expected >= the topology's largest degree "
                    f"{have}")
  pad = jnp.full(problem.neighbours.shape[:-1] + (slots - have,), -1, problem.neighbours.dtype)
  return problem._replace(neighbours=jnp.concatenate([problem.neighbours, pad], -1))


def generate_apps(spec: WorkloadSpec, latency_ms: Sequence[float], seed: int,
                  clusters: int = 1) -> list[AppSpec]:
  """Random apps of `spec`'s shape; with several clusters, app a is submitted to cluster
  a % clusters."""
  services = spec.apps * spec.services_per_app
  if not services <= spec.instances <= services * spec.max_replicas:
    raise SpecError(f"workload.instances: got {spec.instances}, expected between the number of "
                    f"services ({services}) and services x max_replicas "
                    f"({services * spec.max_replicas})")
  rng = np.random.default_rng(seed)
  replicas = np.ones(services, int)
  for _ in range(spec.instances - services):
    open_ = np.flatnonzero(replicas < spec.max_replicas)
    replicas[rng.choice(open_)] += 1
  apps = []
  for a in range(spec.apps):
    svcs, calls = [], []
    for j in range(spec.services_per_app):
      r = int(replicas[a * spec.services_per_app + j])
      per_replica = float(rng.uniform(*spec.cpu_per_replica))
      svcs.append(ServiceSpec(
          name=f"s{j}", cpu_request=round(per_replica, 3),
          mem_request=round(float(rng.uniform(*spec.mem_per_replica)), 3),
          cpu_usage=round(per_replica * r, 3), base_ms=round(float(rng.uniform(*spec.base_ms)), 3),
          replicas=r, min_replicas=1, max_replicas=spec.max_replicas))
      if j:  # a call tree: each service is called by an earlier one
        calls.append((f"s{int(rng.integers(0, j))}", f"s{j}",
                      round(float(rng.uniform(*spec.calls_per_request)), 3)))
    slo = spec.slo_slack * sum(s.base_ms for s in svcs) + sum(
        rate * latency_ms[2] for _, _, rate in calls)
    apps.append(AppSpec(name=f"app{a}", slo_ms=round(slo, 3), services=tuple(svcs),
                        calls=tuple(calls), home_cluster=a % clusters if clusters > 1 else -1))
  return apps


# -- load ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoadSpec:
  """Per-app load factor over `steps`: 1 + amplitude * sin(2 pi (t / period + phase)), phases
  drawn per app (time zones), times a burst factor during bursts that start with probability
  `burst_rate` per app and step and last a geometric number of steps (mean `burst_steps`)."""

  steps: int = 96
  period: int = 96
  amplitude: float = 0.4
  burst_rate: float = 0.02
  burst_factor: float = 1.6
  burst_steps: float = 4.0
  phase_spread: float = 0.25  # phases uniform in [0, phase_spread) of a period


def load_trace(spec: LoadSpec, num_apps: int, key: jax.Array) -> jax.Array:
  """(steps, A) load factors, >= 0.1."""
  k_phase, k_start, k_len = jax.random.split(key, 3)
  phase = jax.random.uniform(k_phase, (num_apps,)) * spec.phase_spread
  t = jnp.arange(spec.steps, dtype=jnp.float32)[:, None]
  diurnal = 1.0 + spec.amplitude * jnp.sin(2 * jnp.pi * (t / spec.period + phase))
  starts = jax.random.bernoulli(k_start, spec.burst_rate, (spec.steps, num_apps))
  lengths = 1 + jax.random.geometric(k_len, 1.0 / spec.burst_steps, (spec.steps, num_apps))

  def carry_burst(remaining, x):
    start, length = x
    remaining = jnp.where(start, jnp.maximum(remaining, length), remaining)
    return jnp.maximum(remaining - 1, 0), remaining > 0

  _, bursting = jax.lax.scan(carry_burst, jnp.zeros(num_apps, jnp.int32), (starts, lengths))
  return jnp.maximum(diurnal * jnp.where(bursting, spec.burst_factor, 1.0), 0.1)


# -- placement state and the objective -----------------------------------------------------------


class Placement(NamedTuple):
  """Who holds what: each agent's inventory of instance ids (its local state). An instance id
  that no inventory holds is not running. M slots per host (a kubelet's max pods)."""

  inventory: jax.Array  # (H, M) i32 instance ids, -1 = free slot


def owners(problem: Problem, placement: Placement) -> jax.Array:
  """(I,) the host holding each instance id, -1 where none does."""
  num_instances = problem.num_services * problem.max_replica_slots
  return _owners(placement.inventory, num_instances)


def _owners(inventory: jax.Array, num_instances: int) -> jax.Array:
  hosts, slots = inventory.shape
  host_of_slot = jnp.broadcast_to(jnp.arange(hosts, dtype=jnp.int32)[:, None], (hosts, slots))
  ids = jnp.where(inventory >= 0, inventory, num_instances)  # free slots write out of range
  return jnp.full(num_instances, -1, jnp.int32).at[ids.ravel()].set(host_of_slot.ravel(),
                                                                  mode="drop")


def host_latency(problem: Problem, a: jax.Array, b: jax.Array) -> jax.Array:
  """One-way latency (ms) between hosts a and b (arrays of host ids, broadcast)."""
  level = jnp.where(a == b, 0, jnp.where(
      problem.host_rack[a] == problem.host_rack[b], 1, jnp.where(
          problem.host_zone[a] == problem.host_zone[b], 2, jnp.where(
              problem.host_cluster[a] == problem.host_cluster[b], 3, 4))))
  return problem.level_latency[level]


class Observed(NamedTuple):
  """What the simulator derives from a placement under a load: the agents' raw observations and
  the objective terms."""

  owner: jax.Array  # (I,) host or -1
  replicas: jax.Array  # (S,) running replicas
  host_cpu_request: jax.Array  # (H,) reserved cores
  host_mem_request: jax.Array  # (H,) reserved GiB
  host_rho: jax.Array  # (H,) actual CPU use / capacity
  host_count: jax.Array  # (H,) instances held
  inst_cpu_use: jax.Array  # (I,) actual cores
  inst_network: jax.Array  # (I,) traffic x latency of the instance's calls (both ends counted)
  app_latency_ms: jax.Array  # (A,)
  app_violation: jax.Array  # (A,) bool
  app_instances: jax.Array  # (A,) running instances


def observe(problem: Problem, placement: Placement, load: jax.Array) -> Observed:
  """Derives every observation and objective term from who holds what, at load (A,)."""
  num_s, num_r = problem.num_services, problem.max_replica_slots
  num_h = problem.num_hosts
  owner = _owners(placement.inventory, num_s * num_r)
  present = owner >= 0
  service = instance_service(num_s, num_r)
  replicas = jax.ops.segment_sum(present.astype(jnp.int32), service, num_s)
  svc_load = load[problem.svc_app]
  inst_use = jnp.where(present, (problem.svc_cpu_usage * svc_load /
                                 jnp.maximum(replicas, 1))[service], 0.0)
  at = jnp.where(present, owner, num_h)  # absent instances go to a dropped segment
  host_use = jax.ops.segment_sum(inst_use, at, num_h + 1)[:num_h]
  host_cpu_req = jax.ops.segment_sum(jnp.where(present, problem.svc_cpu_request[service], 0.0),
                                     at, num_h + 1)[:num_h]
  host_mem_req = jax.ops.segment_sum(jnp.where(present, problem.svc_mem_request[service], 0.0),
                                     at, num_h + 1)[:num_h]
  host_count = jax.ops.segment_sum(present.astype(jnp.int32), at, num_h + 1)[:num_h]
  rho = host_use / problem.host_cpu
  # service time: base_ms x mean over replicas of the host's queueing factor
  queue = jnp.where(present, 1.0 / jnp.maximum(1.0 - rho[jnp.maximum(owner, 0)], EPS), 0.0)
  svc_queue = jax.ops.segment_sum(queue, service, num_s) / jnp.maximum(replicas, 1)
  svc_ms = problem.svc_base_ms * svc_queue
  # calls: mean latency over replica pairs of caller and callee
  owner_sr = owner.reshape(num_s, num_r)
  a, b = owner_sr[problem.call_src], owner_sr[problem.call_dst]  # (C, R)
  pair = (a[:, :, None] >= 0) & (b[:, None, :] >= 0)
  lat = host_latency(problem, jnp.maximum(a, 0)[:, :, None], jnp.maximum(b, 0)[:, None, :])
  call_ms = jnp.sum(jnp.where(pair, lat, 0.0), (1, 2)) / jnp.maximum(jnp.sum(pair, (1, 2)), 1)
  num_a = problem.num_apps
  app_ms = (jax.ops.segment_sum(svc_ms, problem.svc_app, num_a) +
            jax.ops.segment_sum(problem.call_rate * call_ms, problem.svc_app[problem.call_src],
                                num_a))
  app_instances = jax.ops.segment_sum(replicas, problem.svc_app, num_a)
  return Observed(owner=owner, replicas=replicas, host_cpu_request=host_cpu_req,
                  host_mem_request=host_mem_req, host_rho=rho, host_count=host_count,
                  inst_cpu_use=inst_use,
                  inst_network=jnp.where(present, network_at(
                      problem, owner, replicas, load, jnp.arange(num_s * num_r), owner), 0.0),
                  app_latency_ms=app_ms, app_violation=app_ms > problem.app_slo_ms,
                  app_instances=app_instances)


def network_at(problem: Problem, owner: jax.Array, replicas: jax.Array, load: jax.Array,
               instance: jax.Array, host: jax.Array) -> jax.Array:
  """Network cost of `instance` (ids) if it ran on `host` (broadcast together), the others
  staying where they are: sum over its call partners of load x calls per request / (replicas
  of both ends) x the latency to each partner replica. Summed over all running instances at
  their owners it is twice the network cost (each call pair counted from both ends). What an
  agent knows of its own instances (where their call partners run: a service mesh's view)."""
  num_s, num_r = problem.num_services, problem.max_replica_slots
  instance = jnp.maximum(instance, 0)
  service = instance // num_r
  owner_sr = owner.reshape(num_s, num_r)
  peers = problem.svc_peer[service]  # (..., P)
  peer_owner = owner_sr[jnp.maximum(peers, 0)]  # (..., P, R)
  weight = (problem.svc_peer_rate[service] * load[problem.svc_app[service]][..., None] /
            (jnp.maximum(replicas[service], 1)[..., None] *
             jnp.maximum(replicas[jnp.maximum(peers, 0)], 1)))  # (..., P)
  weight = jnp.where(peers >= 0, weight, 0.0)
  lat = host_latency(problem, jnp.maximum(host, 0)[..., None, None], jnp.maximum(peer_owner, 0))
  lat = jnp.where(peer_owner >= 0, lat, 0.0)  # (..., P, R)
  return jnp.sum(weight[..., None] * lat, (-2, -1))


@dataclasses.dataclass(frozen=True)
class Weights:
  """Objective weights: cost = host x active hosts + network x network cost (ms x calls) +
  slo x apps over SLO + overload x sum(max(0, rho - rho_max)) + migration x migrations."""

  host: float = 1.0
  network: float = 1.0
  slo: float = 4.0
  overload: float = 10.0
  migration: float = 0.05
  rho_max: float = 0.6  # queueing factor 2.5 at rho_max: within slo_slack (3) of idle


class Terms(NamedTuple):
  active_hosts: jax.Array
  network: jax.Array
  violations: jax.Array
  overload: jax.Array
  cost: jax.Array  # weighted sum, migrations excluded (counted where they happen)


def terms(weights: Weights, obs: Observed) -> Terms:
  active = jnp.sum(obs.host_count > 0)
  network = 0.5 * jnp.sum(obs.inst_network)
  violations = jnp.sum(obs.app_violation)
  overload = jnp.sum(jnp.maximum(obs.host_rho - weights.rho_max, 0.0))
  cost = (weights.host * active + weights.network * network + weights.slo * violations +
          weights.overload * overload)
  return Terms(active, network, violations, overload, cost)


def host_costs(problem: Problem, weights: Weights, obs: Observed) -> jax.Array:
  """(H,) each host's share of `terms(...).cost`: its activity and overload, half the network
  cost of the instances it holds, and each violating app's penalty split evenly over the app's
  instances. Sums exactly to the total (up to rounding)."""
  num_h = problem.num_hosts
  service = instance_service(problem.num_services, problem.max_replica_slots)
  present = obs.owner >= 0
  app = problem.svc_app[service]
  slo_share = jnp.where(present & obs.app_violation[app],
                        1.0 / jnp.maximum(obs.app_instances[app], 1), 0.0)
  at = jnp.where(present, obs.owner, num_h)
  per_inst = weights.network * 0.5 * obs.inst_network + weights.slo * slo_share
  return (weights.host * (obs.host_count > 0) +
          weights.overload * jnp.maximum(obs.host_rho - weights.rho_max, 0.0) +
          jax.ops.segment_sum(per_inst, at, num_h + 1)[:num_h])
