"""The graph pass: operator strategies -> tensor layouts -> inserted redistributions -> sliced graph.

A model is a small op graph of the project's own (`GraphBuilder`): inputs (data), parameters and
operators, each operator carrying a sharding strategy in the MindSpore sense: the layout it
needs for each input, written as PartitionSpec entries per dimension (e.g. MatMul
`(("dp", None), (None, "mp"))`). `partition` infers every tensor's layout from the strategies
(a MatMul whose contracted dimension is split yields partial sums over those axes), inserts a
planned redistribution wherever a producer's layout differs from what the consumer needs, and
returns the sliced graph: one `shard_map` body in which every operator runs on local blocks and
every redistribution is its collectives, jitted, plus a printable summary.

Every operator's local computation is the same function as its global one (a MatMul of blocks is
a block of partial sums, attention runs on the local heads, a loss divides its local sum by the
global count), so `reference_fn` evaluates the same graph unsliced on one device.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

from research.parallel import lower
from research.parallel import plan as plan_lib
from research.parallel.layout import Layout, LayoutError

Spec = Sequence[Any]  # PartitionSpec entries per dimension: None, an axis, or a tuple of axes

OPS = ("matmul", "add", "relu", "gelu", "tanh", "layer_norm", "attention", "softmax_xent", "mse")


class GraphError(ValueError):
  """A graph or strategy that does not type-check; the message names the operator."""


@dataclasses.dataclass(frozen=True)
class Tensor:
  name: str
  shape: tuple[int, ...]
  dtype: str


@dataclasses.dataclass(frozen=True)
class Node:
  op: str
  inputs: tuple[str, ...]
  output: str
  strategy: tuple[tuple[Any, ...], ...]  # one spec per input
  attrs: tuple[tuple[str, Any], ...] = ()

  @property
  def attr(self) -> dict[str, Any]:
    return dict(self.attrs)


@dataclasses.dataclass(frozen=True)
class Graph:
  tensors: Mapping[str, Tensor]
  inputs: tuple[str, ...]
  params: tuple[str, ...]
  nodes: tuple[Node, ...]
  output: str


class GraphBuilder:
  """Builds a `Graph`; every method returns the name of the tensor it creates."""

  def __init__(self, dtype: str = "float32"):
    self.dtype = dtype
    self.tensors: dict[str, Tensor] = {}
    self.inputs: list[str] = []
    self.params: list[str] = []
    self.nodes: list[Node] = []

  def _new(self, name: str, shape: Sequence[int]) -> str:
    if name in self.tensors:
      raise GraphError(f"tensor name {name!r} is used twice")
    self.tensors[name] = Tensor(name, tuple(int(s) for s in shape), self.dtype)
    return name

  def input(self, name: str, shape: Sequence[int]) -> str:
    self.inputs.append(name)
    return self._new(name, shape)

  def param(self, name: str, shape: Sequence[int]) -> str:
    self.params.append(name)
    return self._new(name, shape)

  def shape(self, name: str) -> tuple[int, ...]:
    return self.tensors[name].shape

  def _node(self, op, inputs, shape, strategy, name=None, **attrs) -> str:
    for i in inputs:
      if i not in self.tensors:
        raise GraphError(f"{op}: unknown input tensor {i!r}")
    strategy = tuple(tuple(s) for s in strategy)
    if len(strategy) != len(inputs):
      raise GraphError(f"{op} {name or ''}: strategy has {len(strategy)} entries for "
                       f"{len(inputs)} inputs")
    for i, spec in zip(inputs, strategy):
      if len(spec) != len(self.shape(i)):
        raise GraphError(f"{op} {name or ''}: strategy {spec} for input {i!r} of shape "
                         f"{self.shape(i)}: expected {len(self.shape(i))} entries")
    name = name or f"{op}{len(self.nodes)}"
    out = self._new(name, shape)
    self.nodes.append(Node(op, tuple(inputs), out, strategy, tuple(sorted(attrs.items()))))
    return out

  def matmul(self, a: str, b: str, strategy: Sequence[Spec], name: str | None = None) -> str:
    sa, sb = self.shape(a), self.shape(b)
    if len(sb) != 2 or sa[-1] != sb[0]:
      raise GraphError(f"matmul {name or ''}: shapes {sa} @ {sb} do not contract")
    return self._node("matmul", (a, b), sa[:-1] + sb[1:], strategy, name)

  def add(self, a: str, b: str, strategy: Sequence[Spec], name: str | None = None) -> str:
    sa, sb = self.shape(a), self.shape(b)
    if len(sb) > len(sa) or sa[len(sa) - len(sb):] != sb:
      raise GraphError(f"add {name or ''}: {sb} does not broadcast to {sa}")
    return self._node("add", (a, b), sa, strategy, name)

  def unary(self, op: str, x: str, strategy: Sequence[Spec], name: str | None = None) -> str:
    if op not in ("relu", "gelu", "tanh"):
      raise GraphError(f"unary op {op!r}: expected relu, gelu or tanh")
    return self._node(op, (x,), self.shape(x), strategy, name)

  def layer_norm(self, x: str, scale: str, bias: str, strategy: Sequence[Spec],
                 name: str | None = None) -> str:
    return self._node("layer_norm", (x, scale, bias), self.shape(x), strategy, name)

  def attention(self, q: str, k: str, v: str, head_dim: int, strategy: Sequence[Spec],
                name: str | None = None) -> str:
    if self.shape(q)[-1] % head_dim:
      raise GraphError(f"attention {name or ''}: width {self.shape(q)[-1]} is not a multiple of "
                       f"head_dim={head_dim}")
    return self._node("attention", (q, k, v), self.shape(q), strategy, name, head_dim=head_dim)

  def softmax_xent(self, logits: str, labels: str, strategy: Sequence[Spec],
                   name: str | None = None) -> str:
    count = math.prod(self.shape(logits)[:-1])
    return self._node("softmax_xent", (logits, labels), (), strategy, name, count=count)

  def mse(self, prediction: str, target: str, strategy: Sequence[Spec],
          name: str | None = None) -> str:
    count = math.prod(self.shape(prediction))
    return self._node("mse", (prediction, target), (), strategy, name, count=count)

  def build(self, output: str) -> Graph:
    return Graph(dict(self.tensors), tuple(self.inputs), tuple(self.params), tuple(self.nodes),
                 output)


# -- operator semantics (the same on local blocks and on whole tensors) -----------------------


def compute(node: Node, args: Sequence[Any]):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  op, attr = node.op, node.attr
  if op == "matmul":
    return jnp.matmul(args[0], args[1], precision=jax.lax.Precision.HIGHEST)
  if op == "add":
    return args[0] + args[1]
  if op == "relu":
    return jax.nn.relu(args[0])
  if op == "gelu":
    return jax.nn.gelu(args[0])
  if op == "tanh":
    return jnp.tanh(args[0])
  if op == "layer_norm":
    x, scale, bias = args
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-6) * scale + bias
  if op == "attention":
    q, k, v = args
    b, t, width = q.shape
    heads = width // attr["head_dim"]
    split = lambda z: z.reshape(b, -1, heads, attr["head_dim"])
    out = jax.nn.dot_product_attention(split(q), split(k), split(v))
    return out.reshape(b, t, width)
  if op == "softmax_xent":
    logits, labels = args
    return -jnp.sum(labels * jax.nn.log_softmax(logits)) / attr["count"]
  if op == "mse":
    return jnp.sum((args[0] - args[1]) ** 2) / attr["count"]
  raise GraphError(f"unknown op {op!r}; expected one of {OPS}")


def output_layout(node: Node, layouts: Sequence[Layout], shapes: Sequence[tuple[int, ...]]
                  ) -> Layout:
  """The layout an operator produces from the layouts its strategy asks for."""
  where = f"{node.op} {node.output!r}"
  first = layouts[0]
  try:
    if node.op == "matmul":
      a, b = layouts
      if a.dims[-1] != b.dims[0]:
        raise GraphError(f"{where}: contracted dimension split by {a.dims[-1]} in the left "
                         f"operand but {b.dims[0]} in the right")
      return Layout(a.mesh_axes, a.dims[:-1] + (b.dims[1],), partial=a.dims[-1])
    if node.op == "add":
      a, b = layouts
      if b.dims != a.dims[a.rank - b.rank:]:
        raise GraphError(f"{where}: operand layouts {a} and {b} differ on the shared "
                         "dimensions")
      return a
    if node.op in ("relu", "gelu", "tanh"):
      return first
    if node.op == "layer_norm":
      if first.dims[-1] or layouts[1].dims[-1] or layouts[2].dims[-1]:
        raise GraphError(f"{where}: the normalized (last) dimension must not be split")
      return first
    if node.op == "attention":
      if any(l != first for l in layouts):
        raise GraphError(f"{where}: q, k and v need one layout")
      if first.dims[1]:
        raise GraphError(f"{where}: the sequence dimension must not be split (got {first})")
      heads = shapes[0][-1] // node.attr["head_dim"]
      if heads % first.shards(2):
        raise GraphError(f"{where}: {heads} heads do not divide over {first.dims[2]}")
      return first
    if node.op in ("softmax_xent", "mse"):
      if layouts[0] != layouts[1]:
        raise GraphError(f"{where}: both operands need one layout")
      if node.op == "softmax_xent" and first.dims[-1]:
        raise GraphError(f"{where}: the class dimension must not be split")
      return Layout(first.mesh_axes, (), partial=first.used_axes)
  except LayoutError as error:
    raise GraphError(f"{where}: {error}") from None
  raise GraphError(f"unknown op {node.op!r}; expected one of {OPS}")


# -- the pass ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Redistribution:
  tensor: str
  plan: plan_lib.Plan


@dataclasses.dataclass(frozen=True)
class SlicedNode:
  node: Node
  input_layouts: tuple[Layout, ...]
  redistributions: tuple[Redistribution, ...]
  output_layout: Layout


@dataclasses.dataclass
class PartitionedGraph:
  graph: Graph
  mesh: Any
  param_layouts: dict[str, Layout]
  input_layouts: dict[str, Layout]
  sliced: tuple[SlicedNode, ...]
  final: Redistribution | None
  output_layout: Layout
  fn: Callable = dataclasses.field(repr=False)

  @property
  def redistributions(self) -> list[Redistribution]:
    found = [r for s in self.sliced for r in s.redistributions]
    return found + ([self.final] if self.final else [])

  @property
  def predicted_bytes(self) -> float:
    return float(sum(r.plan.predicted_bytes for r in self.redistributions))

  def collectives(self) -> collections.Counter:
    total = collections.Counter()
    for r in self.redistributions:
      total.update(r.plan.collectives())
    return total

  def param_shardings(self) -> dict[str, Any]:
    return {k: v.sharding(self.mesh) for k, v in self.param_layouts.items()}

  def input_shardings(self) -> dict[str, Any]:
    return {k: v.sharding(self.mesh) for k, v in self.input_layouts.items()}

  def summary(self) -> str:
    rows = [f"{'operator':28s} {'input layouts':44s} {'inserted redistribution':52s} bytes"]

    def moves(redistributions):
      return "; ".join(f"{r.tensor}: " + ", ".join(plan_lib.describe(s.op) for s in r.plan.steps)
                       for r in redistributions) or "-"

    for s in self.sliced:
      label = f"{s.node.op} -> {s.node.output}"
      layouts = ", ".join(str(l) for l in s.input_layouts)
      bytes_ = sum(r.plan.predicted_bytes for r in s.redistributions)
      rows.append(f"{label:28s} {layouts:44s} {moves(s.redistributions):52s} {bytes_:.0f}")
    if self.final:
      rows.append(f"{'output ' + self.graph.output:28s} {str(self.final.plan.source):44s} "
                  f"{moves([self.final]):52s} {self.final.plan.predicted_bytes:.0f}")
    rows.append(f"total predicted bytes received per device: {self.predicted_bytes:.0f}")
    return "\n".join(rows)


def _layout(mesh, spec, rank, where) -> Layout:
  try:
    return Layout.from_spec(mesh, tuple(spec), rank)
  except LayoutError as error:
    raise GraphError(f"{where}: {error}") from None


def partition(graph: Graph, mesh: Any, input_specs: Mapping[str, Spec] | None = None,
              output_spec: Spec = (), cost_model: plan_lib.CostModel = plan_lib.CostModel()
              ) -> PartitionedGraph:
  """Runs the pass; parameters take the layout their first consumer's strategy asks for."""
  import jax  # pylint: disable=import-outside-toplevel

  tensors = graph.tensors
  layouts: dict[str, Layout] = {}
  for name in graph.inputs:
    if input_specs and name in input_specs:
      layouts[name] = _layout(mesh, input_specs[name], len(tensors[name].shape),
                              f"input {name!r}")
  sliced, planned = [], set()
  for node in graph.nodes:
    required = tuple(_layout(mesh, spec, len(tensors[i].shape),
                             f"{node.op} {node.output!r} strategy for {i!r}")
                     for i, spec in zip(node.inputs, node.strategy))
    redistributions = []
    for name, need in zip(node.inputs, required):
      t = tensors[name]
      try:
        need.check_shape(t.shape)
        if name not in layouts:  # a parameter or an input without a given layout
          layouts[name] = need
        if layouts[name] != need and (name, need) not in planned:  # once per tensor and layout
          planned.add((name, need))
          redistributions.append(Redistribution(name, plan_lib.plan_redistribution(
              t.shape, t.dtype, layouts[name], need, cost_model, refine=False)))
      except (LayoutError, plan_lib.PlanError) as error:
        raise GraphError(f"{node.op} {node.output!r} input {name!r}: {error}") from None
    out = output_layout(node, required, [tensors[i].shape for i in node.inputs])
    out.check_shape(tensors[node.output].shape)
    layouts[node.output] = out
    sliced.append(SlicedNode(node, required, tuple(redistributions), out))
  produced = layouts[graph.output]
  want = _layout(mesh, output_spec, len(tensors[graph.output].shape), "output_spec")
  final = None
  if produced != want:
    t = tensors[graph.output]
    final = Redistribution(graph.output,
                           plan_lib.plan_redistribution(t.shape, t.dtype, produced, want,
                                                        cost_model, refine=False))
  param_layouts = {p: layouts[p] for p in graph.params if p in layouts}
  input_layouts = {i: layouts[i] for i in graph.inputs if i in layouts}
  sliced = tuple(sliced)

  def body(params, inputs):
    env = dict(params, **inputs)
    moved = {}
    for s in sliced:
      for r in s.redistributions:  # planned once per (tensor, layout), shared by consumers
        moved[(r.tensor, r.plan.target)] = lower.local_fn(r.plan)(env[r.tensor])
      args = [moved[(i, need)] if layouts[i] != need else env[i]
              for i, need in zip(s.node.inputs, s.input_layouts)]
      env[s.node.output] = compute(s.node, args)
    result = env[graph.output]
    return lower.local_fn(final.plan)(result) if final else result

  specs = lambda d: {k: v.to_spec() for k, v in d.items()}
  fn = jax.jit(jax.shard_map(body, mesh=mesh,
                             in_specs=(specs(param_layouts), specs(input_layouts)),
                             out_specs=want.to_spec(), check_vma=False))
  return PartitionedGraph(graph, mesh, param_layouts, input_layouts, sliced, final, want, fn)


def reference_fn(graph: Graph) -> Callable:
  """(params, inputs) -> output on whole tensors, one device: the unsliced graph."""

  def run(params, inputs):
    env = dict(params, **inputs)
    for node in graph.nodes:
      env[node.output] = compute(node, [env[i] for i in node.inputs])
    return env[graph.output]

  return run


def init_params(graph: Graph, key) -> dict[str, Any]:
  """Parameters: LeCun-normal matrices, ones for names ending in 'scale', zeros otherwise."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  params = {}
  for i, name in enumerate(graph.params):
    t = graph.tensors[name]
    if len(t.shape) == 2:
      params[name] = jax.nn.initializers.lecun_normal()(jax.random.fold_in(key, i), t.shape,
                                                       t.dtype)
    elif name.endswith("scale"):
      params[name] = jnp.ones(t.shape, t.dtype)
    else:
      params[name] = jnp.zeros(t.shape, t.dtype)
  return params

