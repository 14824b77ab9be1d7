"""Local memory keeps the last good snapshot; the disk store never restores a partial step."""

import jax
import numpy as np
import pytest

from research.checkpoint import store
from research.checkpoint import worker as worker_lib


@pytest.fixture(scope="module")
def states():
  problem = worker_lib.make_problem(2)
  return worker_lib.init_state(problem, 0), worker_lib.reference_run(problem, 3)


def assert_trees_equal(actual, expected):
  """Same tree structure, and every leaf of the same dtype, shape and bits."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e), strict=True)


def test_pack_unpack_is_exact_and_checks_length(states):
  template, state = states
  packed = store.pack(state)
  assert len(packed) == store.packed_size(template)
  assert_trees_equal(store.unpack(template, packed), state)
  with pytest.raises(AssertionError):  # a tree with fewer leaves is not equal
    assert_trees_equal(state._replace(rng=None), state)
  with pytest.raises(ValueError, match="too short"):
    store.unpack(template, packed[:-8])
  buffers = store.restore_buffers(template)
  back = store.unpack(template, packed, out=buffers)
  assert_trees_equal(back, state)
  assert all(a is b for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(buffers),
                                    strict=True))
  with pytest.raises(ValueError, match="out: expected restore_buffers"):
    store.unpack(template, packed, out=store.restore_buffers(template.params))


def test_local_slots_keep_the_previous_snapshot_when_a_copy_is_cut_short(tmp_path, states):
  template, state = states
  slots = store.LocalSlots(tmp_path / "w0", store.packed_size(template), create=True)
  assert slots.read(template) is None
  slots.write(1, template)
  slots.write(2, state)
  step, back = slots.read(template)
  assert step == 2
  assert_trees_equal(back, state)
  # A worker killed in the middle of its next copy: the slot it writes is marked invalid first.
  torn = store.LocalSlots(tmp_path / "w0", store.packed_size(template))
  def killed_mid_copy(tree, out):
    out[: len(out) // 2] = bytes(len(out) // 2)
    raise KeyboardInterrupt  # stands for kill -9 between the header and the end of the copy
  original = store.pack
  store.pack = killed_mid_copy
  try:
    with pytest.raises(KeyboardInterrupt):
      torn.write(3, state)
  finally:
    store.pack = original
  step, back = slots.read(template)
  assert step == 2  # the newest complete snapshot, not the torn one
  assert_trees_equal(back, state)
  # Another process (a replacement worker) sees the same memory.
  other = store.LocalSlots(tmp_path / "w0", store.packed_size(template))
  assert other.read(template)[0] == 2
  slots.write(4, template)  # the next snapshot goes into the torn slot and becomes the newest
  assert other.read(template)[0] == 4
  with pytest.raises(FileNotFoundError, match="no local-memory file"):
    store.LocalSlots(tmp_path / "w1", store.packed_size(template))


def test_persistent_store_skips_uncommitted_and_corrupted_steps(tmp_path, states):
  template, state = states
  lines = []
  persistent = store.PersistentStore(tmp_path / "worker_0", log=lines.append)
  persistent.save(2, template)
  persistent.save(4, state)
  persistent.close()
  persistent = store.PersistentStore(tmp_path / "worker_0", log=lines.append)
  assert persistent.restorable_steps() == [4, 2]
  assert_trees_equal(persistent.restore(4, template), state)

  (tmp_path / "worker_0" / store.MANIFESTS / "4.json").unlink()  # an async save never committed
  assert persistent.restorable_steps() == [2]
  assert "skip persisted step 4 of worker_0: no commit manifest" in lines[-1]

  persistent.save(6, state)
  persistent.close()
  persistent = store.PersistentStore(tmp_path / "worker_0", log=lines.append)
  from research.checkpoint import transport
  corrupted = transport.corrupt_newest_checkpoint(tmp_path / "worker_0")
  assert "/6/" in corrupted
  assert persistent.restorable_steps() == [2]
  assert any("skip persisted step 6" in line and "corrupted" in line for line in lines)
  assert_trees_equal(persistent.restore(2, template), template)


def test_local_restore_is_private_and_adopted_by_jax_without_a_copy(tmp_path, states):
  template, state = states
  slots = store.LocalSlots(tmp_path / "w0", store.packed_size(template), create=True)
  slots.write(1, state)
  step, restored = slots.read(template)
  assert step == 1 and all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(restored))
  slots.write(2, template)  # both slots are overwritten after the restore ...
  slots.write(3, template)
  assert_trees_equal(restored, state)  # ... and the restored state does not change with them
  slots.close()
  if jax.default_backend() == "cpu":  # the zero-copy hand-over the restore time depends on
    host = store.aligned_empty((1000, 33), np.float32)
    assert host.ctypes.data % 64 == 0 and host.shape == (1000, 33)
    assert jax.device_put(host).unsafe_buffer_pointer() == host.ctypes.data
