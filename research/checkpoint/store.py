"""Where checkpoint states live: node-local memory (fast, per node) and orbax on disk (durable).

Local memory: one file per jax process in a RAM-backed folder of its node (`/dev/shm` on
Linux), memory-mapped by the process that writes its snapshots. A few slots (two by default),
each with a header (step, payload bytes, a valid flag, a sequence number, the job's
fingerprint): a snapshot goes into the oldest slot, which is marked invalid first and valid
last, so a process killed in the middle of a copy leaves the previous snapshots valid. The file outlives the process; the agent owns it, copies its
snapshots to the peer node's agent (a replica) and stages a replica into a new file when a
process moves to another node. A snapshot holds the process's own shards (`local_shards`).

Persistent: one orbax `CheckpointManager` over the job's global arrays (async saves; orbax writes
each step to a temporary folder and renames it on commit). A step counts as committed only when
our manifest for it exists: written by process 0 after orbax finished the step, holding the
sha256 of every file in it. `restorable_steps` checks each step against its manifest and skips,
with a log line, a step with no manifest (an async save that never finished) or with a file that
changed (corruption).

A state crosses processes as one flat buffer: `pack` / `unpack` against a template pytree.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from research.common import records

# --- one flat buffer per pytree ---------------------------------------------------------------


def _spec(leaf) -> tuple[tuple[int, ...], np.dtype]:
  """(shape, dtype) of an array or a jax.ShapeDtypeStruct."""
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return tuple(leaf.shape), np.dtype(leaf.dtype)
  leaf = np.asarray(leaf)
  return leaf.shape, leaf.dtype


def _nbytes(leaf) -> int:
  shape, dtype = _spec(leaf)
  return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def packed_size(template) -> int:
  return sum(_nbytes(leaf) for leaf in jax.tree.leaves(template))


# A large snapshot is copied by several threads: numpy releases the GIL while it copies, and one
# core's copy does not use the memory bandwidth of several (the snapshot copy rate in the goals
# table of `python -m experiments.bench_checkpoint`). A restore copies into new pages, whose
# first touch is what it waits for, and stays on one thread.
PARALLEL_COPY_BYTES = 32 << 20  # a state at least this large is copied in parallel
_copy_pool = None


def copy_threads() -> int:
  return max(1, min(4, os.cpu_count() or 1))


def copy_all(pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
  """dst[...] = src for each (dst, src) pair of flat uint8 views of equal size; a total of at
  least PARALLEL_COPY_BYTES is split between `copy_threads()` threads."""
  global _copy_pool  # pylint: disable=global-statement
  total = sum(src.size for _, src in pairs)
  if total < PARALLEL_COPY_BYTES or copy_threads() == 1:
    for dst, src in pairs:
      np.copyto(dst, src)
    return
  # One contiguous range of the concatenated bytes per thread (interleaved pieces copy slower).
  threads = copy_threads()
  bounds = [total * t // threads for t in range(threads + 1)]
  ranges: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(threads)]
  start = 0
  for dst, src in pairs:
    end = start + src.size
    for t in range(threads):
      lo, hi = max(start, bounds[t]), min(end, bounds[t + 1])
      if lo < hi:
        ranges[t].append((dst[lo - start:hi - start], src[lo - start:hi - start]))
    start = end
  if _copy_pool is None:
    from concurrent.futures import ThreadPoolExecutor  # pylint: disable=import-outside-toplevel
    _copy_pool = ThreadPoolExecutor(threads, thread_name_prefix="meshwork-copy")
  list(_copy_pool.map(lambda part: [np.copyto(d, s) for d, s in part], ranges))


def _flat_bytes(array: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def pack(tree, out: memoryview | None = None) -> bytes | None:
  """The leaves' bytes back to back (C order); into `out` when given."""
  leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]
  if out is None:
    return b"".join(np.ascontiguousarray(leaf).tobytes() for leaf in leaves)
  pairs, offset = [], 0
  for leaf in leaves:
    pairs.append((np.frombuffer(out, dtype=np.uint8, count=leaf.nbytes, offset=offset),
                  _flat_bytes(leaf)))
    offset += leaf.nbytes
  copy_all(pairs)
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


def unpack(template, buffer, copy: bool = True) -> Any:
  """The pytree of `template`'s structure, shapes and dtypes, read from `buffer`.

  `template`: arrays or jax.ShapeDtypeStructs. With copy=True every leaf is a new 64-byte-
  aligned array (see `aligned_empty`); with copy=False the leaves are views of `buffer` (for a
  buffer nobody else writes).
  """
  leaves, treedef = jax.tree.flatten(template)
  restored, offset = [], 0
  for leaf in leaves:
    shape, dtype = _spec(leaf)
    size = _nbytes(leaf)
    if offset + size > len(buffer):
      raise ValueError(f"buffer of {len(buffer)} bytes is too short for the state "
                       f"({packed_size(template)} bytes)")
    view = np.frombuffer(buffer, dtype=dtype, count=size // dtype.itemsize, offset=offset)
    view = view.reshape(shape)
    if copy:
      view, source = aligned_empty(shape, dtype), view
      np.copyto(view, source)  # one thread: new pages fault in no faster from several
    restored.append(view)
    offset += size
  if offset != len(buffer):
    raise ValueError(f"buffer has {len(buffer)} bytes, the state {offset}")
  return jax.tree.unflatten(treedef, restored)


# --- one process's shards of a global state --------------------------------------------------


def _distinct_local_indices(sharding, shape) -> list[tuple[Any, list]]:
  """(index, devices) for each distinct shard index this process holds, by first device id."""
  groups: dict[str, tuple[Any, list]] = {}
  for device, index in sorted(sharding.addressable_devices_indices_map(shape).items(),
                              key=lambda item: item[0].id):
    groups.setdefault(repr(index), (index, []))[1].append(device)
  return list(groups.values())


def local_shards(state) -> list[np.ndarray]:
  """This process's part of a global state: one host array per distinct shard it holds.

  What a process snapshots: a replicated leaf gives one copy (not one per local device), a
  sharded leaf the process's own slices. `from_local_shards` rebuilds the global arrays.
  """
  out = []
  for leaf in jax.tree.leaves(state):
    by_device = {s.device: s for s in leaf.addressable_shards}
    for _, devices in _distinct_local_indices(leaf.sharding, leaf.shape):
      out.append(np.asarray(by_device[devices[0]].data))
  return out


def local_shards_template(abstract) -> list[jax.ShapeDtypeStruct]:
  """The shapes and dtypes `local_shards` gives for a state like `abstract` (with shardings)."""
  out = []
  for leaf in jax.tree.leaves(abstract):
    shard_shape = leaf.sharding.shard_shape(leaf.shape)
    for _ in _distinct_local_indices(leaf.sharding, leaf.shape):
      out.append(jax.ShapeDtypeStruct(shard_shape, leaf.dtype))
  return out


def from_local_shards(abstract, shards: list[np.ndarray]):
  """Global arrays shaped and sharded as `abstract`, from this process's `local_shards`."""
  leaves, treedef = jax.tree.flatten(abstract)
  shards, arrays = list(shards), []
  for leaf in leaves:
    per_device = []
    for _, devices in _distinct_local_indices(leaf.sharding, leaf.shape):
      data = shards.pop(0)
      per_device += [jax.device_put(data, device) for device in devices]
    arrays.append(jax.make_array_from_single_device_arrays(leaf.shape, leaf.sharding,
                                                           per_device))
  if shards:
    raise ValueError(f"{len(shards)} shards left over: not a snapshot of this state")
  return jax.tree.unflatten(treedef, arrays)


def save_shards(path: str | os.PathLike, shards: list[np.ndarray]) -> Path:
  """A process's shards (`local_shards`) as one .npz, written atomically."""
  return records.atomic_save_npz(path, **{f"arr_{i}": a for i, a in enumerate(shards)})


def load_shards(path: str | os.PathLike) -> list[np.ndarray]:
  """The shards `save_shards` wrote, in order."""
  with np.load(path) as data:
    return [data[f"arr_{i}"] for i in range(len(data.files))]


# --- node-local memory ------------------------------------------------------------------------

_HEADER = struct.Struct("<qqqqQ")  # step, nbytes, valid, sequence, job
_HEADER_BYTES = 64


def job_number(job: str) -> int:
  """A job fingerprint (16 hex digits) as the 64-bit number a slot header keeps."""
  try:
    return int(job, 16) & 0xFFFFFFFFFFFFFFFF
  except (TypeError, ValueError):
    raise ValueError(f"job={job!r}: expected a fingerprint of hex digits") from None


class SnapshotMismatch(ValueError):
  """A snapshot that does not belong here: another job, another step, another size."""


_FILE = struct.Struct("<8sqq")  # magic, slots, state bytes (the file's first 64 bytes)
_MAGIC = b"MWSLOTS1"


class LocalSlots:
  """A process's snapshot slots (two by default) in a memory-mapped RAM file."""

  def __init__(self, path: str | os.PathLike, state_bytes: int, create: bool = False,
               populate: bool = False, slots: int = 2):
    """Maps the file, creating it (empty) when `create`.

    `slots`: how many snapshots the file keeps (the newest `slots`; at least 2, so that a
    snapshot cut short leaves the one before). `populate` maps every page up front
    (MAP_POPULATE: one call instead of a page fault per 4 KB at the first read).
    """
    self.path, self.state_bytes = Path(path), int(state_bytes)
    self.slot_bytes = _HEADER_BYTES + self.state_bytes
    if create:  # always a new file: a process still mapping an old one never sees this one
      if slots < 2:
        raise ValueError(f"slots={slots}: expected >= 2")
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self.path.unlink(missing_ok=True)
      with open(self.path, "wb") as f:
        f.truncate(_HEADER_BYTES + slots * self.slot_bytes)
        f.write(_FILE.pack(_MAGIC, slots, self.state_bytes))
    elif not self.path.is_file():
      raise FileNotFoundError(f"no local-memory file at {str(self.path)!r}")
    magic, slots, found_bytes = self.describe(self.path)
    if magic != _MAGIC:
      raise SnapshotMismatch(f"{str(self.path)!r} is not a local-memory file")
    if found_bytes != self.state_bytes:
      raise SnapshotMismatch(
          f"local-memory file {str(self.path)!r} holds snapshots of {found_bytes} bytes; this "
          f"state has {self.state_bytes}: a snapshot of another state shape")
    self.slots = slots
    size = _HEADER_BYTES + slots * self.slot_bytes
    self._file = open(self.path, "r+b")
    flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
    self._map = mmap.mmap(self._file.fileno(), size, flags=flags)

  @staticmethod
  def describe(path: str | os.PathLike) -> tuple[bytes, int, int]:
    """(magic, slots, state bytes) from a local-memory file's first bytes."""
    with open(path, "rb") as f:
      head = f.read(_FILE.size)
    if len(head) < _FILE.size:
      return b"", 0, 0
    return _FILE.unpack(head)

  @classmethod
  def open(cls, path: str | os.PathLike) -> "LocalSlots":
    """An existing file, its state size read from the file (what a node agent does)."""
    return cls(path, cls.describe(path)[2])

  def _header(self, slot: int) -> tuple[int, int, int, int, int]:
    return _HEADER.unpack_from(self._map, _HEADER_BYTES + slot * self.slot_bytes)

  def _payload(self, slot: int) -> memoryview:
    start = _HEADER_BYTES + slot * self.slot_bytes + _HEADER_BYTES
    return memoryview(self._map)[start:start + self.state_bytes]

  def snapshots(self) -> list[tuple[int, int, int]]:
    """(step, job number, slot) of every valid snapshot, newest first."""
    found = []
    for slot in range(self.slots):
      step, nbytes, valid, sequence, job = self._header(slot)
      if valid == 1 and nbytes == self.state_bytes:
        found.append((sequence, step, job, slot))
    return [(step, job, slot) for _, step, job, slot in sorted(found, reverse=True)]

  def write(self, step: int, tree, job: str) -> None:
    """Snapshot: copy into an invalid or the oldest slot, then mark it valid (the others stay)."""
    headers = [self._header(s) for s in range(self.slots)]
    valid = [(h[3], s) for s, h in enumerate(headers) if h[2] == 1]
    invalid = [s for s, h in enumerate(headers) if h[2] != 1]
    slot = invalid[0] if invalid else min(valid)[1]
    sequence = max(valid)[0] + 1 if valid else 0
    offset = _HEADER_BYTES + slot * self.slot_bytes
    _HEADER.pack_into(self._map, offset, -1, 0, 0, 0, 0)  # invalid while copying
    pack(tree, self._payload(slot))
    _HEADER.pack_into(self._map, offset, step, self.state_bytes, 1, sequence, job_number(job))

  def _slot_of(self, step: int) -> tuple[int, int]:
    """(job number, slot) of the valid snapshot of `step`; refuses a step it does not hold."""
    held = self.snapshots()
    match = [s for s in held if s[0] == step]
    if not match:
      raise SnapshotMismatch(f"{self.path.name}: no snapshot of step {step} in local memory "
                             f"(it holds steps {[s[0] for s in held]})")
    return match[0][1:]

  def _check_unchanged(self, step: int, slot: int) -> None:
    if self._header(slot)[:3] != (step, self.state_bytes, 1):
      raise SnapshotMismatch(f"{self.path.name}: step {step} was overwritten while read")

  def read(self, template, step: int, job: str) -> Any:
    """The snapshot of `step` as host arrays (a private copy), refusing another job's.

    One copy per leaf from the shared mapping into private 64-byte-aligned arrays, which
    `jax.device_put` on CPU adopts without a second copy. The copy is what makes the state
    private: a later snapshot into this slot cannot change a restored state.
    """
    found_job, slot = self._slot_of(step)
    if found_job != job_number(job):
      raise SnapshotMismatch(f"{self.path.name}: the snapshot of step {step} belongs to job "
                             f"{found_job:016x}, not to this job {job}")
    state = unpack(template, self._payload(slot), copy=True)
    self._check_unchanged(step, slot)
    return state

  def read_bytes(self, step: int) -> tuple[int, bytes]:
    """(job number, payload) of the snapshot of `step`: what a peer's replica holds."""
    job, slot = self._slot_of(step)
    payload = bytes(self._payload(slot))
    self._check_unchanged(step, slot)
    return job, payload

  def write_bytes(self, step: int, payload: bytes, job: int) -> None:
    """Stages a replica's payload as the snapshot of `step` (into the older slot)."""
    if len(payload) != self.state_bytes:
      raise SnapshotMismatch(f"{self.path.name}: a replica of {len(payload)} bytes for a state "
                             f"of {self.state_bytes}")
    self.write(step, [np.frombuffer(payload, np.uint8)], f"{job:016x}")

  def close(self) -> None:
    self._map.close()
    self._file.close()


_STATUS = struct.Struct("<qqqq")  # pid, steps completed, heartbeat (CLOCK_MONOTONIC ns), phase
_BEAT = struct.Struct("<q")       # the heartbeat alone, at byte 16


class ProcessStatus:
  """A process's heartbeat and progress in a small shared-memory file its node agent reads.

  The process writes (a background thread for the heartbeat, the step loop for the step); the
  agent reads without any message: a process frozen by SIGSTOP or stuck in a deadlock stops
  its heartbeat, a process blocked in a collective (waiting for a failed peer) does not.
  CLOCK_MONOTONIC is one clock for every process of a machine.
  """
  PHASES = ("starting", "restoring", "training", "done")

  def __init__(self, path: str | os.PathLike, create: bool = False):
    self.path = Path(path)
    if create:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self.path.unlink(missing_ok=True)
      with open(self.path, "wb") as f:
        f.truncate(_STATUS.size)
    self._file = open(self.path, "r+b")
    self._map = mmap.mmap(self._file.fileno(), _STATUS.size)

  def write(self, pid: int, step: int, phase: str) -> None:
    _STATUS.pack_into(self._map, 0, pid, step, time.monotonic_ns(), self.PHASES.index(phase))

  def beat(self) -> None:
    """Only the heartbeat field: the step loop's writes of the other fields are never undone."""
    _BEAT.pack_into(self._map, 16, time.monotonic_ns())

  def read(self) -> tuple[int, int, int, str]:
    """(pid, step, heartbeat ns, phase); heartbeat 0 before the first."""
    pid, step, beat, phase = _STATUS.unpack_from(self._map, 0)
    return pid, step, beat, self.PHASES[phase]

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

MANIFESTS = "manifests"


def _file_hashes(step_dir: Path) -> dict[str, str]:
  return {str(path.relative_to(step_dir)): records.sha256_file(path)
          for path in sorted(p for p in step_dir.rglob("*") if p.is_file())}


def _as_items(tree) -> dict[str, Any]:
  """The state as orbax saves it: leaves by position, so any pytree type restores exactly."""
  return {f"leaf_{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(tree))}


def restorable_steps(directory: str | os.PathLike,
                     log: Callable[[str], None] = print) -> list[int]:
  """Committed steps whose files match their manifest, newest first; logs every skip.

  Reads files only (no jax, no orbax): the job driver decides the restore step with it.
  """
  directory = Path(directory)
  steps_dir = directory / "steps"
  found = sorted((int(p.name) for p in steps_dir.iterdir() if p.is_dir() and p.name.isdigit()),
                 reverse=True) if steps_dir.is_dir() else []
  good = []
  for step in found:
    manifest = directory / MANIFESTS / f"{step}.json"
    if not manifest.is_file():
      log(f"skip persisted step {step}: no commit manifest (the async save did not finish)")
      continue
    expected = json.loads(manifest.read_text())["files"]
    actual = _file_hashes(steps_dir / str(step))
    if actual != expected:
      changed = sorted(k for k in set(expected) | set(actual)
                       if expected.get(k) != actual.get(k))
      log(f"skip persisted step {step}: files {changed} do not match the commit manifest "
          "(corrupted)")
      continue
    good.append(step)
  return good


class PersistentStore:
  """Async orbax checkpoints of the job's global state plus our commit manifests.

  Every process of the job opens it on the same directory (shared storage on a cluster) and
  saves at the same steps; orbax writes each process's shards and commits a step (renames its
  temporary folder) once all have written. Process 0 then writes our manifest for the step.
  """

  def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3):
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    self.directory = Path(directory).absolute()
    self.primary = jax.process_index() == 0
    if self.primary:
      (self.directory / MANIFESTS).mkdir(parents=True, exist_ok=True)
    self._ocp = ocp
    self._manager = ocp.CheckpointManager(
        self.directory / "steps",
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             enable_async_checkpointing=True,
                                             cleanup_tmp_directories=True))
    self._pending: list[int] = []

  def save(self, step: int, state) -> None:
    """Starts an async save of `state` at `step`; commits finished earlier saves first."""
    self.commit_finished()
    self._manager.save(step, args=self._ocp.args.StandardSave(_as_items(state)))
    self._pending.append(step)

  def commit_finished(self, wait: bool = True) -> list[int]:
    """Process 0 writes manifests for the saves orbax finished; returns the steps committed.

    wait=True waits for orbax's saves first; wait=False (after every step) commits only when no
    save is in progress on this process.
    """
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
      if self.primary:
        records.atomic_write_json(self.directory / MANIFESTS / f"{step}.json",
                                  {"step": step, "files": _file_hashes(step_dir)})
      committed.append(step)
    self._pending = []
    if self.primary:
      self._drop_stale_manifests()
    return committed

  def _drop_stale_manifests(self) -> None:
    kept = {int(p.name) for p in (self.directory / "steps").iterdir() if p.name.isdigit()}
    for manifest in (self.directory / MANIFESTS).glob("*.json"):
      if int(manifest.stem) not in kept:
        manifest.unlink(missing_ok=True)

  def restore(self, step: int, abstract) -> Any:
    """The global state of `step`, shaped and sharded as `abstract` (ShapeDtypeStructs)."""
    items = self._manager.restore(step, args=self._ocp.args.StandardRestore(_as_items(abstract)))
    return jax.tree.unflatten(jax.tree.structure(abstract), [items[k] for k in sorted(items)])

  def close(self) -> None:
    self.commit_finished()
    self._manager.close()
