"""The redistribution planner: the cheapest sequence of collectives from one layout to another.

Each redistribution operator changes one thing about a layout (MindSpore's
RedistributionOperatorInfer names the first three). `axes` is a group of mesh axes, major to
minor; a collective over a group runs once over the product of their sizes:

- `Slice(dim, axes)`: split `dim` further by free mesh axes (appended minor-most); a local
  slice, no communication.
- `AllGather(dim, axes)`: un-split `dim` by its minor-most axes.
- `AllToAll(axes, src_dim, dst_dim)`: move the minor-most axes of `src_dim` to be the minor-most
  axes of `dst_dim`.
- `ReduceScatter(dim, axes)`: sum the partial values over `axes` and split `dim` by them.
- `AllReduce(axes)`: sum the partial values over `axes`, leaving the tensor replicated on them.
- `Permute(target)`: to any layout with the same block shape whose blocks sit on other devices:
  one collective permute (e.g. P('x') -> P('y') where x and y have the same size, or (x,y) ->
  (y,x)).

`plan_redistribution` runs Dijkstra over layouts (states) with these operators (edges), each
costed by `CostModel`: a launch cost per collective plus, per mesh axis, `alpha * (n - 1) +
beta * bytes received per device` (ring algorithms; one hop for a permute). The search runs on
the refined mesh, where a mesh axis of size 4 is two sub-axes of size 2 (as MindSpore expands
device matrices), so a plan may gather over half of an axis after a permute (XLA does the
same). Gathering everything then slicing is one path of the graph, so the plan is never worse
under the model. Plans are memoized. An optional `max_bytes_per_device` caps the peak (input +
output buffer) of every step.

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
from research.parallel.layout import refine as refine_layout


class PlanError(ValueError):
  """No plan exists under the given constraints."""


# -- operators -------------------------------------------------------------------------------


def _group(layout: Layout, axes: tuple[str, ...]) -> int:
  sizes = layout.axis_sizes
  return math.prod(sizes[a] for a in axes)


def _drop_suffix(axes: tuple[str, ...], suffix: tuple[str, ...], what: str,
                 layout: Layout) -> tuple[str, ...]:
  if not suffix or axes[len(axes) - len(suffix):] != suffix:
    raise LayoutError(f"{what}: {suffix} are not the minor-most axes {axes} in {layout}")
  return axes[:len(axes) - len(suffix)]


@dataclasses.dataclass(frozen=True)
class Slice:
  dim: int
  axes: tuple[str, ...]
  collective = None

  def apply(self, layout: Layout) -> Layout:
    dims = list(layout.dims)
    dims[self.dim] = dims[self.dim] + self.axes
    return layout.with_dims(dims)

  def received_bytes(self, before: int, after: int, n: int) -> float:
    return 0.0


@dataclasses.dataclass(frozen=True)
class AllGather:
  dim: int
  axes: tuple[str, ...]
  collective = "all-gather"

  def apply(self, layout: Layout) -> Layout:
    dims = list(layout.dims)
    dims[self.dim] = _drop_suffix(dims[self.dim], self.axes, "all-gather", layout)
    return layout.with_dims(dims)

  def received_bytes(self, before: int, after: int, n: int) -> float:
    return float(after - before)


@dataclasses.dataclass(frozen=True)
class AllToAll:
  axes: tuple[str, ...]
  src_dim: int
  dst_dim: int
  collective = "all-to-all"

  def apply(self, layout: Layout) -> Layout:
    dims = list(layout.dims)
    dims[self.src_dim] = _drop_suffix(dims[self.src_dim], self.axes, "all-to-all", layout)
    dims[self.dst_dim] = dims[self.dst_dim] + self.axes
    return layout.with_dims(dims)

  def received_bytes(self, before: int, after: int, n: int) -> float:
    return before * (n - 1) / n


@dataclasses.dataclass(frozen=True)
class ReduceScatter:
  dim: int
  axes: tuple[str, ...]
  collective = "reduce-scatter"

  def apply(self, layout: Layout) -> Layout:
    dims = list(layout.dims)
    dims[self.dim] = dims[self.dim] + self.axes
    return layout.with_dims(dims, tuple(a for a in layout.partial if a not in self.axes))

  def received_bytes(self, before: int, after: int, n: int) -> float:
    return before * (n - 1) / n


@dataclasses.dataclass(frozen=True)
class AllReduce:
  axes: tuple[str, ...]
  collective = "all-reduce"

  def apply(self, layout: Layout) -> Layout:
    return layout.with_dims(layout.dims, tuple(a for a in layout.partial if a not in self.axes))

  def received_bytes(self, before: int, after: int, n: int) -> float:
    return 2 * before * (n - 1) / n


@dataclasses.dataclass(frozen=True)
class Permute:
  target: Layout
  collective = "collective-permute"

  @property
  def axes(self) -> tuple[str, ...]:
    return self.target.axis_names

  def apply(self, layout: Layout) -> Layout:
    return self.target

  def received_bytes(self, before: int, after: int, n: int) -> float:
    return float(after)


Operator = Slice | AllGather | AllToAll | ReduceScatter | AllReduce | Permute


def describe(op: Operator) -> str:
  axes = "" if isinstance(op, Permute) else (op.axes[0] if len(op.axes) == 1 else
                                             "(" + ",".join(op.axes) + ")")
  if isinstance(op, Slice):
    return f"slice(dim {op.dim} by {axes})"
  if isinstance(op, AllGather):
    return f"all-gather(dim {op.dim} over {axes})"
  if isinstance(op, AllToAll):
    return f"all-to-all({axes}: dim {op.src_dim} -> dim {op.dst_dim})"
  if isinstance(op, ReduceScatter):
    return f"reduce-scatter(dim {op.dim} over {axes})"
  if isinstance(op, AllReduce):
    return f"all-reduce(over {axes})"
  return f"collective-permute(-> {op.target})"


# -- cost model ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CostModel:
  """Alpha-beta cost per mesh axis: a fixed launch cost per collective, seconds per message hop
  (ring: n - 1 hops over a group of n devices) and seconds per byte received.

  `alpha` / `beta` are (axis, value) pairs; axes not named use the defaults. The defaults
  (10 us launch, 1 us per hop, 10 GB/s) describe a fast interconnect; only ratios matter. The
  launch cost makes one collective over a group of axes cheaper than one per sub-axis.
  """

  alpha: tuple[tuple[str, float], ...] = ()
  beta: tuple[tuple[str, float], ...] = ()
  default_alpha: float = 1e-6
  default_beta: float = 1e-10
  launch: float = 1e-5

  @classmethod
  def per_axis(cls, alpha: Mapping[str, float] | None = None,
               beta: Mapping[str, float] | None = None, **defaults) -> "CostModel":
    return cls(tuple(sorted((alpha or {}).items())), tuple(sorted((beta or {}).items())),
               **defaults)

  def seconds(self, op: Operator, layout: Layout, received: float) -> float:
    if op.collective is None:
      return 0.0
    alphas, betas = dict(self.alpha), dict(self.beta)
    # A sub-axis ('y:0') of a refined mesh costs what its mesh axis ('y') costs.
    axes = [a.split(":")[0] for a in op.axes]
    alpha = max(alphas.get(a, self.default_alpha) for a in axes)
    beta = max(betas.get(a, self.default_beta) for a in axes)
    hops = 1 if isinstance(op, Permute) else _group(layout, op.axes) - 1
    return self.launch + alpha * hops + beta * received


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


def _ordered_subsets(axes: Sequence[str]) -> list[tuple[str, ...]]:
  """Every non-empty ordered selection of distinct axes (the orders a slice can append)."""
  return [p for k in range(1, len(axes) + 1) for p in itertools.permutations(axes, k)]


def neighbours(layout: Layout, shape: tuple[int, ...]) -> list[Operator]:
  """Operators applicable to `layout` whose result divides `shape`.

  Collectives act on a minor-most run of axes of one dimension (a group of mesh axes is one
  collective over their product), slices append free axes in any order, partial axes reduce as a
  group or scatter into a dimension, and a permute reaches every layout with the same block shape.
  """
  ops: list[Operator] = []
  rank = layout.rank

  def fits(dim: int, axes: tuple[str, ...], current: Layout) -> bool:
    return shape[dim] % (current.shards(dim) * _group(current, axes)) == 0

  for d, axes in enumerate(layout.dims):
    for k in range(1, len(axes) + 1):
      suffix = axes[len(axes) - k:]
      gathered = AllGather(d, suffix)
      ops.append(gathered)
      for e in range(rank):
        if e != d and fits(e, suffix, gathered.apply(layout)):
          ops.append(AllToAll(suffix, d, e))
  for group in _ordered_subsets(layout.free_axes):
    for e in range(rank):
      if fits(e, group, layout):
        ops.append(Slice(e, group))
  for group in _ordered_subsets(layout.partial):
    if list(group) == sorted(group, key=layout.axis_names.index):  # one order suffices
      ops.append(AllReduce(group))
    for e in range(rank):
      if fits(e, group, layout):
        ops.append(ReduceScatter(e, group))
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


def _step(op: Operator, layout: Layout, after_layout: Layout, shape, dtype,
          cost_model: CostModel) -> Step:
  """`op` taking `layout` to `after_layout` (= op.apply(layout)), costed."""
  before, after = local_bytes(layout, shape, dtype), local_bytes(after_layout, shape, dtype)
  if isinstance(op, Permute):
    moved = op.received_bytes(before, after, 0) if _permute_pairs_moving(layout, after_layout) else 0.0
  else:
    moved = op.received_bytes(before, after, _group(layout, op.axes))
  return Step(op, layout, after_layout, moved, cost_model.seconds(op, layout, moved),
              before + after)


@functools.lru_cache(maxsize=65536)
def _search(shape: tuple[int, ...], dtype: str, source: Layout, target: Layout,
            cost_model: CostModel, max_bytes_per_device: int | None) -> tuple[Step, ...] | None:
  """Dijkstra from source to target; None if the target is unreachable."""
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
    for op in neighbours(layout, shape):
      after_layout = op.apply(layout)
      if after_layout in done or not set(target.partial) <= set(after_layout.partial):
        continue
      step = _step(op, layout, after_layout, shape, dtype, cost_model)
      if max_bytes_per_device is not None and step.peak_bytes > max_bytes_per_device:
        continue
      cost = (seconds + step.seconds, received + step.received_bytes, count + 1)
      if after_layout not in best or cost < best[after_layout]:
        best[after_layout] = cost
        previous[after_layout] = step
        heapq.heappush(heap, (*cost, next(tie), after_layout))
  if target not in done:
    return None
  steps = []
  layout = target
  while layout != source:
    steps.append(previous[layout])
    layout = steps[-1].before
  return tuple(reversed(steps))


def plan_redistribution(shape: Sequence[int], dtype: Any, source: Layout, target: Layout,
                        cost_model: CostModel = CostModel(),
                        max_bytes_per_device: int | None = None, refine: bool = True) -> Plan:
  """The cheapest plan under `cost_model` (ties: fewer bytes, then fewer steps).

  With `refine` (default) the search runs on the refined mesh, where each mesh axis is split
  into prime-size sub-axes ('y' of 4 -> 'y:0', 'y:1'); the steps then name sub-axes, and the
  executor runs them on the same devices arranged as the refined mesh.
  """
  shape = tuple(int(s) for s in shape)
  dtype = np.dtype(dtype).name
  if source.mesh_axes != target.mesh_axes:
    raise LayoutError(f"source mesh {dict(source.mesh_axes)} and target mesh "
                      f"{dict(target.mesh_axes)} differ")
  source.check_shape(shape)
  target.check_shape(shape)
  if not set(target.partial) <= set(source.partial):
    raise PlanError(f"target {target} is partial over axes the source {source} is not: a "
                    "redistribution cannot create partial sums")
  start, goal = (refine_layout(source), refine_layout(target)) if refine else (source, target)
  steps = _search(shape, dtype, start, goal, cost_model, max_bytes_per_device)
  if steps is None:
    cap = ("" if max_bytes_per_device is None else
           f" under max_bytes_per_device={max_bytes_per_device}")
    raise PlanError(f"no redistribution from {source} to {target} for shape {shape}{cap}")
  return Plan(shape, dtype, source, target, steps)


def gather_then_slice_plan(shape: Sequence[int], dtype: Any, source: Layout, target: Layout,
                           cost_model: CostModel = CostModel()) -> Plan:
  """The naive plan: reduce partial sums, gather every dimension, then slice to the target."""
  shape = tuple(int(s) for s in shape)
  dtype = np.dtype(dtype).name
  reduce = tuple(a for a in source.partial if a not in target.partial)
  ops: list[Operator] = [AllReduce(reduce)] if reduce else []
  ops += [AllGather(d, axes) for d, axes in enumerate(source.dims) if axes]
  ops += [Slice(d, axes) for d, axes in enumerate(target.dims) if axes]
  steps, layout = [], source
  for op in ops:
    steps.append(_step(op, layout, op.apply(layout), shape, dtype, cost_model))
    layout = steps[-1].after
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
