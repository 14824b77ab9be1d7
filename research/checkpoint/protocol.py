"""The checkpoint runtime's roles as data: typed messages and pure state machines.

Three roles (their side effects live in `transport.py` and `job_process.py`):

- the job: `num_processes` jax processes, one multi-controller program (`jax.distributed`);
  each snapshots its own shards of the training state into its node's local memory;
- a node agent per node (a Ray actor pinned to the node): launches and watches the node's jax
  processes, owns the node's local memory, keeps a replica of its peer node's snapshots;
- the job driver: places processes on nodes, turns what the agents report into decisions
  (`driver_step`), and on any failure stops the whole job and starts it again from the newest
  step every process can restore (`plan_restore`), as Gemini (SOSP'23) does.

Everything here is a pure function of its arguments, so the protocol is tested in process and
deterministically (tests/checkpoint/test_protocol.py); times are arguments, never read here.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Sequence

# --- placement ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Placement:
  """Which node runs which jax process, and whose replica each node keeps.

  nodes: the node of each node slot (a Ray node id, or any name in tests).
  process_slots: the node slot of each process.
  A node slot's peer is the next slot (cyclic): it holds that slot's replicas (Gemini's ring
  placement with one replica), so losing one node leaves every snapshot somewhere.
  """
  nodes: tuple[str, ...]
  process_slots: tuple[int, ...]

  def __post_init__(self):
    if not self.nodes:
      raise ValueError("placement.nodes: expected at least one node")
    if len(set(self.nodes)) != len(self.nodes):
      raise ValueError(f"placement.nodes: expected distinct nodes, got {self.nodes}")
    bad = [s for s in self.process_slots if not 0 <= s < len(self.nodes)]
    if bad:
      raise ValueError(f"placement.process_slots: slots {bad} outside 0..{len(self.nodes) - 1}")

  @property
  def num_processes(self) -> int:
    return len(self.process_slots)

  def node_of(self, process: int) -> str:
    return self.nodes[self.process_slots[process]]

  def processes_on(self, node: str) -> tuple[int, ...]:
    return tuple(p for p in range(self.num_processes) if self.node_of(p) == node)

  def peer_of(self, node: str) -> str | None:
    """The node that keeps `node`'s replicas (None with a single node)."""
    if len(self.nodes) < 2:
      return None
    return self.nodes[(self.nodes.index(node) + 1) % len(self.nodes)]


def place(num_processes: int, processes_per_node: int, nodes: Sequence[str]) -> Placement:
  """Processes in blocks of `processes_per_node` on the first nodes, in order."""
  if num_processes < 1 or processes_per_node < 1:
    raise ValueError(f"num_processes={num_processes}, processes_per_node={processes_per_node}: "
                     "expected positive ints")
  needed = -(-num_processes // processes_per_node)
  if len(nodes) < needed:
    raise ValueError(f"{num_processes} processes at {processes_per_node} per node need "
                     f"{needed} nodes; the cluster has {len(nodes)} ({list(nodes)})")
  return Placement(tuple(nodes[:needed]),
                   tuple(p // processes_per_node for p in range(num_processes)))


def replace_nodes(placement: Placement, lost: Sequence[str], spares: Sequence[str]) -> Placement:
  """The placement after losing `lost` nodes: each lost slot taken over by a spare node.

  Without a spare, the lost slot's processes move to the surviving slots in turn (a node then
  runs more processes than before). Process ids, and so each process's data and devices in the
  global mesh, never change: only where a process runs.
  """
  lost = [n for n in lost if n in placement.nodes]
  spares = [n for n in spares if n not in placement.nodes]
  nodes, slots = list(placement.nodes), list(placement.process_slots)
  orphans = []
  for node in lost:
    slot = nodes.index(node)
    if spares:
      nodes[slot] = spares.pop(0)
    else:
      orphans.append(slot)
  if not orphans:
    return Placement(tuple(nodes), tuple(slots))
  keep = [s for s in range(len(nodes)) if s not in orphans]
  if not keep:
    raise ValueError(f"every node of the job is lost ({list(placement.nodes)}) and no spare "
                     "node is left: nothing to run on")
  renumber = {old: new for new, old in enumerate(keep)}
  moved, i = [], 0
  for slot in slots:
    if slot in orphans:
      moved.append(renumber[keep[i % len(keep)]])
      i += 1
    else:
      moved.append(renumber[slot])
  return Placement(tuple(nodes[s] for s in keep), tuple(moved))


# --- where a process restores from --------------------------------------------------------------


class Source(enum.Enum):
  INIT = "init"              # no checkpoint: the initial state
  LOCAL = "local"            # the process's own snapshot in its node's memory
  PEER = "peer"              # the replica in the peer node's memory, staged into the new node
  PERSISTENT = "persistent"  # orbax, the newest committed and intact step


class Tier(enum.Enum):
  LOCAL = "local"      # a snapshot the process wrote on this node
  REPLICA = "replica"  # a copy this node keeps for its peer


@dataclasses.dataclass(frozen=True)
class Snapshot:
  """One snapshot an agent reports: whose, which step, where, of which job."""
  process: int
  step: int
  node: str
  tier: Tier
  job: str  # the job's fingerprint (config and state shapes): a snapshot of another job never
            # restores into this one


@dataclasses.dataclass(frozen=True)
class Choice:
  process: int
  source: Source
  node: str | None  # the node holding the bytes (LOCAL, PEER)


@dataclasses.dataclass(frozen=True)
class RestorePlan:
  step: int                    # every process restores this same step (0: from scratch)
  choices: tuple[Choice, ...]  # one per process, in process order

  @property
  def sources(self) -> tuple[str, ...]:
    return tuple(c.source.value for c in self.choices)


def plan_restore(placement: Placement, job: str, snapshots: Sequence[Snapshot],
                 persistent_steps: Sequence[int]) -> RestorePlan:
  """The newest step that every process can restore, and from where.

  All processes must restore one step (their shards make one global state). A process restores
  from its own node's memory when it runs where its snapshot is, else from a replica (staged
  into its new node first); memory wins over orbax at an equal step, as it is faster, and a
  newer persistent step wins over older memory. Snapshots of another job are ignored (and
  refused again where they are read). `persistent_steps`: committed and intact orbax steps.
  """
  held: dict[int, dict[int, list[Snapshot]]] = {}
  for snap in snapshots:
    if snap.job != job or not 0 <= snap.process < placement.num_processes:
      continue
    held.setdefault(snap.step, {}).setdefault(snap.process, []).append(snap)

  def choice(process: int, step: int) -> Choice | None:
    options = held.get(step, {}).get(process, [])
    home = placement.node_of(process)
    for snap in options:  # the process's own snapshot on the node it runs on now
      if snap.node == home and snap.tier is Tier.LOCAL:
        return Choice(process, Source.LOCAL, home)
    for snap in options:
      if snap.node != home or snap.tier is Tier.REPLICA:
        return Choice(process, Source.PEER, snap.node)
    return None

  memory_step = None
  for step in sorted(held, reverse=True):
    choices = [choice(p, step) for p in range(placement.num_processes)]
    if all(choices):
      memory_step = (step, tuple(choices))
      break
  persistent = max(persistent_steps, default=None)
  if memory_step is not None and (persistent is None or memory_step[0] >= persistent):
    return RestorePlan(*memory_step)
  if persistent is not None:
    return RestorePlan(persistent, tuple(Choice(p, Source.PERSISTENT, None)
                                         for p in range(placement.num_processes)))
  return RestorePlan(0, tuple(Choice(p, Source.INIT, None)
                              for p in range(placement.num_processes)))


# --- the driver ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProcessReport:
  """What a node agent sees of one of its jax processes."""
  process: int
  alive: bool
  exit_code: int | None     # None while alive
  heartbeat_age_s: float    # since the last heartbeat (since launch before the first)
  step: int                 # steps completed, as the process last said
  started: bool             # has sent a heartbeat since launch


@dataclasses.dataclass(frozen=True)
class Reports:
  """One round of agent polls: every live process's report, and the nodes that did not answer."""
  now: float
  processes: tuple[ProcessReport, ...]
  lost_nodes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Launched:
  now: float
  plan: RestorePlan


class Phase(enum.Enum):
  IDLE = "idle"          # nothing launched yet
  RUNNING = "running"
  STOPPED = "stopped"    # after a failure: the job is stopped, a restart is due
  DONE = "done"
  FAILED = "failed"      # out of restarts


@dataclasses.dataclass(frozen=True)
class Failure:
  kind: str              # "exit" (a process died), "hang" (no heartbeat: fenced), "node"
  process: int | None
  node: str | None
  step: int              # the newest step any process had completed when it was seen
  detected_at: float
  detail: str


# Commands the driver's edge carries out.
@dataclasses.dataclass(frozen=True)
class Fence:
  process: int           # kill -9 a process that stopped heartbeating (it may still hold locks)


@dataclasses.dataclass(frozen=True)
class StopJob:
  pass                   # kill every process of the job (they would block in a collective)


@dataclasses.dataclass(frozen=True)
class Restart:
  lost_nodes: tuple[str, ...]  # the edge replaces these, re-plans the restore and launches


@dataclasses.dataclass(frozen=True)
class Finish:
  pass


@dataclasses.dataclass(frozen=True)
class GiveUp:
  reason: str


@dataclasses.dataclass(frozen=True)
class DriverConfig:
  num_processes: int
  steps: int
  heartbeat_timeout_s: float   # a started process silent this long is fenced
  startup_timeout_s: float     # a process that never heartbeats after launch, the same
  max_restarts: int


@dataclasses.dataclass(frozen=True)
class DriverState:
  phase: Phase = Phase.IDLE
  attempt: int = 0                      # launches so far
  launched_at: float = 0.0
  newest_step: int = 0                  # steps completed by every process, as last reported
  failures: tuple[Failure, ...] = ()


def driver_step(config: DriverConfig, state: DriverState, event) -> tuple[DriverState, list]:
  """The driver's decision for one event: (new state, commands for the edge)."""
  if isinstance(event, Launched):
    if state.phase not in (Phase.IDLE, Phase.STOPPED):
      raise ValueError(f"launch in phase {state.phase.value}: expected idle or stopped")
    return dataclasses.replace(state, phase=Phase.RUNNING, attempt=state.attempt + 1,
                               launched_at=event.now), []
  if not isinstance(event, Reports):
    raise TypeError(f"event: expected Launched or Reports, got {type(event).__name__}")
  if state.phase is not Phase.RUNNING:
    return state, []
  seen = {r.process for r in event.processes}
  steps = [r.step for r in event.processes]
  newest = max([state.newest_step, *steps])

  def fail(kind, process, node, detail, commands):
    failure = Failure(kind, process, node, newest, event.now, detail)
    failures = state.failures + (failure,)
    if len(failures) > config.max_restarts:
      return (dataclasses.replace(state, phase=Phase.FAILED, newest_step=newest,
                                  failures=failures),
              [*commands, StopJob(), GiveUp(f"{len(failures)} failures; max_restarts="
                                            f"{config.max_restarts}")])
    return (dataclasses.replace(state, phase=Phase.STOPPED, newest_step=newest,
                                failures=failures),
            [*commands, StopJob(), Restart(tuple(event.lost_nodes))])

  if event.lost_nodes:
    return fail("node", None, event.lost_nodes[0],
                f"node agent(s) {list(event.lost_nodes)} did not answer", [])
  for report in sorted(event.processes, key=lambda r: r.process):
    if not report.alive and report.exit_code not in (None, 0):
      return fail("exit", report.process, None,
                  f"process {report.process} exited with code {report.exit_code}", [])
  for report in sorted(event.processes, key=lambda r: r.process):
    limit = config.heartbeat_timeout_s if report.started else config.startup_timeout_s
    if report.alive and report.heartbeat_age_s > limit:
      what = "no heartbeat" if report.started else "no first heartbeat"
      return fail("hang", report.process, None,
                  f"process {report.process}: {what} for {report.heartbeat_age_s:.1f} s "
                  f"(limit {limit} s)", [Fence(report.process)])
  missing = sorted(set(range(config.num_processes)) - seen)
  if missing:  # an agent that answers but lost track of a process: treat as a failure
    return fail("exit", missing[0], None, f"process {missing[0]} is not reported by its agent",
                [])
  if all(not r.alive and r.exit_code == 0 for r in event.processes):
    short = [r for r in event.processes if r.step < config.steps]
    if short:
      return fail("exit", short[0].process, None,
                  f"process {short[0].process} exited cleanly at step {short[0].step} < "
                  f"{config.steps}", [])
    return dataclasses.replace(state, phase=Phase.DONE, newest_step=newest), [Finish()]
  return dataclasses.replace(state, newest_step=newest), []


# --- what the driver hands to a launch ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class JobSpec:
  """Everything a jax process of the job needs besides its launch (data, written as JSON)."""
  job: str                     # fingerprint of the problem, devices and steps (worker.fingerprint)
  num_processes: int
  devices_per_process: int
  hidden: tuple[int, ...]
  batch_per_device: int
  learning_rate: float
  dropout: float
  seed: int
  steps: int
  snapshot_every: int          # local-memory snapshot period in steps (0: never)
  persist_every: int           # orbax save period in steps (0: never)
  min_step_seconds: float      # pacing, so that faults land at a chosen step
  inputs_file: str             # training rows and initial params (worker.write_inputs)
  persistent_dir: str          # the job's orbax folder (shared storage)
  results_dir: str             # final states and per-attempt events (shared storage)
  compilation_cache_dir: str | None = None
  memory_slots: int = 2        # snapshots each process keeps in local memory (>= 2)

  def __post_init__(self):
    if not isinstance(self.memory_slots, int) or self.memory_slots < 2:
      raise ValueError(f"memory_slots={self.memory_slots!r}: expected an int >= 2")
    for name in ("num_processes", "devices_per_process", "batch_per_device", "steps"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)!r}: expected a positive int")
    for name in ("snapshot_every", "persist_every"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
        raise ValueError(f"{name}={getattr(self, name)!r}: expected an int >= 0 (0: never)")

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: dict) -> "JobSpec":
    return cls(**dict(data, hidden=tuple(data["hidden"])))


@dataclasses.dataclass(frozen=True)
class Launch:
  """One jax process's launch: who it is, where the job's coordinator is, what it restores.

  Its files (local-memory slots, status) are its node agent's to name.
  """
  process: int
  attempt: int
  coordinator: str             # host:port of jax.distributed's coordination service
  source: Source
  step: int                    # the step to restore (0 with Source.INIT)

  def argv(self) -> list[str]:
    return ["--process", str(self.process), "--attempt", str(self.attempt),
            "--coordinator", self.coordinator, "--source", self.source.value,
            "--step", str(self.step)]
