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
  move each version at most once per edge. Egress is counted where the bytes land: each node
  counts the bytes it fetched from each source, so node `n`'s egress is what its children
  fetched from it plus, at a leaf, what the actors read from it (`Topology.receivers`); the
  learner's is what the root fetched from it (one blob per version, whatever the number of
  actors).

  Failures: `fail_node` kills a node's actor (`ray.kill`); an actor whose leaf or one of its
  ancestors is dead (killed, or found dead through a `RayActorError` on a read) is moved by
  `cache.reattach` to a live leaf on its next read, and the read is retried there.
- `RayReplayService(config, spec)`: one Ray actor around a `replay.Table`; `insert` answers
  False and `sample` None while the rate limiter (or the table's size) says wait.

Cache node actors are sync Ray actors (one call at a time): a node blocks only on its parent
(pull) and never on a child (pushes are fire-and-forget), so calls cannot wait in a cycle.
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

NodeOptions = Callable[[int], Mapping[str, Any]]  # node id -> CacheNodeActor.options(**...)


def is_actor_death(error: BaseException) -> bool:
  """Whether a Ray error means an actor on the call's path died: a `RayActorError`, an object
  lost with its owner (`ObjectLostError`), or either inside a call the callee made (a
  `RayTaskError` whose cause is one)."""
  while error is not None:
    if isinstance(error, (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)):
      return True
    error = getattr(error, "cause", None) if isinstance(error,
                                                        ray.exceptions.RayTaskError) else None
  return False


# -- one cache node ---------------------------------------------------------------------------



@ray.remote(num_cpus=0)
class CacheNodeActor:
  """One cache node: a `cache.CacheNode` plus the ref of its blob in Ray's object store."""

  def __init__(self, node_id: int, parent_id: int, spec: cache.ParamSpec):
    self._node = cache.CacheNode(node_id=node_id, spec=spec)
    self._parent_id = parent_id  # cache.LEARNER at the root
    self._ref: ray.ObjectRef | None = None  # ray.put(self._node.blob), owned by this actor
    self._parent = None  # the parent's actor handle; None at the root
    self._children: list = []
    self._ingress: dict[int, int] = {}  # source node id (or cache.LEARNER) -> bytes fetched

  def connect(self, parent, children: list) -> int:
    self._parent, self._children = parent, list(children)
    return self._node.node_id

  def publish(self, src: int, version: int, wrapped_ref: list) -> bool:
    """Takes the blob behind `wrapped_ref[0]` when `version` is newer than the one held, keeps
    its own copy and pushes that to the children (without waiting for them). Returns whether it
    landed. A blob not matching the spec, or not of `version`, raises ValueError and changes
    nothing."""
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
    return True

  def pull(self, have_version: int) -> tuple[int, list | None]:
    """Refreshes this node from its ancestors (root first), then answers (version, [ref]) when
    the version held is newer than `have_version`, else (version, None)."""
    if self._parent is not None:
      version, wrapped = ray.get(self._parent.pull.remote(self._node.version))
      if wrapped is not None:
        self.publish(self._parent_id, version, wrapped)
    if self._node.version > have_version:
      return self._node.version, [self._ref]
    return self._node.version, None

  def version(self) -> int:
    return self._node.version

  def ingress(self) -> dict[int, int]:
    return dict(self._ingress)

  def location(self) -> str:
    """The id of the Ray node (machine) this cache node runs on."""
    return ray.get_runtime_context().get_node_id()


# -- the parameter service --------------------------------------------------------------------


class RayParameterService:
  """The cache tree as Ray actors: publish once per version at the root, read at the leaves.

  `node_options(node_id)` gives each node actor's Ray options (e.g. a `scheduling_strategy` to
  place the tree across machines); `timeout_s` bounds each wait on a node. Thread-safe: one
  learner thread may publish while other threads read.
  """

  def __init__(self, topology: cache.Topology, spec: cache.ParamSpec, *,
               node_options: NodeOptions | None = None, timeout_s: float = 60.0):
    if not isinstance(topology, cache.Topology) or not isinstance(spec, cache.ParamSpec):
      raise ValueError(f"RayParameterService: got {type(topology).__name__}, "
                       f"{type(spec).__name__}; expected a cache.Topology and a cache.ParamSpec")
    self.topology = topology
    self.spec = spec
    self.timeout_s = timeout_s
    self.dead: set[int] = set()
    self.nodes = [
        CacheNodeActor.options(**dict((node_options or (lambda n: {}))(n))).remote(
            n, topology.parent(n), spec)
        for n in range(topology.num_nodes)]
    ray.get([node.connect.remote(
        None if n == 0 else self.nodes[topology.parent(n)],
        [self.nodes[c] for c in topology.children(n)]) for n, node in enumerate(self.nodes)],
            timeout=timeout_s)
    self._lock = threading.Lock()  # guards topology, dead, _held, _actor_egress, _ingress
    self._held: dict[int, tuple[int, Any]] = {}  # actor -> (version, params) it last read
    self._actor_egress: dict[int, int] = {}  # leaf -> bytes the actors fetched from it
    self._ingress: dict[int, dict[int, int]] = {}  # node -> its last known ingress counters

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
    """(version, params) for `actor` from its leaf, after the leaf pulled from its ancestors;
    (cache.NO_VERSION, None) before any publish. Never older than what the actor read before.
    A dead leaf or ancestor moves the actor to another leaf (cache.reattach), and the read is
    retried there."""
    error = None
    for _ in range(self.topology.num_nodes + 1):
      with self._lock:
        leaf = self._live_leaf(actor)
        have_version, params = self._held.get(actor, (cache.NO_VERSION, None))
      try:
        version, wrapped = ray.get(self.nodes[leaf].pull.remote(have_version),
                                   timeout=self.timeout_s)
        if wrapped is None:
          return have_version, params
        blob = ray.get(wrapped[0], timeout=self.timeout_s)
      except Exception as e:  # pylint: disable=broad-except
        if not is_actor_death(e):
          raise
        error = e
        self._find_dead((leaf, *self.topology.ancestors(leaf)))
        continue
      params = cache.from_blob(blob, self.spec)
      with self._lock:
        self._actor_egress[leaf] = self._actor_egress.get(leaf, 0) + blob.nbytes
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

  def _find_dead(self, node_ids: tuple[int, ...]) -> None:
    """Asks each node for its version; those whose actor is gone join `dead`."""
    for n in node_ids:
      try:
        ray.get(self.nodes[n].version.remote(), timeout=self.timeout_s)
      except Exception as e:  # pylint: disable=broad-except
        if not is_actor_death(e):
          raise
        with self._lock:
          self.dead.add(n)

  # -- faults, settling, accounting --

  def fail_node(self, node_id: int) -> None:
    """Kills cache node `node_id` (fault injection); its counters are kept for egress_bytes."""
    if not isinstance(node_id, (int, np.integer)) or not 0 <= node_id < self.topology.num_nodes:
      raise ValueError(f"fail_node: got {node_id!r}, expected a node id 0 ... "
                       f"{self.topology.num_nodes - 1}")
    if node_id in self.dead:
      return
    self._counters(node_id)
    ray.kill(self.nodes[node_id], no_restart=True)
    with self._lock:
      self.dead.add(node_id)

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
        with self._lock:
          self.dead.add(n)
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
      connected = {n: v for n, v in versions.items()
                   if not self.dead.intersection(self.topology.ancestors(n))}
      lagging = {n: v for n, v in connected.items() if v != versions[0]}
      if not lagging:
        return versions[0]
      if time.monotonic() > deadline:
        raise TimeoutError(f"settle: after {timeout_s} s nodes {lagging} (node: version) still "
                           f"lag the root's version {versions[0]}")
      time.sleep(0.01)

  def _counters(self, node_id: int) -> dict[int, int]:
    """The node's ingress counters, refreshed unless it is dead."""
    if node_id not in self.dead:
      try:
        counters = ray.get(self.nodes[node_id].ingress.remote(), timeout=self.timeout_s)
        with self._lock:
          self._ingress[node_id] = counters
      except Exception as e:  # pylint: disable=broad-except
        if not is_actor_death(e):
          raise
        with self._lock:
          self.dead.add(node_id)
    return self._ingress.get(node_id, {})

  def egress_bytes(self) -> dict[int, int]:
    """Bytes each node (cache.LEARNER for the learner) has sent: what its children fetched from
    it, plus at a leaf what the actors fetched. A dead node's counters are the last ones seen."""
    egress = {cache.LEARNER: 0, **{n: 0 for n in range(self.topology.num_nodes)}}
    for n in range(self.topology.num_nodes):
      for src, nbytes in self._counters(n).items():
        egress[src] += nbytes
    with self._lock:
      for leaf, nbytes in self._actor_egress.items():
        egress[leaf] += nbytes
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
  """A `replay.Table`; insert and sample answer "wait" (False / None) as the limiter says."""

  def __init__(self, config: replay.TableConfig, spec: replay.ItemSpec):
    self._table = replay.new_table(config, spec)

  def insert(self, item: Mapping[str, np.ndarray], priority: float) -> bool:
    if not replay.can_insert(self._table):
      return False
    self._table = replay.insert(self._table, item, priority)  # ValueError for a bad item
    return True

  def sample(self, n: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray,
                                               np.ndarray] | None:
    if not replay.can_sample(self._table, n):  # ValueError for n < 1
      return None
    self._table, batch, keys, probs = replay.sample(self._table, n, np.random.default_rng(seed))
    return batch, keys, probs

  def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> None:
    self._table = replay.update_priorities(self._table, keys, priorities)

  def accounting(self) -> replay.Accounting:
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

  def insert(self, item: dict[str, np.ndarray], priority: float = 1.0) -> bool:
    """Inserts `item` unless the rate limiter says wait (False, nothing inserted). An item not
    of the spec raises ValueError naming the field."""
    return ray.get(self.table.insert.remote(item, priority), timeout=self.timeout_s)

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
