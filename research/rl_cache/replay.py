"""A Reverb-style replay table as pure functions over an immutable host-side (numpy) state.

Actors `insert` trajectories (one item: a fixed set of named fields with fixed shapes and
dtypes, an `ItemSpec`), the learner `sample`s batches, and may `update_priorities` of what it
sampled. As in Reverb (Cassirer et al., 2021, "Reverb: A Framework for Experience Replay"):

- Selector: "uniform" (p_i = 1 / size) or "prioritized" (p_i = priority_i**alpha / sum_j
  priority_j**alpha, Schaul et al., 2016; all-zero priorities fall back to uniform). Each
  draw of a batch is independent (with replacement); a batch may not ask for more items than
  the table holds.
- Remover: "fifo": inserting into a full table (`max_size` items) evicts the oldest item.
- Rate limiter: Reverb's `SampleToInsertRatio(samples_per_insert, min_size_to_sample,
  error_buffer)`, or `MinSize(min_size_to_sample)` when `samples_per_insert` is None.
  Sampling waits until the table holds `min_size_to_sample` items; after that the error
  `inserts * samples_per_insert - samples` is kept within
  `min_size_to_sample * samples_per_insert +- error_buffer` (Reverb's `rate_limiter.cc`:
  `CanInsert` / `CanSample`; every item of a batch counts as one sample). Equivalently
  `(inserts - min_size_to_sample) * samples_per_insert - samples` stays within
  `+- error_buffer`, so samples / inserts tends to `samples_per_insert`.
  `can_insert` / `can_sample` say whether the next call keeps that; `insert` and `sample` do
  not enforce it: the backends block or retry while these say no.

No threads, clocks or I/O here; each call copies the O(size) bookkeeping (never the stored
arrays), which suits the table sizes of the experiments, not millions of items.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

SELECTORS = ("uniform", "prioritized")
REMOVERS = ("fifo",)


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


# -- configuration ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TableConfig:
  """A table's selector, remover and rate limiter; validated on construction."""

  max_size: int
  selector: str = "uniform"  # "uniform" | "prioritized"
  priority_exponent: float = 1.0  # alpha of the prioritized selector
  remover: str = "fifo"
  samples_per_insert: float | None = None  # None: a MinSize limiter (no ratio kept)
  min_size_to_sample: int = 1
  error_buffer: float | None = None  # required with samples_per_insert

  def __post_init__(self):
    if not _is_int(self.max_size) or self.max_size < 1:
      raise ValueError(f"TableConfig max_size: got {self.max_size!r}, expected an int >= 1")
    if self.selector not in SELECTORS:
      raise ValueError(f"TableConfig selector: got {self.selector!r}, expected one of {SELECTORS}")
    if (not _is_real(self.priority_exponent) or not math.isfinite(self.priority_exponent)
        or self.priority_exponent < 0):
      raise ValueError(f"TableConfig priority_exponent: got {self.priority_exponent!r}, "
                       "expected a finite number >= 0")
    if self.remover not in REMOVERS:
      raise ValueError(f"TableConfig remover: got {self.remover!r}, expected one of {REMOVERS}")
    if (not _is_int(self.min_size_to_sample)
        or not 1 <= self.min_size_to_sample <= self.max_size):
      raise ValueError(f"TableConfig min_size_to_sample: got {self.min_size_to_sample!r}, "
                       f"expected an int in 1 ... max_size={self.max_size}")
    spi, buffer = self.samples_per_insert, self.error_buffer
    if spi is None:
      if buffer is not None:
        raise ValueError(f"TableConfig error_buffer: got {buffer!r} without samples_per_insert; "
                         "expected None (MinSize limiter) or a samples_per_insert")
      return
    if not _is_real(spi) or not math.isfinite(spi) or spi <= 0:
      raise ValueError(f"TableConfig samples_per_insert: got {spi!r}, expected a finite "
                       "number > 0 (or None for a MinSize limiter)")
    # Reverb: max_diff - min_diff >= 2 * max(1, samples_per_insert), else inserts or samples
    # of one item at a time could both be blocked.
    if not _is_real(buffer) or not math.isfinite(buffer) or buffer < max(1.0, spi):
      raise ValueError(f"TableConfig error_buffer: got {buffer!r}, expected a finite number >= "
                       f"max(1, samples_per_insert) = {max(1.0, spi)}")

  @property
  def min_diff(self) -> float:
    """Sampling is blocked below this value of `inserts * samples_per_insert - samples`."""
    if self.samples_per_insert is None:
      return -math.inf
    return self.samples_per_insert * self.min_size_to_sample - self.error_buffer

  @property
  def max_diff(self) -> float:
    """Inserting is blocked above this value of `inserts * samples_per_insert - samples`."""
    if self.samples_per_insert is None:
      return math.inf
    return self.samples_per_insert * self.min_size_to_sample + self.error_buffer


class FieldSpec(NamedTuple):
  name: str
  shape: tuple[int, ...]
  dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class ItemSpec:
  """The fields of every item, e.g. obs (T, 4) float32, action (T,) int32, reward (T,) float32."""

  fields: tuple[FieldSpec, ...]

  def __post_init__(self):
    fields = tuple(FieldSpec(str(f[0]), tuple(int(d) for d in f[1]), np.dtype(f[2]))
                   for f in self.fields)
    names = [f.name for f in fields]
    if not fields or len(set(names)) != len(names):
      raise ValueError(f"ItemSpec fields: got {names}, expected at least one, names unique")
    object.__setattr__(self, "fields", fields)

  @classmethod
  def of(cls, **fields: tuple[Sequence[int], Any]) -> "ItemSpec":
    """`ItemSpec.of(obs=((T, 4), np.float32), action=((T,), np.int32))`."""
    return cls(tuple(FieldSpec(name, shape, dtype) for name, (shape, dtype) in fields.items()))

  @classmethod
  def from_example(cls, item: Mapping[str, Any]) -> "ItemSpec":
    return cls(tuple(FieldSpec(name, np.shape(x), np.asarray(x).dtype)
                     for name, x in item.items()))

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(f.name for f in self.fields)


# -- state ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Table:
  """Replay state. Items are kept oldest first; every array is read-only."""

  config: TableConfig
  spec: ItemSpec
  keys: np.ndarray  # shape=(size,), dtype=int64; ascending, key k = the k-th insert
  items: tuple[tuple[np.ndarray, ...], ...]  # one tuple per item, in spec field order
  priorities: np.ndarray  # shape=(size,), dtype=float64; >= 0
  times_sampled: np.ndarray  # shape=(size,), dtype=int64
  inserted: int = 0  # inserts ever (also the next key)
  sampled: int = 0  # items sampled ever (a batch of n counts n)
  evicted: int = 0  # items removed ever
  evicted_times_sampled: int = 0  # samples of the items since removed

  @property
  def size(self) -> int:
    return len(self.items)


def _frozen(x: np.ndarray) -> np.ndarray:
  x.setflags(write=False)
  return x


def new_table(config: TableConfig, spec: ItemSpec) -> Table:
  if not isinstance(config, TableConfig) or not isinstance(spec, ItemSpec):
    raise ValueError(f"new_table: got {type(config).__name__}, {type(spec).__name__}; "
                     "expected a TableConfig and an ItemSpec")
  return Table(config=config, spec=spec, keys=_frozen(np.zeros(0, np.int64)), items=(),
               priorities=_frozen(np.zeros(0, np.float64)),
               times_sampled=_frozen(np.zeros(0, np.int64)))


def _check_priorities(priorities: np.ndarray, what: str) -> None:
  if not np.all(np.isfinite(priorities)) or np.any(priorities < 0):
    raise ValueError(f"{what}: got {priorities.tolist()}, expected finite numbers >= 0")


def _checked_item(spec: ItemSpec, item: Any) -> tuple[np.ndarray, ...]:
  if not isinstance(item, Mapping):
    raise ValueError(f"item: got {type(item).__name__}, expected a mapping with fields "
                     f"{list(spec.names)}")
  missing = [n for n in spec.names if n not in item]
  extra = [n for n in item if n not in spec.names]
  if missing or extra:
    raise ValueError(f"item fields: got {list(item)}, expected {list(spec.names)} "
                     f"(missing {missing}, unexpected {extra})")
  out = []
  for name, shape, dtype in spec.fields:
    x = np.asarray(item[name])
    if x.shape != shape or x.dtype != dtype:
      raise ValueError(f"item field {name!r}: got shape {x.shape} dtype {x.dtype}, expected "
                       f"shape {shape} dtype {dtype}")
    out.append(_frozen(np.array(x, copy=True)))
  return tuple(out)


# -- operations -------------------------------------------------------------------------------


def insert(table: Table, item: Mapping[str, Any], priority: float = 1.0) -> Table:
  """The table with `item` added as the newest (key `table.inserted`); a full table first
  evicts its oldest item. Raises ValueError, naming the field, for an item not matching the
  spec (shapes and dtypes must match exactly: no silent casts)."""
  values = _checked_item(table.spec, item)
  if not _is_real(priority):
    raise ValueError(f"priority: got {priority!r}, expected a finite number >= 0")
  _check_priorities(np.array([priority], np.float64), "priority")
  keys, items = table.keys, table.items
  priorities, times_sampled = table.priorities, table.times_sampled
  evicted, evicted_times_sampled = table.evicted, table.evicted_times_sampled
  if table.size == table.config.max_size:  # FIFO remover
    evicted += 1
    evicted_times_sampled += int(times_sampled[0])
    keys, items = keys[1:], items[1:]
    priorities, times_sampled = priorities[1:], times_sampled[1:]
  return dataclasses.replace(
      table,
      keys=_frozen(np.append(keys, np.int64(table.inserted))),
      items=items + (values,),
      priorities=_frozen(np.append(priorities, np.float64(priority))),
      times_sampled=_frozen(np.append(times_sampled, np.int64(0))),
      inserted=table.inserted + 1, evicted=evicted,
      evicted_times_sampled=evicted_times_sampled)


def probabilities(table: Table) -> np.ndarray:
  """The selector's probability of each item (oldest first) for one draw."""
  if table.size == 0:
    return np.zeros(0, np.float64)
  if table.config.selector == "prioritized":
    weights = table.priorities ** table.config.priority_exponent
    total = weights.sum()
    if total > 0:
      return weights / total
  return np.full(table.size, 1.0 / table.size)


def sample(table: Table, n: int, rng: np.random.Generator
           ) -> tuple[Table, dict[str, np.ndarray], np.ndarray, np.ndarray]:
  """Draws `n` items (independently, with replacement) by the table's selector.

  Returns (table with its sample counts advanced, batch: field -> array of shape (n, *shape),
  keys: int64 (n,), probabilities: float64 (n,), each draw's selection probability, for
  importance weights). Raises ValueError, changing nothing, when `n` is not in 1 ... size.
  """
  if not _is_int(n) or n < 1:
    raise ValueError(f"sample n: got {n!r}, expected an int >= 1")
  if n > table.size:
    raise ValueError(f"sample n={n}: the table holds {table.size} items; expected n <= size")
  if not isinstance(rng, np.random.Generator):
    raise ValueError(f"sample rng: got {type(rng).__name__}, expected a numpy Generator "
                     "(np.random.default_rng(seed))")
  probs = probabilities(table)
  index = rng.choice(table.size, size=n, replace=True, p=probs)
  batch = {name: np.stack([table.items[i][f] for i in index])
           for f, name in enumerate(table.spec.names)}
  times_sampled = table.times_sampled.copy()
  np.add.at(times_sampled, index, 1)
  new = dataclasses.replace(table, times_sampled=_frozen(times_sampled),
                            sampled=table.sampled + int(n))
  return new, batch, table.keys[index].copy(), probs[index]


def update_priorities(table: Table, keys: Sequence[int] | np.ndarray,
                      priorities: Sequence[float] | np.ndarray) -> Table:
  """New priorities for the items of `keys` (the last one wins for a repeated key).

  Keys evicted since they were sampled are skipped (as in Reverb: the learner's update may
  arrive after the actors pushed them out); a key never inserted, or a priority that is not
  finite and >= 0, raises ValueError and changes nothing.
  """
  keys = np.asarray(keys)
  priorities = np.asarray(priorities, np.float64)
  if keys.ndim != 1 or priorities.shape != keys.shape or (
      keys.size and not np.issubdtype(keys.dtype, np.integer)):
    raise ValueError(f"update_priorities: got keys of shape {keys.shape} dtype {keys.dtype} and "
                     f"priorities of shape {priorities.shape}; expected two 1-D arrays of one "
                     "length, integer keys")
  _check_priorities(priorities, "update_priorities priorities")
  unknown = keys[(keys < 0) | (keys >= table.inserted)]
  if unknown.size:
    raise ValueError(f"update_priorities keys: {unknown.tolist()} were never inserted "
                     f"(keys so far: 0 ... {table.inserted - 1})")
  index = np.searchsorted(table.keys, keys)
  present = np.zeros(keys.shape, bool)
  if table.size:
    present = (index < table.size) & (table.keys[np.minimum(index, table.size - 1)] == keys)
  new_priorities = table.priorities.copy()
  new_priorities[index[present]] = priorities[present]  # numpy: the last write wins
  return dataclasses.replace(table, priorities=_frozen(new_priorities))


# -- rate limiter -----------------------------------------------------------------------------


def can_insert(table: Table, n: int = 1) -> bool:
  """Whether inserting `n` more items keeps the rate limiter's bound (Reverb `CanInsert`)."""
  if not _is_int(n) or n < 1:
    raise ValueError(f"can_insert n: got {n!r}, expected an int >= 1")
  config = table.config
  # Until the table reaches min_size_to_sample, inserts are free.
  if table.inserted + n - table.evicted <= config.min_size_to_sample:
    return True
  if config.samples_per_insert is None:
    return True
  return (table.inserted + n) * config.samples_per_insert - table.sampled <= config.max_diff


def can_sample(table: Table, n: int = 1) -> bool:
  """Whether `sample(table, n)` succeeds and keeps the rate limiter's bound (Reverb
  `CanSample`, plus this table's n <= size)."""
  if not _is_int(n) or n < 1:
    raise ValueError(f"can_sample n: got {n!r}, expected an int >= 1")
  config = table.config
  if table.size < config.min_size_to_sample or n > table.size:
    return False
  if config.samples_per_insert is None:
    return True
  return table.inserted * config.samples_per_insert - table.sampled - n >= config.min_diff


# -- invariants -------------------------------------------------------------------------------


class Accounting(NamedTuple):
  """Where every inserted item and every sample went."""

  inserted: int
  size: int
  evicted: int
  sampled: int  # items sampled ever
  sampled_in_table: int  # of those, draws of items still held
  sampled_evicted: int  # draws of items since evicted

  @property
  def balanced(self) -> bool:
    """inserted == size + evicted and sampled == sampled_in_table + sampled_evicted."""
    return (self.inserted == self.size + self.evicted
            and self.sampled == self.sampled_in_table + self.sampled_evicted)


def accounting(table: Table) -> Accounting:
  sizes = {len(table.keys), len(table.items), len(table.priorities), len(table.times_sampled)}
  if len(sizes) != 1:
    raise ValueError(f"table: keys, items, priorities and times_sampled have lengths {sizes}")
  return Accounting(inserted=table.inserted, size=table.size, evicted=table.evicted,
                    sampled=table.sampled, sampled_in_table=int(table.times_sampled.sum()),
                    sampled_evicted=table.evicted_times_sampled)
