"""Checkpoint states in node-local memory: a faulted job against the fault-free one, on Ray.

A multi-controller jax job (research/checkpoint: `processes` jax processes, one global data
mesh) trains the digits MLP; one node agent per node (a Ray actor) launches the node's
processes, keeps their snapshots in the node's memory and a replica of its peer node's. The
job runs once without faults and once with the configured faults, fired at steps drawn from
the seed by the injector below (it lives here, not in the runtime):

  kill_process        kill -9 of a jax process: the job restarts from local memory
  hang_process        SIGSTOP of a process: no heartbeats, it is fenced (kill -9), restart
  kill_node           a node of Ray's test cluster removed (its memory with it): the lost
                      processes restart on a spare node from the peer's replica (removed once
                      the peer holds replicas at or past the observed step, so that the fault
                      is at that step and not at an older one the replicas lagged at)
  corrupt_checkpoint  flips bytes in the newest committed orbax step (armed with the next
                      fault, fired once that failure stopped the job, before its restore)
  kill_node_and_peer  a node and its peer removed: both copies gone, restore from orbax (the
                      newest committed step whose files match its manifest)

Both final states are compared bit for bit with the reference: the fault-free job, or (for up
to 2 devices, where a sum of two is the same in any order) one process with the same devices.
Headline: the faulted job's wall time vs the fault-free job's; the note gives each failure's
wasted time (failure to the first step past the pre-failure step) and where it restored from.

  python -m experiments.run configs/checkpoint/smoke.py
  python -m experiments.run configs/checkpoint/faults.py --paper checkpoint.faults
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import time
from pathlib import Path

import ml_collections
import numpy as np

from research.common import config as config_lib
from research.common import records

NODE_FAULTS = {"kill_node", "kill_node_and_peer"}
FAULTS = ("kill_process", "hang_process", "kill_node", "corrupt_checkpoint", "kill_node_and_peer")


def config_schema() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "nodes": 2,                    # nodes the job's processes run on
      "spare_nodes": 2,              # more nodes, idle until one replaces a lost node
      "processes": 2,                # jax processes of the job (one jax.distributed program)
      "devices": 2,                  # devices of the job in all (CPU: per process = devices /
                                     # processes, set with XLA_FLAGS in each process)
      "steps": 24,
      "hidden": (64,),
      "batch_per_device": 16,
      "learning_rate": 0.05,
      "dropout": 0.1,
      "snapshot_every": 1,           # local-memory snapshot period (steps)
      # Snapshots kept per process in local memory, and replicas of each at the peer node: the
      # restore needs one step every process still holds, so these must cover the replicas'
      # lag behind the newest snapshot (a few steps when steps are short).
      "memory_slots": 3,
      "persist_every": 4,            # orbax period (steps); 0: never
      "min_step_seconds": 0.1,       # pacing, so faults land where they are drawn
      "heartbeat_timeout": 3.0,      # seconds without a heartbeat before a process is fenced
      "startup_timeout": 120.0,      # the same before its first heartbeat
      "max_restarts": 8,
      "faults": FAULTS,              # in this order, at increasing steps drawn from the seed
      "reference": "fault_free_job",  # or "in_process" (one process; up to 2 devices)
      # "" starts Ray's multi-node test cluster here (nodes + spare_nodes worker nodes; a plain
      # one-node Ray for 1 node without spares and node faults); else the address of a running
      # Ray cluster (faults that remove nodes need the test cluster).
      "ray_address": "",
      # One jax compilation cache for the jobs' processes: "run" = a folder in the run folder,
      # removed at the end; "off"; or a folder to keep.
      "compilation_cache": "run",
  })


PAPER_PAGE = "papers/checkpoint.md"


def validate_config(config) -> None:
  config_lib.check_positive(config, "nodes", "processes", "devices", "steps", "batch_per_device",
                            "heartbeat_timeout", "startup_timeout")
  if config.processes > config.devices:
    raise config_lib.ConfigError(
        f"config key 'processes': got {config.processes}, more than devices={config.devices} "
        "(every process needs at least one device)")
  if config.devices % config.processes:
    raise config_lib.ConfigError(
        f"config key 'devices': got {config.devices}, expected a multiple of "
        f"processes={config.processes} (the same devices on every process)")
  if config.processes < config.nodes:
    raise config_lib.ConfigError(f"config key 'nodes': got {config.nodes}, more than "
                                 f"processes={config.processes} (a node without a process)")
  if config.memory_slots < 2:
    raise config_lib.ConfigError(f"config key 'memory_slots': got {config.memory_slots}, "
                                 "expected >= 2")
  for key in ("spare_nodes", "snapshot_every", "persist_every", "max_restarts"):
    if config[key] < 0:
      raise config_lib.ConfigError(f"config key {key!r}: got {config[key]}, expected >= 0")
  unknown = [f for f in config.faults if f not in FAULTS]
  if unknown:
    raise config_lib.ConfigError(f"config key 'faults': unknown {unknown}; expected some of "
                                 f"{list(FAULTS)}")
  if config.reference not in ("fault_free_job", "in_process"):
    raise config_lib.ConfigError(f"config key 'reference': got {config.reference!r}, expected "
                                 "'fault_free_job' or 'in_process'")
  if config.reference == "in_process" and config.devices > 2:
    raise config_lib.ConfigError(
        f"config key 'reference': 'in_process' needs devices <= 2 (got {config.devices}): "
        "beyond two, a sum in another order is not the same float")
  if not config.compilation_cache:
    raise config_lib.ConfigError("config key 'compilation_cache': got '', expected 'run', "
                                 "'off' or a folder")
  slots = max(1, len(config.faults))
  if config.steps < 3 * slots:
    raise config_lib.ConfigError(f"config key 'steps': got {config.steps}, expected >= "
                                 f"{3 * slots} for {len(config.faults)} faults")


# --- the fault injector -------------------------------------------------------------------------


@dataclasses.dataclass
class Fault:
  kind: str
  step: int                 # fired once every process has completed this step
  process: int              # the process hit (or whose node is removed)
  fired_at: float | None = None
  detail: str = ""
  # What the injector read once the fault had landed (None where it does not apply, or where
  # the file was not there):
  completed: int | None = None    # kill_process, hang_process: the newest step the hit process
                                  # had recorded (its status file or its local memory), which
                                  # the signal froze
  held_by_all: int | None = None  # the newest step in every process's local memory once the
                                  # failed attempt was stopped, before its restore was planned
  last_beat_ns: int | None = None  # hang_process: the stopped process's last heartbeat
                                  # (CLOCK_MONOTONIC ns, the clock of time.monotonic)
  due_step: int | None = None     # kill_node: the observed step when the fault came due; the
                                  # node is removed once its peer holds replicas at or past it
  replicated_step: int | None = None  # kill_node: the newest step the peer held replicas of
                                      # for every process of the node when it was removed


def draw_faults(config) -> list[Fault]:
  """One fault per entry of `config.faults`, at increasing steps drawn from the seed.

  The steps split [2, steps - 1] into equal segments, one per fault; a corrupt_checkpoint goes
  with the next fault's step; a fault that needs orbax comes after two persisted steps.
  """
  rng = np.random.default_rng(config.seed)
  kinds = list(config.faults)
  timed = [k for k in kinds if k != "corrupt_checkpoint"]
  low, high = 2, config.steps - 1
  bounds = np.linspace(low, high, len(timed) + 1)
  steps = [int(rng.integers(int(a), max(int(a) + 1, int(b)))) for a, b in
           zip(bounds[:-1], bounds[1:])]
  if "kill_node_and_peer" in timed and config.persist_every:
    i = timed.index("kill_node_and_peer")
    steps[i] = max(steps[i], 2 * config.persist_every + 2)
    steps = [s if j <= i else max(s, steps[i] + 1) for j, s in enumerate(steps)]
  faults, timed_steps = [], iter(zip(timed, steps))
  pending_corrupt = False
  for kind in kinds:
    if kind == "corrupt_checkpoint":
      pending_corrupt = True
      continue
    _, step = next(timed_steps)
    process = int(rng.integers(config.processes))
    if pending_corrupt:
      faults.append(Fault("corrupt_checkpoint", step, process))
      pending_corrupt = False
    faults.append(Fault(kind, step, process))
  if pending_corrupt:
    faults.append(Fault("corrupt_checkpoint", config.steps - 1, 0))
  return faults


def corrupt_newest_checkpoint(directory: Path) -> str:
  """Flips bytes in the largest file of the newest committed orbax step.

  Committed: the step has its manifest, so a restore would otherwise trust it (a step without
  one is skipped anyway).
  """
  from research.checkpoint import store  # pylint: disable=import-outside-toplevel

  directory = Path(directory)
  manifests = directory / store.MANIFESTS
  steps = sorted((p for p in (directory / "steps").iterdir()
                  if p.name.isdigit() and (manifests / f"{p.name}.json").is_file()),
                 key=lambda p: int(p.name)) if (directory / "steps").is_dir() else []
  if not steps:
    return f"nothing (no committed step under {directory})"
  files = sorted((p for p in steps[-1].rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  target = files[-1]
  data = bytearray(target.read_bytes())
  for i in range(0, len(data), max(1, len(data) // 16)):
    data[i] ^= 0xFF
  target.write_bytes(bytes(data))
  return str(target.relative_to(directory))


def wait_for_signal(pid: int, states: str, seconds: float = 10.0) -> bool:
  """Waits until every thread of `pid` is in one of `states` (letters of /proc's state field:
  "ZX" dead, "Tt" stopped) or the process is gone; False after `seconds`.

  `os.kill` only queues a signal: a thread running on another core may still finish a step
  and write its snapshot, status or heartbeat until it takes it.
  """
  tasks = Path(f"/proc/{pid}/task")
  end = time.monotonic() + seconds
  while True:
    try:
      threads = list(tasks.iterdir())
    except FileNotFoundError:
      return True  # reaped
    letters = []
    for thread in threads:
      try:
        letters.append((thread / "stat").read_text().rsplit(")", 1)[1].split()[0])
      except (FileNotFoundError, ProcessLookupError):
        continue  # a thread that has exited
    if all(letter in states for letter in letters):
      return True
    if time.monotonic() > end:
      return False
    time.sleep(0.001)


def local_steps(path: Path) -> set[int]:
  """The steps of the valid snapshots in a local-memory file (none without the file)."""
  from research.checkpoint import store  # pylint: disable=import-outside-toplevel
  try:
    slots = store.LocalSlots.open(path)
  except (FileNotFoundError, ValueError):
    return set()
  try:
    return {step for step, _, _ in slots.snapshots()}
  finally:
    slots.close()


class Injector:
  """The driver's observer: fires each fault once its step is reached and the job is healthy.

  A corrupt_checkpoint is armed with the fault after it and fires in `before_restore`, when
  that fault's failure has stopped every process: the newest committed step is then the one the
  restore would take. (Fired with the fault instead, process 0 could still commit the save in
  flight after the corruption, and the restore would take that newer, intact step.)
  """

  def __init__(self, faults: list[Fault], cluster, memory_root: Path, job: str,
               persistent_dir: Path, log, replicas: bool = True):
    """`replicas`: the job snapshots into local memory, so its peers keep replicas that a
    kill_node waits for (a job without local memory has none to wait for)."""
    self.faults, self.cluster, self.log = faults, cluster, log
    self.replicas = replicas
    self.memory_root, self.job, self.persistent_dir = memory_root, job, persistent_dir
    self.progress: list[tuple[float, int, int]] = []  # (time, attempt, min step)
    self.armed: list[Fault] = []  # corruptions whose companion fault has fired
    self.restoring: tuple[Fault, object] | None = None  # the fault fired last, its placement

  def _remove_node(self, node: str) -> None:
    target = next(n for n in self.cluster.list_all_nodes() if n.node_id == node)
    self.cluster.remove_node(target, allow_graceful=False)
    from research.checkpoint import transport  # pylint: disable=import-outside-toplevel
    shutil.rmtree(transport.node_memory_dir(self.memory_root, self.job, node),
                  ignore_errors=True)  # its memory goes with it

  def __call__(self, view) -> None:
    from research.checkpoint import transport  # pylint: disable=import-outside-toplevel

    healthy = (len(view.reports) == view.placement.num_processes
               and all(r.alive and r.started for r in view.reports))
    if not view.reports:
      return
    step = min(r.step for r in view.reports)
    if not self.progress or self.progress[-1][1:] != (view.attempt, step):
      self.progress.append((view.now, view.attempt, step))
    pending = [f for f in self.faults if f.fired_at is None and f not in self.armed]
    if not pending or not healthy or step < pending[0].step:
      return
    fault = pending[0]
    if fault.kind == "corrupt_checkpoint" and len(pending) == 1:
      fault.step = step  # no fault after it, so no restore: corrupted as it stands
      self._corrupt(fault, f"at step {step}")
      return
    target = pending[1] if fault.kind == "corrupt_checkpoint" else fault
    node = view.placement.node_of(target.process)
    peer = view.placement.peer_of(node)
    if target.kind == "kill_node" and peer is not None and self.replicas:
      if target.due_step is None:
        target.due_step = step  # fixed: training goes on while the replicas catch up with it
      replicated = self._replicated_step(view, node, peer)
      if replicated < target.due_step:
        return  # the peer's replicas lag the step it came due at: tried again at the next poll
      target.replicated_step = replicated
    if fault.kind == "corrupt_checkpoint":
      fault.step = step
      self.armed.append(fault)  # fired before the next fault's restore
      fault = target
    if fault.kind in ("kill_process", "hang_process"):
      pid = transport.call(view.agents[node], "pids")[fault.process]
      kill = fault.kind == "kill_process"
      os.kill(pid, signal.SIGKILL if kill else signal.SIGSTOP)
      fault.detail = f"process {fault.process} (pid {pid})"
      if not wait_for_signal(pid, "ZX" if kill else "Tt"):
        self.log(f"fault: pid {pid} had not taken the signal after 10 s")
      fault.completed, beat = self._recorded(node, fault.process)
      if not kill:
        fault.last_beat_ns = beat
    elif fault.kind == "kill_node":
      self._remove_node(node)
      fault.detail = f"node of process {fault.process}"
    elif fault.kind == "kill_node_and_peer":
      self._remove_node(node)
      if peer is not None:
        self._remove_node(peer)
      fault.detail = f"node of process {fault.process} and its peer"
    fault.fired_at = time.monotonic()
    fault.step = step  # the step every process had completed when it fired
    self.restoring = (fault, view.placement)
    self.log(f"fault: {fault.kind} at step {step}: {fault.detail}")

  def _replicated_step(self, view, node: str, peer: str) -> int:
    """The newest step that `peer` holds a replica of for every process of `node` (-1: none).

    The agents replicate beside training, the newest snapshot whenever they look
    (transport.NodeAgent._replicate_once), so a replica can lag the processes by a few steps;
    a node removed then would restore an older step than the one it was removed at.
    """
    from research.checkpoint import protocol  # pylint: disable=import-outside-toplevel
    from research.checkpoint import transport  # pylint: disable=import-outside-toplevel
    newest = {p: -1 for p in view.placement.processes_on(node)}
    for snap in transport.call(view.agents[peer], "inventory", timeout=10.0):
      if snap.tier == protocol.Tier.REPLICA and snap.process in newest:
        newest[snap.process] = max(newest[snap.process], snap.step)
    return min(newest.values())

  def _memory_file(self, node: str, process: int) -> Path:
    from research.checkpoint import transport  # pylint: disable=import-outside-toplevel
    return transport.process_files(self.memory_root, self.job, node, process)[0]

  def _recorded(self, node: str, process: int) -> tuple[int | None, int | None]:
    """(newest step, last heartbeat) a process whose signal has landed had recorded.

    The step: in its status file or in its local memory (it writes the snapshot first, so a
    kill between the two leaves the status a step behind); the heartbeat from its status file
    (None without one). Read after the signal landed, neither can change any more; the observed
    step the fault fired at can be a step or two older (reports travel to the driver), and the
    last beat older than one beat period before the signal (a starved heartbeat thread).
    """
    from research.checkpoint import store  # pylint: disable=import-outside-toplevel
    from research.checkpoint import transport  # pylint: disable=import-outside-toplevel
    memory_file, status_file = transport.process_files(self.memory_root, self.job, node, process)
    steps, beat = local_steps(memory_file), None
    if status_file.is_file():
      status = store.ProcessStatus(status_file)
      _, step, beat, _ = status.read()
      status.close()
      steps.add(step)
    return max(steps, default=None), beat

  def _corrupt(self, fault: Fault, when: str) -> None:
    fault.detail = corrupt_newest_checkpoint(self.persistent_dir)
    fault.fired_at = time.monotonic()
    self.log(f"fault: corrupt_checkpoint {when}: {fault.detail}")

  def before_restore(self, attempt: int) -> None:
    """Fires the armed corruptions: the job's processes are stopped, no save can commit.

    Then reads, for the fault fired last, the newest step every process holds in its local
    memory (nothing writes there until the restore plan is carried out).
    """
    for fault in self.armed:
      if fault.fired_at is None:
        self._corrupt(fault, f"before attempt {attempt}'s restore")
    if self.restoring is not None:  # the first restart after a fault is the one it caused
      fault, placement = self.restoring
      held = [local_steps(self._memory_file(placement.node_of(p), p))
              for p in range(placement.num_processes)]
      fault.held_by_all = max(set.intersection(*held), default=None)
      self.restoring = None


# --- the run -------------------------------------------------------------------------------------


def _start_cluster(config):
  import ray  # pylint: disable=import-outside-toplevel
  os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback addresses only
  if config.ray_address:
    from research.checkpoint import transport  # pylint: disable=import-outside-toplevel
    ray.init(address=config.ray_address)
    return None, transport.ray_alive_nodes()
  if config.nodes == 1 and config.spare_nodes == 0 and not set(config.faults) & NODE_FAULTS:
    ray.init(address="local", num_cpus=1, include_dashboard=False,  # one node: this one
             log_to_driver=False)
    return None, [ray.get_runtime_context().get_node_id()]
  return start_test_cluster(config.nodes + config.spare_nodes)


def start_test_cluster(worker_nodes: int):
  """Ray's multi-node test cluster on this machine: a head for the driver (no CPUs) and
  `worker_nodes` 1-CPU nodes; connects this process. Returns (cluster, worker node ids).

  The GCS declares a node dead after `health_check_failure_threshold` missed health checks
  (one per `health_check_period_ms`): raised to 20 x 1 s, as a loaded 2-core machine has
  missed Ray's default 5 x 3 s. The agent of a node removed by a test is seen dead at once
  anyway (its processes' connections close), though Ray lists the node alive until the checks
  give up (`live_nodes` leaves it out).
  """
  import ray  # pylint: disable=import-outside-toplevel
  from ray.cluster_utils import Cluster  # pylint: disable=import-outside-toplevel
  cluster = Cluster(initialize_head=True, head_node_args={
      "num_cpus": 0, "include_dashboard": False,
      "_system_config": {"health_check_failure_threshold": 20,
                         "health_check_period_ms": 1000}})
  for _ in range(worker_nodes):
    cluster.add_node(num_cpus=1)
  ray.init(address=cluster.address, log_to_driver=False)
  cluster.wait_for_nodes()
  head = cluster.head_node.node_id
  return cluster, [n.node_id for n in cluster.list_all_nodes() if n.node_id != head]


def live_nodes(nodes: list[str], cluster=None) -> list[str]:
  """Those of `nodes` (Ray node ids) that are alive, in their order.

  With Ray's test cluster, also only the nodes it still has: one it removed stays listed alive
  until the GCS's health checks give up on it (up to 20 s here, see `start_test_cluster`).
  """
  from research.checkpoint import transport  # pylint: disable=import-outside-toplevel
  live = set(transport.ray_alive_nodes())
  if cluster is not None:
    live &= {n.node_id for n in cluster.list_all_nodes()}
  return [n for n in nodes if n in live]


def _problem(config):
  from research.checkpoint import worker  # pylint: disable=import-outside-toplevel
  return worker.make_problem(tuple(config.hidden), config.batch_per_device,
                             config.learning_rate, config.dropout, config.seed)


def prepare(config_json: str, folder: str, reference: bool) -> None:
  """Writes the job's inputs (training rows, initial params) and, if asked, the reference.

  The reference: the job's computation in one process on `devices` CPU devices, its shards
  in `reference.npz`. Runs in this process when it has the devices, else in a child process
  (`start_prepare`) while the Ray cluster starts: scikit-learn's import and the eager init take
  seconds, and this process's device count is fixed already.
  """
  from research.checkpoint import store  # pylint: disable=import-outside-toplevel
  from research.checkpoint import worker  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict(json.loads(config_json))
  problem = _problem(config)
  worker.write_inputs(problem, Path(folder) / "inputs.npz")
  if reference:
    store.save_shards(Path(folder) / "reference.npz", reference_shards(config, problem))


def reference_shards(config, problem=None) -> list[np.ndarray]:
  """The job's computation in this process on its first `devices` CPU devices: the shards."""
  import jax  # pylint: disable=import-outside-toplevel
  from research.checkpoint import store  # pylint: disable=import-outside-toplevel
  from research.checkpoint import worker  # pylint: disable=import-outside-toplevel
  problem = _problem(config) if problem is None else problem
  mesh = worker.data_mesh(jax.devices()[:config.devices])
  state = worker.run_steps(problem, mesh, worker.replicate(worker.init_state(problem), mesh),
                           config.steps)
  return store.local_shards(state)


def _prepare_json(config) -> str:
  keys = ("hidden", "batch_per_device", "learning_rate", "dropout", "seed", "devices", "steps")
  return json.dumps({k: (list(config[k]) if k == "hidden" else config[k]) for k in keys})


def start_prepare(config, folder: Path, reference: bool):
  """Starts `prepare` in a child process with `devices` CPU devices."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from research.common import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  folder.mkdir(parents=True, exist_ok=True)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  mesh_lib.set_cpu_device_count(config.devices, env)
  given = _prepare_json(config)
  code = ("import sys; from experiments.checkpoint import prepare; "
          "prepare(sys.argv[1], sys.argv[2], sys.argv[3] == '1')")
  return subprocess.Popen([sys.executable, "-c", code, given, str(folder),
                           "1" if reference else "0"], env=env)


def run_job(config, workdir: Path, name: str, cluster, nodes: list[str], faults: list[Fault],
            cache: str, run=None, log=print):
  """One job through the runtime on `nodes` (Ray node ids); returns (result, injector).

  `cluster`: Ray's test cluster (ray.cluster_utils.Cluster), which node faults remove nodes
  of; `run`: the launcher's run context for progress lines, or None.
  """
  from research.checkpoint import protocol  # pylint: disable=import-outside-toplevel
  from research.checkpoint import store  # pylint: disable=import-outside-toplevel
  from research.checkpoint import transport  # pylint: disable=import-outside-toplevel
  from research.checkpoint import worker  # pylint: disable=import-outside-toplevel

  folder = workdir / name
  (folder / "results").mkdir(parents=True, exist_ok=True)
  inputs = workdir / "inputs.npz"
  if not inputs.exists():
    worker.write_inputs(_problem(config), inputs)
  problem = worker.read_problem(inputs, tuple(config.hidden), config.batch_per_device,
                                config.learning_rate, config.dropout, config.seed)
  job = worker.fingerprint(problem, config.devices, config.steps)
  spec = protocol.JobSpec(
      job=job, num_processes=config.processes,
      devices_per_process=config.devices // config.processes, hidden=tuple(config.hidden),
      batch_per_device=config.batch_per_device, learning_rate=config.learning_rate,
      dropout=config.dropout, seed=config.seed, steps=config.steps,
      snapshot_every=config.snapshot_every, persist_every=config.persist_every,
      min_step_seconds=config.min_step_seconds, inputs_file=str(inputs),
      persistent_dir=str(folder / "persistent"), results_dir=str(folder / "results"),
      compilation_cache_dir=cache or None, memory_slots=config.memory_slots)
  records.atomic_write_json(folder / "spec.json", spec.to_json())
  memory_root = store.local_memory_root() / f"{name}-{os.getpid()}-{time.time_ns()}"
  per_node = -(-config.processes // config.nodes)
  placement = protocol.place(config.processes, per_node, nodes)
  make_agent = transport.ray_agent_factory(
      job, str(memory_root), str(folder / "spec.json"),
      f"--xla_force_host_platform_device_count={spec.devices_per_process}", str(folder / "logs"),
      config.memory_slots)
  injector = Injector(faults, cluster, memory_root, job, folder / "persistent", log,
                      replicas=config.snapshot_every > 0)
  driver = protocol.DriverConfig(config.processes, config.steps, config.heartbeat_timeout,
                                 config.startup_timeout, config.max_restarts)
  last = [-1]

  def observe(view):
    injector(view)
    if run is not None and injector.progress and injector.progress[-1][2] != last[0]:
      last[0] = injector.progress[-1][2]
      run.log(last[0], job=name, attempt=view.attempt)

  def alive_nodes():
    return live_nodes(nodes, cluster)

  try:
    result = transport.run_job(spec, placement, driver, make_agent, alive_nodes, observe,
                               log=log, before_restore=injector.before_restore)
  finally:
    shutil.rmtree(memory_root, ignore_errors=True)
  return result, injector


def _failure_rows(result, faults: list[Fault]) -> list[dict]:
  """Each fault with the failure the driver saw for it and its timeline.

  Matched on time, not by position: a fault's failure is the first one detected after it fired
  and before the next fault fired. The counts need not match, so pairing them in order would
  pair the wrong ones without a word: a loaded machine can add a failure no fault caused (a
  heartbeat later than the timeout), and a fault may not fire before the job ends. A fault
  that never fired, or whose failure the driver never saw, gets a row with no timeline.
  """
  timed = [f for f in faults if f.kind != "corrupt_checkpoint"]
  fired = sorted((f for f in timed if f.fired_at is not None), key=lambda f: f.fired_at)
  rows = []
  for fault in timed:
    recovery = None
    if fault.fired_at is not None:
      later = [f.fired_at for f in fired if f.fired_at > fault.fired_at]
      until = min(later, default=float("inf"))
      recovery = next((r for r in result.recoveries
                       if fault.fired_at <= r.failure.detected_at < until), None)
    plan = recovery.plan if recovery is not None else None
    rows.append({
        "kind": fault.kind, "process": fault.process, "step": fault.step,
        "fired": fault.fired_at is not None,
        "completed": fault.completed, "held_by_all": fault.held_by_all,
        "replicated_step": fault.replicated_step,
        "seen_as": recovery.failure.kind if recovery is not None else None,
        "detection_s": (recovery.failure.detected_at - fault.fired_at
                        if recovery is not None else None),
        "wasted_s": (recovery.recovered_at - fault.fired_at
                     if recovery is not None and recovery.recovered_at is not None else None),
        "restored_step": plan.step if plan else None,
        "restored_from": sorted(set(plan.sources)) if plan else None})
  return rows


def run(config, run):
  os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback addresses only
  import ray  # pylint: disable=import-outside-toplevel
  from research.checkpoint import store  # pylint: disable=import-outside-toplevel

  cache = {"run": str(run.workdir / "compilation_cache"), "off": ""}.get(
      config.compilation_cache, config.compilation_cache)
  lines: list[str] = []

  def log(line):
    lines.append(f"{time.monotonic():.3f} {line}")

  in_process = config.reference == "in_process"
  import jax  # pylint: disable=import-outside-toplevel
  if len(jax.devices("cpu")) >= config.devices and jax.default_backend() == "cpu":
    # This process has the devices (the demo's 8): a thread, while the cluster starts.
    import threading  # pylint: disable=import-outside-toplevel
    child, errors = None, []

    def prepare_here():
      try:
        prepare(_prepare_json(config), str(run.workdir), in_process)
      except BaseException as error:  # pylint: disable=broad-except  (raised below)
        errors.append(error)

    preparing = threading.Thread(target=prepare_here)
    preparing.start()
  else:
    child, preparing = start_prepare(config, run.workdir, in_process), None
  cluster, nodes = _start_cluster(config)
  jobs, reference = {}, None
  try:
    if child is not None and child.wait() != 0:
      raise RuntimeError(f"preparing the job's inputs exited with code {child.returncode}")
    if preparing is not None:
      preparing.join()
      if errors:
        raise errors[0]
    if in_process:  # replicated: every process holds the same shards as the one process
      reference = [store.load_shards(run.workdir / "reference.npz")] * config.processes
    names = ["fault_free", "faulted"] if config.reference == "fault_free_job" else ["faulted"]
    for name in run.progress(names, description="jobs"):
      faults = draw_faults(config) if name == "faulted" else []
      result, injector = run_job(config, run.workdir, name, cluster, live_nodes(nodes, cluster),
                                 faults, cache, run, lambda line, n=name: log(f"[{n}] {line}"))
      if reference is None:
        reference = result.final
      jobs[name] = {"result": result, "faults": faults, "progress": injector.progress}
  finally:
    if child is not None and child.poll() is None:
      child.kill()
    ray.shutdown()
    if cluster is not None:
      cluster.shutdown()
    if config.compilation_cache == "run":
      shutil.rmtree(cache, ignore_errors=True)  # compiled programs, not results
  run.save_text("events.log", "\n".join(lines) + "\n")

  summary_jobs = {}
  for name, job in jobs.items():
    result = job["result"]
    bit_exact = len(result.final) == len(reference) and all(
        len(shards) == len(expected) and all(
            np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(shards, expected))
        for shards, expected in zip(result.final, reference))
    restores = [e for e in result.events if e["event"] == "restored"]
    summary_jobs[name] = {
        "bit_exact": bit_exact, "seconds": result.seconds, "attempts": len(result.plans),
        "failures": _failure_rows(result, job["faults"]),
        "faults": [{"kind": f.kind, "process": f.process, "step": f.step, "detail": f.detail}
                   for f in job["faults"]],
        "restores": [{k: e[k] for k in ("attempt", "process", "source", "step", "init_s",
                                        "restore_s")} for e in restores],
        "progress": job["progress"]}
  _plot(run, summary_jobs)
  faulted = summary_jobs["faulted"]
  clean = summary_jobs.get("fault_free")
  bit_exact = all(j["bit_exact"] for j in summary_jobs.values())
  failures = "; ".join(
      f"{r['kind']} @ {r['step']}: {_seconds(r['wasted_s'])} wasted, restored step "
      f"{r['restored_step']} from {'+'.join(r['restored_from'] or [])}"
      for r in faulted["failures"]) or "no faults"
  against = ("the fault-free job" if clean else
             f"one process with {config.devices} devices")
  return {
      "headline": {
          "metric": "faulted job seconds", "value": faulted["seconds"],
          "baseline": "fault-free job seconds" if clean else "(no fault-free job run)",
          "baseline_value": clean["seconds"] if clean else float("nan"),
          "note": (f"{config.processes} jax processes on {config.nodes} Ray nodes; {failures}; "
                   f"final state bit-exact vs {against}: {'yes' if bit_exact else 'NO'}"),
      },
      "bit_exact": bit_exact,
      "reference": config.reference,
      "jobs": summary_jobs,
  }


def _seconds(value) -> str:
  return "-" if value is None else f"{value:.1f} s"


def _plot(run, jobs) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(7.5, 4))
  for name, job in jobs.items():
    if not job["progress"]:
      continue
    t0 = job["progress"][0][0]
    ax.step([t - t0 for t, _, _ in job["progress"]], [s for _, _, s in job["progress"]],
            where="post", label=name.replace("_", "-"))
  for fault in jobs["faulted"]["faults"]:
    ax.axhline(fault["step"], color="grey", linestyle=":", linewidth=0.8)
    ax.annotate(fault["kind"], (0, fault["step"]), fontsize=7, va="bottom")
  ax.set_xlabel("seconds since the job's first report (restarts included)")
  ax.set_ylabel("steps completed by every process")
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right")
  ax.set_title("multi-controller training under faults (dotted: fault steps)")
  run.save_figure("steps_vs_time.png", fig)
  plt.close(fig)


def paper_tables(result: dict) -> dict[str, str]:
  """The page's recovery table from a kept result (its summary)."""
  summary = result["summary"]
  rows = []
  for name, job in summary["jobs"].items():
    for r in job["failures"] or [None]:
      rows.append([
          name.replace("_", "-"), "yes" if job["bit_exact"] else "NO", job["attempts"],
          "-" if r is None else f"{r['kind']} (process {r['process']}) @ step {r['step']}"
          + ("" if r.get("fired", True) else " (never fired)"),
          "-" if r is None or r["seen_as"] is None else r["seen_as"],
          "-" if r is None else _seconds(r["detection_s"]),
          "-" if r is None else _seconds(r["wasted_s"]),
          "-" if r is None or r["restored_step"] is None else
          f"step {r['restored_step']} from {'+'.join(r['restored_from'])}",
          f"{job['seconds']:.1f}"])
  return {"faults": records.write_markdown_table(
      ["job", "final state == reference (bits)", "launches", "fault", "seen as", "detected after",
       "wasted (fault to first step past it)", "restored", "job seconds"], rows)}
