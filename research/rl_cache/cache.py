"""A versioned parameter cache tree between one learner and many actors.

The learner publishes each new parameter version once, to the root cache; the root forwards it to
its `fanout` children, and so on down `depth` levels to the leaf caches, from which the actors
read (RLlib-style pull with version numbers; the tree is what keeps the learner's egress at one
blob per version whatever the number of actors). With `n` actors, a flat broadcast costs the
learner `n` blobs per version; the tree costs it 1, and no cache node sends more than
`max(fanout, ceil(n / leaves))`.

Everything here is a pure state machine over immutable values, for the backends (in-process,
multi-process, Ray actors) to wrap:

- `ParamSpec` (tree structure, shapes, dtypes) and `ParamBlob(version, leaves)`: flattened host
  copies of the params, checked against the spec where they enter (`check`).
- `Topology(depth, fanout, num_actors)`: node ids (breadth first, root 0, children of `i` are
  `fanout * i + 1 ... fanout * i + fanout`), parents, the leaf each actor reads from, and the
  egress each node pays per version.
- `CacheNode(node_id, spec, version, blob)` and `publish(node, blob)`: a node's version only goes
  up; a newer blob always lands, an equal or older one leaves the node as it is.
- Whole-tree helpers over a dict node_id -> CacheNode (never mutated; a new dict is returned):
  `push` (learner -> root -> ... -> leaves), `pull` (one node from its parent), `actor_read`.
- Failures: `reattach` moves an actor off a dead leaf; `resume_version` numbers a restarted
  learner's versions above everything already published.

Because each transfer is "take the sender's version if newer", any interleaving of pushes and
pulls keeps every node monotone, and one final push brings every node to the newest version.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Mapping, NamedTuple

import jax
import numpy as np

LEARNER = -1  # the source id of the learner in a `Hop`; cache node ids are 0 ... num_nodes - 1
NO_VERSION = -1  # the version of a node that holds no blob yet


# -- params as blobs --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """What every blob of one policy looks like: tree structure, leaf paths, shapes and dtypes."""

  treedef: Any  # a jax PyTreeDef
  paths: tuple[str, ...]  # jax.tree_util.keystr of each leaf, in flattening order
  shapes: tuple[tuple[int, ...], ...]
  dtypes: tuple[np.dtype, ...]

  @classmethod
  def from_params(cls, params: Any) -> "ParamSpec":
    """The spec of an example params pytree (arrays of any kind; only shapes and dtypes count)."""
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    return cls(treedef=treedef,
               paths=tuple(jax.tree_util.keystr(p) for p, _ in path_leaves),
               shapes=tuple(tuple(int(d) for d in np.shape(x)) for _, x in path_leaves),
               dtypes=tuple(np.dtype(_dtype_of(x)) for _, x in path_leaves))

  @property
  def num_leaves(self) -> int:
    return len(self.paths)

  @property
  def nbytes(self) -> int:
    """Bytes of one blob's arrays: what one transfer of one version moves."""
    return sum(int(np.prod(s, dtype=np.int64)) * d.itemsize
               for s, d in zip(self.shapes, self.dtypes))


class ParamBlob(NamedTuple):
  """One version of the params, flattened in the spec's leaf order (read-only host arrays)."""

  version: int  # >= 0; strictly increasing over the learner's publishes
  leaves: tuple[np.ndarray, ...]

  @property
  def nbytes(self) -> int:
    return sum(int(x.nbytes) for x in self.leaves)


def _dtype_of(x: Any) -> Any:
  return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def to_blob(params: Any, version: int, spec: ParamSpec | None = None) -> ParamBlob:
  """Host copy of `params` as a blob (checked against `spec` when given)."""
  leaves = []
  for x in jax.tree_util.tree_leaves(params):
    x = np.array(x, copy=True)
    x.setflags(write=False)
    leaves.append(x)
  blob = ParamBlob(version=version, leaves=tuple(leaves))
  spec = ParamSpec.from_params(params) if spec is None else spec
  check(blob, spec)
  if spec.treedef != jax.tree_util.tree_structure(params):
    raise ValueError(f"params: tree structure {jax.tree_util.tree_structure(params)} differs "
                     f"from the spec's {spec.treedef}")
  return blob


def from_blob(blob: ParamBlob, spec: ParamSpec) -> Any:
  """The params pytree of a blob (numpy leaves; `jax.device_put` it where it is used)."""
  check(blob, spec)
  return jax.tree_util.tree_unflatten(spec.treedef, list(blob.leaves))


def check(blob: Any, spec: ParamSpec) -> None:
  """Raises ValueError unless `blob` is a ParamBlob of `spec`; the message names the leaf."""
  if not isinstance(blob, ParamBlob):
    raise ValueError(f"blob: got {type(blob).__name__}, expected a ParamBlob")
  if (not isinstance(blob.version, (int, np.integer)) or isinstance(blob.version, bool)
      or blob.version < 0):
    raise ValueError(f"blob version: got {blob.version!r}, expected an int >= 0")
  if len(blob.leaves) != spec.num_leaves:
    raise ValueError(f"blob version {blob.version}: got {len(blob.leaves)} leaves, expected "
                     f"{spec.num_leaves} ({', '.join(spec.paths)})")
  for i, (x, path, shape, dtype) in enumerate(
      zip(blob.leaves, spec.paths, spec.shapes, spec.dtypes)):
    if not isinstance(x, np.ndarray):
      raise ValueError(f"blob version {blob.version}, leaf {i} {path}: got "
                       f"{type(x).__name__}, expected a numpy array")
    if x.shape != shape or x.dtype != dtype:
      raise ValueError(f"blob version {blob.version}, leaf {i} {path}: got shape {x.shape} "
                       f"dtype {x.dtype}, expected shape {shape} dtype {dtype}")


# -- topology ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Topology:
  """learner -> root -> ... -> leaves (`depth` cache levels, `fanout` children each) -> actors.

  Level `l` holds `fanout**l` nodes; node ids run breadth first from the root (0), so the
  parent of node `i > 0` is `(i - 1) // fanout`. Actor `a` reads from leaf `a % num_leaves`
  (round robin) unless `attachments` (one leaf id per actor) says otherwise: `with_leaf`
  records a `reattach`.
  """

  depth: int
  fanout: int
  num_actors: int
  attachments: tuple[int, ...] | None = None

  def __post_init__(self):
    for name in ("depth", "fanout", "num_actors"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Topology {name}: got {value!r}, expected an int >= 1")
    if self.attachments is None:
      leaves = self.leaves
      attachments = tuple(leaves[a % len(leaves)] for a in range(self.num_actors))
    else:
      attachments = tuple(int(x) for x in self.attachments)
      if len(attachments) != self.num_actors:
        raise ValueError(f"Topology attachments: got {len(attachments)} leaf ids, expected one "
                         f"per actor ({self.num_actors})")
      bad = [x for x in attachments if not self.is_leaf(x)]
      if bad:
        raise ValueError(f"Topology attachments: {bad} are not leaf ids; the leaves are "
                         f"{self.leaves[0]} ... {self.leaves[-1]}")
    object.__setattr__(self, "attachments", attachments)

  # -- sizes --

  @property
  def nodes_per_level(self) -> tuple[int, ...]:
    return tuple(self.fanout**level for level in range(self.depth))

  @property
  def num_nodes(self) -> int:
    return sum(self.nodes_per_level)

  def level_nodes(self, level: int) -> range:
    if not 0 <= level < self.depth:
      raise ValueError(f"level: got {level}, expected 0 ... {self.depth - 1}")
    start = sum(self.nodes_per_level[:level])
    return range(start, start + self.nodes_per_level[level])

  @property
  def leaves(self) -> range:
    return self.level_nodes(self.depth - 1)

  def is_leaf(self, node_id: int) -> bool:
    return node_id in self.leaves

  def _check_node(self, node_id: int) -> None:
    if not isinstance(node_id, (int, np.integer)) or not 0 <= node_id < self.num_nodes:
      raise ValueError(f"node id: got {node_id!r}, expected 0 ... {self.num_nodes - 1}")

  def _check_actor(self, actor: int) -> None:
    if not isinstance(actor, (int, np.integer)) or not 0 <= actor < self.num_actors:
      raise ValueError(f"actor: got {actor!r}, expected 0 ... {self.num_actors - 1}")

  # -- structure --

  def parent(self, node_id: int) -> int:
    """The node's parent id; `LEARNER` for the root."""
    self._check_node(node_id)
    return LEARNER if node_id == 0 else (node_id - 1) // self.fanout

  def children(self, node_id: int) -> range:
    """Child cache nodes (empty for a leaf)."""
    self._check_node(node_id)
    if self.is_leaf(node_id):
      return range(0)
    return range(self.fanout * node_id + 1, self.fanout * node_id + self.fanout + 1)

  def ancestors(self, node_id: int) -> tuple[int, ...]:
    """Parent, grandparent, ..., root."""
    out, node = [], self.parent(node_id)
    while node != LEARNER:
      out.append(node)
      node = self.parent(node)
    return tuple(out)

  def leaf_of(self, actor: int) -> int:
    self._check_actor(actor)
    return self.attachments[actor]

  def actors_of(self, leaf: int) -> tuple[int, ...]:
    self._check_node(leaf)
    return tuple(a for a, x in enumerate(self.attachments) if x == leaf)

  @functools.cached_property
  def _leaf_load(self) -> collections.Counter:
    return collections.Counter(self.attachments)

  def with_leaf(self, actor: int, leaf: int) -> "Topology":
    """The same tree with `actor` reading from `leaf` (after a `reattach`)."""
    self._check_actor(actor)
    attachments = list(self.attachments)
    attachments[actor] = leaf
    return dataclasses.replace(self, attachments=tuple(attachments))

  # -- egress per version --

  def receivers(self, node_id: int) -> int:
    """How many copies the node sends per version: child caches, or attached actors at a leaf."""
    self._check_node(node_id)
    return self._leaf_load[node_id] if self.is_leaf(node_id) else len(self.children(node_id))

  def node_egress_bytes(self, node_id: int, blob_bytes: int) -> int:
    return self.receivers(node_id) * blob_bytes

  def learner_egress_bytes(self, blob_bytes: int) -> int:
    """One blob per version, to the root, whatever the number of actors."""
    return blob_bytes

  def flat_egress_bytes(self, blob_bytes: int) -> int:
    """What the learner would send per version broadcasting to every actor itself."""
    return self.num_actors * blob_bytes

  def max_node_egress_bytes(self, blob_bytes: int) -> int:
    return max(self.node_egress_bytes(n, blob_bytes) for n in range(self.num_nodes))


# -- one cache node ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class CacheNode:
  """A cache holding at most one blob: the newest version it has seen (compared by identity:
  `publish` returns the same object when it changes nothing)."""

  node_id: int
  spec: ParamSpec
  version: int = NO_VERSION
  blob: ParamBlob | None = None


def publish(node: CacheNode, blob: ParamBlob) -> CacheNode:
  """The node after it is offered `blob`.

  A newer version always replaces the one held; an equal or older one returns `node` itself, so
  a node never goes backwards and never loses a newer version. A blob not matching the node's
  spec raises ValueError and changes nothing.
  """
  check(blob, node.spec)
  if blob.version <= node.version:
    return node
  return dataclasses.replace(node, version=int(blob.version), blob=blob)


# -- the whole tree ---------------------------------------------------------------------------

Tree = Mapping[int, CacheNode]  # node_id -> CacheNode, for every node of a Topology


class Hop(NamedTuple):
  """One transfer of a blob that landed: `src` (a node id or `LEARNER`) sent `version` to `dst`."""

  src: int
  dst: int
  version: int


def init_tree(topology: Topology, spec: ParamSpec) -> dict[int, CacheNode]:
  """Every node empty (version `NO_VERSION`)."""
  return {n: CacheNode(node_id=n, spec=spec) for n in range(topology.num_nodes)}


def _check_tree(tree: Tree, topology: Topology) -> None:
  if set(tree) != set(range(topology.num_nodes)):
    raise ValueError(f"tree: got node ids {sorted(tree)}, expected 0 ... "
                     f"{topology.num_nodes - 1} (from init_tree)")


def pull(tree: Tree, topology: Topology, node_id: int) -> dict[int, CacheNode]:
  """`node_id` takes its parent's blob when the parent's version is newer (root: no-op)."""
  _check_tree(tree, topology)
  parent = topology.parent(node_id)
  new = dict(tree)
  if parent != LEARNER and tree[parent].blob is not None:
    new[node_id] = publish(tree[node_id], tree[parent].blob)
  return new


def push(tree: Tree, topology: Topology,
         blob: ParamBlob) -> tuple[dict[int, CacheNode], tuple[Hop, ...]]:
  """The learner publishes `blob` to the root, then each level pulls from the one above.

  Returns the new tree and the transfers that landed, learner first. Nodes forward the newest
  version they hold, so an out-of-date `blob` still refreshes nodes that lag behind the root, and
  after any push every node holds the root's version.
  """
  _check_tree(tree, topology)
  check(blob, tree[0].spec)
  new = dict(tree)
  hops = []
  root = publish(tree[0], blob)
  if root is not tree[0]:
    hops.append(Hop(LEARNER, 0, root.version))
  new[0] = root
  for level in range(1, topology.depth):
    for node_id in topology.level_nodes(level):
      parent = new[topology.parent(node_id)]
      if parent.blob is None:
        continue
      node = publish(new[node_id], parent.blob)
      if node is not new[node_id]:
        hops.append(Hop(parent.node_id, node_id, node.version))
      new[node_id] = node
  return new, tuple(hops)


def actor_read(tree: Tree, topology: Topology, actor: int) -> tuple[int, ParamBlob | None]:
  """(version, blob) held by the actor's leaf; (`NO_VERSION`, None) before the first push."""
  node = tree[topology.leaf_of(actor)]
  return node.version, node.blob


# -- failure and restart ----------------------------------------------------------------------


def reattach(topology: Topology, actor: int, dead: set[int] | frozenset[int]) -> int:
  """The leaf `actor` should read from when the nodes in `dead` are down.

  A leaf counts as live when it and every cache above it are up (otherwise no new version can
  reach it). The actor keeps a live leaf; otherwise it moves to a live sibling under the same
  parent, else to any live leaf; the least loaded first, then the lowest id. Raises ValueError
  when no leaf is live. Record the answer with `topology.with_leaf(actor, leaf)`.
  """
  dead = set(dead)
  for node_id in dead:
    topology._check_node(node_id)
  current = topology.leaf_of(actor)

  def live(leaf: int) -> bool:
    return leaf not in dead and not dead.intersection(topology.ancestors(leaf))

  if live(current):
    return current
  load = dict(topology._leaf_load)
  load[current] -= 1
  parent = topology.parent(current)
  siblings = [x for x in topology.leaves if x != current and topology.parent(x) == parent]
  for candidates in (siblings, list(topology.leaves)):
    candidates = [x for x in candidates if live(x)]
    if candidates:
      return min(candidates, key=lambda x: (load.get(x, 0), x))
  raise ValueError(f"reattach actor {actor}: no live leaf (dead nodes {sorted(dead)} cut every "
                   f"leaf {topology.leaves[0]} ... {topology.leaves[-1]} off the root); restart "
                   "a cache first")


def resume_version(last_published: int) -> int:
  """First version a restarted learner publishes: strictly above `last_published`.

  `last_published` is the newest version the root has seen (`tree[0].version`, `NO_VERSION`
  if none), so a cache never refuses the restarted learner's blobs as stale.
  """
  if (not isinstance(last_published, (int, np.integer)) or isinstance(last_published, bool)
      or last_published < NO_VERSION):
    raise ValueError(f"last_published: got {last_published!r}, expected an int >= {NO_VERSION}")
  return int(last_published) + 1
