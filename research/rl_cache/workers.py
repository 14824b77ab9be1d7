"""RL actors outside the learner's process: the actor loop, and the pools that run it.

`ActorWorker` is one RL actor as an object that lives in its own process: it reads the params
of the newest version its leaf cache holds, steps its environments with them (`agent.rollout`,
jitted there), and inserts each trajectory into the replay table, waiting while the table's rate
limiter says wait. It talks to the two services through their interface only (`read(actor)`,
`insert(item)`, `accounting()`), so the same loop runs against the multi-process services
(`process_backend.py`, standard-library manager proxies) and the Ray ones (`ray_backend.py`).

A pool runs one `ActorWorker` per actor and answers with what finished:

  submit(actor, num_rollouts, epsilon)   one call on that actor's worker (never two at once)
  wait(timeout_s) -> [(actor, WorkerReport), ...]   the calls that finished by then
  in_flight                              the number of calls not yet returned by wait
  close()                                stop the workers (drain first to count every rollout:
                                         on processes, a call still waiting on the rate limiter
                                         returns at once and its item is not inserted; Ray
                                         kills its actors)

`ProcessActorPool` (here) gives each actor a spawned process of its own: a one-worker
`concurrent.futures.ProcessPoolExecutor`, so the actor's environment state stays in that process
between calls. `ray_backend.RayActorPool` gives each a Ray actor. Worker processes run jax on the
CPU with one thread each (`configure_actor_process`): many actors share a machine's cores.
"""

from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing
import os
import time
from typing import Any, Callable, NamedTuple

import numpy as np

from research.rl_cache import cache

# How long one insert call may wait in the replay service for the rate limiter.
INSERT_WAIT_S = 0.25

# XLA flags of an actor process: one compute thread, so N actors on a machine use N cores.
ACTOR_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def configure_actor_process() -> None:
  """Before an actor process's first jax computation: CPU, one thread (read when the backend
  starts, which is lazy, so this holds even where jax was imported already)."""
  os.environ["XLA_FLAGS"] = ACTOR_XLA_FLAGS
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_platforms", "cpu")


class WorkerReport(NamedTuple):
  """What one `ActorWorker.run` call did."""

  env_steps: int  # env steps taken in this call (all of the worker's envs)
  episode_returns: np.ndarray  # shape=(k,), dtype=float32: episodes finished in this call
  versions: tuple[int, ...]  # the params version each rollout used
  insert_retries: int  # inserts the rate limiter refused before they went in
  stopped: bool = False  # the pool closed while the last item waited; it was not inserted


class ActorWorker:
  """One RL actor in its own process (module docstring). `stop`: polled while an insert waits;
  when it answers True the call returns with `stopped=True` and that item is dropped."""

  def __init__(self, agent_config: Any, actor: int, seed: int, reader: Any, replay_service: Any,
               *, wait_s: float = 60.0, stop: Callable[[], bool] | None = None):
    # Imported here, not at the top: cache node processes import this module and need neither.
    import jax  # pylint: disable=import-outside-toplevel
    from research.rl_cache import agent as agent_lib  # pylint: disable=import-outside-toplevel
    self._jax = jax
    self._actor = actor
    self._reader = reader
    self._replay = replay_service
    self._wait_s = wait_s
    self._stop = stop or (lambda: False)
    self._rollout = jax.jit(functools.partial(agent_lib.rollout, agent_config))
    self._state = agent_lib.init_actor(agent_config, jax.random.key(seed))
    self._version, self._params = cache.NO_VERSION, None

  def _fresh_params(self) -> None:
    deadline = time.monotonic() + self._wait_s
    while True:
      version, params = self._reader.read(self._actor)
      if params is not None:
        break
      if time.monotonic() > deadline:
        raise TimeoutError(f"actor {self._actor}: no params version published after "
                           f"{self._wait_s} s")
      time.sleep(0.01)
    if version != self._version:
      self._version, self._params = version, self._jax.device_put(params)

  def run(self, num_rollouts: int, epsilon: float) -> WorkerReport:
    """`num_rollouts` rollouts, each with the newest params its leaf has when it starts."""
    returns_all, versions, retries, stopped = [], [], 0, False
    steps_before = int(self._state.env_steps)
    for _ in range(num_rollouts):
      self._fresh_params()
      versions.append(self._version)
      self._state, trajectory, (returns, finished) = self._rollout(self._params, self._state,
                                                                   epsilon)
      returns_all.append(np.asarray(returns)[np.asarray(finished)])
      item = {k: np.asarray(v) for k, v in trajectory._asdict().items()}
      deadline = time.monotonic() + self._wait_s
      # The service holds each insert up to INSERT_WAIT_S for the limiter; between tries the
      # worker looks at its stop flag and its deadline.
      while not self._replay.insert(item, 1.0, INSERT_WAIT_S):
        retries += 1
        if self._stop():
          stopped = True
          break
        if time.monotonic() > deadline:
          raise TimeoutError(f"actor {self._actor}: the replay table refused an insert for "
                             f"{self._wait_s} s: {self._replay.accounting()} (is a learner "
                             "sampling?)")
      if stopped:
        break
    return WorkerReport(env_steps=int(self._state.env_steps) - steps_before,
                        episode_returns=np.concatenate(returns_all).astype(np.float32)
                        if returns_all else np.zeros(0, np.float32),
                        versions=tuple(versions), insert_retries=retries, stopped=stopped)


# -- one spawned process per actor ------------------------------------------------------------

_PROCESS_WORKER: ActorWorker | None = None  # the actor this process runs (set by the initializer)


def _init_actor_process(agent_config, actor, seed, reader, replay_service, stop_event,
                        wait_s) -> None:
  global _PROCESS_WORKER  # pylint: disable=global-statement
  configure_actor_process()
  _PROCESS_WORKER = ActorWorker(agent_config, actor, seed, reader, replay_service,
                                wait_s=wait_s, stop=stop_event.is_set)


def _run_in_actor_process(num_rollouts: int, epsilon: float) -> WorkerReport:
  return _PROCESS_WORKER.run(num_rollouts, epsilon)


class ActorPool:
  """The pool interface of the module docstring over one call handle per actor in flight;
  subclasses say how a call starts (`_start`), which handles have finished (`_finished`) and
  how a finished one answers (`_result`)."""

  def __init__(self):
    self._pending: dict[Any, int] = {}  # call handle -> actor

  def submit(self, actor: int, num_rollouts: int, epsilon: float) -> None:
    if actor in self._pending.values():
      raise ValueError(f"actor {actor} has a call in flight; wait for it before submitting")
    self._pending[self._start(actor, num_rollouts, epsilon)] = actor

  @property
  def in_flight(self) -> int:
    """Calls submitted and not yet returned by `wait`."""
    return len(self._pending)

  def wait(self, timeout_s: float) -> list[tuple[int, WorkerReport]]:
    if not self._pending:
      return []
    done = self._finished(list(self._pending), timeout_s)
    return [(self._pending.pop(handle), self._result(handle)) for handle in done]

  def _start(self, actor: int, num_rollouts: int, epsilon: float) -> Any:
    raise NotImplementedError

  def _finished(self, handles: list, timeout_s: float) -> list:
    raise NotImplementedError

  def _result(self, handle: Any) -> WorkerReport:
    raise NotImplementedError


class ProcessActorPool(ActorPool):
  """One spawned process per actor (module docstring). `reader`, `replay_service` and
  `stop_event` are picklable handles the worker processes call: the manager proxies of
  `process_backend.ProcessServices`; `close` sets the event."""

  def __init__(self, agent_config: Any, seeds: list[int], reader: Any, replay_service: Any,
               stop_event: Any, *, wait_s: float = 60.0):
    super().__init__()
    context = multiprocessing.get_context("spawn")  # never fork a process that holds jax
    self._stop = stop_event
    self._executors = [
        concurrent.futures.ProcessPoolExecutor(
            max_workers=1, mp_context=context, initializer=_init_actor_process,
            initargs=(agent_config, actor, seed, reader, replay_service, stop_event, wait_s))
        for actor, seed in enumerate(seeds)]

  def _start(self, actor: int, num_rollouts: int, epsilon: float) -> concurrent.futures.Future:
    return self._executors[actor].submit(_run_in_actor_process, num_rollouts, epsilon)

  def _finished(self, handles: list, timeout_s: float) -> list:
    done, _ = concurrent.futures.wait(handles, timeout=timeout_s,
                                      return_when=concurrent.futures.FIRST_COMPLETED)
    return list(done)

  def _result(self, handle: concurrent.futures.Future) -> WorkerReport:
    return handle.result()

  def close(self) -> None:
    self._stop.set()
    for executor in self._executors:
      executor.shutdown(wait=True, cancel_futures=True)
    self._pending.clear()
