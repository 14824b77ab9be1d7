"""The runtime on Ray's multi-node test cluster: every fault ends on the fault-free bits.

One module-wide cluster (a head for this driver and four 1-CPU worker nodes); each test runs a
job of 2 jax processes on 2 nodes through `experiments/checkpoint.py: run_job`, with the
experiment's fault injector. The default case kills a process with kill -9 and compares with the
same computation in this process on 2 devices (a sum of two floats is the same in any order);
the slow cases compare with the fault-free job of the same config, with 2 devices per process
(4 in all, so the gradient sum's order matters and gloo's fixed ring order is what is tested).
"""

import os

import numpy as np
import pytest

from experiments import checkpoint as experiment
from experiments import run as launcher

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="module")
def cluster():
  import ray
  test_cluster, _ = experiment.start_test_cluster(4)
  yield test_cluster
  ray.shutdown()
  test_cluster.shutdown()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_compilation_cache"))


def worker_nodes(cluster):
  """Live worker nodes, ordered as the cluster added them (never the driver's head)."""
  head = cluster.head_node.node_id
  return experiment.live_nodes([n.node_id for n in cluster.list_all_nodes()
                                if n.node_id != head], cluster)


def ensure_nodes(cluster, count):
  while len(worker_nodes(cluster)) < count:
    cluster.add_node(num_cpus=1)
  cluster.wait_for_nodes()


def config_with(**overrides):
  config, _ = launcher.load("configs/checkpoint/faults.py",
                            ["faults=()"] + [f"{k}={v}" for k, v in overrides.items()])
  return config


def run(cluster, tmp_path, cache, name, config, faults):
  lines = []
  result, injector = experiment.run_job(config, tmp_path, name, cluster, worker_nodes(cluster),
                                        faults, cache, log=lines.append)
  return result, lines


def assert_bit_equal(final, reference):
  assert len(final) == len(reference)
  for shards, expected in zip(final, reference):
    assert len(shards) == len(expected)
    for a, b in zip(shards, expected):
      np.testing.assert_array_equal(a, b, strict=True)


def test_killed_process_restarts_the_job_from_local_memory_bit_exact(cluster, tmp_path, cache):
  # A kill is seen as an exit at once; a long heartbeat timeout keeps a loaded machine (a
  # process silent for 3 s) from fencing a second time and adding restarts the test does not
  # count (seen once while other jobs shared the two cores).
  config = config_with(steps=10, persist_every=0, min_step_seconds=0.05, spare_nodes=0,
                       heartbeat_timeout=30.0)
  step = int(np.random.default_rng(7).integers(3, 8))
  faults = [experiment.Fault("kill_process", step, 1)]
  result, lines = run(cluster, tmp_path, cache, "killed", config, faults)
  # The reference: the same computation in this process on 2 of its CPU devices.
  assert_bit_equal(result.final, [experiment.reference_shards(config)] * 2)
  assert [p.sources for p in result.plans] == [("init", "init"), ("local", "local")]
  failure = result.recoveries[0].failure
  assert failure.kind == "exit" and failure.process == 1 and "code -9" in failure.detail
  # No completed step lost: at least the step every process had completed when the kill was
  # decided, at most the newest step the killed process had recorded once the signal landed
  # (both may have finished more steps while the reports travelled); and the newest step every
  # process held in local memory once the job was stopped.
  fault = faults[0]
  assert fault.step <= result.plans[1].step <= fault.completed, (fault, result.plans)
  assert result.plans[1].step == fault.held_by_all, (fault, result.plans)
  assert result.recoveries[0].recovered_at > faults[0].fired_at
  restored = [e for e in result.events if e["event"] == "restored" and e["attempt"] == 2]
  assert sorted(e["source"] for e in restored) == ["local", "local"]


@pytest.fixture(scope="module")
def fault_free(cluster, tmp_path_factory, cache):
  """The fault-free job of the slow cases' config (4 devices, orbax every 3 steps)."""
  config = config_with(**SLOW)
  result, _ = run(cluster, tmp_path_factory.mktemp("fault_free"), cache, "fault_free", config,
                  [])
  assert [p.sources for p in result.plans] == [("init", "init")]
  return result.final


SLOW = dict(devices=4, steps=16, persist_every=3, min_step_seconds=0.1, spare_nodes=2)


def run_slow(cluster, tmp_path, cache, fault_free, name, faults, nodes):
  """A slow case's job on at least `nodes` worker nodes, its final state the fault-free bits."""
  ensure_nodes(cluster, nodes)
  result, lines = run(cluster, tmp_path, cache, name, config_with(**SLOW), faults)
  assert_bit_equal(result.final, fault_free)
  return result, lines


@pytest.mark.slow
def test_hung_process_is_fenced_and_the_job_restarts_bit_exact(cluster, tmp_path, cache,
                                                               fault_free):
  faults = [experiment.Fault("hang_process", 5, 0)]
  result, lines = run_slow(cluster, tmp_path, cache, fault_free, "hung", faults, 2)
  failure = result.recoveries[0].failure
  assert failure.kind == "hang" and failure.process == 0 and "no heartbeat" in failure.detail
  # Fenced only after the timeout had passed since its last heartbeat, read from its status
  # file once the stop had landed (the same CLOCK_MONOTONIC as the driver's time.monotonic).
  last_beat = faults[0].last_beat_ns / 1e9
  assert last_beat <= faults[0].fired_at, faults[0]
  assert failure.detected_at - last_beat >= config_with(**SLOW).heartbeat_timeout, (failure,
                                                                                   faults[0])
  assert set(result.plans[1].sources) == {"local"}


@pytest.mark.slow
def test_lost_node_restores_from_the_peer_replica_without_orbax(cluster, tmp_path, cache,
                                                                 fault_free):
  faults = [experiment.Fault("kill_node", 7, 1)]
  result, lines = run_slow(cluster, tmp_path, cache, fault_free, "node", faults, 3)
  assert result.recoveries[0].failure.kind == "node"
  plan = result.plans[1]
  assert plan.sources == ("local", "peer")  # process 1 moved to a spare, its replica staged
  # The node was removed once the peer held replicas at or past the step every process had
  # completed when the fault came due; no replicated step is lost.
  assert faults[0].due_step <= faults[0].replicated_step <= plan.step, (faults[0], plan, lines)
  assert result.placements[-1].node_of(1) not in result.placements[0].nodes
  restored = [e for e in result.events if e["event"] == "restored" and e["attempt"] == 2]
  assert sorted(e["source"] for e in restored) == ["local", "peer"]


@pytest.mark.slow
def test_lost_node_and_peer_restore_the_newest_intact_orbax_step(cluster, tmp_path, cache,
                                                                  fault_free):
  faults = [experiment.Fault("kill_node_and_peer", 10, 0)]
  result, lines = run_slow(cluster, tmp_path, cache, fault_free, "both", faults, 4)
  plan = result.plans[1]
  assert plan.sources == ("persistent", "persistent")
  # The newest committed step: the last save, or the one before while the last is in flight.
  assert plan.step % 3 == 0 and faults[0].step - 6 < plan.step <= faults[0].step, (plan, lines)


@pytest.mark.slow
def test_corrupted_newest_orbax_step_is_skipped_for_the_one_before(cluster, tmp_path, cache,
                                                                   fault_free):
  faults = [experiment.Fault("corrupt_checkpoint", 11, 0),
            experiment.Fault("kill_node_and_peer", 11, 0)]
  result, lines = run_slow(cluster, tmp_path, cache, fault_free, "corrupt", faults, 4)
  corrupted = int(faults[0].detail.split(os.sep)[1])  # steps/<step>/...
  skipped = [line for line in lines if line.startswith(f"skip persisted step {corrupted}:")]
  assert skipped and "corrupted" in skipped[0], lines
  plan = result.plans[1]
  assert plan.sources == ("persistent", "persistent")
  assert plan.step == corrupted - SLOW["persist_every"], (plan, lines)  # the step before it
