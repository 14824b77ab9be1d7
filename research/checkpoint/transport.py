"""The processes: a coordinator, one node agent per simulated node, the agents' workers.

Every party is an OS process (multiprocessing, spawn start: each imports jax afresh) talking over
pipes; messages are tuples whose first entry names them. The coordinator hands every process the
training rows, and a job's processes may share one jax compilation cache (`JobSpec`), so a process
after the first loads its programs instead of compiling them. One training step:

  coordinator -> agents -> workers   ("step", s)
  workers -> agents -> coordinator   ("grads", s, worker, packed gradient)   relayed as is
  coordinator: mean of the gradients summed in worker order (the fixed order makes the float
               sum independent of who failed)
  coordinator -> agents -> workers   ("update", s, packed mean)
  workers: apply it (optax), snapshot the state into the node's local memory every
           `snapshot_every` steps, answer ("applied", s)
  agents: when all their workers applied s, ("done", s); every `persist_every` steps they start
          async orbax saves of their workers' snapshots (store.PersistentStore)

Failures. Workers send heartbeats to their agent, agents to the coordinator. A worker whose
process died, whose pipe closed or whose heartbeats stopped for `heartbeat_timeout` is killed
(fenced: a hung worker must not come back) and replaced, restored from the node's local
memory: by the node's warm spare (a standby worker that has compiled the step and prepared its
restore buffers; the job starts once every node has one) or, when that is used up, by a new
process; the agent replays the mean gradients it relayed since that snapshot and
re-sends the step in progress. An agent that dies (its node) takes its workers and local memory
with it: the coordinator kills every process, picks the newest step every worker has committed
and intact on disk, restarts all agents from it, and re-runs the steps after it. Every message
names its step; a gradient of another step is dropped (logged), so states of different steps
never mix.

Faults (`Fault`): kill -9 a worker or an agent at a step, hang a worker (no heartbeats, no work),
delay heartbeats below the timeout, corrupt the newest persisted checkpoint of a worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import wait as wait_for
from pathlib import Path
from typing import Callable

FAULT_KINDS = ("kill_worker", "kill_agent", "hang_worker", "delay_heartbeats",
               "corrupt_checkpoint")


@dataclasses.dataclass(frozen=True)
class JobSpec:
  """A training job: its shape, its model, its checkpoint and heartbeat policy."""
  workdir: str
  num_agents: int = 2
  workers_per_agent: int = 2
  steps: int = 20
  seed: int = 0
  hidden: tuple[int, ...] = (64,)
  batch_size: int = 32
  learning_rate: float = 0.05
  dropout: float = 0.1
  snapshot_every: int = 1        # local-memory snapshot period (steps)
  persist_every: int = 5         # orbax save period (steps); a multiple of snapshot_every
  heartbeat_interval: float = 0.1
  heartbeat_timeout: float = 2.0
  startup_timeout: float = 120.0  # a new process imports jax and compiles before it beats
  min_step_seconds: float = 0.0   # pace steps to emulate compute time (async saves need time)
  warm_spare: bool = True         # one standby worker per node, compiled, buffers touched
  # The training rows (x, y), handed to every process so none imports scikit-learn for them;
  # None: each loads them (run_job fills this in once for the processes it starts).
  data: tuple | None = dataclasses.field(default=None, compare=False, repr=False)
  compilation_cache: str = ""     # a folder for jax's persistent compilation cache, shared by
                                  # the job's processes ("": off): a process after the first
                                  # loads the init and step programs instead of compiling them

  def __post_init__(self):
    for name in ("num_agents", "workers_per_agent", "steps", "batch_size", "snapshot_every",
                 "persist_every"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)!r}; expected a positive int")
    if self.persist_every % self.snapshot_every:
      raise ValueError(f"persist_every={self.persist_every} must be a multiple of "
                       f"snapshot_every={self.snapshot_every} (agents persist snapshots)")
    if not 0 < self.heartbeat_interval < self.heartbeat_timeout:
      raise ValueError(f"heartbeat_interval={self.heartbeat_interval} must be positive and "
                       f"below heartbeat_timeout={self.heartbeat_timeout}")

  @property
  def num_workers(self) -> int:
    return self.num_agents * self.workers_per_agent

  def workers_of(self, agent: int) -> list[int]:
    return list(range(agent * self.workers_per_agent, (agent + 1) * self.workers_per_agent))

  def persist_dir(self, worker: int) -> Path:
    return Path(self.workdir) / "persistent" / f"worker_{worker}"

  def slots_path(self, worker: int) -> Path:
    """The worker's local-memory file (RAM-backed), named after the job's folder."""
    import hashlib  # pylint: disable=import-outside-toplevel
    from research.checkpoint import store  # pylint: disable=import-outside-toplevel
    job = hashlib.sha256(str(Path(self.workdir).absolute()).encode()).hexdigest()[:12]
    return store.local_memory_root() / f"meshwork-ckpt-{job}-w{worker}"


@dataclasses.dataclass(frozen=True)
class Fault:
  kind: str       # one of FAULT_KINDS
  target: int     # worker index (agent index for kill_agent)
  step: int       # injected when the coordinator starts this step
  seconds: float = 0.0  # hang / heartbeat delay length

  def __post_init__(self):
    if self.kind not in FAULT_KINDS:
      raise ValueError(f"fault kind={self.kind!r}; expected one of {FAULT_KINDS}")


def _use_compilation_cache(spec: JobSpec) -> None:
  """Points this (spawned) process's jax at the job's shared compilation cache, if it has one.

  Every entry, however small: the programs here compile in well under jax's default threshold
  of one second each, and a worker compiles about twenty of them. A torn entry (two processes
  writing one key) is read as a miss and compiled.
  """
  if spec.compilation_cache:
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_compilation_cache_dir", spec.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


@contextlib.contextmanager
def compiling_into(cache: str):
  """Within the block, this process's compilations also go into the jax compilation cache
  `cache` (a `JobSpec.compilation_cache`; "": none), for a job's processes to load instead of
  compiling; afterwards the process caches as it did before (it may run other work too).
  """
  if not cache:
    yield
    return
  # pylint: disable=import-outside-toplevel
  import jax
  from jax.experimental.compilation_cache import compilation_cache
  before = {name: getattr(jax.config, name) for name in (
      "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")}
  compilation_cache.reset_cache()
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  try:
    yield
  finally:
    for name, value in before.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()


def _problem(spec: JobSpec):
  from research.checkpoint import worker as worker_lib  # pylint: disable=import-outside-toplevel
  return worker_lib.make_problem(spec.num_workers, spec.hidden, spec.batch_size,
                                 spec.learning_rate, spec.dropout, spec.seed, spec.data)


def _process_main(main: Callable, *args) -> None:
  """A spawned process's target: `main(*args)`, then the process ends at once (os._exit).

  Left to itself, a spawned process ends with the interpreter's teardown of the jax, flax and
  orbax modules, which takes seconds on a busy 2-core machine while the parent waits to join
  it; nothing in it matters here (results went out over the pipe, files are closed).
  """
  code = 1
  try:
    main(*args)
    code = 0
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access


# --- worker process ---------------------------------------------------------------------------


def worker_main(conn, spec: JobSpec, worker: int | None, restore, agent: int = 0) -> None:
  """A worker: restore (init / local memory / persisted step), then serve steps and updates.

  restore="standby" makes a warm spare of node `agent` (worker=None): it imports jax, compiles
  the step, maps the node's local memory and touches a set of restore buffers, says
  ("standby",) and waits for ("assign", worker); its restore is then one copy from local memory
  into those buffers (a new process pays for imports, compilation and fresh pages first).
  """
  send_lock = threading.Lock()
  pause_until = [0.0]
  beat_every = [spec.heartbeat_interval]
  me = [worker]  # the worker this process is; None while a spare

  def send(message):
    with send_lock:
      conn.send(message)

  def heartbeats():
    while True:
      time.sleep(beat_every[0])
      if me[0] is not None and time.monotonic() >= pause_until[0]:
        try:
          send(("heartbeat", me[0]))
        except (OSError, EOFError):
          return

  threading.Thread(target=heartbeats, daemon=True).start()  # before the slow imports
  _use_compilation_cache(spec)
  from research.checkpoint import store  # pylint: disable=import-outside-toplevel
  from research.checkpoint import worker as worker_lib  # pylint: disable=import-outside-toplevel

  problem = _problem(spec)
  gradient, update = worker_lib.make_step_fns(problem)
  first = worker_lib.init_state(problem, 0)  # every worker's state has its shapes
  state_bytes = store.packed_size(first)
  x, y, position = worker_lib.batch_for(problem, 0, first)
  # Compiles both halves of a step before this process says it is ready (a spare: before any
  # failure), so the job's step loop times steps, not compilation.
  update(first, gradient(first, x, y)[0], position)
  buffers, how = None, "new process"
  try:
    if restore == "standby":
      warm = first
      node_slots = {w: store.LocalSlots(spec.slots_path(w), state_bytes, populate=True)
                    for w in spec.workers_of(agent)}
      buffers = store.restore_buffers(warm)
      send(("standby",))
      message = conn.recv()
      if message[0] != "assign":
        return  # ("stop",): the job ended without needing this spare
      worker, restore, how = message[1], "local", "warm spare"
      me[0] = worker
      slots = node_slots[worker]
    else:
      slots = store.LocalSlots(spec.slots_path(worker), state_bytes)
  except FileNotFoundError:
    return  # the node's local memory is gone: its agent was killed while this process started
  except (EOFError, OSError):
    return  # the agent is gone
  template = worker_lib.init_state(problem, worker)
  source, start = restore, time.perf_counter()
  if restore == "local":
    found = slots.read(template, out=buffers)
    state = found[1] if found else template
    source = "local" if found else "init (local memory empty)"
  elif isinstance(restore, tuple) and restore[0] == "persistent":
    state = store.PersistentStore(spec.persist_dir(worker)).restore(restore[1], template)
  else:
    state = template
  seconds = time.perf_counter() - start
  send(("ready", worker, int(state.step), source, f"{how}, {1e3 * seconds:.1f} ms"))
  while True:
    try:
      message = conn.recv()
    except (EOFError, OSError):
      return  # the agent is gone: so is this node
    kind = message[0]
    if kind == "step":
      step = message[1]
      if int(state.step) != step - 1:
        send(("error", worker, f"asked for step {step} at state step {int(state.step)}"))
        continue
      x, y, _ = worker_lib.batch_for(problem, worker, state)
      grads, _ = gradient(state, x, y)
      send(("grads", step, worker, store.pack(grads)))
    elif kind == "update":
      step, packed = message[1], message[2]
      if int(state.step) != step - 1:
        send(("error", worker, f"update {step} at state step {int(state.step)}"))
        continue
      mean = store.unpack(problem.init_params, packed)
      _, next_position = worker_lib.minibatch(problem, worker, state.data_position)
      state = update(state, mean, next_position)
      if step % spec.snapshot_every == 0:
        slots.write(step, state)
      send(("applied", step, worker))
    elif kind == "final":
      send(("final", worker, store.pack(state)))
    elif kind == "hang":
      pause_until[0] = time.monotonic() + message[1]
      time.sleep(message[1])
    elif kind == "delay_heartbeats":
      beat_every[0] = message[1]
    elif kind == "stop":
      slots.close()
      return


# --- agent process ----------------------------------------------------------------------------


def agent_main(conn, spec: JobSpec, agent: int, restore) -> None:
  """A node agent: owns its workers' local memory, replaces failed workers, persists."""
  _use_compilation_cache(spec)
  from research.checkpoint import store  # pylint: disable=import-outside-toplevel
  from research.checkpoint import worker as worker_lib  # pylint: disable=import-outside-toplevel

  ctx = mp.get_context("spawn")
  problem = _problem(spec)
  template = worker_lib.init_state(problem, 0)
  state_bytes = store.packed_size(template)
  workers = spec.workers_of(agent)

  def log(text):
    conn.send(("event", agent, text))

  slots = {w: store.LocalSlots(spec.slots_path(w), state_bytes, create=True) for w in workers}
  stores = {w: store.PersistentStore(spec.persist_dir(w), log=log) for w in workers}
  procs, conns, ready, last_beat = {}, {}, {}, {}
  applied = {w: 0 for w in workers}
  grads_sent: set[int] = set()
  update_log: dict[int, bytes] = {}
  current = done_reported = 0  # the step in progress; the newest step reported done

  def start(w, how):
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_process_main, args=(worker_main, child, spec, w, how, agent),
                       daemon=False)
    proc.start()
    child.close()
    return proc, parent

  def spawn(w, how):
    procs[w], conns[w] = start(w, how)
    ready[w], last_beat[w] = False, time.monotonic()

  spare = {}  # the warm spare: "proc", "conn", "standby" (it said it is ready)

  def spawn_spare():
    spare["proc"], spare["conn"] = start(None, "standby")
    spare["standby"] = False

  for w in workers:
    spawn(w, restore)

  def replace(w, why):
    proc = procs[w]
    if proc.is_alive():
      os.kill(proc.pid, signal.SIGKILL)  # fence: a hung worker must not come back
    proc.join(timeout=5)
    conns[w].close()
    if spare.get("standby"):
      log(f"worker {w} failed ({why}); the warm spare takes over, restoring from local memory")
      procs[w], conns[w] = spare.pop("proc"), spare.pop("conn")
      ready[w], last_beat[w] = False, time.monotonic()
      conns[w].send(("assign", w))
      spawn_spare()
    else:
      log(f"worker {w} failed ({why}); replacing it, restoring from local memory")
      spawn(w, "local")  # a gradient it already delivered for this step stays delivered

  last_heartbeat = time.monotonic()
  while True:
    now = time.monotonic()
    if now - last_heartbeat >= spec.heartbeat_interval:
      conn.send(("heartbeat", agent))
      last_heartbeat = now
      for w in workers:  # commit (manifest) the async saves orbax has finished
        for step in stores[w].commit_finished(wait=False):
          log(f"worker {w}: persisted step {step} committed")
    if spec.warm_spare and not spare and all(ready.values()):
      spawn_spare()  # once the workers run: its imports do not slow their start
    if spare and not spare["proc"].is_alive():
      log(f"the warm spare exited with {spare['proc'].exitcode}; starting another")
      spawn_spare()
    for w in workers:
      if not procs[w].is_alive():
        replace(w, f"process exited with {procs[w].exitcode}")
      elif now - last_beat[w] > (spec.heartbeat_timeout if ready[w] else spec.startup_timeout):
        replace(w, f"no heartbeat for {now - last_beat[w]:.1f} s")
    sources = [conn] + [conns[w] for w in workers] + ([spare["conn"]] if spare else [])
    for source in wait_for(sources, timeout=spec.heartbeat_interval):
      if spare and source is spare["conn"]:
        try:
          spare["standby"] = source.recv() == ("standby",)
          if spare["standby"]:
            conn.send(("spare", agent))
        except (EOFError, OSError):
          spare["proc"].join(timeout=5)  # restarted above on the next pass
        continue
      if source is conn:
        try:
          message = conn.recv()
        except (EOFError, OSError):
          message = ("stop",)
        kind = message[0]
        if kind == "step":
          current = message[1]
          grads_sent.clear()
          for w in workers:
            if ready[w]:
              conns[w].send(message)
        elif kind == "update":
          update_log[message[1]] = message[2]
          for w in workers:
            if ready[w]:
              conns[w].send(message)
        elif kind == "fault":
          _, fault_kind, w, seconds = message
          conns[w].send(("hang", seconds) if fault_kind == "hang_worker"
                        else ("delay_heartbeats", seconds))
        elif kind == "final":
          for w in workers:
            conns[w].send(("final",))
        elif kind == "stop":
          for w in workers:
            try:
              conns[w].send(("stop",))
            except (OSError, EOFError):
              pass
          if spare and not spare["standby"]:
            spare["proc"].kill()  # still importing and compiling: nothing to wait for
          elif spare:
            try:
              spare["conn"].send(("stop",))
            except (OSError, EOFError):
              pass
          if spare:
            spare["proc"].join(timeout=10)
          for w in workers:
            procs[w].join(timeout=10)
            stores[w].close()
            slots[w].close()
            Path(spec.slots_path(w)).unlink(missing_ok=True)
          return
        continue
      w = next(k for k in workers if conns[k] is source)
      try:
        message = source.recv()
      except (EOFError, OSError):
        replace(w, "its pipe closed")
        continue
      kind = message[0]
      last_beat[w] = time.monotonic()
      if kind == "ready":
        ready[w] = True
        restored = message[2]
        applied[w] = restored
        if message[3] == "local":
          log(f"worker {w}: restored step {restored} from local memory ({message[4]})")
        conn.send(("worker", agent, w, procs[w].pid, restored, message[3], message[4]))
        for s in range(restored + 1, max(update_log, default=0) + 1):
          if s not in update_log:
            log(f"worker {w}: update {s} is no longer in the replay log")
            break
          conns[w].send(("update", s, update_log[s]))
        if current > max(update_log, default=0) and w not in grads_sent:
          conns[w].send(("step", current))
      elif kind == "grads":
        if message[1] == current and w not in grads_sent:
          grads_sent.add(w)
          conn.send(message)
        else:
          log(f"dropped gradient of step {message[1]} from worker {w} (current step "
              f"{current})")
      elif kind == "applied":
        applied[w] = message[1]
        step = min(applied.values())
        if step > done_reported:
          done_reported = step
          if step % spec.persist_every == 0:
            for v in workers:
              found = slots[v].read(template)
              if found and found[0] == step:
                stores[v].save(step, found[1])
          for s in [s for s in update_log if s <= step - spec.snapshot_every]:
            del update_log[s]
          conn.send(("done", step, agent))
      elif kind in ("final", "error"):
        conn.send(message)


# --- coordinator ------------------------------------------------------------------------------


class AgentFailure(RuntimeError):
  pass


@dataclasses.dataclass
class JobResult:
  final_state: bytes          # packed state of worker 0 after the last step
  replicas_equal: bool        # every worker ended with the same params and optimizer state
  events: list[str]
  steps_lost: list[int]       # per failure: steps recomputed because of it
  step_seconds: list[tuple[int, float]]  # (step, seconds) in the order run, replays included
  restarts: int
  local_restores: list[str]   # per restore from local memory: who and how long, e.g.
                              # "warm spare, <t> ms" or "new process, <t> ms"


def run_job(spec: JobSpec, faults: list[Fault] = (), log: Callable[[str], None] = print,
            on_step: Callable[[int], None] | None = None, max_restarts: int = 3) -> JobResult:
  """Runs the job to `spec.steps`, injecting `faults`; returns the final state and what happened.

  Call it under `if __name__ == "__main__":` in a script: processes start with "spawn".
  """
  try:
    return _run_job(spec, faults, log, on_step, max_restarts)
  finally:
    for w in range(spec.num_workers):  # a killed agent leaves its local-memory files behind
      Path(spec.slots_path(w)).unlink(missing_ok=True)


def _run_job(spec, faults, log, on_step, max_restarts) -> JobResult:
  from research.checkpoint import store  # pylint: disable=import-outside-toplevel
  from research.checkpoint import worker as worker_lib  # pylint: disable=import-outside-toplevel

  ctx = mp.get_context("spawn")
  problem = _problem(spec)
  spec = dataclasses.replace(spec, data=(problem.x, problem.y))
  current = 0  # the step in progress (read by receive())
  pending = sorted(faults, key=lambda f: f.step)
  events, steps_lost, step_seconds, local_restores = [], [], [], []
  worker_pids: dict[int, int] = {}

  def note(text):
    events.append(text)
    log(text)

  restore, first_step, restarts = "init", 1, 0
  while True:
    agents, conns = {}, {}
    for a in range(spec.num_agents):
      parent, child = ctx.Pipe()
      proc = ctx.Process(target=_process_main, args=(agent_main, child, spec, a, restore))
      proc.start()
      child.close()
      agents[a], conns[a] = proc, parent
    last_beat = {a: time.monotonic() for a in agents}
    heard_from = set()
    ready = set()
    spares = set()  # agents whose warm spare stands by

    def receive(timeout):
      """Messages from agents; raises AgentFailure when one died or went silent."""
      got = []
      for source in wait_for(list(conns.values()), timeout=timeout):
        a = next(k for k, c in conns.items() if c is source)
        try:
          got.append(source.recv())
          last_beat[a] = time.monotonic()
          heard_from.add(a)
        except (EOFError, OSError):
          raise AgentFailure(f"agent {a}'s pipe closed") from None
      now = time.monotonic()
      for a, proc in agents.items():
        if not proc.is_alive():
          raise AgentFailure(f"agent {a} exited with {proc.exitcode}")
        limit = spec.heartbeat_timeout * 3 if a in heard_from else spec.startup_timeout
        if now - last_beat[a] > limit:
          raise AgentFailure(f"no heartbeat from agent {a} for {now - last_beat[a]:.1f} s")
      for message in got:
        if message[0] == "event":
          note(f"agent {message[1]}: {message[2]}")
        elif message[0] == "worker":
          _, _, w, pid, restored, source, how = message
          worker_pids[w] = pid
          ready.add(w)
          if source == "local":
            steps_lost.append(max(0, current - 1 - restored))
            local_restores.append(how)
          if restore != "init" or source != "init":
            note(f"worker {w} ready at step {restored} (restored from {source})")
        elif message[0] == "spare":
          spares.add(message[1])
        elif message[0] == "error":
          raise RuntimeError(f"worker {message[1]}: {message[2]}")
      return [m for m in got if m[0] not in ("event", "worker", "heartbeat", "spare")]

    try:
      # Start when every worker is ready and every node's first spare stands by (so which
      # failure a spare takes does not depend on how fast it compiled).
      while len(ready) < spec.num_workers or (spec.warm_spare and len(spares) < spec.num_agents):
        receive(spec.heartbeat_interval)
      for step in range(first_step, spec.steps + 1):
        current = step
        start = time.perf_counter()
        for a in agents:
          conns[a].send(("step", step))
        for fault in [f for f in pending if f.step == step]:
          pending.remove(fault)
          _inject(fault, spec, agents, conns, worker_pids, note)
        grads = {}
        while len(grads) < spec.num_workers:
          for message in receive(spec.heartbeat_interval):
            if message[0] == "grads" and message[1] == step:
              grads[message[2]] = store.unpack(problem.init_params, message[3])
            elif message[0] == "grads":
              note(f"dropped gradient of step {message[1]} during step {step}")
        total = worker_lib.sum_in_order([grads[w] for w in range(spec.num_workers)])
        packed = store.pack(worker_lib.mean_of_sum(total, spec.num_workers))
        for a in agents:
          conns[a].send(("update", step, packed))
        done = set()
        while len(done) < spec.num_agents:
          done |= {m[2] for m in receive(spec.heartbeat_interval)
                   if m[0] == "done" and m[1] >= step}
        time.sleep(max(0.0, spec.min_step_seconds - (time.perf_counter() - start)))
        step_seconds.append((step, time.perf_counter() - start))
        if on_step:
          on_step(step)
      for a in agents:
        conns[a].send(("final",))
      finals = {}
      while len(finals) < spec.num_workers:
        finals |= {m[1]: m[2] for m in receive(spec.heartbeat_interval) if m[0] == "final"}
      for a in agents:
        conns[a].send(("stop",))
      for proc in agents.values():
        proc.join(timeout=30)
      template = worker_lib.init_state(problem, 0)
      states = [store.unpack(template, finals[w]) for w in range(spec.num_workers)]
      replicas = [store.pack((state.params, state.opt_state)) for state in states]
      return JobResult(finals[0], len(set(replicas)) == 1, events, steps_lost, step_seconds,
                       restarts, local_restores)
    except AgentFailure as failure:
      failed_step = max(current, first_step)
      _kill_all(agents, worker_pids)
      if restarts >= max_restarts:
        raise RuntimeError(f"gave up after {restarts} job restarts: {failure}") from None
      note(f"node failure during step {failed_step}: {failure}; restarting the job from the "
           "newest committed checkpoint")
      committed = _newest_common_step(spec, note)
      restore = ("persistent", committed) if committed else "init"
      steps_lost.append(failed_step - 1 - committed)
      note(f"restoring every worker from persisted step {committed}" if committed else
           "no committed checkpoint: restarting from the initial state")
      first_step, restarts = committed + 1, restarts + 1  # new agents recreate local memory


def _inject(fault: Fault, spec, agents, conns, worker_pids, note) -> None:
  if fault.kind == "kill_worker":
    note(f"fault: kill -9 worker {fault.target} (pid {worker_pids[fault.target]}) at step "
         f"{fault.step}")
    os.kill(worker_pids[fault.target], signal.SIGKILL)
  elif fault.kind == "kill_agent":
    note(f"fault: kill -9 agent {fault.target} (pid {agents[fault.target].pid}) at step "
         f"{fault.step}")
    os.kill(agents[fault.target].pid, signal.SIGKILL)
  elif fault.kind in ("hang_worker", "delay_heartbeats"):
    agent = fault.target // spec.workers_per_agent
    note(f"fault: {fault.kind} worker {fault.target} for {fault.seconds} s at step {fault.step}")
    conns[agent].send(("fault", fault.kind, fault.target, fault.seconds))
  elif fault.kind == "corrupt_checkpoint":
    corrupted = corrupt_newest_checkpoint(spec.persist_dir(fault.target))
    note(f"fault: corrupted {corrupted} at step {fault.step}")


def corrupt_newest_checkpoint(directory: Path) -> str:
  """Flips bytes in the largest file of the newest committed step (for the fault harness).

  Committed: the step has its manifest, so a restore would otherwise trust it (a step without
  one is skipped anyway).
  """
  from research.checkpoint import store  # pylint: disable=import-outside-toplevel

  manifests = directory / store.MANIFESTS
  steps = sorted((p for p in (directory / "steps").iterdir()
                  if p.name.isdigit() and (manifests / f"{p.name}.json").is_file()),
                 key=lambda p: int(p.name))
  if not steps:
    return f"nothing (no committed step under {directory})"
  files = sorted((p for p in steps[-1].rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  target = files[-1]
  data = bytearray(target.read_bytes())
  for i in range(0, len(data), max(1, len(data) // 16)):
    data[i] ^= 0xFF
  target.write_bytes(bytes(data))
  return str(target.relative_to(directory.parent.parent))


def _kill_all(agents, worker_pids) -> None:
  for pid in [p.pid for p in agents.values()] + list(worker_pids.values()):
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  for proc in agents.values():
    proc.join(timeout=10)


def _newest_common_step(spec: JobSpec, note) -> int:
  """The newest step every worker has committed and intact on disk (0 if none)."""
  from research.checkpoint import store  # pylint: disable=import-outside-toplevel

  common = None
  for w in range(spec.num_workers):
    if not spec.persist_dir(w).is_dir():
      return 0
    steps = set(store.PersistentStore(spec.persist_dir(w), log=note).restorable_steps())
    common = steps if common is None else common & steps
  return max(common) if common else 0


def clean(spec: JobSpec) -> None:
  """Removes the job's persisted checkpoints (local memory files are removed by the agents)."""
  shutil.rmtree(Path(spec.workdir) / "persistent", ignore_errors=True)
