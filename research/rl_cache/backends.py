"""The services an actor/learner run talks to, in-process: the parameter cache and the replay table.

A run sees two services with one small interface each, whatever the backend:

  ParameterService  publish(params, version) from the learner to the cache tree's root (one blob
                    per version); read(actor) -> (version, params) from the actor's leaf, after
                    pulling a newer version from its ancestors; fail_node(node) (fault
                    injection: actors below it re-attach on their next read); egress_bytes().
  ReplayService     insert(item, priority, timeout_s) -> bool (False: the rate limiter still
                    says wait after timeout_s; nothing inserted; a remote service holds the
                    call meanwhile, as Reverb's server does, rather than have actors retry);
                    sample(n, seed) -> batch or None (rate limited or too few items);
                    accounting().

`InProcessParameterService` / `InProcessReplayService` hold the pure state of
`research.rl_cache.cache` / `replay` and replace it on every call: tests and the single-process
backend. `research.rl_cache.process_backend` hosts these two in a manager process for actors in
local processes; `research.rl_cache.ray_backend` has the same two services as Ray actors.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from research.rl_cache import cache
from research.rl_cache import replay


class InProcessParameterService:
  """The cache tree in this process; push on publish, pull on read (both as cache.py defines).

  It counts and fails as `ray_backend.RayParameterService` does: the learner's egress is one
  blob per version the root takes (an equal or older version changes nothing and moves no
  bytes); node `n`'s egress is what its children took from it plus, at a leaf, a blob for each
  read that hands an RL actor a version newer than the one it holds; a failed node
  (`fail_node`, an id of the tree or ValueError) and the nodes below it receive nothing more,
  and a failed root refuses publishes.
  """

  def __init__(self, topology: cache.Topology, spec: cache.ParamSpec):
    self.topology = topology
    self.spec = spec
    self.tree = cache.init_tree(topology, spec)
    self.dead: set[int] = set()
    self._egress = {cache.LEARNER: 0, **{n: 0 for n in range(topology.num_nodes)}}
    self._held: dict[int, tuple[int, cache.ParamBlob]] = {}  # actor -> the version it read

  def _cut_off(self, node_id: int) -> bool:
    """Whether `node_id` is dead or below a dead node (no version can reach it)."""
    return bool(self.dead & {node_id, *self.topology.ancestors(node_id)})

  def publish(self, params: Any, version: int) -> None:
    blob = cache.to_blob(params, version, self.spec)
    cache.check(blob, self.spec)
    if 0 in self.dead:
      raise RuntimeError("publish: the root cache (node 0) is dead; no version can reach any "
                         "leaf (start a new service, numbering versions from "
                         "cache.resume_version)")
    if blob.version <= self.tree[0].version:
      return  # the root refuses it without taking the bytes (cache.publish's rule)
    tree, hops = cache.push(self.tree, self.topology, blob)
    for node_id in range(self.topology.num_nodes):
      if self._cut_off(node_id):  # a dead node takes nothing, so nothing reaches below it
        tree[node_id] = self.tree[node_id]
    for hop in hops:
      if not self._cut_off(hop.dst):
        self._egress[hop.src] += blob.nbytes
    self.tree = tree

  def read(self, actor: int) -> tuple[int, Any | None]:
    leaf = self.topology.leaf_of(actor)
    if self._cut_off(leaf):
      leaf = cache.reattach(self.topology, actor, self.dead)
      self.topology = self.topology.with_leaf(actor, leaf)
    for node in list(reversed(self.topology.ancestors(leaf))) + [leaf]:
      tree = cache.pull(self.tree, self.topology, node)
      if tree[node] is not self.tree[node]:
        self._egress[self.topology.parent(node)] += tree[node].blob.nbytes
      self.tree = tree
    version, blob = cache.actor_read(self.tree, self.topology, actor)
    if version > self._held.get(actor, (cache.NO_VERSION, None))[0]:
      self._egress[leaf] += blob.nbytes  # the actor fetches the blob from its leaf
      self._held[actor] = (version, blob)
    version, blob = self._held.get(actor, (cache.NO_VERSION, None))
    return version, (None if blob is None else cache.from_blob(blob, self.spec))

  def fail_node(self, node_id: int) -> None:
    """Node `node_id` fails (fault injection): it and the nodes below it receive nothing more;
    actors below it re-attach on their next read."""
    if not isinstance(node_id, (int, np.integer)) or not 0 <= node_id < self.topology.num_nodes:
      raise ValueError(f"fail_node: got {node_id!r}, expected a node id 0 ... "
                       f"{self.topology.num_nodes - 1}")
    self.dead.add(int(node_id))

  def egress_bytes(self) -> dict[int, int]:
    """Bytes each node (cache.LEARNER for the learner) has sent (class docstring)."""
    return dict(self._egress)

  def close(self) -> None:
    pass


class InProcessReplayService:
  """A replay table in this process; the rate limiter answers through the return values."""

  def __init__(self, config: replay.TableConfig, spec: replay.ItemSpec):
    self.table = replay.new_table(config, spec)

  def insert(self, item: dict[str, np.ndarray], priority: float = 1.0,
             timeout_s: float = 0.0) -> bool:
    """True once inserted; False (nothing inserted) while the limiter says wait. In one process
    nobody can sample meanwhile, so `timeout_s` (how long a remote service may hold the call
    for the limiter) changes nothing here."""
    del timeout_s
    if not replay.can_insert(self.table):
      return False
    self.table = replay.insert(self.table, item, priority)
    return True

  def sample(self, n: int, seed: int) -> dict[str, np.ndarray] | None:
    """A batch, or None while the limiter says wait or the table holds fewer than `n` items.
    `n` above max_size (never possible) raises."""
    max_size = self.table.config.max_size
    if isinstance(n, (int, np.integer)) and n > max_size:
      raise ValueError(f"sample n={n}: the table never holds more than max_size={max_size} "
                       "items; expected n <= max_size")
    if not replay.can_sample(self.table, n):
      return None
    self.table, batch, _, _ = replay.sample(self.table, n, np.random.default_rng(seed))
    return batch

  def accounting(self) -> replay.Accounting:
    return replay.accounting(self.table)

  def close(self) -> None:
    pass
