"""A cost model of getting one parameter version to every actor, to project measurements.

Three ways to broadcast a blob of `B` bytes to `k` actors:

- tree: learner -> root -> ... -> leaves (`cache.Topology`) -> actors. Each cache node serves its
  children one after another (`hop_s` each: a node fetches the blob from its parent and stores
  its own copy), and each leaf serves its actors one after another (`serve_s` each). The last
  actor to hold the version is the one behind the last child at every level:

    latency = fixed_s + hop_s * (1 + sum of the children served before it at each level)
                      + serve_s * (the number of actors on its leaf)

  computed exactly by `tree_latency` for any topology (also unbalanced ones) by walking every
  node's ready time; learner egress is one blob per version.
- flat: the learner sends the blob to each actor itself, one after another:
  latency = fixed_s + send_s * k; learner egress k blobs per version.
- object store: the learner puts the blob once; the actors on a machine read the machine's copy
  and each machine's store pulls it once (`machines` pulls of the owner's copy at most: a store
  may also pull from another machine that holds it). latency = fixed_s + get_s * k on one
  machine (the driver hands out the reference one call at a time).

`fit_*` calibrate the costs by least squares on measured (k, latency) points; `project` evaluates
all three at any actor count. Pure functions over numbers; the measurements are made by
experiments/bench_rl_cache.py.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np

from research.rl_cache import cache


def topology_for(num_actors: int, fanout: int, actors_per_leaf: int) -> cache.Topology:
  """The shallowest tree of `fanout` whose leaves take `num_actors` with at most
  `actors_per_leaf` on each."""
  if fanout < 2 or actors_per_leaf < 1 or num_actors < 1:
    raise ValueError(f"topology_for: got num_actors={num_actors}, fanout={fanout}, "
                     f"actors_per_leaf={actors_per_leaf}; expected >= 1, >= 2, >= 1")
  leaves_needed = -(-num_actors // actors_per_leaf)
  depth = 1
  while fanout ** (depth - 1) < leaves_needed:
    depth += 1
  return cache.Topology(depth=depth, fanout=fanout, num_actors=num_actors)


class TreeTerms(NamedTuple):
  """The worst actor's path in unit costs: latency = fixed_s + hop_s * hops + serve_s * serves."""

  hops: int  # node fetches on the worst path, counting the children served before each
  serves: int  # actor reads its leaf serves up to and including the worst actor's


def leaf_terms(topology: cache.Topology) -> list[TreeTerms]:
  """`TreeTerms` of the last actor of every leaf that has actors."""
  ready: dict[int, int] = {0: 1}  # node -> hops until it holds the blob (the root's fetch: 1)
  for level in range(1, topology.depth):
    for node in topology.level_nodes(level):
      parent = topology.parent(node)
      rank = node - topology.children(parent).start  # served after `rank` siblings
      ready[node] = ready[parent] + rank + 1
  actors = {leaf: 0 for leaf in topology.leaves}
  for a in range(topology.num_actors):
    actors[topology.leaf_of(a)] += 1
  return [TreeTerms(ready[leaf], n) for leaf, n in actors.items() if n]


def tree_terms(topology: cache.Topology) -> TreeTerms:
  """The terms of the actor that holds the version last at equal unit costs (hop_s = serve_s;
  ties: the most hops): the design row `fit_tree` uses."""
  return max(leaf_terms(topology), key=lambda t: (t.hops + t.serves, t.hops))


def tree_latency(topology: cache.Topology, fixed_s: float, hop_s: float, serve_s: float
                 ) -> float:
  """Seconds until every actor holds a published version (module docstring): the slowest
  leaf's last actor at these costs."""
  return fixed_s + max(hop_s * t.hops + serve_s * t.serves for t in leaf_terms(topology))


class TreeCosts(NamedTuple):
  fixed_s: float
  hop_s: float
  serve_s: float


class LinearCosts(NamedTuple):
  """latency = fixed_s + per_actor_s * k (flat sends, object-store gets)."""

  fixed_s: float
  per_actor_s: float


def fit_tree(topologies: Sequence[cache.Topology], latencies_s: Sequence[float]) -> TreeCosts:
  """Least-squares (fixed_s, hop_s, serve_s) over measured latencies, costs clipped at 0."""
  terms = [tree_terms(t) for t in topologies]
  design = np.array([[1.0, t.hops, t.serves] for t in terms])
  coef, *_ = np.linalg.lstsq(design, np.asarray(latencies_s, float), rcond=None)
  return TreeCosts(*(max(float(c), 0.0) for c in coef))


def fit_linear(actor_counts: Sequence[int], latencies_s: Sequence[float]) -> LinearCosts:
  design = np.array([[1.0, k] for k in actor_counts])
  coef, *_ = np.linalg.lstsq(design, np.asarray(latencies_s, float), rcond=None)
  return LinearCosts(*(max(float(c), 0.0) for c in coef))


def project(num_actors: int, *, tree: TreeCosts, flat: LinearCosts, store: LinearCosts,
            fanout: int, actors_per_leaf: int, actors_per_machine: int, blob_bytes: int
            ) -> dict[str, float]:
  """Latency (s) and learner egress (bytes per version) of the three broadcasts at
  `num_actors` (module docstring); `machines` = ceil(num_actors / actors_per_machine)."""
  topology = topology_for(num_actors, fanout, actors_per_leaf)
  machines = math.ceil(num_actors / actors_per_machine)
  return {
      "actors": num_actors, "tree_depth": topology.depth,
      "tree_latency_s": tree_latency(topology, *tree),
      "flat_latency_s": flat.fixed_s + flat.per_actor_s * num_actors,
      "store_latency_s": store.fixed_s + store.per_actor_s * num_actors,
      "tree_egress_bytes": blob_bytes,
      "flat_egress_bytes": blob_bytes * num_actors,
      "store_egress_bytes_at_most": blob_bytes * machines,
  }
