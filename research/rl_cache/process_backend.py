"""The parameter cache tree and the replay table for RL actors in local processes.

The services are the in-process ones (`backends.py`: the pure state of `cache.py` and
`replay.py`) hosted in one server process by the standard library's
`multiprocessing.managers`: the learner (in the driver) and every actor process call them
through manager proxies, one call at a time per service (a lock: the manager serves each
connection in its own thread). An insert the rate limiter refuses waits in the service (a
condition variable, up to the caller's timeout) until a sample lets it in, as Reverb's server
holds it, so actors do not resend items in a loop. Bytes and versions are counted as the pure tree defines them, so
learner egress, per-node egress and reattachment read the same as in-process.

This backend is for one machine; across machines the Ray backend does the same job
(`ray_backend.py`: one Ray actor per cache node, blobs in Ray's object store).

  with ProcessServices(topology, param_spec, table_config, item_spec) as services:
    services.params.publish(params, version); services.replay.sample(n, seed) ...
    pool = workers.ProcessActorPool(agent_config, seeds, services.params, services.replay,
                                    services.stop_event)
"""

from __future__ import annotations

import multiprocessing
import threading
from multiprocessing import managers

from research.rl_cache import backends
from research.rl_cache import replay


class _LockedParameterService(backends.InProcessParameterService):
  """`InProcessParameterService`, one call at a time."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._lock = threading.Lock()

  def publish(self, params, version):
    with self._lock:
      return super().publish(params, version)

  def read(self, actor):
    with self._lock:
      return super().read(actor)

  def fail_node(self, node_id):
    with self._lock:
      return super().fail_node(node_id)

  def egress_bytes(self):
    with self._lock:
      return super().egress_bytes()


class _LockedReplayService(backends.InProcessReplayService):
  """`InProcessReplayService`, one call at a time; an insert the limiter refuses waits (up to
  its timeout_s) for a sample to change the limiter's answer."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._changed = threading.Condition()

  def insert(self, item, priority=1.0, timeout_s=0.0):
    with self._changed:
      if self._changed.wait_for(lambda: replay.can_insert(self.table), timeout=timeout_s):
        return super().insert(item, priority)
      return False

  def sample(self, n, seed):
    with self._changed:
      batch = super().sample(n, seed)
      if batch is not None:
        self._changed.notify_all()
      return batch

  def accounting(self):
    with self._changed:
      return super().accounting()


class _ServiceManager(managers.BaseManager):
  pass


_ServiceManager.register("ParameterService", _LockedParameterService,
                         exposed=("publish", "read", "fail_node", "egress_bytes", "close"))
_ServiceManager.register("ReplayService", _LockedReplayService,
                         exposed=("insert", "sample", "accounting", "close"))
_ServiceManager.register("Event", threading.Event, exposed=("set", "is_set", "clear"))


class ProcessServices:
  """A manager process hosting the two services and the actors' stop event (module docstring).
  `params`, `replay`, `stop_event` are proxies: picklable, usable from any local process."""

  def __init__(self, topology, param_spec, table_config, item_spec):
    self._manager = _ServiceManager(ctx=multiprocessing.get_context("spawn"))
    self._manager.start()
    self.params = self._manager.ParameterService(topology, param_spec)  # pylint: disable=no-member
    self.replay = self._manager.ReplayService(table_config, item_spec)  # pylint: disable=no-member
    self.stop_event = self._manager.Event()  # pylint: disable=no-member

  def close(self) -> None:
    if self._manager is not None:
      self._manager.shutdown()
      self._manager = None

  def __enter__(self) -> "ProcessServices":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
