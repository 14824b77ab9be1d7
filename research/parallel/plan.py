"""The redistribution planner: the cheapest sequence of collectives from one layout to another.

Each redistribution operator changes one thing about a layout (MindSpore's
RedistributionOperatorInfer names the first three):

- `Slice(dim, axis)`: split `dim` further by a free mesh axis (minor-most); a local slice, no
  communication.
- `AllGather(dim, axis)`: un-split `dim` by its minor-most axis.
- `AllToAll(axis, src_dim, dst_dim)`: move the minor-most axis of `src_dim` to be the minor-most
  axis of `dst_dim`.
- `ReduceScatter(dim, axis)`: sum the partial values over `axis` and split `dim` by it.
- `AllReduce(axis)`: sum the partial values over `axis`, leaving the tensor replicated on it.
- `Permute(target)`: to any layout with the same block shape whose blocks sit on other devices:
  one collective permute (e.g. P('x') -> P('y') where x and y have the same size, or (x,y) ->
  (y,x)).

`plan_redistribution` runs Dijkstra over layouts (states) with these operators (edges), each
costed by an alpha-beta model per mesh axis: `alpha * (n - 1) + beta * bytes received per
device` (ring algorithms; one `alpha` for a permute). Gathering everything then slicing is one
path of the graph, so the plan is never worse under the model. Plans are memoized. An optional
`max_bytes_per_device` caps the peak (input + output buffer) of every step.

`lower_bound_bytes` is exact: per device, the bytes of its target block it does not already hold,
read from `NamedSharding.devices_indices_map`; the bound is the maximum over devices.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import heapq
import itertools
import math
from typing import Any, Mapping, Sequence

import numpy as np

from research.parallel.layout import Layout, LayoutError, all_layouts


class PlanError(ValueError):
  """No plan exists under the given constraints."""


# -- operators -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Slice:
  dim: int
  axis: str
  collective = None

  def apply(self, layout: Layout) -> Layout:
    dims = list(layout.dims)
    dims[self.dim] = dims[self.dim] + (self.axis,)
    return layout.with_dims(dims)

  def axes(self, layout: Layout) -> tuple[str, ...]:
    return (self.axis,)

  def received_bytes(self, before: int, after: int, n: int) -> float:
    return 0.0


@dataclasses.dataclass(frozen=True)
class AllGather:
  dim: int
  axis: str
  collective = "all-gather"

  def apply(self, layout: Layout) -> Layout:
    dims = list(layout.dims)
    if not dims[self.dim] or dims[self.dim][-1] != self.axis:
      raise LayoutError(f"all-gather of {self.axis!r} on dim {self.dim}: not its minor-most "
                        f"axis in {layout}")
    dims[self.dim] = dims[self.dim][:-1]
    return layout.with_dims(dims)

  def axes(self, layout: Layout) -> tuple[str, ...]:
    return (self.axis,)

  def received_bytes(self, before: int, after: int, n: int) -> float:
    return float(after - before)


@dataclasses.dataclass(frozen=True)
class AllToAll:
  axis: str
  src_dim: int
  dst_dim: int
  collective = "all-to-all"

  def apply(self, layout: Layout) -> Layout:
    dims = list(layout.dims)
    if not dims[self.src_dim] or dims[self.src_dim][-1] != self.axis:
      raise LayoutError(f"all-to-all of {self.axis!r} from dim {self.src_dim}: not its "
                        f"minor-most axis in {layout}")
    dims[self.src_dim] = dims[self.src_dim][:-1]
    dims[self.dst_dim] = dims[self.dst_dim] + (self.axis,)
    return layout.with_dims(dims)

  def axes(self, layout: Layout) -> tuple[str, ...]:
    return (self.axis,)

  def received_bytes(self, before: int, after: int, n: int) -> float:
    return before * (n - 1) / n


@dataclasses.dataclass(frozen=True)
class ReduceScatter:
  dim: int
  axis: str
  collective = "reduce-scatter"

  def apply(self, layout: Layout) -> Layout:
    dims = list(layout.dims)
    dims[self.dim] = dims[self.dim] + (self.axis,)
    return layout.with_dims(dims, tuple(a for a in layout.partial if a != self.axis))

  def axes(self, layout: Layout) -> tuple[str, ...]:
    return (self.axis,)

  def received_bytes(self, before: int, after: int, n: int) -> float:
    return before * (n - 1) / n


@dataclasses.dataclass(frozen=True)
class AllReduce:
  axis: str
  collective = "all-reduce"

  def apply(self, layout: Layout) -> Layout:
    return layout.with_dims(layout.dims, tuple(a for a in layout.partial if a != self.axis))

  def axes(self, layout: Layout) -> tuple[str, ...]:
    return (self.axis,)

  def received_bytes(self, before: int, after: int, n: int) -> float:
    return 2 * before * (n - 1) / n


@dataclasses.dataclass(frozen=True)
class Permute:
  target: Layout
  collective = "collective-permute"

  def apply(self, layout: Layout) -> Layout:
    return self.target

  def axes(self, layout: Layout) -> tuple[str, ...]:
    return layout.axis_names

  def received_bytes(self, before: int, after: int, n: int) -> float:
    return float(after)


Operator = Slice | AllGather | AllToAll | ReduceScatter | AllReduce | Permute


def describe(op: Operator) -> str:
  if isinstance(op, Slice):
    return f"slice(dim {op.dim} by {op.axis})"
  if isinstance(op, AllGather):
    return f"all-gather(dim {op.dim} over {op.axis})"
  if isinstance(op, AllToAll):
    return f"all-to-all({op.axis}: dim {op.src_dim} -> dim {op.dst_dim})"
  if isinstance(op, ReduceScatter):
    return f"reduce-scatter(dim {op.dim} over {op.axis})"
  if isinstance(op, AllReduce):
    return f"all-reduce(over {op.axis})"
  return f"collective-permute(-> {op.target})"


# -- cost model ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CostModel:
  """Alpha-beta cost per mesh axis: seconds per message hop and seconds per byte received.

  `alpha` / `beta` are (axis, value) pairs; axes not named use the defaults. The defaults
  (10 us, 10 GB/s) describe a fast interconnect; only ratios matter to the planner.
  """

  alpha: tuple[tuple[str, float], ...] = ()
  beta: tuple[tuple[str, float], ...] = ()
  default_alpha: float = 1e-5
  default_beta: float = 1e-10

  @classmethod
  def per_axis(cls, alpha: Mapping[str, float] | None = None,
               beta: Mapping[str, float] | None = None, **defaults) -> "CostModel":
    return cls(tuple(sorted((alpha or {}).items())), tuple(sorted((beta or {}).items())),
               **defaults)

  def seconds(self, op: Operator, layout: Layout, received: float) -> float:
    if op.collective is None:
      return 0.0
    axes = op.axes(layout)
    alphas, betas = dict(self.alpha), dict(self.beta)
    alpha = max(alphas.get(a, self.default_alpha) for a in axes)
    beta = max(betas.get(a, self.default_beta) for a in axes)
    hops = 1 if isinstance(op, Permute) else layout.axis_sizes[axes[0]] - 1
    return alpha * hops + beta * received


# -- plans -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Step:
  op: Operator
  before: Layout
  after: Layout
  received_bytes: float  # per device
  seconds: float         # alpha-beta prediction
  peak_bytes: int        # input + output buffer per device


@dataclasses.dataclass(frozen=True)
class Plan:
  shape: tuple[int, ...]
  dtype: str
  source: Layout
  target: Layout
  steps: tuple[Step, ...]

  @property
  def predicted_bytes(self) -> float:
    """Bytes each device receives (per step, the busiest device), summed over steps."""
    return float(sum(s.received_bytes for s in self.steps))

  @property
  def predicted_seconds(self) -> float:
    return float(sum(s.seconds for s in self.steps))

  @property
  def peak_bytes(self) -> int:
    return max([s.peak_bytes for s in self.steps] or [local_bytes(self.source, self.shape,
                                                                  self.dtype)])

  def collectives(self) -> collections.Counter:
    """How many of each HLO collective the plan lowers to."""
    return collections.Counter(s.op.collective for s in self.steps if s.op.collective)

  def summary(self) -> str:
    lines = [f"{self.dtype}{list(self.shape)}: {self.source} -> {self.target}"]
    for s in self.steps:
      lines.append(f"  {describe(s.op):42s} -> {str(s.after):28s} "
                   f"{s.received_bytes:12.0f} B  {s.seconds * 1e6:8.1f} us")
    lines.append(f"  total {self.predicted_bytes:.0f} B received per device, "
                 f"{self.predicted_seconds * 1e6:.1f} us predicted")
    return "\n".join(lines)


def local_bytes(layout: Layout, shape: Sequence[int], dtype: Any) -> int:
  return math.prod(layout.shard_shape(shape)) * np.dtype(dtype).itemsize


def neighbours(layout: Layout, shape: tuple[int, ...]) -> list[Operator]:
  """Operators applicable to `layout` whose result divides `shape`."""
  ops: list[Operator] = []
  sizes = layout.axis_sizes
  rank = layout.rank

  def fits(dim: int, axis: str, current: Layout) -> bool:
    return shape[dim] % (current.shards(dim) * sizes[axis]) == 0

  for d, axes in enumerate(layout.dims):
    if not axes:
      continue
    axis = axes[-1]
    ops.append(AllGather(d, axis))
    gathered = AllGather(d, axis).apply(layout)
    for e in range(rank):
      if e != d and fits(e, axis, gathered):
        ops.append(AllToAll(axis, d, e))
  for axis in layout.free_axes:
    for e in range(rank):
      if fits(e, axis, layout):
        ops.append(Slice(e, axis))
  for axis in layout.partial:
    ops.append(AllReduce(axis))
    for e in range(rank):
      if fits(e, axis, layout):
        ops.append(ReduceScatter(e, axis))
  if not layout.partial:
    for other in _same_block_shape(layout.mesh_axes, shape)[layout.shard_shape(shape)]:
      if other != layout:
        ops.append(Permute(other))
  return ops


@functools.lru_cache(maxsize=256)
def _same_block_shape(mesh_axes, shape) -> dict[tuple[int, ...], list[Layout]]:
  """Non-partial layouts of `shape` grouped by local block shape (Permute's reach)."""
  groups: dict[tuple[int, ...], list[Layout]] = collections.defaultdict(list)
  for layout in all_layouts(mesh_axes, shape):
    groups[layout.shard_shape(shape)].append(layout)
  return dict(groups)


@functools.lru_cache(maxsize=65536)
def _plan(shape: tuple[int, ...], dtype: str, source: Layout, target: Layout,
          cost_model: CostModel, max_bytes_per_device: int | None) -> Plan:
  if source.mesh_axes != target.mesh_axes:
    raise LayoutError(f"source mesh {dict(source.mesh_axes)} and target mesh "
                      f"{dict(target.mesh_axes)} differ")
  source.check_shape(shape)
  target.check_shape(shape)
  if not set(target.partial) <= set(source.partial):
    raise PlanError(f"target {target} is partial over axes the source {source} is not: a "
                    "redistribution cannot create partial sums")
  tie = itertools.count()
  # Cost: (seconds, bytes, steps); the tie counter keeps heap entries comparable.
  best = {source: (0.0, 0.0, 0)}
  previous: dict[Layout, Step] = {}
  heap = [(0.0, 0.0, 0, next(tie), source)]
  done = set()
  while heap:
    seconds, received, count, _, layout = heapq.heappop(heap)
    if layout in done:
      continue
    done.add(layout)
    if layout == target:
      break
    before = local_bytes(layout, shape, dtype)
    for op in neighbours(layout, shape):
      after_layout = op.apply(layout)
      if after_layout in done:
        continue
      if not set(target.partial) <= set(after_layout.partial):
        continue
      after = local_bytes(after_layout, shape, dtype)
      peak = before + after
      if max_bytes_per_device is not None and peak > max_bytes_per_device:
        continue
      n = layout.num_devices if isinstance(op, Permute) else layout.axis_sizes[op.axes(layout)[0]]
      moved = op.received_bytes(before, after, n)
      if isinstance(op, Permute) and _permute_pairs_moving(layout, after_layout) == 0:
        moved = 0.0
      step_seconds = cost_model.seconds(op, layout, moved)
      cost = (seconds + step_seconds, received + moved, count + 1)
      if after_layout not in best or cost < best[after_layout]:
        best[after_layout] = cost
        previous[after_layout] = Step(op, layout, after_layout, moved, step_seconds, peak)
        heapq.heappush(heap, (*cost, next(tie), after_layout))
  if target not in done:
    cap = "" if max_bytes_per_device is None else f" under max_bytes_per_device={max_bytes_per_device}"
    raise PlanError(f"no redistribution from {source} to {target} for shape {shape}{cap}")
  steps = []
  layout = target
  while layout != source:
    step = previous[layout]
    steps.append(step)
    layout = step.before
  return Plan(shape, dtype, source, target, tuple(reversed(steps)))


def plan_redistribution(shape: Sequence[int], dtype: Any, source: Layout, target: Layout,
                        cost_model: CostModel = CostModel(),
                        max_bytes_per_device: int | None = None) -> Plan:
  """The cheapest plan under `cost_model` (ties: fewer bytes, then fewer steps)."""
  return _plan(tuple(int(s) for s in shape), np.dtype(dtype).name, source, target, cost_model,
               max_bytes_per_device)


def gather_then_slice_plan(shape: Sequence[int], dtype: Any, source: Layout, target: Layout,
                           cost_model: CostModel = CostModel()) -> Plan:
  """The naive plan: reduce partial sums, gather every dimension, then slice to the target."""
  shape = tuple(int(s) for s in shape)
  dtype = np.dtype(dtype).name
  ops: list[Operator] = [AllReduce(a) for a in source.partial if a not in target.partial]
  layout = source
  for op in ops:
    layout = op.apply(layout)
  for d in range(source.rank):
    for axis in reversed(source.dims[d]):
      ops.append(AllGather(d, axis))
  for d in range(target.rank):
    for axis in target.dims[d]:
      ops.append(Slice(d, axis))
  steps, layout = [], source
  for op in ops:
    after_layout = op.apply(layout)
    before, after = local_bytes(layout, shape, dtype), local_bytes(after_layout, shape, dtype)
    n = layout.axis_sizes[op.axes(layout)[0]]
    moved = op.received_bytes(before, after, n)
    steps.append(Step(op, layout, after_layout, moved, cost_model.seconds(op, layout, moved),
                      before + after))
    layout = after_layout
  return Plan(shape, dtype, source, target, tuple(steps))


# -- permutations ----------------------------------------------------------------------------


def mesh_coordinates(layout: Layout) -> list[dict[str, int]]:
  """Every device's mesh coordinate, in row-major (linear device index) order."""
  names = layout.axis_names
  sizes = [s for _, s in layout.mesh_axes]
  return [dict(zip(names, c)) for c in itertools.product(*(range(s) for s in sizes))]


def permute_pairs(source: Layout, target: Layout) -> list[tuple[int, int]]:
  """(from, to) linear device indices moving each device's target block to it, a bijection."""
  coords = mesh_coordinates(source)
  have = [source.block_of(c) for c in coords]
  need = [target.block_of(c) for c in coords]
  if collections.Counter(have) != collections.Counter(need):
    raise LayoutError(f"{source} -> {target}: not a permutation of equal blocks")
  pairs, senders = [], collections.defaultdict(list)
  for i, block in enumerate(have):
    if block != need[i]:
      senders[block].append(i)
  for i, block in enumerate(need):
    if block == have[i]:
      pairs.append((i, i))
    else:
      pairs.append((senders[block].pop(), i))
  return pairs


@functools.lru_cache(maxsize=65536)
def _permute_pairs_moving(source: Layout, target: Layout) -> int:
  return sum(1 for s, d in permute_pairs(source, target) if s != d)


# -- lower bound -----------------------------------------------------------------------------


def lower_bound_bytes(shape: Sequence[int], dtype: Any, source: Layout, target: Layout,
                      mesh: Any) -> float:
  """Most bytes any device must receive: its target block less what it already holds.

  Read from `NamedSharding.devices_indices_map` of both layouts on `mesh`. A partial-sum source
  holds none of the final values, so then each device must receive its whole target block.
  """
  shape = tuple(int(s) for s in shape)
  itemsize = np.dtype(dtype).itemsize
  target_map = target.sharding(mesh).devices_indices_map(shape)
  if source.partial:
    return float(max(_volume(idx, shape) for idx in target_map.values()) * itemsize)
  source_map = source.sharding(mesh).devices_indices_map(shape)
  worst = 0
  for device, wanted in target_map.items():
    held = source_map[device]
    overlap = 1
    for want, have, size in zip(wanted, held, shape):
      w0, w1, _ = want.indices(size)
      h0, h1, _ = have.indices(size)
      overlap *= max(0, min(w1, h1) - max(w0, h0))
    worst = max(worst, _volume(wanted, shape) - overlap)
  return float(worst * itemsize)


def _volume(index: tuple[slice, ...], shape: tuple[int, ...]) -> int:
  return math.prod(len(range(*s.indices(n))) for s, n in zip(index, shape))
