"""Tensor layouts on a device mesh: which mesh axes split which tensor dimension.

A `Layout` is the mesh (axis names with sizes, in mesh order), one tuple of mesh axes per tensor
dimension (major to minor: dimension d of a device at mesh coordinate c holds block
`sum_k c[a_k] * prod(sizes of a_{k+1:})` of `prod(sizes)` equal blocks), and the axes over which
the local values are partial sums still to be reduced. Axes used nowhere replicate the tensor.

It converts to and from a `jax.sharding.PartitionSpec` (partial sums have no PartitionSpec: they
exist only inside a `shard_map` body) and to and from MindSpore's (device matrix, tensor map),
where tensor-map entry i names device-matrix dimension `len(device_matrix) - 1 - i` and -1 means
unsplit.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from typing import Any, Mapping, Sequence

from jax.sharding import PartitionSpec


class LayoutError(ValueError):
  """A layout that is malformed or does not fit a tensor shape or a mesh."""


def mesh_axes_of(mesh: Any) -> tuple[tuple[str, int], ...]:
  """(name, size) pairs in mesh order, from a `jax.sharding.Mesh` or `AbstractMesh`, a mapping
  or pairs."""
  if hasattr(mesh, "axis_names") and hasattr(mesh, "axis_sizes"):
    return tuple((str(n), int(s)) for n, s in zip(mesh.axis_names, mesh.axis_sizes))
  items = mesh.items() if isinstance(mesh, Mapping) else mesh
  try:
    return tuple((str(n), int(s)) for n, s in items)
  except (TypeError, ValueError):
    raise LayoutError(f"mesh: got {mesh!r}, expected a jax Mesh, a mapping axis name -> size or "
                      "(name, size) pairs") from None


@dataclasses.dataclass(frozen=True)
class Layout:
  """An immutable tensor layout; see the module docstring."""

  mesh_axes: tuple[tuple[str, int], ...]
  dims: tuple[tuple[str, ...], ...]
  partial: tuple[str, ...] = ()

  def __post_init__(self):
    mesh_axes = mesh_axes_of(self.mesh_axes)
    names = [n for n, _ in mesh_axes]
    if len(set(names)) != len(names):
      raise LayoutError(f"mesh axes {names}: a name repeats")
    for name, size in mesh_axes:
      if size < 1:
        raise LayoutError(f"mesh axis {name!r} has size {size}; expected a positive size")
    dims = []
    for d, axes in enumerate(self.dims):
      axes = (axes,) if isinstance(axes, str) else tuple(() if axes is None else axes)
      dims.append(axes)
    used = [a for axes in dims for a in axes] + list(self.partial)
    for axis in used:
      if axis not in names:
        raise LayoutError(f"layout {_dims_str(dims, self.partial)}: unknown mesh axis {axis!r}; "
                          f"the mesh has {names}")
    repeated = sorted({a for a in used if used.count(a) > 1})
    if repeated:
      raise LayoutError(f"layout {_dims_str(dims, self.partial)}: mesh axes {repeated} are used "
                        "more than once (a mesh axis splits at most one dimension, or is partial)")
    partial = tuple(sorted(set(self.partial), key=names.index))
    object.__setattr__(self, "mesh_axes", mesh_axes)
    object.__setattr__(self, "dims", tuple(dims))
    object.__setattr__(self, "partial", partial)

  # -- construction ----------------------------------------------------------------------------

  @classmethod
  def from_spec(cls, mesh: Any, spec: PartitionSpec | Sequence | None, rank: int,
                partial: Sequence[str] = ()) -> "Layout":
    """From a PartitionSpec (shorter specs mean unsplit trailing dimensions)."""
    spec = tuple(PartitionSpec() if spec is None else spec)
    if len(spec) > rank:
      raise LayoutError(f"PartitionSpec {spec} has {len(spec)} entries for a rank-{rank} tensor")
    entries = list(spec) + [None] * (rank - len(spec))
    return cls(mesh_axes_of(mesh), tuple(entries), tuple(partial))

  @classmethod
  def replicated(cls, mesh: Any, rank: int) -> "Layout":
    return cls(mesh_axes_of(mesh), ((),) * rank)

  @classmethod
  def from_mindspore(cls, device_matrix: Sequence[int], tensor_map: Sequence[int | Sequence[int]],
                     axis_names: Sequence[str] | None = None) -> "Layout":
    """From MindSpore's device matrix and tensor map (axis names default to d0, d1, ...)."""
    device_matrix = tuple(int(s) for s in device_matrix)
    if axis_names is None:
      axis_names = tuple(f"d{i}" for i in range(len(device_matrix)))
    if len(axis_names) != len(device_matrix):
      raise LayoutError(f"axis_names {tuple(axis_names)} and device_matrix {device_matrix} "
                        "differ in length")
    last = len(device_matrix) - 1
    dims = []
    for entry in tensor_map:
      entries = (entry,) if isinstance(entry, int) else tuple(entry)
      axes = []
      for e in entries:
        if e == -1:
          continue
        if not 0 <= e <= last:
          raise LayoutError(f"tensor_map entry {e}: expected -1 or 0..{last} for device matrix "
                            f"{device_matrix}")
        axes.append(axis_names[last - e])
      dims.append(tuple(axes))
    return cls(tuple(zip(axis_names, device_matrix)), tuple(dims))

  # -- views -----------------------------------------------------------------------------------

  @property
  def rank(self) -> int:
    return len(self.dims)

  @property
  def axis_names(self) -> tuple[str, ...]:
    return _axis_names(self.mesh_axes)

  @property
  def axis_sizes(self) -> Mapping[str, int]:
    """Axis name -> size (one shared read-only mapping per mesh)."""
    return _axis_sizes(self.mesh_axes)

  @property
  def num_devices(self) -> int:
    return math.prod(s for _, s in self.mesh_axes)

  @property
  def used_axes(self) -> tuple[str, ...]:
    """Mesh axes that split a dimension or are partial, in mesh order."""
    used = {a for axes in self.dims for a in axes} | set(self.partial)
    return tuple(n for n in self.axis_names if n in used)

  @property
  def free_axes(self) -> tuple[str, ...]:
    """Mesh axes over which the tensor is replicated."""
    used = set(self.used_axes)
    return tuple(n for n in self.axis_names if n not in used)

  def shards(self, dim: int) -> int:
    """Number of blocks dimension `dim` is split into."""
    sizes = self.axis_sizes
    return math.prod(sizes[a] for a in self.dims[dim])

  def check_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
    """Raises LayoutError unless the shape has this rank and each dimension divides evenly."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != self.rank:
      raise LayoutError(f"layout {self} has rank {self.rank}; the tensor has shape {shape}")
    for d, size in enumerate(shape):
      if size % self.shards(d):
        raise LayoutError(f"layout {self}: dimension {d} of shape {shape} has size {size}, "
                          f"not divisible by mesh axes {self.dims[d]} "
                          f"(product {self.shards(d)})")
    return shape

  def divides(self, shape: Sequence[int]) -> bool:
    return len(shape) == self.rank and all(s % self.shards(d) == 0 for d, s in enumerate(shape))

  def shard_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
    """The local block shape on each device."""
    shape = self.check_shape(shape)
    return tuple(s // self.shards(d) for d, s in enumerate(shape))

  def block_of(self, coordinate: Mapping[str, int]) -> tuple[int, ...]:
    """Block index per dimension held by the device at a mesh coordinate."""
    sizes = self.axis_sizes
    block = []
    for axes in self.dims:
      index = 0
      for a in axes:
        index = index * sizes[a] + coordinate[a]
      block.append(index)
    return tuple(block)

  # -- conversions -----------------------------------------------------------------------------

  def to_spec(self) -> PartitionSpec:
    """The PartitionSpec; raises for a partial-sum layout (it has none)."""
    if self.partial:
      raise LayoutError(f"layout {self} is partial over {self.partial}: a partial sum has no "
                        "PartitionSpec (reduce it first)")
    return PartitionSpec(*(None if not axes else axes[0] if len(axes) == 1 else axes
                           for axes in self.dims))

  def to_mindspore(self) -> tuple[tuple[int, ...], tuple[int | tuple[int, ...], ...]]:
    """(device matrix, tensor map) in MindSpore's convention."""
    names = self.axis_names
    last = len(names) - 1
    tensor_map = []
    for axes in self.dims:
      entries = tuple(last - names.index(a) for a in axes)
      tensor_map.append(-1 if not entries else entries[0] if len(entries) == 1 else entries)
    return tuple(s for _, s in self.mesh_axes), tuple(tensor_map)

  def sharding(self, mesh: Any):
    """A `NamedSharding` on `mesh`, whose axes must be this layout's."""
    from jax.sharding import NamedSharding  # pylint: disable=import-outside-toplevel
    if mesh_axes_of(mesh) != self.mesh_axes:
      raise LayoutError(f"layout on mesh {dict(self.mesh_axes)} used with mesh "
                        f"{dict(mesh_axes_of(mesh))}")
    return NamedSharding(mesh, self.to_spec())

  # -- edits used by the planner ---------------------------------------------------------------

  def with_dims(self, dims: Sequence[tuple[str, ...]], partial: Sequence[str] | None = None
                ) -> "Layout":
    """The same mesh with new dims (tuples of this mesh's axis names, each used once) and
    partial axes; the planner's edit, so it skips the constructor's checks (its callers keep
    to these rules) but keeps partial axes in mesh order."""
    layout = object.__new__(Layout)
    if partial is None:
      partial = self.partial
    elif len(partial) > 1:
      names = self.axis_names
      partial = tuple(sorted(set(partial), key=names.index))
    object.__setattr__(layout, "mesh_axes", self.mesh_axes)
    object.__setattr__(layout, "dims", tuple(tuple(axes) for axes in dims))
    object.__setattr__(layout, "partial", tuple(partial))
    return layout

  def __str__(self) -> str:
    return _dims_str(self.dims, self.partial)


@functools.lru_cache(maxsize=1024)
def _axis_names(mesh_axes) -> tuple[str, ...]:
  return tuple(n for n, _ in mesh_axes)


@functools.lru_cache(maxsize=1024)
def _axis_sizes(mesh_axes) -> Mapping[str, int]:
  return types.MappingProxyType(dict(mesh_axes))


def _dims_str(dims, partial) -> str:
  parts = []
  for axes in dims:
    parts.append("None" if not axes else axes[0] if len(axes) == 1 else
                 "(" + ",".join(axes) + ")")
  text = "[" + ", ".join(parts) + "]"
  return text + (f" partial{{{','.join(partial)}}}" if partial else "")


def _prime_factors(n: int) -> list[int]:
  factors, p = [], 2
  while n > 1:
    while n % p == 0:
      factors.append(p)
      n //= p
    p += 1
  return factors


def refined_axes(mesh_axes: Any) -> dict[str, tuple[tuple[str, int], ...]]:
  """Each mesh axis as its prime-size sub-axes, major to minor ('y' of 4 -> 'y:0', 'y:1')."""
  refined = {}
  for name, size in mesh_axes_of(mesh_axes):
    factors = _prime_factors(size)
    if len(factors) <= 1:
      refined[name] = ((name, size),)
    else:
      refined[name] = tuple((f"{name}:{i}", f) for i, f in enumerate(factors))
  return refined


def refine(layout: Layout) -> Layout:
  """The same placement on the refined mesh (every mesh axis split into prime sub-axes).

  Devices keep their order (the refined mesh is the device array reshaped), so a block lives on
  the same device under both; the refined mesh also has layouts the original cannot name
  (split by one sub-axis), which the planner uses as intermediates.
  """
  sub = refined_axes(layout.mesh_axes)
  if all(len(v) == 1 for v in sub.values()):
    return layout
  mesh_axes = tuple(a for name in layout.axis_names for a in sub[name])
  dims = tuple(tuple(n for a in axes for n, _ in sub[a]) for axes in layout.dims)
  partial = tuple(n for a in layout.partial for n, _ in sub[a])
  return Layout(mesh_axes, dims, partial)


def all_layouts(mesh: Any, shape: Sequence[int]) -> list[Layout]:
  """Every non-partial layout of a tensor of `shape` on `mesh` whose splits divide the shape."""
  mesh_axes = mesh_axes_of(mesh)
  rank = len(shape)
  found: list[Layout] = []

  def place(i: int, dims: list[tuple[str, ...]]):
    if i == len(mesh_axes):
      layout = Layout(mesh_axes, tuple(dims))
      if layout.divides(shape):
        found.append(layout)
      return
    name = mesh_axes[i][0]
    place(i + 1, dims)  # axis unused
    for d in range(rank):
      for position in range(len(dims[d]) + 1):
        new = list(dims)
        new[d] = dims[d][:position] + (name,) + dims[d][position:]
        place(i + 1, new)

  place(0, [()] * rank)
  return found


def random_layout(mesh: Any, shape: Sequence[int], rng) -> Layout:
  """A random non-partial layout of `shape` on `mesh` (for fuzzing and benchmarks): each mesh
  axis, in a random order, splits a random dimension at a random depth where the dimension
  still divides, or stays free; `rng` is a numpy Generator."""
  mesh_axes = mesh_axes_of(mesh)
  rank = len(shape)
  dims: list[list[str]] = [[] for _ in range(rank)]
  shards = [1] * rank
  for i in rng.permutation(len(mesh_axes)):
    name, size = mesh_axes[int(i)]
    d = int(rng.integers(rank + 1))
    if d < rank and shape[d] % (shards[d] * size) == 0:
      dims[d].insert(int(rng.integers(len(dims[d]) + 1)), name)
      shards[d] *= size
  return Layout(mesh_axes, tuple(tuple(axes) for axes in dims))

