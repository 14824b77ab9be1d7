"""The checkpoint runtime's edges on Ray: node agents (Ray actors pinned to nodes) and the driver.

- `NodeAgent`: one per node, created with Ray's node affinity, so it lives and dies with its
  node. It launches the node's jax processes (`research/checkpoint/job_process.py`, plain
  subprocesses that die with it), reads their heartbeats and progress from shared memory
  (`store.ProcessStatus`), fences (kill -9) and stops them, owns the node's local memory (one
  `store.LocalSlots` file per process), copies each new snapshot to its peer node's agent (a
  replica, through Ray's object store; off the training path) and stages a replica into local
  memory when a process moves to its node. A plain class: tests drive it in process.
- `run_job`: the job driver. It places processes on nodes, launches the job, polls the agents,
  feeds what they report to the pure `protocol.driver_step` and carries out its commands: fence,
  stop the whole job, replace lost nodes, re-plan the restore (`protocol.plan_restore`) and
  launch again. Failure detection is Ray's (an agent whose node died raises `RayActorError`) plus
  the heartbeats; restarts are the driver's launches; nothing here is a scheduler or an RPC layer.

Fault injection is not here: the experiment and the tests pass an `observer` that may kill
processes, stop them or remove nodes of Ray's test cluster.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from research.checkpoint import protocol
from research.checkpoint import store

REPLICATION_POLL_SECONDS = 0.02


def call(target, method: str, *args, timeout: float | None = None):
  """`target.method(*args)`, through Ray when `target` is an actor handle (then waited for)."""
  function = getattr(target, method)
  remote = getattr(function, "remote", None)
  if remote is None:
    return function(*args)
  import ray  # pylint: disable=import-outside-toplevel
  return ray.get(remote(*args), timeout=timeout)


def node_memory_dir(memory_root: str | os.PathLike, job: str, node: str) -> Path:
  """Where a node's agent keeps the job's local memory (a RAM-backed folder of that node)."""
  return Path(memory_root) / f"meshwork-ckpt-{job}" / node


def process_files(memory_root: str | os.PathLike, job: str, node: str,
                  process: int) -> tuple[Path, Path]:
  """(local-memory file, status file) of `process` on `node`, as its node agent names them."""
  directory = node_memory_dir(memory_root, job, node)
  return directory / f"p{process}.slots", directory / f"p{process}.status"


def _die_with_parent() -> None:  # runs in the child between fork and exec
  import ctypes  # pylint: disable=import-outside-toplevel
  ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class NodeAgent:
  """One node's agent: its jax processes, its local memory and its peer's replicas."""

  def __init__(self, node: str, job: str, memory_root: str, spec_file: str,
               device_flags: str = "", log_dir: str | None = None, slots: int = 2):
    """`slots`: snapshots kept per process, in its local-memory file and as replicas of the
    peer's processes (the last `slots` written or arrived each)."""
    self.node, self.job, self.spec_file, self.slots = node, job, spec_file, slots
    self.memory_root = memory_root
    self.dir = node_memory_dir(memory_root, job, node)
    self.dir.mkdir(parents=True, exist_ok=True)
    self.device_flags = device_flags
    self.log_dir = Path(log_dir) if log_dir else None
    self._processes: dict[int, subprocess.Popen] = {}
    self._launched_at: dict[int, float] = {}
    # process -> step -> (job number, payload), in order of arrival
    self._replicas: dict[int, dict[int, tuple[int, bytes]]] = {}
    self._sent: dict[int, int] = {}  # process -> newest step sent to the current peer
    self._peer = None
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._replicator = threading.Thread(target=self._replicate_loop, daemon=True)
    self._replicator.start()

  # --- files of this node -----------------------------------------------------------------
  def memory_file(self, process: int) -> Path:
    return process_files(self.memory_root, self.job, self.node, process)[0]

  def status_file(self, process: int) -> Path:
    return process_files(self.memory_root, self.job, self.node, process)[1]

  def ping(self) -> str:
    return self.node

  def free_port(self) -> int:
    """A free TCP port on this node, for the job's coordinator when process 0 runs here."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
      s.bind(("127.0.0.1", 0))
      return s.getsockname()[1]

  # --- processes --------------------------------------------------------------------------
  def launch(self, launches: list[protocol.Launch]) -> dict[int, int]:
    """Starts one jax process per launch, with its files on this node; returns their pids."""
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    if self.device_flags:  # this node's flags replace any device count inherited from the agent
      inherited = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                         env.get("XLA_FLAGS", ""))
      env["XLA_FLAGS"] = (inherited + " " + self.device_flags).strip()
    pids = {}
    for launch in launches:
      if launch.process in self._processes and self._processes[launch.process].poll() is None:
        raise RuntimeError(f"node {self.node}: process {launch.process} is still running")
      store.ProcessStatus(self.status_file(launch.process), create=True).close()
      out = subprocess.DEVNULL
      if self.log_dir is not None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out = open(self.log_dir / f"p{launch.process}.a{launch.attempt}.log", "wb")
      command = [sys.executable, "-m", "research.checkpoint.job_process", self.spec_file,
                 *launch.argv(), "--memory-file", str(self.memory_file(launch.process)),
                 "--status-file", str(self.status_file(launch.process))]
      child = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                               preexec_fn=_die_with_parent)
      with self._lock:
        self._processes[launch.process] = child
        self._launched_at[launch.process] = time.monotonic()
      pids[launch.process] = child.pid
    return pids

  def pids(self) -> dict[int, int]:
    return {p: child.pid for p, child in self._processes.items() if child.poll() is None}

  def poll(self) -> list[protocol.ProcessReport]:
    """A report on every process launched here since the last stop."""
    reports = []
    now = time.monotonic_ns()
    for process, child in sorted(self._processes.items()):
      code = child.poll()
      _, step, beat, _ = store.ProcessStatus(self.status_file(process)).read()
      started = beat > 0
      since = beat if started else int(self._launched_at[process] * 1e9)
      reports.append(protocol.ProcessReport(process, code is None, code, (now - since) / 1e9,
                                            step, started))
    return reports

  def fence(self, process: int) -> None:
    child = self._processes.get(process)
    if child is not None and child.poll() is None:
      child.kill()
      child.wait()

  def stop(self) -> None:
    """Kills every process of this node (kill -9) and forgets them."""
    for child in self._processes.values():
      if child.poll() is None:
        child.kill()
    for child in self._processes.values():
      child.wait()
    with self._lock:
      self._processes.clear()
      self._launched_at.clear()

  # --- local memory and replicas ----------------------------------------------------------
  def set_peer(self, peer) -> None:
    """The agent (a Ray actor handle, or any object with `store_replica`) keeping our replicas."""
    with self._lock:
      self._peer, self._sent = peer, {}

  def _slot_files(self) -> list[tuple[int, Path]]:
    return sorted((int(p.stem[1:]), p) for p in self.dir.glob("p*.slots"))

  def _open_slots(self, path: Path) -> store.LocalSlots | None:
    try:
      return store.LocalSlots.open(path)
    except (FileNotFoundError, ValueError):
      return None

  def inventory(self) -> list[protocol.Snapshot]:
    """Every snapshot of this job on this node: local ones and the replicas it keeps."""
    found, number = [], store.job_number(self.job)
    for process, path in self._slot_files():
      slots = self._open_slots(path)
      if slots is None:
        continue
      for step, job, _ in slots.snapshots():
        if job == number:
          found.append(protocol.Snapshot(process, step, self.node, protocol.Tier.LOCAL, self.job))
      slots.close()
    with self._lock:
      for process, held in self._replicas.items():
        for step, (job, _) in held.items():
          if job == number:
            found.append(protocol.Snapshot(process, step, self.node, protocol.Tier.REPLICA,
                                           self.job))
    return found

  def store_replica(self, process: int, step: int, job: int, payload: bytes) -> None:
    """Keeps a peer's snapshot: the `slots` that arrived last per process.

    By arrival, as `LocalSlots` keeps the newest writes: after a restart from an older step,
    the replicas of the new attempt replace those of the failed one, whose steps are higher.
    """
    with self._lock:
      held = self._replicas.setdefault(process, {})
      held.pop(step, None)  # a step sent again counts as arrived now
      held[step] = (job, payload)
      while len(held) > self.slots:
        del held[next(iter(held))]

  def replica(self, process: int, step: int) -> tuple[int, int, bytes]:
    """(step, job number, payload) of a snapshot this node holds for `process`."""
    with self._lock:
      held = self._replicas.get(process, {})
      if step in held:
        return (step, *held[step])
    path = self.memory_file(process)
    slots = self._open_slots(path) if path.exists() else None
    if slots is None:
      raise store.SnapshotMismatch(f"node {self.node} holds no snapshot of process {process}")
    try:
      return (step, *slots.read_bytes(step))
    finally:
      slots.close()

  def stage(self, process: int, step: int, holder) -> None:
    """Copies `process`'s snapshot of `step` from `holder` (another agent) into local memory.

    Refuses, writing nothing, a peer that answers with another step or another job's snapshot.
    """
    got_step, job, payload = call(holder, "replica", process, step)
    if got_step != step:
      raise store.SnapshotMismatch(f"node {self.node}: the peer answered step {got_step} for "
                                   f"process {process}; the restore plan says step {step}")
    if job != store.job_number(self.job):
      raise store.SnapshotMismatch(f"node {self.node}: the peer's snapshot of process {process} "
                                   f"belongs to job {job:016x}, not to this job {self.job}")
    path = self.memory_file(process)
    slots = store.LocalSlots(path, len(payload), create=True, slots=self.slots)
    slots.write_bytes(step, payload, job)
    slots.close()

  def _replicate_once(self) -> None:
    with self._lock:  # the peer with its record: a step sent to an old peer is not marked sent
      peer, sent = self._peer, self._sent  # to a new one that `set_peer` swapped in meanwhile
    if peer is None:
      return
    for process, path in self._slot_files():
      slots = self._open_slots(path)
      if slots is None:
        continue
      try:
        held = slots.snapshots()
        if not held or held[0][0] <= sent.get(process, -1):
          continue
        step = held[0][0]
        try:
          job, payload = slots.read_bytes(step)
        except store.SnapshotMismatch:
          continue  # overwritten while read: the next round takes the newer one
      finally:
        slots.close()
      call(peer, "store_replica", process, step, job, payload)
      sent[process] = step

  def _replicate_loop(self) -> None:
    while not self._stop.wait(REPLICATION_POLL_SECONDS):
      try:
        self._replicate_once()
      except Exception:  # pylint: disable=broad-except
        time.sleep(REPLICATION_POLL_SECONDS)  # a peer that is gone: the driver will notice

  def shutdown(self, remove_memory: bool = True) -> None:
    self._stop.set()
    self.stop()
    if remove_memory:
      for path in self.dir.glob("*"):
        path.unlink(missing_ok=True)


# --- the job driver -----------------------------------------------------------------------------


@dataclasses.dataclass
class JobView:
  """What the driver's observer sees at each poll (the experiment's fault injector uses it)."""
  now: float
  attempt: int
  placement: protocol.Placement
  reports: list[protocol.ProcessReport]
  agents: dict[str, Any]


@dataclasses.dataclass
class Recovery:
  """One failure's timeline on the driver's clock (time.monotonic)."""
  failure: protocol.Failure
  plan: protocol.RestorePlan | None = None
  relaunched_at: float | None = None
  recovered_at: float | None = None   # first poll with every process past failure.step


@dataclasses.dataclass
class JobResult:
  final: list[list[Any]]            # each process's final shards (host arrays), process order
  recoveries: list[Recovery]
  plans: list[protocol.RestorePlan]
  placements: list[protocol.Placement]
  events: list[dict]                # the processes' own events (restore times, snapshot times)
  seconds: float


def _answers(agent, timeout: float) -> bool:
  try:
    call(agent, "ping", timeout=timeout)
    return True
  except Exception:  # pylint: disable=broad-except  (RayActorError, GetTimeoutError, ...)
    return False


def _reports(agents: dict[str, Any], nodes, timeout: float):
  """(reports, lost nodes) from polling `nodes`' agents, Ray calls issued together."""
  pending, reports, lost = {}, [], []
  for node in nodes:
    poll = agents[node].poll
    pending[node] = poll.remote() if hasattr(poll, "remote") else poll
  for node, handle in pending.items():
    try:
      if callable(handle):
        reports += handle()
      else:
        import ray  # pylint: disable=import-outside-toplevel
        reports += ray.get(handle, timeout=timeout)
    except Exception:  # pylint: disable=broad-except  (RayActorError, GetTimeoutError, ...)
      lost.append(node)
  return reports, lost


def run_job(spec: protocol.JobSpec, placement: protocol.Placement, config: protocol.DriverConfig,
            make_agent: Callable[[str], Any], alive_nodes: Callable[[], list[str]],
            observer: Callable[[JobView], None] | None = None, poll_seconds: float = 0.05,
            poll_timeout_s: float = 10.0, log: Callable[[str], None] = print,
            before_restore: Callable[[int], None] | None = None) -> JobResult:
  """Runs the job to its last step through every failure `config.max_restarts` allows.

  `before_restore(attempt)` runs before each restart's restore is planned, once every process
  of the failed attempt is stopped or gone with its node (a fault injector uses it to change
  what the restore finds).
  """
  began = time.monotonic()
  agents = {node: make_agent(node) for node in placement.nodes}
  placements, plans, recoveries = [placement], [], []
  state = protocol.DriverState()

  def set_peers():
    for node in placement.nodes:
      peer = placement.peer_of(node)
      call(agents[node], "set_peer", agents[peer] if peer else None)

  def launch():
    nonlocal state
    if before_restore is not None and state.attempt > 0:
      before_restore(state.attempt + 1)
    snapshots = []
    for node in placement.nodes:
      snapshots += call(agents[node], "inventory", timeout=poll_timeout_s)
    persistent = store.restorable_steps(spec.persistent_dir, log)
    plan = protocol.plan_restore(placement, spec.job, snapshots, persistent)
    plans.append(plan)
    log(f"attempt {state.attempt + 1}: restore step {plan.step} from {list(plan.sources)}")
    for choice in plan.choices:
      if choice.source is protocol.Source.PEER:
        home = placement.node_of(choice.process)
        call(agents[home], "stage", choice.process, plan.step, agents[choice.node],
             timeout=poll_timeout_s * 6)
    port = call(agents[placement.node_of(0)], "free_port", timeout=poll_timeout_s)
    coordinator = f"127.0.0.1:{port}"
    for node in placement.nodes:
      launches = [protocol.Launch(p, state.attempt + 1, coordinator, plan.choices[p].source,
                                  plan.step) for p in placement.processes_on(node)]
      call(agents[node], "launch", launches, timeout=poll_timeout_s)
    state, _ = protocol.driver_step(config, state, protocol.Launched(time.monotonic(), plan))
    if recoveries and recoveries[-1].relaunched_at is None:
      recoveries[-1].plan, recoveries[-1].relaunched_at = plan, time.monotonic()

  def replace(lost):
    nonlocal placement
    lost, dead = list(lost), set(lost)
    while True:
      for node in lost:
        agent = agents.pop(node, None)
        if agent is not None and hasattr(agent, "__ray_terminate__"):
          import ray  # pylint: disable=import-outside-toplevel
          ray.kill(agent, no_restart=True)
      spares = [n for n in alive_nodes() if n not in placement.nodes and n not in dead]
      placement = protocol.replace_nodes(placement, lost, spares)
      for node in placement.nodes:
        if node not in agents:
          agents[node] = make_agent(node)
      # A node the cluster still lists may be gone already: its new agent never starts.
      lost = [n for n in placement.nodes if not _answers(agents[n], poll_timeout_s)]
      if not lost:
        break
      dead.update(lost)
      log(f"spare nodes {lost} did not answer; replacing them too")
    placements.append(placement)
    log(f"nodes {sorted(dead)} lost; processes now on {list(placement.nodes)}")

  try:
    set_peers()
    launch()
    while True:
      time.sleep(poll_seconds)
      reports, lost = _reports(agents, placement.nodes, poll_timeout_s)
      now = time.monotonic()
      if observer is not None:
        observer(JobView(now, state.attempt, placement, reports, agents))
      if recoveries and recoveries[-1].recovered_at is None and not lost and reports and all(
          r.step > recoveries[-1].failure.step for r in reports):
        recoveries[-1].recovered_at = now
      state, commands = protocol.driver_step(config, state,
                                             protocol.Reports(now, tuple(reports), tuple(lost)))
      for command in commands:
        if isinstance(command, protocol.Fence):
          call(agents[placement.node_of(command.process)], "fence", command.process,
               timeout=poll_timeout_s)
        elif isinstance(command, protocol.StopJob):
          for node in placement.nodes:
            if node not in lost:
              call(agents[node], "stop", timeout=poll_timeout_s)
        elif isinstance(command, protocol.Restart):
          recoveries.append(Recovery(state.failures[-1]))
          log(f"failure: {state.failures[-1].detail} (at step {state.failures[-1].step})")
          if command.lost_nodes:
            replace(command.lost_nodes)
          set_peers()
          launch()
        elif isinstance(command, protocol.GiveUp):
          raise RuntimeError(f"job given up: {command.reason}; failures: "
                             f"{[f.detail for f in state.failures]}")
        elif isinstance(command, protocol.Finish):
          results = Path(spec.results_dir)
          final = [store.load_shards(results / f"final.p{p}.npz")
                   for p in range(spec.num_processes)]
          events = []
          for path in sorted(results.glob("events.p*.jsonl")):
            events += [json.loads(line) for line in path.read_text().splitlines() if line]
          return JobResult(final, recoveries, plans, placements, events,
                           time.monotonic() - began)
  finally:
    for node, agent in agents.items():
      try:
        call(agent, "shutdown", timeout=poll_timeout_s)
      except Exception:  # pylint: disable=broad-except  (an agent whose node is gone)
        pass


# --- Ray ------------------------------------------------------------------------------------------


def ray_agent_factory(job: str, memory_root: str, spec_file: str, device_flags: str,
                      log_dir: str | None = None, slots: int = 2) -> Callable[[str], Any]:
  """node id -> a NodeAgent actor pinned to that node (dies with it; never restarted by Ray)."""
  import ray  # pylint: disable=import-outside-toplevel
  from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # pylint: disable=import-outside-toplevel

  actor = ray.remote(NodeAgent)

  def make(node: str):
    return actor.options(
        num_cpus=0, max_concurrency=8, max_restarts=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
            node, job, memory_root, spec_file, device_flags, log_dir, slots)
  return make


def ray_alive_nodes() -> list[str]:
  import ray  # pylint: disable=import-outside-toplevel
  return [n["NodeID"] for n in ray.nodes() if n["Alive"]]
