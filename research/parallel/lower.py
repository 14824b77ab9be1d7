"""The executor: a plan lowered to `jax.lax` collectives in one `jax.shard_map` body.

`local_fn(plan)` is the per-device function (use it inside a larger shard_map body, as the graph
pass does); `redistribute_fn(plan, mesh)` wraps it in `jax.jit(jax.shard_map(...))` with the
source layout's PartitionSpec in and the target's out, so the result is the input array, bit
for bit, carrying the target sharding. `hlo_collectives(text)` reads the collectives of a compiled
program back (kind and bytes received per device), to check a plan against what XLA runs and to
measure XLA's own resharding.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable

from research.parallel import plan as plan_lib
from research.parallel.layout import Layout, LayoutError, mesh_axes_of


def apply_op(block, op: plan_lib.Operator, layout: Layout):
  """One redistribution operator on a device's local block, inside a shard_map body."""
  import jax  # pylint: disable=import-outside-toplevel

  if isinstance(op, plan_lib.Slice):
    sizes = layout.axis_sizes
    index = 0
    for axis in op.axes:  # linear index over the group, major to minor
      index = index * sizes[axis] + jax.lax.axis_index(axis)
    size = block.shape[op.dim] // math.prod(sizes[a] for a in op.axes)
    return jax.lax.dynamic_slice_in_dim(block, index * size, size, axis=op.dim)
  if isinstance(op, plan_lib.AllGather):
    return jax.lax.all_gather(block, op.axes, axis=op.dim, tiled=True)
  if isinstance(op, plan_lib.AllToAll):
    return jax.lax.all_to_all(block, op.axes, op.dst_dim, op.src_dim, tiled=True)
  if isinstance(op, plan_lib.FusedAllToAll):
    return _fused_all_to_all(block, op, layout)
  if isinstance(op, plan_lib.ReduceScatter):
    return jax.lax.psum_scatter(block, op.axes, scatter_dimension=op.dim, tiled=True)
  if isinstance(op, plan_lib.AllReduce):
    return jax.lax.psum(block, op.axes)
  if isinstance(op, plan_lib.Permute):
    pairs = plan_lib.permute_pairs(layout, op.target)
    return jax.lax.ppermute(block, layout.axis_names, perm=pairs)
  raise TypeError(f"unknown redistribution operator {op!r}")


def _fused_all_to_all(block, op: plan_lib.FusedAllToAll, layout: Layout):
  """Several all-to-alls as one over the product of their groups: each destination dimension
  is cut into its group's pieces, the pieces are stacked in front (one axis of the group's
  size, the moves' axes major to minor) and exchanged with one `all_to_all`; what arrives
  from the peer at group coordinate j of a move is its source dimension's j-th part."""
  import jax  # pylint: disable=import-outside-toplevel

  sizes = layout.axis_sizes
  groups = [math.prod(sizes[a] for a in axes) for axes, _, _ in op.moves]
  dst = {d: k for k, (_, _, d) in enumerate(op.moves)}
  split_shape, piece_axes = [], [None] * len(groups)
  for d, n in enumerate(block.shape):
    if d in dst:
      piece_axes[dst[d]] = len(split_shape)
      split_shape += [groups[dst[d]], n // groups[dst[d]]]
    else:
      split_shape.append(n)
  x = block.reshape(split_shape)
  x = jax.numpy.moveaxis(x, piece_axes, list(range(len(groups))))
  rest = x.shape[len(groups):]
  x = x.reshape((math.prod(groups),) + rest)
  x = jax.lax.all_to_all(x, op.axes, 0, 0, tiled=True)
  x = x.reshape(tuple(groups) + rest)
  # Each received-group axis goes in front of its move's source dimension and merges with it.
  order, merged = [], []
  for d in range(len(rest)):
    k = next((k for k, (_, src, _) in enumerate(op.moves) if src == d), None)
    if k is not None:
      order.append(k)
      merged.append(groups[k] * rest[d])
    else:
      merged.append(rest[d])
    order.append(len(groups) + d)
  return x.transpose(order).reshape(merged)


def local_fn(plan: plan_lib.Plan) -> Callable:
  """block -> block: the plan's operators in order, inside a shard_map over the mesh its steps
  name (`plan_mesh`; plan with `refine=False` to use it in a shard_map over the original mesh)."""

  def run(block):
    for step in plan.steps:
      block = apply_op(block, step.op, step.before)
    return block

  return run


def plan_mesh(plan: plan_lib.Plan, mesh: Any):
  """The mesh the plan's steps act on: `mesh`, or its devices arranged as the refined mesh."""
  from jax.sharding import AbstractMesh, Mesh  # pylint: disable=import-outside-toplevel

  axes = plan.steps[0].before.mesh_axes if plan.steps else plan.source.mesh_axes
  if axes == plan.source.mesh_axes:
    return mesh
  names, sizes = zip(*axes)
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  types = tuple(types[n.split(":")[0]] for n in names)
  if isinstance(mesh, AbstractMesh):  # a traced value's mesh (inside jit): no devices named
    return AbstractMesh(sizes, names, axis_types=types)
  return Mesh(mesh.devices.reshape(sizes), names, axis_types=types)


def redistribute_fn(plan: plan_lib.Plan, mesh: Any) -> Callable:
  """A jitted global-array function: source sharding in, the same array in target sharding out."""
  import jax  # pylint: disable=import-outside-toplevel

  if plan.source.partial or plan.target.partial:
    raise LayoutError("redistribute_fn moves global arrays; a partial-sum layout exists only "
                      "inside a shard_map body (use local_fn there)")
  return jax.jit(functools.partial(_run_plan, plan, mesh),
                 out_shardings=plan.target.sharding(mesh))


def _run_plan(plan: plan_lib.Plan, mesh: Any, x):
  """The plan's collectives on a global value `x` (traced or not), as in redistribute_fn."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax.sharding import AxisType, NamedSharding  # pylint: disable=import-outside-toplevel

  steps_mesh = plan_mesh(plan, mesh)
  start = plan.steps[0].before if plan.steps else plan.source
  goal = plan.steps[-1].after if plan.steps else plan.target
  body = jax.shard_map(local_fn(plan), mesh=steps_mesh, in_specs=start.to_spec(),
                       out_specs=goal.to_spec(), check_vma=False)
  if AxisType.Explicit in tuple(mesh.axis_types):
    # Explicit axes carry the sharding in the value's type, which shard_map checks against
    # in_specs: name the same placement on the refined mesh first (same devices in the same
    # order, so no data moves), and the result's on the caller's mesh after.
    x = jax.sharding.reshard(x, NamedSharding(steps_mesh, start.to_spec()))
    return jax.sharding.reshard(body(x), plan.target.sharding(mesh))
  return jax.lax.with_sharding_constraint(body(x), plan.target.sharding(mesh))


def reshard(x, target, mesh: Any = None, *, source=None,
            cost_model: plan_lib.CostModel = plan_lib.CostModel()):
  """`x` moved to the `target` layout (a Layout or a PartitionSpec) by the planned collectives;
  a drop-in for `jax.sharding.reshard` / `with_sharding_constraint` that works inside `jit` and
  under `jax.grad` (its transpose is the plan of the reverse move, target -> source).

  The source layout is `source` (a Layout or PartitionSpec) if given, else read from `x`: from
  its type on an Explicit-axis mesh (also while tracing), or from a concrete array's
  NamedSharding. `mesh` defaults to the one in x's sharding; a mesh given must be that one.
  """
  import jax  # pylint: disable=import-outside-toplevel

  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  typed = spec is not None and any(entry is not None for entry in spec)
  if not typed and not isinstance(x, jax.core.Tracer):
    sharding = getattr(x, "sharding", None)
    spec = getattr(sharding, "spec", None)
    typed = spec is not None
  if mesh is None:
    mesh = getattr(sharding, "mesh", None)
    if mesh is None:
      raise LayoutError("reshard: no mesh given and none in x's sharding (pass mesh=, and "
                        "source= for a traced value on an Auto-axis mesh)")
  if source is None:
    if not typed:
      raise LayoutError("reshard: x's source layout is unknown inside jit on an Auto-axis mesh; "
                        "pass source= (a Layout or PartitionSpec)")
    source = spec
  as_layout = lambda l: l if isinstance(l, Layout) else Layout.from_spec(mesh, l, x.ndim)
  source, target = as_layout(source), as_layout(target)
  for name, layout in (("source", source), ("target", target)):
    if layout.mesh_axes != mesh_axes_of(mesh):
      raise LayoutError(f"reshard: {name} layout is on mesh {dict(layout.mesh_axes)}, x's mesh "
                        f"is {dict(mesh_axes_of(mesh))}")
  forward = plan_lib.plan_redistribution(x.shape, x.dtype, source, target, cost_model)

  @jax.custom_vjp
  def move(value):
    return _run_plan(forward, mesh, value)

  def move_fwd(value):
    return move(value), None

  def move_bwd(_, cotangent):  # planned only when a gradient is taken
    backward = plan_lib.plan_redistribution(x.shape, x.dtype, target, source, cost_model)
    return (_run_plan(backward, mesh, cotangent),)

  move.defvjp(move_fwd, move_bwd)
  return move(x)


def layout_of(array, mesh: Any) -> Layout:
  """The layout of a global jax array sharded with a NamedSharding on `mesh`."""
  spec = getattr(array.sharding, "spec", None)
  if spec is None:
    raise LayoutError(f"array sharding {array.sharding} is not a NamedSharding")
  return Layout.from_spec(mesh, spec, array.ndim)


def redistribute(array, target: Layout, mesh: Any,
                 cost_model: plan_lib.CostModel = plan_lib.CostModel()):
  """Plans and runs the move of `array` to `target` (convenience; plans are memoized)."""
  plan = plan_lib.plan_redistribution(array.shape, array.dtype, layout_of(array, mesh), target,
                                      cost_model)
  return redistribute_fn(plan, mesh)(array)


# -- reading collectives from compiled HLO ---------------------------------------------------

_COLLECTIVE = re.compile(
    r"=\s*(?P<shape>\(.*?\)|\S+)\s+(?P<kind>all-gather|all-to-all|collective-permute|all-reduce|"
    r"reduce-scatter)(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128)\[([\d,]*)\]")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([\d,]*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\].*?\{([^{}]*)\}")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")
_ITEMSIZE = {"pred": 1, "bf16": 2, "c64": 8, "c128": 16}


def _array_bytes(text: str) -> list[int]:
  sizes = []
  for dtype, dims in _ARRAY.findall(text):
    itemsize = _ITEMSIZE.get(dtype) or int(dtype[1:]) // 8
    sizes.append(math.prod(int(d) for d in dims.split(",") if d) * itemsize)
  return sizes


def _group_size(line: str, num_devices: int) -> int:
  match = _GROUPS_LIST.search(line)
  if match:
    return len([x for x in match.group(1).split(",") if x])
  match = _GROUPS_IOTA.search(line)
  if match:
    return int(match.group(2))
  match = _GROUPS_MESH.search(line)
  if match:
    sizes = dict((k.strip("'"), int(v)) for k, v in
                 (item.split("=") for item in match.group(1).split(",")))
    # Entries name a mesh axis ('axis_1') or a sub-axis of it ('axis_1':(pre)size).
    return math.prod(int(sub) if sub else sizes[name]
                     for name, sub in re.findall(r"'(\w+)'(?::\(\d+\)(\d+))?", match.group(2)))
  return num_devices  # no groups: all devices


def _result_bytes(match) -> int:
  """Bytes of a collective's result: the tuple's sum (CPU's all-to-all returns one array per
  peer) or, for an async `-start`, its largest element (the tuple also holds the operand and,
  for a collective permute, u32[] context words)."""
  shapes = _array_bytes(match.group("shape"))
  return max(shapes) if match.group("start") else sum(shapes)


def hlo_collectives(text: str, num_devices: int) -> list[tuple[str, float]]:
  """(kind, bytes received per device) of each collective in compiled HLO text.

  Received bytes follow the same ring formulas as the planner, from the result shape (the text
  of a compiled module does not type operands): all-gather and all-to-all `out * (n-1)/n`,
  reduce-scatter `out * (n-1)`, all-reduce `2 * out * (n-1)/n`, collective permute `out` when
  some pair moves data.
  """
  found = []
  for line in text.splitlines():
    match = _COLLECTIVE.search(line)
    if not match:  # (`-done` halves of async pairs do not match: the `-start` carries them)
      continue
    kind = match.group("kind")
    out = _result_bytes(match)
    if kind == "collective-permute":
      pairs = _PAIRS.search(line)
      moving = pairs is None or any(a != b for a, b in re.findall(r"\{(\d+),(\d+)\}",
                                                                  pairs.group(1)))
      found.append((kind, float(out) if moving else 0.0))
      continue
    n = _group_size(line, num_devices)
    if kind in ("all-gather", "all-to-all"):
      received = out * (n - 1) / n
    elif kind == "reduce-scatter":
      received = out * (n - 1)
    else:
      received = 2 * out * (n - 1) / n
    found.append((kind, float(received)))
  return found


def compiled_text(fn: Callable, *args) -> str:
  return fn.lower(*args).compile().as_text()


def replicates(text: str, global_bytes: int) -> bool:
  """Whether some collective in the HLO (all-reduce included: XLA can reshard by reducing
  zero-padded copies) produces the whole tensor on a device."""
  for line in text.splitlines():
    match = _COLLECTIVE.search(line)
    if match and _result_bytes(match) >= global_bytes:
      return True
  return False


def xla_reshard_fn(target: Layout, mesh: Any) -> Callable:
  """XLA's own resharding: `jax.jit(identity, out_shardings=target)`, called on an array that
  carries the source sharding."""
  import jax  # pylint: disable=import-outside-toplevel
  return jax.jit(lambda x: x, out_shardings=target.sharding(mesh))

