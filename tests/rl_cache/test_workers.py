"""RL actors outside the learner's process: the actor loop against the service interface, and the
multi-process services (a manager process) refusing bad input with nothing changed."""

import jax
import numpy as np
import pytest

from research.rl_cache import agent
from research.rl_cache import backends
from research.rl_cache import cache
from research.rl_cache import process_backend
from research.rl_cache import replay
from research.rl_cache import workers

CONFIG = agent.AgentConfig(hidden_sizes=(8,), envs_per_actor=2, rollout_length=4)


def _item_spec(config):
  params = agent.init_learner(config, jax.random.key(0)).params
  trajectory = jax.eval_shape(lambda p, s: agent.rollout(config, p, s, 1.0)[1], params,
                              jax.eval_shape(lambda: agent.init_actor(config, jax.random.key(1))))
  return params, replay.ItemSpec.from_example(
      {k: np.zeros(v.shape, v.dtype) for k, v in trajectory._asdict().items()})


def test_an_actor_worker_reads_its_leaf_and_stops_while_the_limiter_holds_its_insert():
  params, spec = _item_spec(CONFIG)
  service = backends.InProcessParameterService(cache.Topology(depth=2, fanout=2, num_actors=2),
                                               cache.ParamSpec.from_params(params))
  table = backends.InProcessReplayService(
      replay.TableConfig(max_size=10, samples_per_insert=1.0, min_size_to_sample=2,
                         error_buffer=2.0), spec)
  polls = []
  worker = workers.ActorWorker(CONFIG, 1, 7, service, table, wait_s=30.0,
                               stop=lambda: polls.append(1) or len(polls) >= 3)
  service.publish(params, 0)
  report = worker.run(2, 1.0)
  assert report.env_steps == 2 * 4 * 2 and report.versions == (0, 0)
  assert not report.stopped and report.insert_retries == 0
  service.publish(jax.tree.map(lambda x: x + 1, params), 1)
  # Inserts 3 and 4 go in ((4 * 1 - 0) <= 2 * 1 + 2); the 5th waits for samples that never come
  # until the stop answers True on its third poll: that item is dropped, nothing else changes.
  report = worker.run(5, 1.0)
  assert report.stopped and report.versions == (1, 1, 1) and report.insert_retries == 3
  assert report.env_steps == 3 * 4 * 2
  counts = table.accounting()
  assert counts.inserted == 4 and counts.sampled == 0 and counts.balanced


def test_process_services_refuse_bad_input_and_change_nothing():
  spec = replay.ItemSpec.of(obs=((2,), np.float32), action=((), np.int32))
  params = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}
  with process_backend.ProcessServices(
      cache.Topology(depth=2, fanout=2, num_actors=4), cache.ParamSpec.from_params(params),
      replay.TableConfig(max_size=4, samples_per_insert=None, min_size_to_sample=1),
      spec) as services:
    services.params.publish(params, 1)
    with pytest.raises(ValueError, match="dtype"):  # raised in the manager, re-raised here
      services.params.publish({"w": np.zeros((3, 2), np.float64), "b": params["b"]}, 2)
    with pytest.raises(ValueError):
      services.params.publish({"w": params["w"]}, 2)
    version, read = services.params.read(3)
    assert version == 1 and read["w"].dtype == np.float32
    assert services.params.egress_bytes()[cache.LEARNER] == services_blob_bytes(params)

    item = {"obs": np.ones(2, np.float32), "action": np.array(1, np.int32)}
    assert services.replay.insert(item)
    with pytest.raises(ValueError, match=r"item field 'obs': got shape \(3,\)"):
      services.replay.insert({"obs": np.ones(3, np.float32), "action": np.array(1, np.int32)})
    with pytest.raises(ValueError, match=r"n=5: the table never holds more than max_size=4"):
      services.replay.sample(5, seed=0)
    assert services.replay.sample(2, seed=0) is None  # more than it holds: wait
    assert services.replay.sample(1, seed=0)["obs"].shape == (1, 2)
    counts = services.replay.accounting()
    assert (counts.inserted, counts.size, counts.sampled) == (1, 1, 1) and counts.balanced
    assert not services.stop_event.is_set()


def services_blob_bytes(params) -> int:
  return cache.ParamSpec.from_params(params).nbytes
