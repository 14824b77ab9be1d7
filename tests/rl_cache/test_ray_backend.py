"""The cache tree and the replay table as Ray actors: monotone versions under concurrency, the
latest version everywhere, one blob of learner egress per version, reattach after a dead leaf
(killed, or its machine removed from a Ray test cluster), refused blobs and items."""

import os
import threading
import time

# Keep every Ray address on 127.0.0.1 (see ENVIRONMENT.md, Ray); read when ray is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

ray = pytest.importorskip("ray")

from research.rl_cache import cache  # pylint: disable=wrong-import-position
from research.rl_cache import ray_backend  # pylint: disable=wrong-import-position
from research.rl_cache import replay  # pylint: disable=wrong-import-position


def _params(version: int) -> dict:
  """Params whose every entry encodes the version, to check each read's params match its version."""
  return {"dense": {"b": np.full((4,), version, np.float32),
                    "w": np.full((3, 4), version, np.float32)},
          "step": np.array(version, np.int32)}


SPEC = cache.ParamSpec.from_params(_params(0))


def _assert_params_of(version: int, params) -> None:
  np.testing.assert_array_equal(params["dense"]["w"], np.full((3, 4), version, np.float32))
  assert int(params["step"]) == version


@pytest.fixture(scope="module")
def _ray_module():
  yield
  if ray.is_initialized():
    ray.shutdown()


@pytest.fixture
def local_ray(_ray_module):
  """One small local Ray instance for the module (started again if a cluster test replaced it)."""
  if not ray.is_initialized():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
  yield


@pytest.fixture
def make_service(local_ray):
  services = []

  def make(topology, spec=SPEC, **kwargs):
    services.append(ray_backend.RayParameterService(topology, spec, **kwargs))
    return services[-1]

  yield make
  for service in services:
    service.close()


# -- parameter service ------------------------------------------------------------------------


@pytest.mark.slow  # the pure tree test (tests/rl_cache/test_cache.py) covers the fast path
def test_versions_never_go_backwards_under_concurrent_publishes_and_reads(make_service):
  topology = cache.Topology(depth=3, fanout=2, num_actors=6)
  service = make_service(topology)
  assert service.read(0) == (cache.NO_VERSION, None)
  num_versions, readers = 30, 3
  done = threading.Event()
  node_versions = {n: [] for n in range(topology.num_nodes)}
  actor_versions = {a: [] for a in range(topology.num_actors)}
  errors = []

  def read_loop(actors):
    try:
      while not done.is_set():
        for actor in actors:
          version, params = service.read(actor)
          if version != cache.NO_VERSION:
            _assert_params_of(version, params)
          actor_versions[actor].append(version)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  def poll_loop():
    while not done.is_set():
      for n, v in service.versions().items():
        node_versions[n].append(v)

  threads = [threading.Thread(target=read_loop, args=(range(i, topology.num_actors, readers),))
             for i in range(readers)] + [threading.Thread(target=poll_loop)]
  for t in threads:
    t.start()
  # After versions 0, 10 and 20 the learner waits until actor 0's reader has read that version,
  # so that reader sees at least three versions come in whatever the threads' timing; between
  # them, publishes and reads race freely.
  handshakes = (0, 10, 20)
  for version in range(num_versions):
    service.publish(_params(version), version)
    deadline = time.monotonic() + 60.0
    while version in handshakes and not (actor_versions[0] and actor_versions[0][-1] >= version):
      assert not errors and time.monotonic() < deadline, (version, actor_versions[0][-5:], errors)
      time.sleep(0.001)
  assert service.settle() == num_versions - 1
  done.set()
  for t in threads:
    t.join(timeout=60)
  assert not errors, errors
  for n, seen in {**node_versions, **actor_versions}.items():
    assert seen and all(a <= b for a, b in zip(seen, seen[1:])), (n, seen)
  assert service.versions() == {n: num_versions - 1 for n in range(topology.num_nodes)}
  for actor in range(topology.num_actors):
    version, params = service.read(actor)
    assert version == num_versions - 1
    _assert_params_of(version, params)
  # The reads ran between the publishes (actor 0 saw each handshake's version come in) ...
  assert set(handshakes) <= set(actor_versions[0]), sorted(set(actor_versions[0]))
  # ... yet no edge moved a version twice: at most one blob per version per child or actor.
  egress = service.egress_bytes()
  assert egress[cache.LEARNER] == num_versions * SPEC.nbytes
  for n in range(topology.num_nodes):
    assert egress[n] <= num_versions * topology.node_egress_bytes(n, SPEC.nbytes), (n, egress)


@pytest.mark.slow  # the pure tree test (tests/rl_cache/test_cache.py) covers the fast path
def test_actors_below_a_dead_intermediate_cache_move_under_a_live_one(make_service):
  topology = cache.Topology(depth=3, fanout=2, num_actors=8)  # leaves 3 ... 6: 2 actors each
  service = make_service(topology)
  service.publish(_params(0), 0)
  assert [service.read(a)[0] for a in range(8)] == [0] * 8
  # Killed behind the service's back: leaves 3 and 4 live on, but their pulls fail inside.
  ray.kill(service.nodes[1], no_restart=True)
  service.publish(_params(1), 1)
  for actor in range(8):
    version, params = service.read(actor)
    assert version == 1
    _assert_params_of(1, params)
  assert service.dead == {1}
  assert sorted(service.topology.leaf_of(a) for a in range(8)) == [5] * 4 + [6] * 4
  assert service.settle() == 1  # nodes cut off below node 1 do not count


@pytest.mark.parametrize("num_actors", [pytest.param(1, marks=pytest.mark.slow), 16])
def test_learner_egress_is_one_blob_per_version_whatever_the_actor_count(make_service,
                                                                         num_actors):
  topology = cache.Topology(depth=2, fanout=2, num_actors=num_actors)
  service = make_service(topology)
  num_versions, blob = 3, SPEC.nbytes
  for version in range(num_versions):
    service.publish(_params(version), version)
    service.settle()
    for actor in range(num_actors):
      assert service.read(actor)[0] == version
  egress = service.egress_bytes()
  assert egress[cache.LEARNER] == num_versions * topology.learner_egress_bytes(blob)
  assert egress[cache.LEARNER] == num_versions * blob
  assert num_versions * topology.flat_egress_bytes(blob) == num_versions * num_actors * blob
  for n in range(topology.num_nodes):  # each node: one blob per child cache / attached actor
    assert egress[n] == num_versions * topology.node_egress_bytes(n, blob), (n, egress)


@pytest.mark.slow  # default: the same rule in-process (test_backends.py) and pure (test_cache.py)
def test_actors_of_a_dead_leaf_reattach_and_keep_reading_the_latest_version(make_service):
  topology = cache.Topology(depth=2, fanout=3, num_actors=6)  # leaves 1, 2, 3: 2 actors each
  service = make_service(topology)
  service.publish(_params(0), 0)
  assert [service.read(a)[0] for a in range(6)] == [0] * 6
  service.fail_node(1)  # through the service
  ray.kill(service.nodes[2], no_restart=True)  # behind its back: found by a RayActorError
  for version in (1, 2):
    service.publish(_params(version), version)
    for actor in range(6):
      got, params = service.read(actor)
      assert got == version
      _assert_params_of(version, params)
  assert service.dead == {1, 2}
  assert [service.topology.leaf_of(a) for a in range(6)] == [3] * 6
  # The leaf now serving every actor sent each of them both new versions.
  assert service.egress_bytes()[3] == (2 + 2 * 6) * SPEC.nbytes
  service.fail_node(3)
  with pytest.raises(ValueError, match="no live leaf"):
    service.read(0)


BAD_PARAMS = [  # (params not of SPEC, the error naming what is wrong)
    ({"dense": {"b": np.zeros(4, np.float32), "w": np.zeros((4, 3), np.float32)},
      "step": np.array(9, np.int32)},
     r"leaf 1 \['dense'\]\['w'\]: got shape \(4, 3\)"),
    ({"dense": {"b": np.zeros(4, np.float32), "w": np.zeros((3, 4), np.float32)},
      "step": np.array(9, np.int64)},
     r"leaf 2 \['step'\]: got shape \(\) dtype int64, expected shape \(\) dtype int32"),
    ({"dense": {"b": np.zeros(4, np.float32)}, "step": np.array(9, np.int32)},
     r"got 2 leaves, expected 3"),
]


def test_a_reader_waiting_at_its_leaf_gets_the_next_pushed_version(make_service):
  topology = cache.Topology(depth=2, fanout=1, num_actors=1)  # root -> leaf -> actor 0
  service = make_service(topology)
  service.publish(_params(0), 0)
  reader = service.leaf_reader()
  assert reader.read(0)[0] == 0
  # Nothing newer comes: the wait ends at its timeout with the version the actor holds.
  assert reader.read(0, wait_newer_s=0.2)[0] == 0
  got = {}
  waiting = threading.Thread(target=lambda: got.update(read=reader.read(0, wait_newer_s=30.0)))
  waiting.start()
  time.sleep(0.3)
  assert waiting.is_alive()  # still waiting: no version 1 anywhere yet
  service.publish(_params(1), 1)  # reaches the leaf by the pushes alone
  waiting.join(timeout=30)
  version, params = got["read"]
  assert version == 1
  _assert_params_of(1, params)


def test_an_older_version_or_a_blob_not_of_the_spec_is_refused_and_nothing_changes(
    make_service):
  topology = cache.Topology(depth=2, fanout=2, num_actors=2)
  service = make_service(topology)
  service.publish(_params(3), 3)
  service.settle()
  egress = service.egress_bytes()
  assert egress[cache.LEARNER] == SPEC.nbytes
  service.publish(_params(2), 2)  # older: the root does not even fetch it
  assert service.egress_bytes() == egress
  for bad, match in BAD_PARAMS:
    with pytest.raises(ValueError, match=match):  # refused before it leaves the learner
      service.publish(bad, 9)
    # Offered to the root directly (as by a peer that skipped the check): refused there.
    blob = cache.ParamBlob(9, tuple(np.asarray(x) for x in jax.tree_util.tree_leaves(bad)))
    with pytest.raises(ValueError, match=match):
      ray.get(service.nodes[0].publish.remote(cache.LEARNER, 9, [ray.put(blob)]))
  with pytest.raises(ValueError, match="offered version 10 but the blob holds version 3"):
    ray.get(service.nodes[0].publish.remote(
        cache.LEARNER, 10, [ray.put(cache.to_blob(_params(3), 3, SPEC))]))
  assert service.versions() == {0: 3, 1: 3, 2: 3}
  assert service.egress_bytes() == egress
  version, params = service.read(0)
  assert version == 3
  _assert_params_of(3, params)


# -- replay service ---------------------------------------------------------------------------

T = 5
ITEM_SPEC = replay.ItemSpec.of(obs=((T, 4), np.float32), action=((T,), np.int32))


def _item(i: int) -> dict:
  return {"obs": np.full((T, 4), i, np.float32), "action": np.full((T,), i, np.int32)}


@pytest.fixture
def make_replay(local_ray):
  services = []

  def make(**config):
    services.append(ray_backend.RayReplayService(replay.TableConfig(**config), ITEM_SPEC))
    return services[-1]

  yield make
  for service in services:
    service.close()


def test_replay_through_ray_counts_add_up_and_refuses_what_cannot_be(make_replay):
  table = make_replay(max_size=4, min_size_to_sample=2)
  assert table.sample(1, seed=0) is None  # below min_size_to_sample
  for i in range(6):
    assert table.insert(_item(i))
  batch = table.sample(3, seed=0)
  assert batch["obs"].shape == (3, T, 4) and batch["action"].dtype == np.int32
  assert set(batch["action"][:, 0].tolist()) <= {2, 3, 4, 5}  # 0 and 1 were evicted (FIFO)
  counts = table.accounting()
  assert counts == replay.Accounting(inserted=6, size=4, evicted=2, sampled=3,
                                     sampled_in_table=3, sampled_evicted=0)
  assert counts.balanced
  with pytest.raises(ValueError, match=r"n=5: the table never holds more than max_size=4"):
    table.sample(5, seed=0)
  with pytest.raises(ValueError, match="sample n"):
    table.sample(0, seed=0)
  with pytest.raises(ValueError, match=r"item field 'obs': got shape \(4, 4\)"):
    table.insert({"obs": np.zeros((4, 4), np.float32), "action": np.zeros(T, np.int32)})
  with pytest.raises(ValueError, match=r"missing \['action'\]"):
    table.insert({"obs": np.zeros((T, 4), np.float32)})
  assert table.accounting() == counts


def test_replay_through_ray_waits_while_the_rate_limiter_says_so(make_replay):
  table = make_replay(max_size=10, samples_per_insert=1.0, min_size_to_sample=2,
                      error_buffer=2.0)
  assert table.sample(2, seed=0) is None  # too few items
  inserted = 0
  while table.insert(_item(inserted)):
    inserted += 1
  assert inserted == 4  # (4 * 1 - 0) <= 2 * 1 + 2; a fifth would exceed it
  assert table.accounting().inserted == 4
  assert table.sample(3, seed=1) is not None
  assert table.insert(_item(4))  # the samples made room for an insert
  assert table.sample(4, seed=2) is None  # 5 - 3 - 4 < 2 - 2: sampling must wait
  counts = table.accounting()
  assert (counts.inserted, counts.sampled, counts.size) == (5, 3, 5) and counts.balanced


# -- an RL actor as a Ray actor ---------------------------------------------------------------


@pytest.mark.slow  # the worker process imports jax and gymnax and jits a rollout
def test_an_actor_worker_reads_its_leaf_rolls_out_and_waits_for_the_rate_limiter(make_service):
  from research.rl_cache import agent  # pylint: disable=import-outside-toplevel
  config = agent.AgentConfig(hidden_sizes=(8,), envs_per_actor=2, rollout_length=4)
  params = agent.init_learner(config, jax.random.key(0)).params
  trajectory = jax.eval_shape(lambda p, s: agent.rollout(config, p, s, 1.0)[1], params,
                              jax.eval_shape(lambda: agent.init_actor(config, jax.random.key(1))))
  spec = replay.ItemSpec.from_example(
      {k: np.zeros(v.shape, v.dtype) for k, v in trajectory._asdict().items()})
  topology = cache.Topology(depth=2, fanout=2, num_actors=2)
  service = make_service(topology, cache.ParamSpec.from_params(params))
  table = ray_backend.RayReplayService(
      replay.TableConfig(max_size=10, samples_per_insert=1.0, min_size_to_sample=2,
                         error_buffer=2.0), spec)
  try:
    service.publish(params, 0)
    worker = ray_backend.RayActorWorker.remote(config, 1, 7, service.leaf_reader(), table,
                                               wait_s=30.0)
    report = ray.get(worker.run.remote(3, 1.0))
    assert report.env_steps == 3 * 4 * 2 and report.versions == (0, 0, 0)
    assert report.insert_retries == 0 and table.accounting().inserted == 3
    service.publish(jax.tree.map(lambda x: x + 1, params), 1)
    running = worker.run.remote(3, 1.0)  # the 5th insert waits: (5 * 1 - 0) > 2 * 1 + 2
    deadline = time.monotonic() + 20
    while table.accounting().inserted < 4 and time.monotonic() < deadline:
      time.sleep(0.05)
    time.sleep(0.2)
    assert table.accounting().inserted == 4
    assert not ray.wait([running], timeout=0)[0]  # the 5th insert is held by the table
    assert table.sample(3, seed=0) is not None  # the learner's samples let the actor go on
    report = ray.get(running)
    assert report.versions == (1, 1, 1)
    assert table.accounting().inserted == 6 and table.accounting().balanced
    # The worker fetched each version once from its leaf (leaf 2: actor 1's).
    assert service.egress_bytes()[2] == 2 * service.spec.nbytes
    ray.kill(worker)
  finally:
    table.close()


# -- a two-machine Ray cluster ----------------------------------------------------------------


@pytest.mark.slow  # a second Ray instance with two raylets
# jax warns on any fork; the cluster's subprocesses fork and exec at once (no jax state shared).
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
def test_leaf_on_a_removed_machine_its_actors_reattach_on_the_other(_ray_module):
  from ray.cluster_utils import Cluster  # pylint: disable=import-outside-toplevel
  if ray.is_initialized():
    ray.shutdown()
  cluster = Cluster(initialize_head=True,
                    head_node_args={"num_cpus": 1, "resources": {"machine_a": 1}})
  try:
    machine_b = cluster.add_node(num_cpus=1, resources={"machine_b": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    topology = cache.Topology(depth=2, fanout=2, num_actors=4)  # leaf 1: actors 0, 2; leaf 2: 1, 3
    machine = {0: "machine_a", 1: "machine_a", 2: "machine_b"}
    service = ray_backend.RayParameterService(
        topology, SPEC, node_options=lambda n: {"resources": {machine[n]: 0.01}})
    locations = ray.get([node.location.remote() for node in service.nodes])
    assert locations[0] == locations[1] != locations[2] == machine_b.node_id
    service.publish(_params(0), 0)
    assert [service.read(a)[0] for a in range(4)] == [0] * 4
    cluster.remove_node(machine_b)
    service.publish(_params(1), 1)
    for actor in range(4):
      version, params = service.read(actor)
      assert version == 1
      _assert_params_of(1, params)
    assert service.dead == {2}
    assert [service.topology.leaf_of(a) for a in range(4)] == [1] * 4
    service.close()
  finally:
    ray.shutdown()
    cluster.shutdown()
