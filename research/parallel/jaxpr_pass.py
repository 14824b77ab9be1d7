"""The planner on a plain jax program: layouts from logical axis rules, propagated through the
program's jaxpr, with planned redistributions wherever an equation's inputs disagree.

`shard(fn, mesh, rules, in_logical)` traces `fn` (e.g. a flax nnx train step, gradients and
optimizer update included) to a jaxpr, gives each input the layout its logical axis names map
to under `rules` (MaxText-style: one table from logical names to mesh axes; the first mesh axis
that is still free and divides the dimension wins), and walks the equations:

- `dot_general`: batch and contracting dimensions of the right operand follow the left one's
  axes; an axis both operands' free dimensions name stays with the left; the output keeps the
  batch and free dimensions' axes (XLA reduces the contracted ones);
- elementwise equations (every array operand and result of one shape): all operands move to
  the most-sharded operand's layout;
- reductions drop the reduced dimensions; `broadcast_in_dim`, `transpose`, `reshape` (axes on
  the major dimension of a merged or split group carry over) and `squeeze` map dimensions;
- nested `jit` and custom-derivative calls are walked inside; any other equation (gather,
  scatter, ...) runs on its operands as they are, and each result takes the most sharded of an
  operand's layout of its shape and the leading (batch-like) axes of an operand with its first
  size.

Where an operand's layout differs from what its equation wants, the program runs
`lower.reshard` (the planned collectives in a shard_map) on it; every result is constrained to
its propagated layout, so XLA's partitioner adds only the reductions of contracted axes. The
global values are those of `fn`: the pass changes where data lives, never what is computed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import numpy as np

from research.parallel import plan as plan_lib
from research.parallel.layout import Layout, LayoutError, mesh_axes_of

Rules = Sequence[tuple[str, Any]]

_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "custom_jvp_call": "call_jaxpr",
          "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr",
          "closed_call": "call_jaxpr", "remat": "jaxpr", "checkpoint": "jaxpr"}
_REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
               "reduce_or", "argmax", "argmin"}
_NOT_ELEMENTWISE = {"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp", "sort", "rev",
                    "dynamic_slice", "dynamic_update_slice", "gather", "scatter", "scatter-add",
                    "scatter_add", "pad", "concatenate", "iota", "random_bits", "random_wrap",
                    "random_unwrap", "threefry2x32", "top_k", "select_and_scatter_add",
                    "reduce_window_sum", "conv_general_dilated", "split", "slice"}


def logical_layout(mesh: Any, names: Sequence[str | None], shape: Sequence[int],
                   rules: Rules) -> Layout:
  """The layout of an array whose dimensions have logical `names`, under `rules`."""
  mesh_axes = mesh_axes_of(mesh)
  sizes = dict(mesh_axes)
  table: dict[str, tuple[str, ...]] = {}
  for logical, axes in rules:
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    for a in axes:
      if a not in sizes:
        raise LayoutError(f"rules: logical axis {logical!r} maps to mesh axis {a!r}; the mesh "
                          f"has {list(sizes)}")
    table.setdefault(logical, axes)
  if len(names) != len(shape):
    raise LayoutError(f"logical names {tuple(names)} for an array of shape {tuple(shape)}: "
                      "expected one name (or None) per dimension")
  for name in names:
    if name is not None and name not in table:
      raise LayoutError(f"logical axis {name!r} has no rule; rules name {sorted(table)}")
  return _valid(mesh_axes, [() if name is None else table[name] for name in names], shape)


# -- propagation -----------------------------------------------------------------------------


@dataclasses.dataclass
class Step:
  """One equation: the layouts its operands arrive in and must have, its results' layouts, and
  the walked body of a nested call."""

  eqn: Any
  arrive: list[Layout | None]  # None: a literal or scalar
  want: list[Layout | None]
  out: list[Layout]
  body: "Program | None" = None


@dataclasses.dataclass
class Program:
  jaxpr: Any
  consts: list
  steps: list[Step]
  out: list[Layout]

  def moves(self) -> list[tuple[Any, Layout, Layout, tuple[int, ...], Any]]:
    """Every (primitive, source, target, shape, dtype) redistribution, nested calls included."""
    found = []
    for step in self.steps:
      for var, have, want in zip(step.eqn.invars, step.arrive, step.want):
        if have is not None and want is not None and have != want:
          found.append((step.eqn.primitive, have, want, tuple(var.aval.shape), var.aval.dtype))
      if step.body is not None:
        found += step.body.moves()
    return found

  def predicted_bytes(self, cost_model: plan_lib.CostModel = plan_lib.CostModel()) -> float:
    """Bytes each device receives in the planned redistributions per call."""
    return float(sum(plan_lib.plan_redistribution(shape, dtype, source, target,
                                                  cost_model).predicted_bytes
                     for _, source, target, shape, dtype in self.moves()))


def _replicated(mesh_axes, rank: int) -> Layout:
  return Layout(mesh_axes, ((),) * rank)


def _shards(layout: Layout) -> int:
  return math.prod(layout.shards(d) for d in range(layout.rank))


def _valid(mesh_axes, dims, shape) -> Layout:
  """`dims` as a layout, dropping repeated axes (first use wins) and non-dividing ones."""
  sizes = dict(mesh_axes)
  used, out = set(), []
  for axes, size in zip(dims, shape):
    kept, shards = [], 1
    for a in axes:
      if a not in used and size % (shards * sizes[a]) == 0:
        kept.append(a)
        shards *= sizes[a]
    used.update(kept)
    out.append(tuple(kept))
  return Layout(mesh_axes, tuple(out))


def _dot_general(eqn, lhs: Layout, rhs: Layout, mesh_axes):
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  lshape, rshape = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
  lfree = [d for d in range(len(lshape)) if d not in lc and d not in lb]
  rfree = [d for d in range(len(rshape)) if d not in rc and d not in rb]
  dims = list(rhs.dims)
  for l, r in list(zip(lb, rb)) + list(zip(lc, rc)):
    dims[r] = lhs.dims[l]
  taken = {a for axes in lhs.dims for a in axes}
  for r in rfree:
    dims[r] = tuple(a for a in rhs.dims[r] if a not in taken)
  want_rhs = _valid(mesh_axes, dims, rshape)
  out_dims = ([lhs.dims[l] for l in lb] + [lhs.dims[l] for l in lfree] +
              [want_rhs.dims[r] for r in rfree])
  out = _valid(mesh_axes, out_dims, eqn.outvars[0].aval.shape)
  return [lhs, want_rhs], [out]


def _reshape(in_shape, out_shape, layout: Layout, mesh_axes):
  """(wanted input layout, output layout): dimension groups of equal size product map onto
  each other; a group keeps the axes of its major input dimension on its major output
  dimension, where they divide it."""
  want, out = [()] * len(in_shape), [()] * len(out_shape)
  i = j = 0
  while i < len(in_shape) or j < len(out_shape):
    gi, gj = [i] if i < len(in_shape) else [], [j] if j < len(out_shape) else []
    pi = in_shape[i] if gi else 1
    pj = out_shape[j] if gj else 1
    i, j = i + len(gi), j + len(gj)
    while pi != pj:
      if pi < pj and i < len(in_shape):
        gi.append(i)
        pi *= in_shape[i]
        i += 1
      elif j < len(out_shape):
        gj.append(j)
        pj *= out_shape[j]
        j += 1
      else:
        break
    if not gi or not gj:
      continue
    major_in = next((d for d in gi if in_shape[d] > 1), gi[0])
    major_out = next((d for d in gj if out_shape[d] > 1), gj[0])
    axes = layout.dims[major_in]
    shards = math.prod(dict(mesh_axes)[a] for a in axes)
    if all(not layout.dims[d] for d in gi if d != major_in) and \
        out_shape[major_out] % shards == 0:
      want[major_in], out[major_out] = axes, axes
  return Layout(mesh_axes, tuple(want)), Layout(mesh_axes, tuple(out))


def _rule(eqn, arrive: list[Layout | None], mesh_axes):
  """(wanted operand layouts, result layouts) of one equation."""
  name = eqn.primitive.name
  shapes = [tuple(v.aval.shape) if hasattr(v.aval, "shape") else () for v in eqn.invars]
  out_shapes = [tuple(v.aval.shape) if hasattr(v.aval, "shape") else () for v in eqn.outvars]
  replicated = lambda shape: _replicated(mesh_axes, len(shape))
  have = [a if a is not None else replicated(s) for a, s in zip(arrive, shapes)]
  if name == "dot_general":
    return _dot_general(eqn, have[0], have[1], mesh_axes)
  if name in _REDUCTIONS:
    reduced = set(eqn.params["axes"])
    kept = [axes for d, axes in enumerate(have[0].dims) if d not in reduced]
    return have, [_valid(mesh_axes, kept, out_shapes[0])]
  if name == "broadcast_in_dim":
    dims = [()] * len(out_shapes[0])
    for i, j in enumerate(eqn.params["broadcast_dimensions"]):
      if shapes[0][i] == out_shapes[0][j]:
        dims[j] = have[0].dims[i]
    return have, [_valid(mesh_axes, dims, out_shapes[0])]
  if name == "transpose":
    perm = eqn.params["permutation"]
    return have, [Layout(mesh_axes, tuple(have[0].dims[p] for p in perm))]
  if name == "squeeze":
    gone = set(d % len(shapes[0]) for d in eqn.params["dimensions"])
    return have, [Layout(mesh_axes, tuple(a for d, a in enumerate(have[0].dims)
                                         if d not in gone))]
  if name == "reshape" and len(eqn.invars) == 1:
    want, out = _reshape(shapes[0], out_shapes[0], have[0], mesh_axes)
    return [want], [out]
  arrays = [s for s in shapes + out_shapes if s]
  if name not in _NOT_ELEMENTWISE and arrays and all(s == arrays[0] for s in arrays):
    # The most-sharded operand's layout, its unsplit dimensions filled from the others' axes:
    # every operand reaches it by slicing only where the others agree.
    ranked = sorted((h for h, s in zip(have, shapes) if s), key=_shards, reverse=True)
    dims = [list(d) for d in ranked[0].dims] if ranked else [[] for _ in arrays[0]]
    for other in ranked[1:]:
      for d, axes in enumerate(other.dims):
        if not dims[d]:
          dims[d] = list(axes)
    best = _valid(mesh_axes, dims, arrays[0])
    return ([best if s else h for h, s in zip(have, shapes)],
            [best if s else replicated(s) for s in out_shapes])
  # Anything else runs where its operands are (XLA partitions it); a result takes the most
  # sharded of: an operand's layout of its shape, the batch-like leading axes of an operand
  # with its first size (a scatter's updates, a gather's indices).
  outs = []
  for shape in out_shapes:
    options = [h for h, s in zip(have, shapes) if s == shape and s]
    options += [_valid(mesh_axes, [h.dims[0]] + [()] * (len(shape) - 1), shape)
                for h, s in zip(have, shapes) if s and shape and s[0] == shape[0]]
    outs.append(max(options, key=_shards) if options else replicated(shape))
  return have, outs


def _closed(eqn):
  inner = eqn.params[_CALLS[eqn.primitive.name]]
  return (inner.jaxpr, list(inner.consts)) if hasattr(inner, "jaxpr") else (inner, [])


def propagate(jaxpr, consts, in_layouts: Sequence[Layout], mesh_axes) -> Program:
  """Walks `jaxpr` from the inputs' layouts (constants replicated)."""
  from jax.extend.core import Literal  # pylint: disable=import-outside-toplevel

  env: dict[Any, Layout] = {}
  for var, c in zip(jaxpr.constvars, consts):
    env[var] = _replicated(mesh_axes, np.ndim(c))
  for var, layout in zip(jaxpr.invars, in_layouts):
    env[var] = layout
  steps = []
  for eqn in jaxpr.eqns:
    arrive = [None if isinstance(v, Literal) or not getattr(v.aval, "shape", ()) else env[v]
              for v in eqn.invars]
    if eqn.primitive.name in _CALLS:
      inner, inner_consts = _closed(eqn)
      have = [a if a is not None else _replicated(mesh_axes, len(getattr(v.aval, "shape", ())))
              for a, v in zip(arrive, eqn.invars)]
      body = propagate(inner, inner_consts, have, mesh_axes)
      step = Step(eqn, arrive, list(arrive), body.out, body)
    else:
      want, out = _rule(eqn, arrive, mesh_axes)
      want = [None if a is None else w for a, w in zip(arrive, want)]
      step = Step(eqn, arrive, want, out)
    steps.append(step)
    for var, layout in zip(eqn.outvars, step.out):
      env[var] = layout
  out = [env[v] if not isinstance(v, Literal) and v in env else
         _replicated(mesh_axes, len(getattr(v.aval, "shape", ()))) for v in jaxpr.outvars]
  return Program(jaxpr, list(consts), steps, out)


# -- running ---------------------------------------------------------------------------------


def run(program: Program, mesh: Any, args: Sequence[Any], consts=None) -> list:
  """The program's values (traced, inside jit): planned moves where layouts disagree, every
  array result constrained to its propagated layout."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax.extend.core import Literal  # pylint: disable=import-outside-toplevel
  from research.parallel import lower  # pylint: disable=import-outside-toplevel

  env: dict[Any, Any] = {}
  jaxpr = program.jaxpr
  for var, value in zip(jaxpr.constvars, program.consts if consts is None else consts):
    env[var] = value
  for var, value in zip(jaxpr.invars, args):
    env[var] = value
  read = lambda v: v.val if isinstance(v, Literal) else env[v]
  for step in program.steps:
    values = [read(v) for v in step.eqn.invars]
    for i, (have, want) in enumerate(zip(step.arrive, step.want)):
      if have is not None and want is not None and have != want:
        values[i] = lower.reshard(values[i], want, mesh, source=have)
    if step.body is not None:
      outs = run(step.body, mesh, values)
    else:
      params = step.eqn.primitive.get_bind_params(step.eqn.params)
      outs = step.eqn.primitive.bind(*values, **params)
      outs = outs if step.eqn.primitive.multiple_results else [outs]
    for var, value, layout in zip(step.eqn.outvars, outs, step.out):
      if layout.rank and not layout.partial:
        value = jax.lax.with_sharding_constraint(value, layout.sharding(mesh))
      env[var] = value
  return [read(v) for v in jaxpr.outvars]


@dataclasses.dataclass
class Sharded:
  """`shard`'s result: `fn` is the jitted program (same signature as the original), `program`
  the walked jaxpr and `in_layouts` the inputs' layouts."""

  fn: Callable
  program: Program
  in_layouts: list[Layout]
  in_shardings: Any


def shard(fn: Callable, mesh: Any, rules: Rules, in_logical: Any, *example_args) -> Sharded:
  """`fn` traced on `example_args` and run with propagated layouts (module docstring).

  `in_logical` mirrors `example_args`: per array a tuple of logical names (or None per
  dimension), or None for a replicated input.
  """
  import jax  # pylint: disable=import-outside-toplevel

  closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*example_args)
  flat_args, in_tree = jax.tree.flatten(example_args)
  try:
    names = in_tree.flatten_up_to(in_logical)
  except (ValueError, TypeError) as error:
    raise LayoutError("in_logical: expected the structure of the arguments with one tuple of "
                      f"logical names (or None) per array ({error})") from None
  mesh_axes = mesh_axes_of(mesh)
  layouts = [_replicated(mesh_axes, np.ndim(a)) if n is None else
             logical_layout(mesh, n, np.shape(a), rules) for a, n in zip(flat_args, names)]
  program = propagate(closed.jaxpr, closed.consts, layouts, mesh_axes)
  shardings = [l.sharding(mesh) for l in layouts]
  out_tree = jax.tree.structure(out_shape)

  def flat_fn(*flat):
    return run(program, mesh, flat)

  jitted = jax.jit(flat_fn, in_shardings=shardings)

  def call(*args):
    return jax.tree.unflatten(out_tree, jitted(*jax.tree.leaves(args)))

  call.lower = lambda *args: jitted.lower(*jax.tree.leaves(args))  # for the HLO
  return Sharded(call, program, layouts, jax.tree.unflatten(in_tree, shardings))
