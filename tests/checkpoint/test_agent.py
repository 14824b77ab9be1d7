"""Node agents in process (plain objects, no Ray): replicas to the peer, staging, refusals."""

import threading
import time

import numpy as np
import pytest

from research.checkpoint import protocol
from research.checkpoint import store
from research.checkpoint import transport

JOB = "00000000000000aa"
OTHER = "00000000000000bb"


@pytest.fixture
def agents(tmp_path):
  made = {n: transport.NodeAgent(n, JOB, str(tmp_path), str(tmp_path / "spec.json"))
          for n in ("a", "b", "c")}
  yield made
  for agent in made.values():
    agent.shutdown()


def snapshot(agent, process, step, values, job=JOB):
  tree = [np.asarray(values, np.float32)]
  path = agent.memory_file(process)
  slots = store.LocalSlots(path, store.packed_size(tree), create=not path.exists())
  slots.write(step, tree, job)
  slots.close()


def wait_for(condition, seconds=5.0):
  end = time.monotonic() + seconds
  while time.monotonic() < end:
    if condition():
      return True
    time.sleep(0.01)
  return False


def test_each_new_snapshot_reaches_the_peer_and_stages_on_a_new_node(agents):
  a, b, c = agents["a"], agents["b"], agents["c"]
  snapshot(a, 0, 1, [1.0, 2.0])
  snapshot(a, 0, 2, [3.0, 4.0])
  snapshot(a, 1, 2, [9.0, 9.0], job=OTHER)  # another job's file on this node: never reported
  a.set_peer(b)
  replica = protocol.Snapshot(0, 2, "b", protocol.Tier.REPLICA, JOB)
  assert wait_for(lambda: replica in b.inventory()), b.inventory()
  assert protocol.Snapshot(0, 2, "a", protocol.Tier.LOCAL, JOB) in a.inventory()
  # Process 1's file holds only another job's snapshot: neither a's inventory lists it nor b's
  # (a replicates the file's newest snapshot whatever its job).
  assert not any(s.process == 1 for s in a.inventory() + b.inventory())
  snapshot(a, 0, 3, [5.0, 6.0])
  assert wait_for(lambda: {s.step for s in b.inventory() if s.process == 0} == {2, 3})
  snapshot(a, 0, 4, [7.0, 8.0])  # the peer keeps the newest two
  assert wait_for(lambda: {s.step for s in b.inventory() if s.process == 0} == {3, 4})
  # Node a is lost; process 0 moves to c, which stages b's replica into its own memory.
  c.stage(0, 3, b)
  staged = store.LocalSlots(c.memory_file(0), 8)
  assert [s[0] for s in staged.snapshots()] == [3]
  template = [np.zeros(2, np.float32)]
  np.testing.assert_array_equal(staged.read(template, 3, JOB)[0], [5.0, 6.0])


class WrongPeer:
  """A peer that answers with another step, or with another job's snapshot."""

  def __init__(self, step_offset=0, job=JOB):
    self.step_offset, self.job = step_offset, job

  def replica(self, process, step):
    return step + self.step_offset, store.job_number(self.job), bytes(8)


def test_a_peer_answering_the_wrong_step_or_job_is_refused_and_nothing_is_written(agents):
  c = agents["c"]
  with pytest.raises(store.SnapshotMismatch, match="the peer answered step 6 for process 0; "
                                                   "the restore plan says step 5"):
    c.stage(0, 5, WrongPeer(step_offset=1))
  with pytest.raises(store.SnapshotMismatch, match=f"belongs to job {OTHER}"):
    c.stage(0, 5, WrongPeer(job=OTHER))
  assert not c.memory_file(0).exists()
  with pytest.raises(store.SnapshotMismatch, match="node b holds no snapshot of process 0"):
    agents["b"].replica(0, 5)
  c.stage(0, 5, WrongPeer())  # the right answer is staged
  assert [s.step for s in c.inventory()] == [5]


def test_replicas_are_kept_by_arrival_so_a_restart_from_an_older_step_replaces_the_stale_ones(
    agents):
  b = agents["b"]  # two slots per process
  number = store.job_number(JOB)
  for step in (5, 6, 7):  # the failed attempt
    b.store_replica(0, step, number, bytes([step]) * 8)
  for step in (4, 5):  # the job restarted from step 3 (orbax): its new snapshots
    b.store_replica(0, step, number, bytes([100 + step]) * 8)
  assert sorted(s.step for s in b.inventory()) == [4, 5]
  assert b.replica(0, 5) == (5, number, bytes([105]) * 8)  # the new attempt's step 5


class BlockingPeer:
  """A peer whose first `store_replica` waits until released (a slow transfer)."""

  def __init__(self):
    self.entered, self.release = threading.Event(), threading.Event()

  def store_replica(self, process, step, job, payload):
    self.entered.set()
    assert self.release.wait(10)


def test_a_snapshot_in_flight_to_the_old_peer_is_still_sent_to_a_new_one(agents):
  a, b = agents["a"], agents["b"]
  old = BlockingPeer()
  snapshot(a, 0, 1, [1.0, 2.0])
  a.set_peer(old)
  assert old.entered.wait(5)  # step 1 is on its way to the old peer
  a.set_peer(b)               # the peer changes (a restart placed the ring anew)
  old.release.set()
  replica = protocol.Snapshot(0, 1, "b", protocol.Tier.REPLICA, JOB)
  assert wait_for(lambda: replica in b.inventory()), b.inventory()
