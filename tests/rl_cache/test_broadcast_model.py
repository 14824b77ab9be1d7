"""The broadcast cost model: exact path terms on small trees worked by hand, least squares that
recovers known costs, and projections whose egress follows the counting rules."""

import numpy as np
import pytest

from research.rl_cache import broadcast_model as bm
from research.rl_cache import cache


def test_topology_for_picks_the_shallowest_tree_that_holds_the_actors():
  assert bm.topology_for(4, fanout=4, actors_per_leaf=4).depth == 1
  assert bm.topology_for(5, fanout=4, actors_per_leaf=4).depth == 2
  assert bm.topology_for(64, fanout=4, actors_per_leaf=4).depth == 3
  assert bm.topology_for(10_000, fanout=4, actors_per_leaf=4).depth == 7  # 4^6 >= 2,500 leaves
  with pytest.raises(ValueError, match="fanout=1"):
    bm.topology_for(8, fanout=1, actors_per_leaf=4)


def test_path_terms_count_the_siblings_served_first_and_the_actors_on_the_leaf():
  # depth 2, fanout 2, 5 actors: leaf 1 (served first) has actors 0, 2, 4; leaf 2 has 1, 3.
  topology = cache.Topology(depth=2, fanout=2, num_actors=5)
  assert sorted(bm.leaf_terms(topology)) == [(2, 3), (3, 2)]  # (hops, serves)
  # equal unit costs tie at 5: the one with more hops
  assert bm.tree_terms(topology) == (3, 2)
  # costly hops: leaf 2's last actor is last; costly serves: leaf 1's
  assert bm.tree_latency(topology, 0.5, 10.0, 1.0) == 0.5 + 30 + 2
  assert bm.tree_latency(topology, 0.0, 1.0, 10.0) == 2 + 30
  # depth 3, fanout 3, 9 actors: the last leaf is the 3rd child of the 3rd child of the root
  assert bm.tree_terms(cache.Topology(depth=3, fanout=3, num_actors=9)) == (1 + 3 + 3, 1)


def test_fits_recover_the_costs_that_made_the_points():
  topologies = [bm.topology_for(k, 4, 4) for k in (1, 2, 4, 8, 16, 32, 64)]
  truth = bm.TreeCosts(0.002, 0.0007, 0.0003)
  latencies = [bm.tree_latency(t, *truth) for t in topologies]
  np.testing.assert_allclose(bm.fit_tree(topologies, latencies), truth, rtol=1e-6, atol=1e-12)
  counts = [1, 2, 4, 8, 16]
  np.testing.assert_allclose(bm.fit_linear(counts, [0.01 + 0.002 * k for k in counts]),
                             (0.01, 0.002), rtol=1e-9)


def test_projection_egress_is_one_blob_for_the_tree_and_one_per_actor_for_flat():
  row = bm.project(10_000, tree=bm.TreeCosts(0.0, 1.0, 1.0), flat=bm.LinearCosts(0.0, 1.0),
                   store=bm.LinearCosts(0.0, 0.5), fanout=4, actors_per_leaf=4,
                   actors_per_machine=64, blob_bytes=1_000)
  assert row["tree_egress_bytes"] == 1_000 and row["flat_egress_bytes"] == 10_000_000
  assert row["store_egress_bytes_at_most"] == 1_000 * 157  # ceil(10,000 / 64) machines
  assert row["flat_latency_s"] == 10_000 and row["store_latency_s"] == 5_000
  # depth 7: 1 + 4 * 6 hops on the last path (the tail of the round robin) + 4 serves at most
  assert row["tree_depth"] == 7 and row["tree_latency_s"] <= 1 + 4 * 6 + 4
