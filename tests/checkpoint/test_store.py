"""Local memory keeps the last good snapshot and refuses foreign ones; orbax never restores a
partial or corrupted step; a process's shards rebuild the global state exactly."""

import os
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments import checkpoint as faults
from research.checkpoint import store
from research.checkpoint import worker

JOB = "0123456789abcdef"


@pytest.fixture(scope="module")
def setting():
  problem = worker.make_problem((16,), batch_per_device=4)
  mesh = worker.data_mesh(jax.devices()[:4])
  start = worker.replicate(worker.init_state(problem), mesh)
  trained = worker.run_steps(problem, mesh, worker.replicate(worker.init_state(problem), mesh), 3)
  return problem, mesh, start, trained


def assert_trees_equal(actual, expected):
  """Same tree structure, and every leaf of the same dtype, shape and bits."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e), strict=True)


def test_pack_unpack_is_exact_and_checks_length(setting):
  _, _, start, trained = setting
  shards = store.local_shards(trained)
  packed = store.pack(shards)
  template = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in shards]
  assert len(packed) == store.packed_size(template)
  back = store.unpack(template, packed)
  assert_trees_equal(back, shards)
  assert all(a.ctypes.data % 64 == 0 for a in back)  # what jax adopts without a copy
  with pytest.raises(AssertionError):  # a tree with fewer leaves is not equal
    assert_trees_equal(back[:-1], shards)
  with pytest.raises(ValueError, match="too short"):
    store.unpack(template, packed[:-8])
  with pytest.raises(ValueError, match="buffer has"):
    store.unpack(template, packed + b"x")


def test_the_parallel_copy_packs_and_unpacks_the_same_bits(monkeypatch, tmp_path):
  # The threshold shrunk so that small leaves of odd sizes take the threaded path, with the
  # threads' ranges ending inside leaves; the bits must be those of the one-thread copy.
  rng = np.random.default_rng(0)
  tree = [rng.normal(size=(37, 5)).astype(np.float32), np.arange(11, dtype=np.int64),
          rng.normal(size=(3,)).astype(np.float64), np.zeros((0, 4), np.float32),
          rng.integers(0, 255, size=(1001,)).astype(np.uint8)]
  template = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in tree]
  serial = store.pack(tree)
  monkeypatch.setattr(store, "PARALLEL_COPY_BYTES", 1)
  monkeypatch.setattr(store, "copy_threads", lambda: 3)
  monkeypatch.setattr(store, "_copy_pool", None)
  out = bytearray(len(serial))
  store.pack(tree, memoryview(out))
  assert bytes(out) == serial
  assert_trees_equal(store.unpack(template, bytes(out)), tree)
  slots = store.LocalSlots(tmp_path / "p0.slots", len(serial), create=True)
  slots.write(4, tree, JOB)
  assert_trees_equal(slots.read(template, 4, JOB), tree)
  slots.close()
  assert store._copy_pool is not None  # the threads did the copies  # pylint: disable=protected-access


def test_a_process_snapshots_one_copy_of_replicated_leaves_and_its_slices_of_sharded_ones(
    setting):
  _, mesh, _, trained = setting
  sharded = jax.device_put(np.arange(32.0, dtype=np.float32).reshape(8, 4),
                           NamedSharding(mesh, P(worker.DATA_AXIS)))
  state = {"replicated": trained.params, "sharded": sharded}
  shards = store.local_shards(state)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          state)
  template = store.local_shards_template(abstract)
  assert [(t.shape, t.dtype) for t in template] == [(a.shape, a.dtype) for a in shards]
  assert len(shards) == len(jax.tree.leaves(trained.params)) + 4  # four slices of (2, 4)
  back = store.from_local_shards(abstract, shards)
  assert_trees_equal(back, state)
  assert back["sharded"].sharding == sharded.sharding
  with pytest.raises(ValueError, match="1 shards left over"):
    store.from_local_shards(abstract, shards + [shards[0]])


def test_local_slots_keep_the_previous_snapshot_when_a_copy_is_cut_short(tmp_path, setting):
  _, _, start, trained = setting
  old, new = store.local_shards(start), store.local_shards(trained)
  template = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in new]
  size = store.packed_size(template)
  slots = store.LocalSlots(tmp_path / "p0.slots", size, create=True)
  assert slots.snapshots() == []
  slots.write(1, old, JOB)
  slots.write(2, new, JOB)
  assert [s[0] for s in slots.snapshots()] == [2, 1]
  assert_trees_equal(slots.read(template, 2, JOB), new)
  assert_trees_equal(slots.read(template, 1, JOB), old)
  # A process killed in the middle of its next copy: the slot it writes is marked invalid first.
  torn = store.LocalSlots(tmp_path / "p0.slots", size)
  def killed_mid_copy(tree, out):
    out[: len(out) // 2] = bytes(len(out) // 2)
    raise KeyboardInterrupt  # stands for kill -9 between the header and the end of the copy
  original = store.pack
  store.pack = killed_mid_copy
  try:
    with pytest.raises(KeyboardInterrupt):
      torn.write(3, new, JOB)
  finally:
    store.pack = original
  assert [s[0] for s in slots.snapshots()] == [2]  # the newest complete one survives
  assert_trees_equal(slots.read(template, 2, JOB), new)
  slots.write(4, old, JOB)  # the next snapshot goes into the torn slot and becomes the newest
  assert [s[0] for s in torn.snapshots()] == [4, 2]
  with pytest.raises(FileNotFoundError, match="no local-memory file"):
    store.LocalSlots(tmp_path / "p1.slots", size)
  # More slots keep more history, oldest overwritten first; a node agent opens the file blind.
  three = store.LocalSlots(tmp_path / "p2.slots", size, create=True, slots=3)
  for step in range(1, 6):
    three.write(step, new if step % 2 else old, JOB)
  opened = store.LocalSlots.open(tmp_path / "p2.slots")
  assert opened.slots == 3 and [s[0] for s in opened.snapshots()] == [5, 4, 3]
  assert_trees_equal(opened.read(template, 4, JOB), old)
  with pytest.raises(ValueError, match="slots=1: expected >= 2"):
    store.LocalSlots(tmp_path / "p3.slots", size, create=True, slots=1)


def test_local_memory_refuses_another_jobs_or_steps_snapshot_and_overwrites_nothing(
    tmp_path, setting):
  _, _, _, trained = setting
  shards = store.local_shards(trained)
  template = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in shards]
  size = store.packed_size(template)
  slots = store.LocalSlots(tmp_path / "p0.slots", size, create=True)
  slots.write(3, shards, "fedcba9876543210")  # another job's snapshot at this path
  before = (tmp_path / "p0.slots").read_bytes()
  with pytest.raises(store.SnapshotMismatch, match="belongs to job fedcba9876543210, not to "
                                                   f"this job {JOB}"):
    slots.read(template, 3, JOB)
  with pytest.raises(store.SnapshotMismatch, match=r"no snapshot of step 4 in local memory "
                                                   r"\(it holds steps \[3\]\)"):
    slots.read(template, 4, "fedcba9876543210")
  with pytest.raises(store.SnapshotMismatch, match="a snapshot of another state shape"):
    store.LocalSlots(tmp_path / "p0.slots", size + 4)
  with pytest.raises(store.SnapshotMismatch, match="a replica of 3 bytes"):
    slots.write_bytes(5, b"abc", 1)
  assert (tmp_path / "p0.slots").read_bytes() == before
  with pytest.raises(ValueError, match="job='zz': expected a fingerprint of hex digits"):
    store.job_number("zz")


def test_process_status_carries_heartbeats_between_processes(tmp_path):
  status = store.ProcessStatus(tmp_path / "p0.status", create=True)
  assert status.read() == (0, 0, 0, "starting")
  status.write(4242, 7, "training")
  other = store.ProcessStatus(tmp_path / "p0.status")
  pid, step, beat, phase = other.read()
  assert (pid, step, phase) == (4242, 7, "training") and beat > 0
  status.beat()
  assert other.read()[2] >= beat and other.read()[:2] == (4242, 7)


def test_persistent_store_skips_uncommitted_and_corrupted_steps(tmp_path, setting):
  problem, mesh, start, trained = setting
  abstract = worker.abstract_state(problem, mesh)
  lines = []
  persistent = store.PersistentStore(tmp_path / "job")
  persistent.save(2, start)
  persistent.save(4, trained)
  persistent.close()
  assert store.restorable_steps(tmp_path / "job", lines.append) == [4, 2]
  restored = store.PersistentStore(tmp_path / "job").restore(4, abstract)
  assert_trees_equal(restored, trained)
  assert restored.step.sharding == abstract.step.sharding

  (tmp_path / "job" / store.MANIFESTS / "4.json").unlink()  # an async save never committed
  assert store.restorable_steps(tmp_path / "job", lines.append) == [2]
  assert "skip persisted step 4: no commit manifest" in lines[-1]

  persistent = store.PersistentStore(tmp_path / "job")
  persistent.save(6, trained)
  persistent.close()
  corrupted = faults.corrupt_newest_checkpoint(tmp_path / "job")
  assert f"{os.sep}6{os.sep}" in corrupted
  assert store.restorable_steps(tmp_path / "job", lines.append) == [2]
  assert any(line.startswith("skip persisted step 6: files") and line.endswith("(corrupted)")
             for line in lines[-2:]), lines
  assert_trees_equal(store.PersistentStore(tmp_path / "job").restore(2, abstract), start)
  assert not list(Path(tmp_path / "job" / "steps").glob("*.orbax-checkpoint-tmp*"))
