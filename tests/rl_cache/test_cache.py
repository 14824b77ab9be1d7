"""Versioned parameter cache tree: monotone versions, egress, reattach, restart, bad blobs."""

import numpy as np
import pytest

from research.rl_cache import cache


def _params(version: int) -> dict:
  """Example policy params whose every entry encodes the version, to check blob/version pairing."""
  return {"dense": {"b": np.full((4,), version, np.float32),
                    "w": np.full((3, 4), version, np.float32)},
          "step": np.array(version, np.int32)}


SPEC = cache.ParamSpec.from_params(_params(0))


def _blob(version: int) -> cache.ParamBlob:
  return cache.to_blob(_params(version), version, SPEC)


def test_spec_and_blob_round_trip():
  assert SPEC.paths == ("['dense']['b']", "['dense']['w']", "['step']")
  assert SPEC.nbytes == 4 * 4 + 12 * 4 + 4
  blob = _blob(7)
  assert blob.nbytes == SPEC.nbytes
  params = cache.from_blob(blob, SPEC)
  np.testing.assert_array_equal(params["dense"]["w"], np.full((3, 4), 7, np.float32))
  with pytest.raises(ValueError):  # blobs are read-only copies
    blob.leaves[0][0] = 1.0


@pytest.mark.parametrize("bad_leaves, match", [
    (lambda ls: ls[:2], r"got 2 leaves, expected 3"),
    (lambda ls: (ls[0], np.zeros((4, 3), np.float32), ls[2]),
     r"leaf 1 \['dense'\]\['w'\]: got shape \(4, 3\) dtype float32, expected shape \(3, 4\)"),
    (lambda ls: (ls[0], ls[1], np.array(5, np.int64)),
     r"leaf 2 \['step'\]: got shape \(\) dtype int64, expected shape \(\) dtype int32"),
])
def test_blob_of_wrong_structure_shape_or_dtype_is_refused_and_state_unchanged(bad_leaves, match):
  topology = cache.Topology(depth=2, fanout=2, num_actors=3)
  tree, _ = cache.push(cache.init_tree(topology, SPEC), topology, _blob(3))
  bad = cache.ParamBlob(version=9, leaves=tuple(bad_leaves(_blob(9).leaves)))
  with pytest.raises(ValueError, match=match):
    cache.check(bad, SPEC)
  node = tree[0]
  with pytest.raises(ValueError, match=match):
    cache.publish(node, bad)
  assert node.version == 3 and node.blob.version == 3
  before = dict(tree)
  with pytest.raises(ValueError, match=match):
    cache.push(tree, topology, bad)
  assert tree == before and all(n.version == 3 for n in tree.values())


def test_negative_version_and_wrong_tree_structure_are_refused():
  with pytest.raises(ValueError, match="version"):
    cache.check(cache.ParamBlob(-2, _blob(0).leaves), SPEC)
  with pytest.raises(ValueError, match="tree structure"):
    cache.to_blob({"dense": {"b": np.zeros(4, np.float32), "w": np.zeros((3, 4), np.float32)},
                   "other": np.array(0, np.int32)}, 0, SPEC)


def test_publish_takes_newer_keeps_newer():
  node = cache.CacheNode(node_id=0, spec=SPEC)
  node = cache.publish(node, _blob(5))
  assert node.version == 5
  assert cache.publish(node, _blob(5)) is node
  assert cache.publish(node, _blob(2)) is node
  assert cache.publish(node, _blob(6)).version == 6


def test_topology_sizes_and_validation():
  t = cache.Topology(depth=3, fanout=3, num_actors=20)
  assert t.nodes_per_level == (1, 3, 9) and t.num_nodes == 13
  assert list(t.leaves) == list(range(4, 13))
  assert [t.parent(n) for n in range(13)] == [cache.LEARNER, 0, 0, 0] + [1] * 3 + [2] * 3 + [3] * 3
  assert list(t.children(2)) == [7, 8, 9] and list(t.children(7)) == []
  assert t.leaf_of(0) == 4 and t.leaf_of(9) == 4 and t.leaf_of(10) == 5
  assert sorted(len(t.actors_of(leaf)) for leaf in t.leaves) == [2] * 7 + [3] * 2
  for kwargs, name in [(dict(depth=0, fanout=2, num_actors=1), "depth"),
                       (dict(depth=2, fanout=0, num_actors=1), "fanout"),
                       (dict(depth=2, fanout=2, num_actors=0), "num_actors")]:
    with pytest.raises(ValueError, match=f"Topology {name}: got 0, expected an int >= 1"):
      cache.Topology(**kwargs)


@pytest.mark.parametrize("num_actors", [1, 10, 1000])
def test_learner_egress_is_one_blob_per_version_with_the_tree_and_num_actors_flat(num_actors):
  t = cache.Topology(depth=3, fanout=3, num_actors=num_actors)
  b = SPEC.nbytes
  assert t.learner_egress_bytes(b) == b
  assert t.flat_egress_bytes(b) == num_actors * b
  # Every cache below the root and every actor receives exactly one copy per version.
  total = sum(t.node_egress_bytes(n, b) for n in range(t.num_nodes))
  assert total == (t.num_nodes - 1 + num_actors) * b
  assert t.max_node_egress_bytes(b) == max(3, -(-num_actors // 9)) * b
  # A push moves the same: one hop out of the learner, one into each other node.
  tree, hops = cache.push(cache.init_tree(t, SPEC), t, _blob(0))
  assert sum(h.src == cache.LEARNER for h in hops) == 1
  assert len(hops) == t.num_nodes


def test_versions_are_monotone_under_random_interleavings_and_a_final_push_reaches_every_actor():
  rng = np.random.default_rng(0)
  t = cache.Topology(depth=3, fanout=3, num_actors=20)
  tree = cache.init_tree(t, SPEC)
  # The learner's publishes, arriving out of order: each late by up to 5 places.
  versions = np.argsort(np.arange(200) + rng.uniform(0, 5, 200))
  newest = cache.NO_VERSION
  last_read = {a: cache.NO_VERSION for a in range(t.num_actors)}
  pushes = pulls = reads = uneven = stale = 0
  for step in range(2000):
    before = {n: node.version for n, node in tree.items()}
    op = rng.integers(4)
    if op == 0 and step % 3 == 0 and pushes < len(versions):  # a (late) push of some version
      version = int(versions[pushes])
      pushes += 1
      stale += version < newest
      tree, hops = cache.push(tree, t, _blob(version))
      newest = max(newest, version)
      assert tree[0].version == newest  # a newer version always lands at the root
      assert all(node.version == newest for node in tree.values())  # and flows everywhere
      assert all(h.version == newest for h in hops)
    elif op == 1 and pushes < len(versions):  # the learner reaches only the root
      version = int(versions[pushes])
      pushes += 1
      tree = dict(tree)
      stale += version < newest
      tree[0] = cache.publish(tree[0], _blob(version))
      newest = max(newest, version)
      assert tree[0].version == newest
    elif op == 2:
      node_id = int(rng.integers(t.num_nodes))
      parent_version = tree[t.parent(node_id)].version if node_id else None
      tree = cache.pull(tree, t, node_id)
      pulls += 1
      if node_id:
        assert tree[node_id].version == max(before[node_id], parent_version)
    else:
      actor = int(rng.integers(t.num_actors))
      version, blob = cache.actor_read(tree, t, actor)
      reads += 1
      assert version >= last_read[actor]
      last_read[actor] = version
      if blob is not None:
        assert blob.version == version
        np.testing.assert_array_equal(cache.from_blob(blob, SPEC)["step"], version)
    for n, node in tree.items():
      assert node.version >= before[n], f"node {n} went back from {before[n]} to {node.version}"
      assert node.version <= newest
      if node.blob is not None:
        assert node.blob.version == node.version
        assert int(node.blob.leaves[2]) == node.version
      if n:  # a child is never ahead of its parent
        assert node.version <= tree[t.parent(n)].version
    uneven += len({node.version for node in tree.values()}) > 2
  assert pushes > 100 and stale > 30 and pulls > 300 and reads > 300
  assert uneven > 100  # the interleavings left nodes at several versions at once
  tree, _ = cache.push(tree, t, _blob(int(versions[0])))  # even a stale final push
  assert {cache.actor_read(tree, t, a)[0] for a in range(t.num_actors)} == {newest}


def test_reattach_prefers_a_live_sibling_and_reads_latest_after_pull():
  t = cache.Topology(depth=3, fanout=3, num_actors=20)
  tree, _ = cache.push(cache.init_tree(t, SPEC), t, _blob(1))
  actor = 1
  leaf = t.leaf_of(actor)  # 5, under node 1 with siblings 4 and 6
  assert t.parent(leaf) == 1
  assert cache.reattach(t, actor, {7}) == leaf  # its own leaf is alive: stay
  new_leaf = cache.reattach(t, actor, {leaf})
  assert new_leaf in (4, 6) and t.parent(new_leaf) == 1
  assert new_leaf == 6  # the less loaded sibling (leaf 4 has 3 actors, leaf 6 has 2)
  assert cache.reattach(t, actor, {leaf, 6}) == 4
  # The whole subtree under node 1 is cut off: any live leaf elsewhere.
  elsewhere = cache.reattach(t, actor, {1})
  assert t.parent(elsewhere) != 1
  # The dead leaf misses version 2; the new leaf gets it after a pull.
  t2 = t.with_leaf(actor, new_leaf)
  tree = dict(tree)
  tree[0] = cache.publish(tree[0], _blob(2))
  tree = cache.pull(tree, t2, 1)
  assert cache.actor_read(tree, t2, actor)[0] == 1
  tree = cache.pull(tree, t2, new_leaf)
  version, blob = cache.actor_read(tree, t2, actor)
  assert version == 2 and int(blob.leaves[2]) == 2
  assert t2.receivers(new_leaf) == t.receivers(new_leaf) + 1
  assert t2.receivers(leaf) == t.receivers(leaf) - 1


def test_reattach_with_no_live_leaf_is_a_clear_error():
  t = cache.Topology(depth=2, fanout=2, num_actors=4)
  with pytest.raises(ValueError, match="reattach actor 0: no live leaf"):
    cache.reattach(t, 0, {1, 2})
  with pytest.raises(ValueError, match="no live leaf"):
    cache.reattach(t, 0, {0})  # the root is down: nothing reaches any leaf
  with pytest.raises(ValueError, match=r"node id: got 99, expected 0 \.\.\. 2"):
    cache.reattach(t, 0, {99})


def test_restarted_learner_versions_continue_above_the_last_published():
  t = cache.Topology(depth=2, fanout=2, num_actors=2)
  tree, _ = cache.push(cache.init_tree(t, SPEC), t, _blob(41))
  first = cache.resume_version(tree[0].version)
  assert first == 42
  tree, hops = cache.push(tree, t, _blob(first))
  assert len(hops) == t.num_nodes and cache.actor_read(tree, t, 1)[0] == 42
  assert cache.resume_version(cache.NO_VERSION) == 0
  with pytest.raises(ValueError, match="last_published"):
    cache.resume_version(-5)
