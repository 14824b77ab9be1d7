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

On large meshes Dijkstra over every layout is too slow (the layouts grow factorially with the
number of sub-axes). `plan_redistribution`'s default ("auto") sets aside what a move leaves
alone, searches the rest exactly by A* (the bound as heuristic) when it is small, and otherwise
runs A* on the unrefined mesh over fewer edges within a budget, from the cheapest of a few quick
plans (`_upper_plan`). `FusedAllToAll` moves several dimension pairs in one collective.
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
class FusedAllToAll:
  """Several all-to-alls in one collective over the product of their groups (as Shardy emits):
  `moves` are (axes, src_dim, dst_dim) with distinct source and destination dimensions, none
  both. Each device receives (n - 1) / n of its block for the whole group of n devices, fewer
  bytes than the moves one after another."""

  moves: tuple[tuple[tuple[str, ...], int, int], ...]
  collective = "all-to-all"

  def __post_init__(self):
    src = [m[1] for m in self.moves]
    dst = [m[2] for m in self.moves]
    if len(self.moves) < 2 or len(set(src)) != len(src) or len(set(dst)) != len(dst) or (
        set(src) & set(dst)):
      raise LayoutError(f"fused all-to-all {self.moves}: expected two or more moves with "
                        "distinct source dims, distinct destination dims, and none both")

  @property
  def axes(self) -> tuple[str, ...]:
    return tuple(a for axes, _, _ in self.moves for a in axes)

  def apply(self, layout: Layout) -> Layout:
    for axes, src, dst in self.moves:
      layout = AllToAll(axes, src, dst).apply(layout)
    return layout

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


Operator = Slice | AllGather | AllToAll | FusedAllToAll | ReduceScatter | AllReduce | Permute


def describe(op: Operator) -> str:
  axes = "" if isinstance(op, Permute) else (op.axes[0] if len(op.axes) == 1 else
                                             "(" + ",".join(op.axes) + ")")
  if isinstance(op, Slice):
    return f"slice(dim {op.dim} by {axes})"
  if isinstance(op, AllGather):
    return f"all-gather(dim {op.dim} over {axes})"
  if isinstance(op, AllToAll):
    return f"all-to-all({axes}: dim {op.src_dim} -> dim {op.dst_dim})"
  if isinstance(op, FusedAllToAll):
    return "all-to-all(" + "; ".join(
        f"{a[0] if len(a) == 1 else '(' + ','.join(a) + ')'}: dim {src} -> dim {dst}"
        for a, src, dst in op.moves) + ")"
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

  `kinds` are (collective kind, launch, alpha, beta) rows, e.g. fitted from measured collectives
  (`fit_cost_model`); a kind named there is costed by its own row instead.
  """

  alpha: tuple[tuple[str, float], ...] = ()
  beta: tuple[tuple[str, float], ...] = ()
  default_alpha: float = 1e-6
  default_beta: float = 1e-10
  launch: float = 1e-5
  kinds: tuple[tuple[str, float, float, float], ...] = ()

  @classmethod
  def load(cls, path) -> "CostModel":
    """The model kept by `python -m experiments.bench_parallel --fit-cost --paper` (a kept
    result whose summary holds `fit`), or a JSON file of that `fit` alone."""
    import json  # pylint: disable=import-outside-toplevel
    with open(path, encoding="utf-8") as f:
      try:
        data = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    fit = data
    if isinstance(fit, dict) and isinstance(fit.get("summary"), dict):
      fit = fit["summary"]
    if isinstance(fit, dict) and "fit" in fit:
      fit = fit["fit"]
    if not isinstance(fit, dict) or "kinds" not in fit:
      found = sorted(fit) if isinstance(fit, dict) else type(fit).__name__
      raise ValueError(f"{path}: expected a kept result whose summary holds 'fit', or that 'fit' "
                       f"alone (a mapping with 'kinds'); found {found}")
    try:
      return cls.from_fit(fit)
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from None

  @classmethod
  def from_fit(cls, fit: Mapping[str, Any]) -> "CostModel":
    kinds = fit.get("kinds")
    if not isinstance(kinds, Mapping) or not kinds:
      raise ValueError("fit: expected 'kinds' with one row per collective kind")
    for kind, p in kinds.items():
      missing = [k for k in ("launch", "alpha", "beta") if not isinstance(p, Mapping) or k not in p]
      if missing:
        raise ValueError(f"fit: kind {kind!r} lacks {missing}; expected launch, alpha, beta")
    rows = tuple((kind, float(p["launch"]), float(p["alpha"]), float(p["beta"]))
                 for kind, p in sorted(kinds.items()))
    # Defaults for kinds the fit lacks: its slowest row (never cheaper than anything fitted).
    return cls(launch=max(r[1] for r in rows), default_alpha=max(r[2] for r in rows),
               default_beta=max(r[3] for r in rows), kinds=rows)

  @classmethod
  def per_axis(cls, alpha: Mapping[str, float] | None = None,
               beta: Mapping[str, float] | None = None, **defaults) -> "CostModel":
    return cls(tuple(sorted((alpha or {}).items())), tuple(sorted((beta or {}).items())),
               **defaults)

  @property
  def min_beta(self) -> float:
    """The smallest seconds per byte of any axis (A*'s heuristic scales the byte bound by it)."""
    return min([self.default_beta] + [b for _, b in self.beta] + [k[3] for k in self.kinds])

  @property
  def min_alpha(self) -> float:
    return min([self.default_alpha] + [a for _, a in self.alpha] + [k[2] for k in self.kinds])

  @property
  def min_launch(self) -> float:
    return min([self.launch] + [k[1] for k in self.kinds])

  def seconds(self, op: Operator, layout: Layout, received: float) -> float:
    if op.collective is None:
      return 0.0
    hops = 1 if isinstance(op, Permute) else _group(layout, op.axes) - 1
    for kind, launch, alpha, beta in self.kinds:
      if kind == op.collective:
        return launch + alpha * hops + beta * received
    alphas, betas = _as_dicts(self.alpha, self.beta)
    # A sub-axis ('y:0') of a refined mesh costs what its mesh axis ('y') costs.
    axes = [a.split(":")[0] for a in op.axes]
    alpha = max(alphas.get(a, self.default_alpha) for a in axes)
    beta = max(betas.get(a, self.default_beta) for a in axes)
    return self.launch + alpha * hops + beta * received


def fit_cost_model(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Per collective kind, launch + alpha * hops + beta * bytes fitted to measured `samples`
  (dicts with kind, hops, bytes received per device, seconds; optionally `scale`, the time the
  error is relative to, else seconds) by non-negative least squares on relative error.
  Returns the `fit` mapping that `CostModel.from_fit` reads: per kind the three parameters, the
  samples used and the median relative error on them."""
  from scipy.optimize import nnls  # pylint: disable=import-outside-toplevel

  kinds: dict[str, Any] = {}
  for kind in sorted({s["kind"] for s in samples}):
    rows = [s for s in samples if s["kind"] == kind]
    if len(rows) < 3:
      raise ValueError(f"samples: kind {kind!r} has {len(rows)} samples, expected at least 3")
    design = np.array([[1.0, r["hops"], r["bytes"]] for r in rows])
    seconds = np.array([r["seconds"] for r in rows])
    weights = 1.0 / np.array([r.get("scale", r["seconds"]) for r in rows])
    scale = np.abs(design).max(axis=0)
    scale[scale == 0] = 1.0
    params, _ = nnls(design / scale * weights[:, None], seconds * weights)
    params = params / scale
    error = np.abs(design @ params - seconds) * weights
    kinds[kind] = {"launch": float(params[0]), "alpha": float(params[1]),
                   "beta": float(params[2]), "samples": len(rows),
                   "median_relative_error": float(np.median(error))}
  return {"kinds": kinds}


@functools.lru_cache(maxsize=64)
def _as_dicts(alpha, beta):
  return dict(alpha), dict(beta)


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
  search: str = ""  # how it was found: "dijkstra", "exact" (A*, every edge) or "fast"

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
  return _local_bytes(layout, tuple(int(s) for s in shape), np.dtype(dtype).itemsize)


@functools.lru_cache(maxsize=1 << 18)
def _local_bytes(layout: Layout, shape: tuple[int, ...], itemsize: int) -> int:
  return math.prod(layout.shard_shape(shape)) * itemsize


@functools.lru_cache(maxsize=1 << 18)
def _block_bytes(layout: Layout, shape: tuple[int, ...], itemsize: int) -> int:
  """`local_bytes` for the planner, whose layouts divide the shape by construction."""
  sizes = layout.axis_sizes
  return math.prod(n // math.prod(sizes[a] for a in axes)
                   for n, axes in zip(shape, layout.dims)) * itemsize


@functools.lru_cache(maxsize=64)
def _itemsize(dtype: Any) -> int:
  return np.dtype(dtype).itemsize


def _fits(shape: tuple[int, ...], layout: Layout, dim: int, axes: tuple[str, ...]) -> bool:
  """Whether `dim` of `shape` still divides after `layout` splits it further by `axes`."""
  return shape[dim] % (layout.shards(dim) * _group(layout, axes)) == 0


def _common_prefix(a: tuple[str, ...], b: tuple[str, ...]) -> int:
  """How many major-most axes two dimensions' axis sequences share."""
  k = 0
  while k < min(len(a), len(b)) and a[k] == b[k]:
    k += 1
  return k


def _collective_moves(layout: Layout, shape: tuple[int, ...]) -> list[Operator]:
  """Every all-gather of a dimension's minor-most axes, every all-to-all of them to another
  dimension that divides, and every fusion of such all-to-alls (both neighbour sets share
  these)."""
  ops: list[Operator] = []
  moves: list[AllToAll] = []
  for d, axes in enumerate(layout.dims):
    for k in range(1, len(axes) + 1):
      suffix = axes[len(axes) - k:]
      gathered = AllGather(d, suffix)
      ops.append(gathered)
      for e in range(layout.rank):
        if e != d and _fits(shape, gathered.apply(layout), e, suffix):
          moves.append(AllToAll(suffix, d, e))
  return ops + moves + _fused(moves, layout.rank)


def _ordered_subsets(axes: Sequence[str]) -> list[tuple[str, ...]]:
  """Every non-empty ordered selection of distinct axes (the orders a slice can append)."""
  return [p for k in range(1, len(axes) + 1) for p in itertools.permutations(axes, k)]


def neighbours(layout: Layout, shape: tuple[int, ...]) -> list[Operator]:
  """Operators applicable to `layout` whose result divides `shape`.

  Collectives act on a minor-most run of axes of one dimension (a group of mesh axes is one
  collective over their product), slices append free axes in any order, partial axes reduce as a
  group or scatter into a dimension, and a permute reaches every layout with the same block shape.
  """
  ops = _collective_moves(layout, shape)
  rank = layout.rank
  for group in _ordered_subsets(layout.free_axes):
    for e in range(rank):
      if _fits(shape, layout, e, group):
        ops.append(Slice(e, group))
  for group in _ordered_subsets(layout.partial):
    if list(group) == sorted(group, key=layout.axis_names.index):  # one order suffices
      ops.append(AllReduce(group))
    for e in range(rank):
      if _fits(shape, layout, e, group):
        ops.append(ReduceScatter(e, group))
  if not layout.partial:
    for other in _same_block_shape(layout.mesh_axes, shape)[layout.shard_shape(shape)]:
      if other != layout:
        ops.append(Permute(other))
  return ops


def _fused(moves: Sequence[AllToAll], rank: int) -> list[FusedAllToAll]:
  """Every set of two or more all-to-alls that one collective can run together."""
  fused = []
  for k in range(2, rank // 2 + 1):
    for group in itertools.combinations(moves, k):
      src = [m.src_dim for m in group]
      dst = [m.dst_dim for m in group]
      if len(set(src)) == k and len(set(dst)) == k and not set(src) & set(dst):
        fused.append(FusedAllToAll(tuple((m.axes, m.src_dim, m.dst_dim) for m in group)))
  return fused


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
  itemsize = _itemsize(dtype)
  before = _block_bytes(layout, shape, itemsize)
  after = _block_bytes(after_layout, shape, itemsize)
  if isinstance(op, Permute):
    moved = op.received_bytes(before, after, 0) if _blocks_move(layout, after_layout) else 0.0
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


# -- large meshes: settled axes, then A* ------------------------------------------------------

# A move whose unsettled part has at most this many layouts on the refined mesh is searched
# exactly (A* over every edge; the benchmark's 8-device meshes always are); larger ones on the
# unrefined mesh over fewer edges, within a budget of evaluated edges.
EXACT_MAX_LAYOUTS = 200
# Edges A* costs before the best plan found so far (at worst gather-then-slice) is returned.
MAX_EDGES = 500


def count_layouts(num_axes: int, rank: int) -> int:
  """Non-partial layouts of a rank-`rank` tensor on `num_axes` mesh axes, ignoring divisibility:
  choose k axes, order them, and cut the order into `rank` (possibly empty) runs."""
  if rank == 0:
    return 1
  return sum(math.comb(num_axes, k) * math.factorial(k) * math.comb(k + rank - 1, rank - 1)
             for k in range(num_axes + 1))


@dataclasses.dataclass(frozen=True)
class _Settled:
  """What a move leaves alone: per dimension the common major-most axes of source and target,
  and the partial axes both keep. (Axes free in both stay: a plan may split by one for a while.)"""

  prefix: tuple[tuple[str, ...], ...]
  partial: tuple[str, ...]
  mesh_axes: tuple[tuple[str, int], ...]  # the full (refined) mesh

  def lift(self, reduced: Layout) -> Layout:
    dims = tuple(p + d for p, d in zip(self.prefix, reduced.dims))
    return Layout(self.mesh_axes, dims, self.partial + reduced.partial)


def _settle(shape: tuple[int, ...], source: Layout, target: Layout):
  """(settled, reduced shape, reduced source, reduced target): the move without the axes it
  leaves alone. A settled prefix axis splits source and target the same way, so each group of
  devices it defines runs the same smaller move on its part of the tensor."""
  prefix = [src[:_common_prefix(src, dst)] for src, dst in zip(source.dims, target.dims)]
  both_partial = tuple(a for a in source.partial if a in target.partial)
  frozen = {a for p in prefix for a in p} | set(both_partial)
  moving = tuple((n, size) for n, size in source.mesh_axes if n not in frozen)
  sizes = source.axis_sizes
  reduced_shape = tuple(n // math.prod(sizes[a] for a in p) for n, p in zip(shape, prefix))

  def reduce(layout: Layout) -> Layout:
    return Layout(moving, tuple(axes[len(p):] for axes, p in zip(layout.dims, prefix)),
                  tuple(a for a in layout.partial if a not in both_partial))

  return (_Settled(tuple(prefix), both_partial, source.mesh_axes), reduced_shape, reduce(source),
          reduce(target))


def _lift_op(op: Operator, settled: _Settled) -> Operator:
  return Permute(settled.lift(op.target)) if isinstance(op, Permute) else op


class _Bound:
  """`lower_bound_bytes` against one target on a mesh given by its axes, vectorized over the
  devices in numpy (no jax mesh), so A* can evaluate it at every state. A device's overlap with
  its target block is a product over dimensions of interval overlaps, and each factor depends
  only on that dimension's axes, so the factors are cached per (dimension, axes)."""

  def __init__(self, target: Layout, shape: tuple[int, ...], itemsize: int):
    self.names = target.axis_names
    self.sizes = target.axis_sizes
    sizes = [s for _, s in target.mesh_axes]
    self.coords = np.indices(sizes).reshape(len(sizes), -1)  # (axes, devices)
    self.shape = shape
    self.itemsize = itemsize
    self.target = [self._interval(d, axes) for d, axes in enumerate(target.dims)]
    self.volume = math.prod(length for _, length in self.target)
    self.factors: dict[tuple[int, tuple[str, ...]], np.ndarray] = {}
    self.cache: dict[Layout, float] = {}

  def _interval(self, d: int, axes: tuple[str, ...]):
    """Per device, the first index of its block along dimension d, and the block's length."""
    index = np.zeros(self.coords.shape[1], np.int64)
    for a in axes:
      index = index * self.sizes[a] + self.coords[self.names.index(a)]
    length = self.shape[d] // math.prod(self.sizes[a] for a in axes)
    return index * length, length

  def _factor(self, d: int, axes: tuple[str, ...]) -> np.ndarray:
    key = (d, axes)
    factor = self.factors.get(key)
    if factor is None:
      start, length = self._interval(d, axes)
      t_start, t_length = self.target[d]
      factor = np.maximum(np.minimum(t_start + t_length, start + length) -
                          np.maximum(t_start, start), 0)
      self.factors[key] = factor
    return factor

  def __call__(self, layout: Layout) -> float:
    value = self.cache.get(layout)
    if value is None:
      if layout.partial:
        value = float(self.volume * self.itemsize)
      else:
        held = None
        for d, axes in enumerate(layout.dims):
          factor = self._factor(d, axes)
          held = factor if held is None else held * factor
        least = int(held.min()) if held is not None else 1
        value = float((self.volume - least) * self.itemsize)
      self.cache[layout] = value
    return value


def _relabel(layout: Layout, mapping: Mapping[str, str]) -> Layout:
  return layout.with_dims(tuple(tuple(mapping.get(a, a) for a in axes) for axes in layout.dims))


def _relabels(layout: Layout, target: Layout) -> dict[Layout, None]:
  """Layouts one permute reaches that head for the target: axes relabelled to the target's at
  the same positions (equal sizes; the rest completed to a bijection), and the target itself
  when the block shapes already agree. A dict: insertion order keeps plans deterministic."""
  sizes = layout.axis_sizes
  names = layout.axis_names
  found: dict[Layout, None] = {}
  mapping: dict[str, str] = {}
  for have, want in zip(layout.dims, target.dims):
    for a, b in zip(have, want):
      if sizes[a] == sizes[b] and a not in mapping and b not in mapping.values():
        mapping[a] = b
  if mapping:
    images = set(mapping.values())
    spare = [b for b in names if b not in images]
    for a in names:
      if a not in mapping:
        same = [b for b in spare if sizes[b] == sizes[a]]
        pick = a if a in same else same[0]
        mapping[a] = pick
        spare.remove(pick)
    found[_relabel(layout, mapping)] = None
  if all(layout.shards(d) == target.shards(d) for d in range(layout.rank)):
    found[target] = None  # the same block shape: one permute finishes the move
  found.pop(layout, None)
  return found


def _fast_neighbours(layout: Layout, shape: tuple[int, ...], target: Layout) -> list[Operator]:
  """`neighbours` with the exponential families cut down: slices of one free axis or of the run
  of free axes the target appends next to a dimension; reductions of one partial axis or of all;
  permutes that swap two equal-size axes or head for the target (`_relabels`)."""
  ops = _collective_moves(layout, shape)
  rank = layout.rank

  def wanted_runs(available):
    """Per dim, the run of `available` axes the target appends next (if the dim is a prefix)."""
    for e, (have, want) in enumerate(zip(layout.dims, target.dims)):
      if want[:len(have)] != have:
        continue
      run = []
      for a in want[len(have):]:
        if a not in available:
          break
        run.append(a)
      if len(run) > 1:
        yield e, tuple(run)

  free = layout.free_axes
  for a in free:
    for e in range(rank):
      if _fits(shape, layout, e, (a,)):
        ops.append(Slice(e, (a,)))
  for e, run in wanted_runs(set(free)):
    if _fits(shape, layout, e, run):
      ops.append(Slice(e, run))
  if layout.partial:
    for group in dict.fromkeys([(a,) for a in layout.partial] + [layout.partial]):
      ops.append(AllReduce(group))
      for e in range(rank):
        if _fits(shape, layout, e, group):
          ops.append(ReduceScatter(e, group))
    for e, run in wanted_runs(set(layout.partial)):
      if _fits(shape, layout, e, run):
        ops.append(ReduceScatter(e, run))
    return ops
  sizes = layout.axis_sizes
  names = layout.axis_names
  used = set(layout.used_axes)
  others: dict[Layout, None] = {}
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      if sizes[a] == sizes[b] and (a in used or b in used):
        others[_relabel(layout, {a: b, b: a})] = None
  others.update(_relabels(layout, target))
  ops += [Permute(other) for other in others if other != layout]
  return ops


def _one_collective(moves: Sequence[AllToAll]) -> AllToAll | FusedAllToAll:
  """All-to-alls on disjoint dimensions as one collective (fused when there are several)."""
  if len(moves) == 1:
    return moves[0]
  return FusedAllToAll(tuple((m.axes, m.src_dim, m.dst_dim) for m in moves))


def _greedy(shape: tuple[int, ...], dtype: str, source: Layout, target: Layout,
            cost_model: CostModel) -> tuple[Step, ...]:
  """Shardy's order, as one plan: reduce partial sums (scattering them where the target splits
  next), then repeat: slice each dimension on toward the target by free axes, move a dimension's
  surplus minor-most axes by all-to-all (fused where several can go at once) to the dimension
  that takes them next, or else all-gather one dimension's surplus."""
  steps: list[Step] = []
  layout = source

  def push(op):
    nonlocal layout
    after = op.apply(layout)
    steps.append(_step(op, layout, after, shape, dtype, cost_model))
    layout = after

  def is_prefix(e):
    return target.dims[e][:len(layout.dims[e])] == layout.dims[e]

  def next_run(e, available):
    run = []
    for a in target.dims[e][len(layout.dims[e]):]:
      if a not in available:
        break
      run.append(a)
    return tuple(run)

  extra = [a for a in layout.partial if a not in target.partial]
  for e in range(layout.rank):
    run = next_run(e, set(extra)) if is_prefix(e) else ()
    if run and _fits(shape, layout, e, run):
      push(ReduceScatter(e, run))
      extra = [a for a in extra if a not in run]
  if extra:
    push(AllReduce(tuple(extra)))
  for _ in range(4 * (len(layout.axis_names) + 1)):
    for e in range(layout.rank):
      run = next_run(e, set(layout.free_axes)) if is_prefix(e) else ()
      if run and _fits(shape, layout, e, run):
        push(Slice(e, run))
    if layout == target:
      return tuple(steps)
    moves, src_used, dst_used = [], set(), set()
    for d in range(layout.rank):
      if is_prefix(d) or d in dst_used:
        continue
      have = layout.dims[d]
      surplus = have[_common_prefix(have, target.dims[d]):]
      for k in range(len(surplus), 0, -1):
        suffix = surplus[len(surplus) - k:]
        found = [e for e in range(layout.rank) if e != d and e not in src_used | dst_used and
                 is_prefix(e) and next_run(e, set(suffix))[:k] == suffix and
                 _fits(shape, layout, e, suffix)]
        if found:
          moves.append(AllToAll(suffix, d, found[0]))
          src_used.add(d)
          dst_used.add(found[0])
          break
    if moves:
      push(_one_collective(moves))
    else:
      d = next(d for d in range(layout.rank) if not is_prefix(d))
      have = layout.dims[d]
      push(AllGather(d, have[_common_prefix(have, target.dims[d]):]))
  raise PlanError(f"greedy plan from {source} to {target} did not converge")  # a bug if seen


def _shape_then_permute(shape: tuple[int, ...], dtype: str, source: Layout, target: Layout,
                        cost_model: CostModel) -> tuple[Step, ...] | None:
  """Give every dimension the target's number of shards first, then relabel with one permute:
  minor-most axes of a dimension whose shard count does not divide the target's move by
  all-to-all to a dimension that can take them (fused where several go at once) or are
  gathered; dimensions short of shards slice by free axes (the target's own first). None if
  the free axes cannot make up the shard counts."""
  steps: list[Step] = []
  layout = source
  want = [target.shards(d) for d in range(target.rank)]

  def push(op):
    nonlocal layout
    after = op.apply(layout)
    steps.append(_step(op, layout, after, shape, dtype, cost_model))
    layout = after

  for _ in range(len(layout.axis_names) + 1):
    over = [d for d in range(layout.rank) if want[d] % layout.shards(d)]
    if not over:
      break
    moves, taken = [], set()
    for d in over:
      axis = layout.dims[d][-1]
      n = layout.axis_sizes[axis]
      for e in range(layout.rank):
        if e != d and e not in taken and e not in over and want[e] % (layout.shards(e) * n) == 0:
          moves.append(AllToAll((axis,), d, e))
          taken |= {d, e}
          break
    if moves:
      push(_one_collective(moves))
    else:
      push(AllGather(over[0], layout.dims[over[0]][-1:]))
  for d in range(layout.rank):
    preferred = [a for a in target.dims[d] if a in layout.free_axes]
    for a in preferred + [a for a in layout.free_axes if a not in preferred]:
      if a in layout.free_axes and want[d] % (layout.shards(d) * layout.axis_sizes[a]) == 0:
        push(Slice(d, (a,)))
  if any(layout.shards(d) != want[d] for d in range(layout.rank)):
    return None
  if layout != target:
    push(Permute(target))
  return tuple(steps)


def _cost(steps: Sequence[Step]) -> tuple[float, float, int]:
  return (sum(s.seconds for s in steps), sum(s.received_bytes for s in steps), len(steps))


def _upper_plan(shape, dtype, source, target, cost_model, max_bytes_per_device):
  """The cheapest of gather-then-slice, the greedy plan, the greedy plan after one permute
  toward the target (`_relabels`) and shape-then-permute, among those under the cap (None if
  none is)."""
  candidates = [gather_then_slice_plan(shape, dtype, source, target, cost_model).steps,
                _greedy(shape, dtype, source, target, cost_model)]
  if not source.partial:
    for other in _relabels(source, target):
      first = _step(Permute(other), source, other, shape, dtype, cost_model)
      candidates.append((first,) + _greedy(shape, dtype, other, target, cost_model))
    # (Its slices of the target's own free axes first also cover "slice, then one permute".)
    reshaped = _shape_then_permute(shape, dtype, source, target, cost_model)
    if reshaped is not None:
      candidates.append(reshaped)
  ok = [c for c in candidates if max_bytes_per_device is None or
        all(s.peak_bytes <= max_bytes_per_device for s in c)]
  return min(ok, key=_cost) if ok else None


@functools.lru_cache(maxsize=65536)
def _search_astar(shape: tuple[int, ...], dtype: str, source: Layout, target: Layout,
                  cost_model: CostModel, max_bytes_per_device: int | None,
                  exact: bool = False, max_edges: int | None = None
                  ) -> tuple[Step, ...] | None:
  """A* from source to target over `_fast_neighbours`, with the exact bound as heuristic
  (admissible and consistent: a device's missing bytes fall by at most what it receives), and
  gather-then-slice's cost as the bound past which states are dropped."""
  itemsize = np.dtype(dtype).itemsize
  bound = _Bound(target, shape, itemsize)
  beta = cost_model.min_beta

  # A move still missing bytes needs at least one more collective: its launch and one hop.
  first = cost_model.min_launch + cost_model.min_alpha

  def h(layout):
    b = bound(layout)
    return (beta * b + first if b > 0 else 0.0), b

  fallback = _upper_plan(shape, dtype, source, target, cost_model, max_bytes_per_device)
  best_cost = _cost(fallback) if fallback is not None else (math.inf, math.inf, math.inf)
  if max_edges is None:
    max_edges = math.inf if exact else MAX_EDGES
  edges = ((lambda layout: neighbours(layout, shape)) if exact else
           (lambda layout: _fast_neighbours(layout, shape, target)))
  tie = itertools.count()
  best = {source: (0.0, 0.0, 0)}
  previous: dict[Layout, Step] = {}
  hs, hb = h(source)
  heap = [(hs, hb, 0, next(tie), source)]
  done = set()
  edges_costed = 0
  while heap and edges_costed < max_edges:
    _, _, _, _, layout = heapq.heappop(heap)
    if layout in done:
      continue
    done.add(layout)
    if layout == target:
      return _path(previous, source, target)
    seconds, received, count = best[layout]
    for op in edges(layout):
      after_layout = op.apply(layout)
      if after_layout in done or not set(target.partial) <= set(after_layout.partial):
        continue
      step = _step(op, layout, after_layout, shape, dtype, cost_model)
      edges_costed += 1
      if max_bytes_per_device is not None and step.peak_bytes > max_bytes_per_device:
        continue
      cost = (seconds + step.seconds, received + step.received_bytes, count + 1)
      if after_layout in best and cost >= best[after_layout]:
        continue
      hs, hb = h(after_layout)
      estimate = (cost[0] + hs, cost[1] + hb, cost[2])
      if estimate >= best_cost:  # cannot beat the plan in hand
        continue
      best[after_layout] = cost
      previous[after_layout] = step
      if after_layout == target:  # a better complete plan: keep it in case the budget ends
        best_cost, fallback = cost, _path(previous, source, target)
      heapq.heappush(heap, (*estimate, next(tie), after_layout))
  return fallback


def _path(previous: Mapping[Layout, Step], source: Layout, target: Layout) -> tuple[Step, ...]:
  steps, layout = [], target
  while layout != source:
    steps.append(previous[layout])
    layout = steps[-1].before
  return tuple(reversed(steps))


def clear_caches() -> None:
  """Forget memoized plans and block tables (to time planning from cold)."""
  for cached in (_search, _search_astar, _same_block_shape, _local_bytes, _block_bytes):
    cached.cache_clear()


def plan_redistribution(shape: Sequence[int], dtype: Any, source: Layout, target: Layout,
                        cost_model: CostModel = CostModel(),
                        max_bytes_per_device: int | None = None, refine: bool = True,
                        method: str = "auto") -> Plan:
  """The cheapest plan under `cost_model` (ties: fewer bytes, then fewer steps).

  With `refine` (default) the search runs on the refined mesh, where each mesh axis is split
  into prime-size sub-axes ('y' of 4 -> 'y:0', 'y:1'); the steps then name sub-axes, and the
  executor runs them on the same devices arranged as the refined mesh.

  `method`: "dijkstra" searches every layout of the whole (refined) mesh: exact under the
  model, but its time grows exponentially with the number of mesh axes. "auto" (default) first
  sets aside what the move leaves alone (`_settle`: each dimension's common major-most axes and
  the partial axes both keep); if the rest has at most `EXACT_MAX_LAYOUTS` layouts on the
  refined mesh, A* over every edge with the exact per-device bound as heuristic finds the same
  optimum as Dijkstra (every pair of the benchmark's 8-device meshes); otherwise A* runs on the
  unrefined mesh over fewer edges (`_fast_neighbours`), starts from the best of three quick
  plans (`_upper_plan`) and stops after `MAX_EDGES` costed edges with the best plan found.
  "astar" always takes that second path.
  """
  if method not in ("auto", "dijkstra", "astar"):
    raise ValueError(f"method: got {method!r}, expected 'auto', 'dijkstra' or 'astar'")
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
  exact = True
  if start == goal:
    steps = ()
  elif method == "dijkstra":
    steps = _search(shape, dtype, start, goal, cost_model, max_bytes_per_device)
  else:
    settled, small_shape, small_start, small_goal = _settle(shape, start, goal)
    exact = (method == "auto" and count_layouts(len(small_start.mesh_axes), len(shape))
             <= EXACT_MAX_LAYOUTS)
    if not exact and refine:  # too large to search every refined layout: plan on mesh axes
      start, goal = source, target
      settled, small_shape, small_start, small_goal = _settle(shape, start, goal)
    small = _search_astar(small_shape, dtype, small_start, small_goal, cost_model,
                          max_bytes_per_device, exact)
    steps = None
    if small is not None:
      steps, layout = [], start
      for s in small:
        op = _lift_op(s.op, settled)
        after = settled.lift(s.after)
        steps.append(_step(op, layout, after, shape, dtype, cost_model))
        layout = after
      steps = tuple(steps)
  if steps is None:
    cap = ("" if max_bytes_per_device is None else
           f" under max_bytes_per_device={max_bytes_per_device}")
    raise PlanError(f"no redistribution from {source} to {target} for shape {shape}{cap}")
  search = "dijkstra" if method == "dijkstra" else "exact" if exact else "fast"
  return Plan(shape, dtype, source, target, steps, search)


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


def _blocks_move(source: Layout, target: Layout) -> bool:
  """Whether some device's block differs between two layouts. Mesh axes of size 1 place
  nothing; over the others, distinct axis sequences of a dimension give some device another
  block index (set one differing axis's coordinate to 1, the rest to 0)."""
  sizes = source.axis_sizes
  strip = lambda layout: tuple(tuple(a for a in axes if sizes[a] > 1) for axes in layout.dims)
  return strip(source) != strip(target)


# -- lower bound -----------------------------------------------------------------------------


def lower_bound_bytes(shape: Sequence[int], dtype: Any, source: Layout, target: Layout,
                      mesh: Any = None) -> float:
  """Most bytes any device must receive: its target block less what it already holds.

  Read from `NamedSharding.devices_indices_map` of both layouts on `mesh`; without a mesh,
  computed from the layouts' block placement in numpy (the same number; no devices needed, so
  meshes of any size). A partial-sum source holds none of the final values, so then each device
  must receive its whole target block.
  """
  shape = tuple(int(s) for s in shape)
  itemsize = np.dtype(dtype).itemsize
  if mesh is None:
    return _Bound(target, shape, itemsize)(source)
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
