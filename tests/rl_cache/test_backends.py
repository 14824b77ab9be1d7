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


def test_replay_service_answers_the_rate_limiter_through_return_values():
  spec = replay.ItemSpec.of(obs=((2,), np.float32))
  config = replay.TableConfig(max_size=10, samples_per_insert=1.0, min_size_to_sample=2,
                              error_buffer=2.0)
  service = backends.InProcessReplayService(config, spec)
  assert service.sample(1, seed=0) is None           # fewer than min_size_to_sample
  inserted = 0
  while service.insert({"obs": np.full(2, inserted, np.float32)}):
    inserted += 1
  assert inserted >= 2                               # the limiter stopped the inserts ...
  assert service.sample(1, seed=0)["obs"].shape == (1, 2)  # ... until the learner samples
  assert service.insert({"obs": np.zeros(2, np.float32)})
  counts = service.accounting()
  assert counts.inserted == inserted + 1 and counts.sampled == 1 and counts.balanced
