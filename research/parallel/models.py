"""Two models in the graph IR, each under named strategy sets on a ('dp', 'mp') mesh.

- `mlp`: digits classifier, 64 -> hidden -> hidden -> 10, softmax cross-entropy.
- `transformer_block`: pre-LN block (multi-head self-attention, GELU MLP, residuals), mean
  squared error against a target sequence.

Strategy sets: "data_parallel" (batch over both axes, weights replicated), "megatron" (batch over
dp; column-parallel then row-parallel matmuls over mp, as in Megatron-LM: one all-reduce per
pair), and "mixed", chosen to force other redistributions: for the MLP a column-parallel layer
feeding a data-parallel one feeding a row-parallel one (all-to-alls and a reduce-scatter); for
the block, Megatron sequence parallelism (residual stream split over the sequence on mp:
all-gathers before the column-parallel matmuls, reduce-scatters after the row-parallel ones).
"""

from __future__ import annotations

from research.parallel.graph import Graph, GraphBuilder, GraphError

STRATEGIES = ("data_parallel", "megatron", "mixed")
ALL = ("dp", "mp")


def _check(strategy: str) -> None:
  if strategy not in STRATEGIES:
    raise GraphError(f"strategy {strategy!r}: expected one of {STRATEGIES}")


def mlp(strategy: str, batch: int = 64, features: int = 64, hidden: int = 128,
        classes: int = 10) -> tuple[Graph, dict]:
  """(graph, input specs) of the digits MLP under `strategy`."""
  _check(strategy)
  g = GraphBuilder()
  x = g.input("x", (batch, features))
  y = g.input("labels", (batch, classes))
  w1, b1 = g.param("w1", (features, hidden)), g.param("b1", (hidden,))
  w2, b2 = g.param("w2", (hidden, hidden)), g.param("b2", (hidden,))
  w3, b3 = g.param("w3", (hidden, classes)), g.param("b3", (classes,))
  if strategy == "data_parallel":
    row = (ALL, None)
    h = g.unary("relu", g.add(g.matmul(x, w1, (row, (None, None))), b1, (row, (None,))), (row,))
    h = g.unary("relu", g.add(g.matmul(h, w2, (row, (None, None))), b2, (row, (None,))), (row,))
    logits = g.add(g.matmul(h, w3, (row, (None, None))), b3, (row, (None,)))
    loss = g.softmax_xent(logits, y, (row, row), name="loss")
    return g.build(loss), {"x": row, "labels": row}
  col = ("dp", "mp")  # activations split over hidden units
  h = g.matmul(x, w1, (("dp", None), (None, "mp")))                     # column parallel
  h = g.unary("relu", g.add(h, b1, (col, ("mp",))), (col,))
  if strategy == "megatron":
    h = g.matmul(h, w2, (col, ("mp", None)))                           # row parallel: partial
    h = g.unary("relu", g.add(h, b2, (("dp", None), (None,))), (("dp", None),))  # all-reduce
    logits = g.add(g.matmul(h, w3, (("dp", None), (None, None))), b3, (("dp", None), (None,)))
    loss = g.softmax_xent(logits, y, (("dp", None), ("dp", None)), name="loss")
    return g.build(loss), {"x": ("dp", None), "labels": ("dp", None)}
  row = (ALL, None)
  h = g.matmul(h, w2, (row, (None, None)))                              # all-to-all in
  h = g.unary("relu", g.add(h, b2, (row, (None,))), (row,))
  logits = g.matmul(h, w3, (col, ("mp", None)))                         # all-to-all; partial
  logits = g.add(logits, b3, (row, (None,)))                            # reduce-scatter
  loss = g.softmax_xent(logits, y, (row, row), name="loss")
  return g.build(loss), {"x": ("dp", None), "labels": row}


def transformer_block(strategy: str, batch: int = 8, seq: int = 16, width: int = 64,
                      heads: int = 8, hidden: int = 128) -> tuple[Graph, dict]:
  """(graph, input specs) of one pre-LN transformer block under `strategy`."""
  _check(strategy)
  if width % heads:
    raise GraphError(f"transformer_block: width={width} is not a multiple of heads={heads}")
  g = GraphBuilder()
  x = g.input("x", (batch, seq, width))
  target = g.input("target", (batch, seq, width))
  p = {name: g.param(name, shape) for name, shape in [
      ("ln1_scale", (width,)), ("ln1_bias", (width,)), ("wq", (width, width)),
      ("wk", (width, width)), ("wv", (width, width)), ("wo", (width, width)), ("bo", (width,)),
      ("ln2_scale", (width,)), ("ln2_bias", (width,)), ("w1", (width, hidden)),
      ("b1", (hidden,)), ("w2", (hidden, width)), ("b2", (width,))]}
  # stream: the residual stream; inner: activations between a column- and a row-parallel
  # matmul (heads / hidden units split over mp). The bias add after a row-parallel matmul asks
  # for the stream's layout, which reduces its partial sums.
  if strategy == "data_parallel":
    stream = inner = (ALL, None, None)
    col_w = row_w = (None, None)
    in_bias = out_bias = (None,)
  else:
    inner = ("dp", None, "mp")
    col_w, row_w, in_bias, out_bias = (None, "mp"), ("mp", None), ("mp",), (None,)
    stream = ("dp", None, None) if strategy == "megatron" else ("dp", "mp", None)
  gathered = (stream[0], None, None)  # what the column-parallel matmuls read
  ln = g.layer_norm(x, p["ln1_scale"], p["ln1_bias"], (stream, (None,), (None,)))
  q, k, v = (g.matmul(ln, p[w], (gathered, col_w)) for w in ("wq", "wk", "wv"))
  a = g.attention(q, k, v, width // heads, (inner,) * 3)
  o = g.add(g.matmul(a, p["wo"], (inner, row_w)), p["bo"], (stream, out_bias))
  r1 = g.add(x, o, (stream, stream))
  ln2 = g.layer_norm(r1, p["ln2_scale"], p["ln2_bias"], (stream, (None,), (None,)))
  h = g.unary("gelu", g.add(g.matmul(ln2, p["w1"], (gathered, col_w)), p["b1"],
                            (inner, in_bias)), (inner,))
  m = g.add(g.matmul(h, p["w2"], (inner, row_w)), p["b2"], (stream, out_bias))
  r2 = g.add(r1, m, (stream, stream))
  loss = g.mse(r2, target, (stream, stream), name="loss")
  return g.build(loss), {"x": stream, "target": stream}
