"""Where checkpoint states live: node-local memory (fast, per node) and orbax on disk (durable).

Local memory: one file per worker in a RAM-backed folder (`/dev/shm` on Linux), memory-mapped by
the worker that writes its snapshots and by a replacement that restores from it. Two slots per
worker, each with a header (step, payload bytes, a valid flag, a sequence number): a snapshot
goes into the slot not holding the newest state, which is marked invalid first and valid last,
so a worker killed in the middle of a copy leaves the previous snapshot as the newest valid one.
The file outlives any worker process; the node agent owns it. A restore is one copy per leaf
into 64-byte-aligned arrays that jax adopts without another copy; a warm spare prepares those
arrays (`restore_buffers`) and the mapping before it is needed.

Persistent: an orbax `CheckpointManager` per worker (async saves; orbax writes each step to a
temporary folder and renames it on commit). A step counts as committed only when our manifest
for it exists: written after orbax finished the step, holding the sha256 of every file in it.
`restorable_steps` checks each step against its manifest and skips, with a log line, a step with
no manifest (an async save that never finished) or with a file that changed (corruption).

A state crosses processes as one flat buffer: `pack` / `unpack` against a template pytree.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from research.common import records

# --- one flat buffer per pytree ---------------------------------------------------------------


def _leaves(tree) -> list[np.ndarray]:
  return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def packed_size(template) -> int:
  return sum(leaf.nbytes for leaf in _leaves(template))


def pack(tree, out: memoryview | None = None) -> bytes | None:
  """The leaves' bytes back to back (C order); into `out` when given."""
  leaves = _leaves(tree)
  if out is None:
    return b"".join(np.ascontiguousarray(leaf).tobytes() for leaf in leaves)
  offset = 0
  for leaf in leaves:
    view = np.frombuffer(out, dtype=np.uint8, count=leaf.nbytes, offset=offset)
    view[:] = np.ascontiguousarray(leaf).reshape(-1).view(np.uint8)
    offset += leaf.nbytes
  return None


_ALIGN = 64  # jax on CPU adopts a host buffer without a copy only from this alignment on


def aligned_empty(shape, dtype) -> np.ndarray:
  """An uninitialized array whose data starts on a 64-byte boundary.

  `jax.device_put` on CPU wraps such an array in place (zero copy); numpy's own allocations
  are only 16-byte aligned, and device_put copies those (a second copy of the whole state).
  """
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  raw = np.empty(nbytes + _ALIGN, np.uint8)
  start = (-raw.ctypes.data) % _ALIGN
  return raw[start:start + nbytes].view(dtype).reshape(shape)


def restore_buffers(template) -> Any:
  """64-byte-aligned arrays shaped like `template`'s leaves, every page already touched.

  What a warm spare worker holds ready: a restore into them is one copy per leaf, with no page
  faults and no zeroing by the kernel on the way (the cost of fresh memory, which is most of a
  restore into new arrays).
  """
  def one(leaf):
    leaf = np.asarray(leaf)
    buffer = aligned_empty(leaf.shape, leaf.dtype)
    buffer.fill(0)
    return buffer
  return jax.tree.map(one, template)


def unpack(template, buffer, copy: bool = True, out=None) -> Any:
  """The pytree of `template`'s structure, shapes and dtypes, read from `buffer`.

  With copy=True every leaf is a new 64-byte-aligned array (see `aligned_empty`), or the
  matching leaf of `out` (from `restore_buffers`) when given; with copy=False the leaves are
  views of `buffer` (for a buffer nobody else writes).
  """
  leaves, treedef = jax.tree.flatten(template)
  targets = [None] * len(leaves)
  if out is not None:
    targets = jax.tree.leaves(out)
    if [(t.shape, t.dtype) for t in targets] != [(np.shape(l), np.asarray(l).dtype)
                                                  for l in leaves]:
      raise ValueError("out: expected restore_buffers(template) (the same leaves, shapes and "
                       "dtypes as the template)")
  restored, offset = [], 0
  for leaf, target in zip(leaves, targets):
    leaf = np.asarray(leaf)
    size = leaf.nbytes
    if offset + size > len(buffer):
      raise ValueError(f"buffer of {len(buffer)} bytes is too short for the state "
                       f"({packed_size(template)} bytes)")
    view = np.frombuffer(buffer, dtype=leaf.dtype, count=leaf.size, offset=offset)
    view = view.reshape(leaf.shape)
    if copy:
      view, source = (aligned_empty(leaf.shape, leaf.dtype) if target is None else target), view
      np.copyto(view, source)
    restored.append(view)
    offset += size
  if offset != len(buffer):
    raise ValueError(f"buffer has {len(buffer)} bytes, the state {offset}")
  return jax.tree.unflatten(treedef, restored)


# --- node-local memory ------------------------------------------------------------------------

_HEADER = struct.Struct("<qqqq")  # step, nbytes, valid, sequence
_HEADER_BYTES = 64


class LocalSlots:
  """Two snapshot slots of one worker in a memory-mapped RAM file."""

  def __init__(self, path: str | os.PathLike, state_bytes: int, create: bool = False,
               populate: bool = False):
    """Maps the file, creating it (empty) when `create`.

    `populate` maps every page up front (MAP_POPULATE: one call instead of a page fault per
    4 KB at the first read); a warm spare does this before it is needed.
    """
    self.path, self.state_bytes = Path(path), int(state_bytes)
    self.slot_bytes = _HEADER_BYTES + self.state_bytes
    size = 2 * self.slot_bytes
    if create:  # always a new file: a process still mapping an old one never sees this one
      self.path.unlink(missing_ok=True)
      with open(self.path, "wb") as f:
        f.truncate(size)
    elif not self.path.is_file() or self.path.stat().st_size != size:
      raise FileNotFoundError(f"no local-memory file of {size} bytes at {str(self.path)!r}")
    self._file = open(self.path, "r+b")
    flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
    self._map = mmap.mmap(self._file.fileno(), size, flags=flags)

  def _header(self, slot: int) -> tuple[int, int, int, int]:
    return _HEADER.unpack_from(self._map, slot * self.slot_bytes)

  def _payload(self, slot: int) -> memoryview:
    start = slot * self.slot_bytes + _HEADER_BYTES
    return memoryview(self._map)[start:start + self.state_bytes]

  def newest(self) -> tuple[int, int] | None:
    """(slot, step) of the newest valid snapshot, or None."""
    best = None
    for slot in (0, 1):
      step, nbytes, valid, sequence = self._header(slot)
      if valid == 1 and nbytes == self.state_bytes and (best is None or sequence > best[2]):
        best = (slot, step, sequence)
    return None if best is None else best[:2]

  def write(self, step: int, tree) -> None:
    """Snapshot: copy into the older slot, then mark it valid (the newer one stays intact)."""
    newest = self.newest()
    slot = 0 if newest is None else 1 - newest[0]
    sequence = 0 if newest is None else self._header(newest[0])[3] + 1
    _HEADER.pack_into(self._map, slot * self.slot_bytes, -1, 0, 0, 0)  # invalid while copying
    pack(tree, self._payload(slot))
    _HEADER.pack_into(self._map, slot * self.slot_bytes, step, self.state_bytes, 1, sequence)

  def read(self, template, out=None) -> tuple[int, Any] | None:
    """(step, state) of the newest valid snapshot, or None; the state's leaves are jax arrays.

    One copy per leaf from the shared mapping into a private 64-byte-aligned array (new, or
    `out` from `restore_buffers`: then the arrays belong to the returned state), which
    `jax.device_put` then adopts without a second copy. The copy is what makes the state
    private: a later snapshot into this slot cannot change a restored state.
    """
    newest = self.newest()
    if newest is None:
      return None
    slot, step = newest
    state = unpack(template, self._payload(slot), copy=True, out=out)
    if self._header(slot)[:3] != (step, self.state_bytes, 1):
      return self.read(template, out)  # overwritten while we read (cannot happen with one writer)
    return step, jax.device_put(state)

  def close(self) -> None:
    self._map.close()
    self._file.close()


def local_memory_root() -> Path:
  """A RAM-backed folder: /dev/shm where it exists, else the temp folder."""
  shm = Path("/dev/shm")
  if shm.is_dir() and os.access(shm, os.W_OK):
    return shm
  import tempfile  # pylint: disable=import-outside-toplevel
  return Path(tempfile.gettempdir())


# --- persistent (orbax) -----------------------------------------------------------------------


def _as_items(tree) -> dict[str, np.ndarray]:
  """The state as orbax saves it: leaves by position, so any pytree type restores exactly."""
  return {f"leaf_{i:05d}": leaf for i, leaf in enumerate(_leaves(tree))}

MANIFESTS = "manifests"


def _file_hashes(step_dir: Path) -> dict[str, str]:
  return {str(path.relative_to(step_dir)): records.sha256_file(path)
          for path in sorted(p for p in step_dir.rglob("*") if p.is_file())}


class PersistentStore:
  """Async orbax checkpoints of one worker's state plus our commit manifests."""

  def __init__(self, directory: str | os.PathLike, log: Callable[[str], None] = print,
               max_to_keep: int = 3):
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    self.directory = Path(directory).absolute()
    self.directory.mkdir(parents=True, exist_ok=True)
    (self.directory / MANIFESTS).mkdir(exist_ok=True)
    self.log = log
    self._ocp = ocp
    self._manager = ocp.CheckpointManager(
        self.directory / "steps",
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             enable_async_checkpointing=True,
                                             cleanup_tmp_directories=True))
    self._pending: list[int] = []

  def save(self, step: int, state) -> None:
    """Starts an async save of `state` at `step`; commits finished earlier saves first."""
    self.commit_finished(wait=True)
    self._manager.save(step, args=self._ocp.args.StandardSave(_as_items(state)))
    self._pending.append(step)

  def commit_finished(self, wait: bool = False) -> list[int]:
    """Writes manifests for saves orbax has finished; returns the steps committed now."""
    if not self._pending:
      return []
    if wait:
      self._manager.wait_until_finished()
    elif self._manager.is_saving_in_progress():
      return []
    committed = []
    for step in self._pending:
      step_dir = self.directory / "steps" / str(step)
      if not step_dir.is_dir():
        continue
      records.atomic_write_json(self.directory / MANIFESTS / f"{step}.json",
                                {"step": step, "files": _file_hashes(step_dir)})
      committed.append(step)
    self._pending = []
    self._drop_stale_manifests()
    return committed

  def _drop_stale_manifests(self) -> None:
    kept = {int(p.name) for p in (self.directory / "steps").iterdir() if p.name.isdigit()}
    for manifest in (self.directory / MANIFESTS).glob("*.json"):
      if int(manifest.stem) not in kept:
        manifest.unlink(missing_ok=True)

  def restorable_steps(self) -> list[int]:
    """Committed steps whose files match their manifest, newest first; logs every skip."""
    steps_dir = self.directory / "steps"
    found = sorted((int(p.name) for p in steps_dir.iterdir() if p.is_dir() and p.name.isdigit()),
                   reverse=True) if steps_dir.is_dir() else []
    good = []
    for step in found:
      manifest = self.directory / MANIFESTS / f"{step}.json"
      if not manifest.is_file():
        self.log(f"skip persisted step {step} of {self.directory.name}: no commit manifest "
                 "(the async save did not finish)")
        continue
      expected = json.loads(manifest.read_text())["files"]
      actual = _file_hashes(steps_dir / str(step))
      if actual != expected:
        changed = sorted(k for k in set(expected) | set(actual)
                         if expected.get(k) != actual.get(k))
        self.log(f"skip persisted step {step} of {self.directory.name}: files {changed} do not "
                 "match the commit manifest (corrupted)")
        continue
      good.append(step)
    return good

  def restore(self, step: int, template) -> Any:
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in _as_items(template).items()}
    items = self._manager.restore(step, args=self._ocp.args.StandardRestore(abstract))
    return jax.tree.unflatten(jax.tree.structure(template),
                              [np.asarray(items[k]) for k in sorted(items)])

  def close(self) -> None:
    self.commit_finished(wait=True)
    self._manager.close()
