"""The in-process services: the interface every backend implements, on the pure cache and table."""

import numpy as np
import pytest

from research.rl_cache import backends
from research.rl_cache import cache
from research.rl_cache import replay


def params_of(value: float):
  return {"w": np.full((3, 2), value, np.float32), "b": np.full((2,), value, np.float32)}


@pytest.fixture
def service():
  topology = cache.Topology(depth=3, fanout=2, num_actors=8)
  return backends.InProcessParameterService(topology, cache.ParamSpec.from_params(params_of(0)))


def test_every_actor_reads_the_latest_version_and_learner_egress_is_one_blob(service):
  assert service.read(0) == (cache.NO_VERSION, None)
  for version in range(3):
    service.publish(params_of(version), version)
  for actor in range(8):
    version, params = service.read(actor)
    assert version == 2
    np.testing.assert_array_equal(params["w"], params_of(2)["w"])
  blob = service.spec.nbytes
  assert service.egress_bytes()[cache.LEARNER] == 3 * blob
  # the root forwards to its 2 children, each of them to 2 leaves: never more than fanout blobs
  assert max(v for k, v in service.egress_bytes().items() if k != cache.LEARNER) == 3 * 2 * blob


def test_an_older_version_never_replaces_a_newer_one(service):
  service.publish(params_of(5), 5)
  service.publish(params_of(4), 4)
  version, params = service.read(3)
  assert version == 5 and params["b"][0] == 5


def test_actors_of_a_dead_leaf_reattach_and_read_on(service):
  service.publish(params_of(1), 1)
  leaf = service.topology.leaf_of(0)
  service.fail_node(leaf)
  service.publish(params_of(2), 2)
  version, _ = service.read(0)
  assert version == 2 and service.topology.leaf_of(0) != leaf


def test_a_blob_of_another_structure_is_refused_and_nothing_changes(service):
  service.publish(params_of(1), 1)
  with pytest.raises(ValueError):
    service.publish({"w": np.zeros((3, 2), np.float64), "b": np.zeros(2, np.float32)}, 2)
  assert service.read(0)[0] == 1


# -- the same counting and failures as the Ray service (tests/rl_cache/test_ray_backend.py) --


def test_an_older_version_moves_no_bytes(service):
  service.publish(params_of(3), 3)
  egress = service.egress_bytes()
  assert egress[cache.LEARNER] == service.spec.nbytes
  service.publish(params_of(2), 2)  # the root refuses it: the learner sends nothing
  service.publish(params_of(3), 3)
  assert service.egress_bytes() == egress
  assert {n: node.version for n, node in service.tree.items()} == {n: 3 for n in range(7)}


@pytest.mark.parametrize("num_actors", [1, 16])
def test_each_node_sends_one_blob_per_version_per_child_or_reading_actor(num_actors):
  topology = cache.Topology(depth=2, fanout=2, num_actors=num_actors)
  service = backends.InProcessParameterService(topology,
                                               cache.ParamSpec.from_params(params_of(0)))
  num_versions, blob = 3, service.spec.nbytes
  for version in range(num_versions):
    service.publish(params_of(version), version)
    for actor in range(num_actors):
      assert service.read(actor)[0] == version
      assert service.read(actor)[0] == version  # a second read of the same version moves nothing
  egress = service.egress_bytes()
  assert egress[cache.LEARNER] == num_versions * topology.learner_egress_bytes(blob)
  for n in range(topology.num_nodes):  # a leaf's egress: the blobs its actors read
    assert egress[n] == num_versions * topology.node_egress_bytes(n, blob), (n, egress)


def test_a_dead_node_and_its_subtree_receive_nothing_more(service):
  blob = service.spec.nbytes  # depth 3, fanout 2: root 0, caches 1 and 2, leaves 3 ... 6
  service.publish(params_of(0), 0)
  service.fail_node(1)
  service.publish(params_of(1), 1)
  assert {n: node.version for n, node in service.tree.items()} == {
      0: 1, 1: 0, 2: 1, 3: 0, 4: 0, 5: 1, 6: 1}
  egress = service.egress_bytes()
  assert (egress[0], egress[1], egress[2]) == (3 * blob, 2 * blob, 4 * blob)
  for actor in range(8):  # the actors of leaves 3 and 4 move under node 2, and read version 1
    assert service.read(actor)[0] == 1
  assert sorted(service.topology.leaf_of(a) for a in range(8)) == [5] * 4 + [6] * 4
  service.fail_node(1)  # again: nothing changes
  assert service.dead == {1}


def test_actors_of_dead_leaves_reattach_and_their_new_leaf_counts_their_reads():
  topology = cache.Topology(depth=2, fanout=3, num_actors=6)  # leaves 1, 2, 3: 2 actors each
  service = backends.InProcessParameterService(topology,
                                               cache.ParamSpec.from_params(params_of(0)))
  service.publish(params_of(0), 0)
  assert [service.read(a)[0] for a in range(6)] == [0] * 6
  service.fail_node(1)
  service.fail_node(2)
  for version in (1, 2):
    service.publish(params_of(version), version)
    assert [service.read(a)[0] for a in range(6)] == [version] * 6
  assert [service.topology.leaf_of(a) for a in range(6)] == [3] * 6
  # As the Ray service counts it: leaf 3 sent its 2 actors version 0, then all 6 both versions.
  assert service.egress_bytes()[3] == (2 + 2 * 6) * service.spec.nbytes
  service.fail_node(3)
  with pytest.raises(ValueError, match="no live leaf"):
    service.read(0)


@pytest.mark.parametrize("node_id", [99, 7, -1, "1", 1.0])
def test_failing_a_node_not_of_the_tree_is_refused_naming_it(service, node_id):
  with pytest.raises(ValueError,
                     match=rf"fail_node: got {node_id!r}, expected a node id 0 \.\.\. 6"):
    service.fail_node(node_id)
  assert service.dead == set()


def test_a_dead_root_refuses_publishes(service):
  service.publish(params_of(0), 0)
  service.fail_node(0)
  with pytest.raises(RuntimeError, match=r"the root cache \(node 0\) is dead"):
    service.publish(params_of(1), 1)


def test_replay_service_answers_the_rate_limiter_through_return_values():
  spec = replay.ItemSpec.of(obs=((2,), np.float32))
  config = replay.TableConfig(max_size=10, samples_per_insert=1.0, min_size_to_sample=2,
                              error_buffer=2.0)
  service = backends.InProcessReplayService(config, spec)
  assert service.sample(1, seed=0) is None           # fewer than min_size_to_sample
  inserted = 0
  while inserted < config.max_size and service.insert({"obs": np.full(2, inserted, np.float32)}):
    inserted += 1
  assert inserted == 4  # the limiter stopped the inserts: (4 * 1 - 0) <= 2 * 1 + 2, a fifth not
  assert service.sample(1, seed=0)["obs"].shape == (1, 2)  # ... until the learner samples
  assert service.insert({"obs": np.zeros(2, np.float32)})
  counts = service.accounting()
  assert counts.inserted == inserted + 1 and counts.sampled == 1 and counts.balanced
