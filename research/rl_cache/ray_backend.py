"""The parameter cache tree and the replay table as Ray actors (the `backends.py` interface).

Ray does the work a distributed run needs (processes, placement, failure detection, moving
bytes between machines); the state machines are the pure ones of `cache.py` and `replay.py`:

- `RayParameterService(topology, spec)`: one Ray actor per cache node (`CacheNodeActor`,
  `num_cpus=0`: it only holds data), each holding a `cache.CacheNode` and the `ObjectRef` of its
  blob. Blobs travel through Ray's object store as references wrapped in a list (so Ray hands
  the reference on instead of resolving it):

    learner: ray.put(blob) once per version -> root.publish(LEARNER, version, [ref])
    node:    version newer than its own? ray.get the blob, cache.publish it (spec checked),
             ray.put its own copy (on a multi-machine cluster its children then fetch the bytes
             from this node's machine, not the learner's) -> child.publish(node, version, [ref])
    read:    the leaf pulls from its ancestors (root first, each node asking its parent with the
             version it holds), then hands the actor its ref when newer than the actor's copy.

  A node that is offered an equal or older version fetches nothing and changes nothing
  (`cache.publish`'s rule), so push and pull in any interleaving keep every node monotone and
  move each version at most once per edge. Egress is counted where the bytes are taken: each
  node counts the bytes it fetched from each source, and a leaf the blobs it handed to RL
  actors, so node `n`'s egress is what its children fetched from it plus, at a leaf, what its
  actors read (`Topology.receivers` per version); the learner's is what the root fetched from
  it (one blob per version, whatever the number of actors).

  Failures: `fail_node` kills a node's actor (`ray.kill`); an actor whose leaf or one of its
  ancestors is dead (killed, or found dead through a `RayActorError` on a read) is moved by
  `cache.reattach` to a live leaf on its next read, and the read is retried there.
  `LeafReader` is the read side on its own (node handles, spec, its own view of attachments and
  dead nodes; picklable), for RL actors in other processes: `service.leaf_reader()`.
- `RayReplayService(config, spec)`: one async Ray actor around a `replay.Table`; `insert` waits
  in the actor up to its timeout while the rate limiter says wait (then answers False) and
  `sample` answers None at once while the limiter (or the table's size) says wait.
- `RayActorWorker(agent_config, actor, seed, reader, replay_service)`: `workers.ActorWorker` (an
  RL actor: read params from its leaf, `agent.rollout`, insert, retry while refused) as a Ray
  actor; `RayActorPool`: one per actor behind the pool interface of `workers.py`.

Cache node actors are threaded Ray actors (calls run concurrently, the node's state under one
lock): a node blocks only on its parent (pull) and never on a child (pushes are
fire-and-forget), so calls cannot wait in a cycle; a reader may also wait at its leaf for the
next pushed version (`wait_newer`, a long poll that asks no ancestor).
`ray.init` belongs to the caller (the launcher or a test); without it Ray starts a local
instance on first use.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Mapping

import numpy as np
import ray

from research.rl_cache import cache
from research.rl_cache import replay
from research.rl_cache import workers

NodeOptions = Callable[[int], Mapping[str, Any]]  # node id -> CacheNodeActor.options(**...)


def is_actor_death(error: BaseException) -> bool:
  """Whether a Ray error means an actor on the call's path died: a `RayActorError`, an object
  lost with its owner (`ObjectLostError`), or either inside a call the callee made (a
  `RayTaskError` whose cause is one)."""
  while error is not None:
    if isinstance(error, (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)):
      return True
    error = error.cause if isinstance(error, ray.exceptions.RayTaskError) else None
  return False


# -- one cache node ---------------------------------------------------------------------------



# A threaded actor: calls run concurrently (a pull waiting on its parent, or a reader waiting for
# a newer version, never holds up the pushes); the node's state is guarded by one lock.
@ray.remote(num_cpus=0, max_concurrency=64)
class CacheNodeActor:
  """One cache node: a `cache.CacheNode` plus the ref of its blob in Ray's object store."""

  def __init__(self, node_id: int, parent_id: int, spec: cache.ParamSpec):
    self._node = cache.CacheNode(node_id=node_id, spec=spec)
    self._parent_id = parent_id  # cache.LEARNER at the root
    self._ref: ray.ObjectRef | None = None  # ray.put(self._node.blob), owned by this actor
    self._parent = None  # the parent's actor handle; None at the root
    self._children: list = []
    self._ingress: dict[int, int] = {}  # source node id (or cache.LEARNER) -> bytes fetched
    self._actor_egress = 0  # bytes of the refs handed to RL actors (a leaf's readers)
    self._changed = threading.Condition()  # guards all of the above; notified on a new version

  def connect(self, parent, children: list) -> int:
    with self._changed:
      self._parent, self._children = parent, list(children)
    return self._node.node_id

  def publish(self, src: int, version: int, wrapped_ref: list) -> bool:
    """Takes the blob behind `wrapped_ref[0]` when `version` is newer than the one held, keeps
    its own copy and pushes that to the children (without waiting for them). Returns whether it
    landed. A blob not matching the spec, or not of `version`, raises ValueError and changes
    nothing."""
    with self._changed:
      if version <= self._node.version:
        return False  # what cache.publish keeps anyway; without fetching the bytes
      blob = ray.get(wrapped_ref[0])
      if not isinstance(blob, cache.ParamBlob) or blob.version != version:
        got = (f"version {blob.version}" if isinstance(blob, cache.ParamBlob)
               else type(blob).__name__)
        raise ValueError(f"cache node {self._node.node_id}: offered version {version} but the "
                         f"blob holds {got}")
      node = cache.publish(self._node, blob)  # ValueError, naming the leaf, unless of the spec
      self._ingress[src] = self._ingress.get(src, 0) + blob.nbytes
      self._node, self._ref = node, ray.put(blob)
      for child in self._children:  # fire and forget: a node never waits on a child
        child.publish.remote(node.node_id, node.version, [self._ref])
      self._changed.notify_all()
      return True

  def _answer(self, have_version: int, to_actor: bool) -> tuple[int, list | None]:
    """(version, [ref]) when the version held is newer than `have_version`, else
    (version, None) (lock held)."""
    if self._node.version > have_version:
      if to_actor:
        self._actor_egress += self._node.blob.nbytes
      return self._node.version, [self._ref]
    return self._node.version, None

  def pull(self, have_version: int, to_actor: bool = False) -> tuple[int, list | None]:
    """Refreshes this node from its ancestors (root first), then answers as `_answer`.
    `to_actor`: the caller is an RL actor, which will fetch the ref (counted as this node's
    egress)."""
    if self._parent is not None:
      with self._changed:
        held = self._node.version
      version, wrapped = ray.get(self._parent.pull.remote(held))
      if wrapped is not None:
        self.publish(self._parent_id, version, wrapped)
    with self._changed:
      return self._answer(have_version, to_actor)

  def wait_newer(self, have_version: int, timeout_s: float, to_actor: bool = False
                 ) -> tuple[int, list | None]:
    """Waits (up to `timeout_s`) until the pushes bring a version newer than `have_version`,
    without asking the ancestors; answers as `_answer`. A long poll: what an actor that wants
    the next version calls instead of pulling repeatedly."""
    with self._changed:
      self._changed.wait_for(lambda: self._node.version > have_version, timeout=timeout_s)
      return self._answer(have_version, to_actor)

  def version(self) -> int:
    with self._changed:
      return self._node.version

  def counters(self) -> tuple[dict[int, int], int]:
    """(bytes fetched from each source, bytes handed to RL actors)."""
    with self._changed:
      return dict(self._ingress), self._actor_egress

  def location(self) -> str:
    """The id of the Ray node (machine) this cache node runs on."""
    return ray.get_runtime_context().get_node_id()


# -- reading params at the leaves -------------------------------------------------------------


class LeafReader:
  """What RL actors need to read their params: the cache nodes' handles, the spec, and this
  reader's view of the topology and of the dead nodes (changed by `cache.reattach`).

  Thread-safe; picklable (hand one to a Ray actor: the copy then keeps its own view).
  """

  def __init__(self, nodes: list, spec: cache.ParamSpec, topology: cache.Topology, *,
               dead: frozenset[int] = frozenset(), timeout_s: float = 60.0):
    self.nodes = list(nodes)
    self.spec = spec
    self.topology = topology
    self.dead = set(dead)
    self.timeout_s = timeout_s
    self._held: dict[int, tuple[int, Any]] = {}  # actor -> (version, params) it last read
    self._lock = threading.Lock()  # guards topology, dead and _held

  def __getstate__(self) -> dict:
    state = dict(self.__dict__)
    del state["_lock"]
    state["_held"] = {}
    return state

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def read(self, actor: int, wait_newer_s: float | None = None) -> tuple[int, Any | None]:
    """(version, params) for `actor` from its leaf, after the leaf pulled from its ancestors;
    (cache.NO_VERSION, None) before any publish. Never older than what the actor read before.
    A dead leaf or ancestor moves the actor to another leaf (cache.reattach; ValueError when
    none is live), and the read is retried there.

    `wait_newer_s`: instead of pulling, wait up to that long at the leaf for the pushes to bring
    a version newer than the actor's (`CacheNodeActor.wait_newer`, a long poll that asks no
    ancestor; the actor's current version when none came)."""
    error = None
    for _ in range(self.topology.num_nodes + 1):
      with self._lock:
        leaf = self._live_leaf(actor)
        have_version, params = self._held.get(actor, (cache.NO_VERSION, None))
      try:
        if wait_newer_s is None:
          call = self.nodes[leaf].pull.remote(have_version, True)
        else:
          call = self.nodes[leaf].wait_newer.remote(have_version, wait_newer_s, True)
        version, wrapped = ray.get(call, timeout=self.timeout_s + (wait_newer_s or 0.0))
        if wrapped is None:
          return have_version, params
        blob = ray.get(wrapped[0], timeout=self.timeout_s)
      except Exception as e:  # pylint: disable=broad-except
        if not is_actor_death(e):
          raise
        error = e
        self.find_dead((leaf, *self.topology.ancestors(leaf)))
        continue
      params = cache.from_blob(blob, self.spec)
      with self._lock:
        if version > self._held.get(actor, (cache.NO_VERSION, None))[0]:
          self._held[actor] = (version, params)
        return self._held[actor]
    raise RuntimeError(f"read actor {actor}: every attempt hit a dead cache node "
                       f"(dead: {sorted(self.dead)})") from error

  def _live_leaf(self, actor: int) -> int:
    """The actor's leaf, re-attached first when it or an ancestor is dead (lock held)."""
    leaf = self.topology.leaf_of(actor)
    if self.dead & {leaf, *self.topology.ancestors(leaf)}:
      leaf = cache.reattach(self.topology, actor, self.dead)
      self.topology = self.topology.with_leaf(actor, leaf)
    return leaf

  def mark_dead(self, node_id: int) -> None:
    with self._lock:
      self.dead.add(node_id)

  def find_dead(self, node_ids: tuple[int, ...]) -> None:
    """Asks each node for its version; those whose actor is gone join `dead`."""
    refs = [(n, self.nodes[n].version.remote()) for n in node_ids]
    for n, ref in refs:
      try:
        ray.get(ref, timeout=self.timeout_s)
      except Exception as e:  # pylint: disable=broad-except
        if not is_actor_death(e):
          raise
        self.mark_dead(n)


# -- the parameter service --------------------------------------------------------------------


class RayParameterService:
  """The cache tree as Ray actors: publish once per version at the root, read at the leaves.

  `node_options(node_id)` gives each node actor's Ray options (e.g. a `scheduling_strategy` to
  place the tree across machines); `timeout_s` bounds each wait on a node. Thread-safe: one
  learner thread may publish while other threads read. `leaf_reader()` gives RL actors in other
  processes their own reader.
  """

  def __init__(self, topology: cache.Topology, spec: cache.ParamSpec, *,
               node_options: NodeOptions | None = None, timeout_s: float = 60.0):
    if not isinstance(topology, cache.Topology) or not isinstance(spec, cache.ParamSpec):
      raise ValueError(f"RayParameterService: got {type(topology).__name__}, "
                       f"{type(spec).__name__}; expected a cache.Topology and a cache.ParamSpec")
    self.spec = spec
    self.timeout_s = timeout_s
    options = node_options or (lambda node_id: {})
    self.nodes = [CacheNodeActor.options(**dict(options(n))).remote(n, topology.parent(n), spec)
                  for n in range(topology.num_nodes)]
    ray.get([node.connect.remote(
        None if n == 0 else self.nodes[topology.parent(n)],
        [self.nodes[c] for c in topology.children(n)]) for n, node in enumerate(self.nodes)],
            timeout=timeout_s)
    self._reader = LeafReader(self.nodes, spec, topology, timeout_s=timeout_s)
    self._counters: dict[int, tuple[dict[int, int], int]] = {}  # node -> last counters seen
    self._counters_lock = threading.Lock()

  @property
  def topology(self) -> cache.Topology:
    """The tree with the current attachments (after any reattach by this service's reads)."""
    return self._reader.topology

  @property
  def dead(self) -> set[int]:
    return set(self._reader.dead)

  def leaf_reader(self) -> LeafReader:
    """A reader with this service's current view, for an RL actor in another process (its
    reattachments then stay its own)."""
    with self._reader._lock:  # pylint: disable=protected-access
      return LeafReader(self.nodes, self.spec, self._reader.topology,
                        dead=frozenset(self._reader.dead), timeout_s=self.timeout_s)

  # -- learner side --

  def publish(self, params: Any, version: int) -> None:
    """Hands version `version` of `params` to the root (one blob) and returns once the root
    holds it; the tree below fills in asynchronously (`settle` waits for it). An equal or older
    version changes nothing; params not of the spec raise ValueError before anything is sent."""
    blob = cache.to_blob(params, version, self.spec)
    if 0 in self.dead:
      raise RuntimeError("publish: the root cache (node 0) is dead; no version can reach any "
                         "leaf (start a new service, numbering versions from "
                         "cache.resume_version)")
    ray.get(self.nodes[0].publish.remote(cache.LEARNER, version, [ray.put(blob)]),
            timeout=self.timeout_s)

  # -- actor side --

  def read(self, actor: int) -> tuple[int, Any | None]:
    """`LeafReader.read`: (version, params) from the actor's leaf, re-attached when dead."""
    return self._reader.read(actor)

  # -- faults, settling, accounting --

  def fail_node(self, node_id: int) -> None:
    """Kills cache node `node_id` (fault injection); its counters are kept for egress_bytes.
    Actors below it re-attach on their next read."""
    if not isinstance(node_id, (int, np.integer)) or not 0 <= node_id < self.topology.num_nodes:
      raise ValueError(f"fail_node: got {node_id!r}, expected a node id 0 ... "
                       f"{self.topology.num_nodes - 1}")
    if node_id in self.dead:
      return
    self._node_counters(node_id)
    ray.kill(self.nodes[node_id], no_restart=True)
    self._reader.mark_dead(node_id)

  def versions(self) -> dict[int, int]:
    """The version each live node holds (a node found dead here joins `dead`)."""
    refs = {n: self.nodes[n].version.remote() for n in range(self.topology.num_nodes)
            if n not in self.dead}
    out = {}
    for n, ref in refs.items():
      try:
        out[n] = ray.get(ref, timeout=self.timeout_s)
      except Exception as e:  # pylint: disable=broad-except
        if not is_actor_death(e):
          raise
        self._reader.mark_dead(n)
    return out

  def settle(self, timeout_s: float | None = None) -> int:
    """Waits until every node still connected to the root holds the root's version; returns it.
    Raises TimeoutError naming the nodes that lag."""
    timeout_s = self.timeout_s if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    while True:
      versions = self.versions()
      if 0 not in versions:
        raise RuntimeError("settle: the root cache (node 0) is dead")
      dead = self.dead
      lagging = {n: v for n, v in versions.items()
                 if v != versions[0] and not dead.intersection(self.topology.ancestors(n))}
      if not lagging:
        return versions[0]
      if time.monotonic() > deadline:
        raise TimeoutError(f"settle: after {timeout_s} s nodes {lagging} (node: version) still "
                           f"lag the root's version {versions[0]}")
      time.sleep(0.01)

  def _node_counters(self, node_id: int) -> tuple[dict[int, int], int]:
    """The node's counters, refreshed unless it is dead (then the last ones seen)."""
    if node_id not in self.dead:
      try:
        counters = ray.get(self.nodes[node_id].counters.remote(), timeout=self.timeout_s)
        with self._counters_lock:
          self._counters[node_id] = counters
      except Exception as e:  # pylint: disable=broad-except
        if not is_actor_death(e):
          raise
        self._reader.mark_dead(node_id)
    with self._counters_lock:
      return self._counters.get(node_id, ({}, 0))

  def egress_bytes(self) -> dict[int, int]:
    """Bytes each node (cache.LEARNER for the learner) has sent: what its children fetched from
    it, plus at a leaf what RL actors fetched from it. A node that died unexpectedly keeps the
    counters last seen (a `fail_node` reads them first)."""
    egress = {cache.LEARNER: 0, **{n: 0 for n in range(self.topology.num_nodes)}}
    for n in range(self.topology.num_nodes):
      ingress, to_actors = self._node_counters(n)
      egress[n] += to_actors
      for src, nbytes in ingress.items():
        egress[src] += nbytes
    return egress

  def close(self) -> None:
    for node in self.nodes:
      ray.kill(node, no_restart=True)
    self.nodes = []

  def __enter__(self) -> "RayParameterService":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# -- the replay service -----------------------------------------------------------------------


@ray.remote(num_cpus=0)
class ReplayTableActor:
  """A `replay.Table` in an async Ray actor (one event loop: calls interleave only at `await`).
  An insert the limiter refuses waits here, up to its timeout, until a sample changes the
  limiter's answer (Reverb's server holds inserts the same way); sample answers None at once
  while the limiter or the table's size says wait."""

  def __init__(self, config: replay.TableConfig, spec: replay.ItemSpec):
    self._table = replay.new_table(config, spec)
    self._changed = None  # asyncio.Condition, made in the actor's event loop on first use

  def _condition(self):
    import asyncio  # pylint: disable=import-outside-toplevel
    if self._changed is None:
      self._changed = asyncio.Condition()
    return self._changed

  async def insert(self, item: Mapping[str, np.ndarray], priority: float,
                   timeout_s: float = 0.0) -> bool:
    import asyncio  # pylint: disable=import-outside-toplevel
    changed = self._condition()
    async with changed:
      if not replay.can_insert(self._table):
        if timeout_s <= 0:
          return False
        try:
          await asyncio.wait_for(changed.wait_for(lambda: replay.can_insert(self._table)),
                                 timeout=timeout_s)
        except asyncio.TimeoutError:
          return False
      self._table = replay.insert(self._table, item, priority)  # ValueError for a bad item
      return True

  async def sample(self, n: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray,
                                                     np.ndarray] | None:
    if not replay.can_sample(self._table, n):  # ValueError for n < 1
      return None
    self._table, batch, keys, probs = replay.sample(self._table, n, np.random.default_rng(seed))
    changed = self._condition()
    async with changed:
      changed.notify_all()
    return batch, keys, probs

  async def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> None:
    self._table = replay.update_priorities(self._table, keys, priorities)

  async def accounting(self) -> replay.Accounting:
    return replay.accounting(self._table)


class RayReplayService:
  """One replay table as a Ray actor; every call waits for its answer (up to `timeout_s`)."""

  def __init__(self, config: replay.TableConfig, spec: replay.ItemSpec, *,
               actor_options: Mapping[str, Any] | None = None, timeout_s: float = 60.0):
    if not isinstance(config, replay.TableConfig) or not isinstance(spec, replay.ItemSpec):
      raise ValueError(f"RayReplayService: got {type(config).__name__}, {type(spec).__name__}; "
                       "expected a replay.TableConfig and a replay.ItemSpec")
    self.config = config
    self.spec = spec
    self.timeout_s = timeout_s
    self.table = ReplayTableActor.options(**dict(actor_options or {})).remote(config, spec)

  def insert(self, item: dict[str, np.ndarray], priority: float = 1.0,
             timeout_s: float = 0.0) -> bool:
    """Inserts `item`, waiting in the table actor up to `timeout_s` while the rate limiter says
    wait (then False, nothing inserted). An item not of the spec raises ValueError naming the
    field."""
    return ray.get(self.table.insert.remote(item, priority, timeout_s),
                   timeout=self.timeout_s + timeout_s)

  def sample_with_info(self, n: int, seed: int
                       ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray] | None:
    """(batch, keys, probabilities) as `replay.sample`, or None while the limiter says wait or
    the table holds fewer than `n` items. `n` above max_size (never possible) raises."""
    if isinstance(n, (int, np.integer)) and n > self.config.max_size:
      raise ValueError(f"sample n={n}: the table never holds more than max_size="
                       f"{self.config.max_size} items; expected n <= max_size")
    return ray.get(self.table.sample.remote(n, seed), timeout=self.timeout_s)

  def sample(self, n: int, seed: int) -> dict[str, np.ndarray] | None:
    out = self.sample_with_info(n, seed)
    return None if out is None else out[0]

  def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> None:
    ray.get(self.table.update_priorities.remote(keys, priorities), timeout=self.timeout_s)

  def accounting(self) -> replay.Accounting:
    return ray.get(self.table.accounting.remote(), timeout=self.timeout_s)

  def close(self) -> None:
    if self.table is not None:
      ray.kill(self.table, no_restart=True)
      self.table = None

  def __enter__(self) -> "RayReplayService":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# -- RL actors as Ray actors ------------------------------------------------------------------


WorkerReport = workers.WorkerReport
ActorWorker = workers.ActorWorker
RayActorWorker = ray.remote(num_cpus=1)(workers.ActorWorker)


class RayActorPool(workers.ActorPool):
  """One `RayActorWorker` per actor, the `workers.py` pool interface over Ray object refs.
  `num_cpus` per worker (1: one core each on a cluster; a local run may oversubscribe by
  starting Ray with more logical CPUs than cores); the workers run jax on the CPU with one
  thread (`workers.ACTOR_XLA_FLAGS`) and report through `ray.wait`."""

  def __init__(self, agent_config: Any, seeds: list[int], reader: LeafReader,
               replay_service: RayReplayService, *, wait_s: float = 60.0,
               num_cpus: float = 1.0):
    super().__init__()
    env = {"XLA_FLAGS": workers.ACTOR_XLA_FLAGS, "JAX_PLATFORMS": "cpu"}
    self._workers = [
        RayActorWorker.options(num_cpus=num_cpus, runtime_env={"env_vars": env}).remote(
            agent_config, actor, seed, reader, replay_service, wait_s=wait_s)
        for actor, seed in enumerate(seeds)]

  def _start(self, actor: int, num_rollouts: int, epsilon: float) -> ray.ObjectRef:
    return self._workers[actor].run.remote(num_rollouts, epsilon)

  def _finished(self, handles: list, timeout_s: float) -> list:
    ready, _ = ray.wait(handles, num_returns=1, timeout=timeout_s)
    if ready:  # and whatever else finished meanwhile
      ready, _ = ray.wait(handles, num_returns=len(handles), timeout=0)
    return ready

  def _result(self, handle: ray.ObjectRef) -> WorkerReport:
    return ray.get(handle)

  def close(self) -> None:
    for worker in self._workers:
      ray.kill(worker, no_restart=True)
    self._workers, self._pending = [], {}
