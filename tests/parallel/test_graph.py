"""research/parallel/graph.py + models.py + train.py: the sliced graph equals the reference."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from research.common.mesh import make_mesh
from research.parallel import graph as graph_lib
from research.parallel import lower, models, train
from research.parallel.plan import AllReduce, AllToAll, ReduceScatter


@pytest.fixture(scope="module")
def mesh():
  return make_mesh((2, 4), ("dp", "mp"))


def partitioned(build, strategy, mesh, **sizes):
  graph, specs = build(strategy, **sizes)
  return graph_lib.partition(graph, mesh, specs)


def random_inputs(graph, seed):
  return {n: jax.random.normal(jax.random.key(seed + i), graph.tensors[n].shape)
          for i, n in enumerate(graph.inputs)}


def random_params(graph, seed):
  """Nonzero biases and scales too; numpy, so no per-shape compile of the initializer (each
  truncated-normal shape costs seconds on CPU)."""
  rng = np.random.default_rng(seed)
  params = {}
  for name in graph.params:
    shape = graph.tensors[name].shape
    scale = 1 / np.sqrt(shape[0]) if len(shape) == 2 else 0.1
    params[name] = ((name.endswith("scale") + scale * rng.normal(size=shape))
                    .astype(np.float32))
  return params


def test_init_params_shapes_and_dtypes():
  graph, _ = models.transformer_block("mixed")
  params = jax.eval_shape(lambda key: graph_lib.init_params(graph, key), jax.random.key(0))
  assert set(params) == set(graph.params)
  for name, value in params.items():
    assert value.shape == graph.tensors[name].shape and value.dtype == graph.tensors[name].dtype


# Every strategy on the MLP and the mixed set (all-to-all, all-gather, reduce-scatter) on the
# transformer block by default; the block's data-parallel and Megatron sets are slow.
@pytest.mark.parametrize("build, strategy", [
    *[(models.mlp, strategy) for strategy in models.STRATEGIES],
    (models.transformer_block, "mixed"),
    *[pytest.param(models.transformer_block, strategy, marks=pytest.mark.slow)
      for strategy in models.STRATEGIES if strategy != "mixed"]])
def test_loss_and_gradients_equal_the_reference(mesh, build, strategy):
  graph, specs = build(strategy)
  sliced = graph_lib.partition(graph, mesh, specs)
  params = random_params(graph, 0)
  inputs = random_inputs(graph, 1)
  want_loss, want_grads = jax.jit(jax.value_and_grad(graph_lib.reference_fn(graph)))(params,
                                                                                  inputs)
  placed = jax.device_put(params, sliced.param_shardings())
  loss, grads = jax.jit(jax.value_and_grad(sliced.fn))(
      placed, jax.device_put(inputs, sliced.input_shardings()))
  np.testing.assert_allclose(loss, want_loss, rtol=2e-6)
  for name in params:
    np.testing.assert_allclose(grads[name], want_grads[name], rtol=2e-5,
                               atol=2e-6 * float(jnp.max(jnp.abs(want_grads[name]))))
    assert grads[name].sharding.is_equivalent_to(placed[name].sharding, grads[name].ndim)
  # The forward program runs exactly the collectives the pass inserted.
  text = sliced.fn.lower(placed, jax.device_put(inputs, sliced.input_shardings())).compile()
  found = collections.Counter(k for k, _ in lower.hlo_collectives(text.as_text(), 8))
  assert found == sliced.collectives(), sliced.summary()


def test_the_pass_runs_on_an_explicit_axis_mesh_too():
  """jax.make_mesh's default axis type: the sharding is part of each array's type."""
  test_loss_and_gradients_equal_the_reference(make_mesh((2, 4), ("dp", "mp"), explicit=True),
                                              models.mlp, "mixed")


def test_inserted_redistributions(mesh):
  megatron = partitioned(models.mlp, "megatron", mesh)
  assert [r.plan.steps[0].op for r in megatron.redistributions] == [AllReduce(("mp",)),
                                                                    AllReduce(("dp",))]
  mixed = partitioned(models.mlp, "mixed", mesh)
  ops = [s.op for r in mixed.redistributions for s in r.plan.steps]
  assert ops == [AllToAll(("mp",), 1, 0), AllToAll(("mp",), 0, 1), ReduceScatter(0, ("mp",)),
                 AllReduce(("dp", "mp"))]  # the loss: one all-reduce over both axes
  block = partitioned(models.transformer_block, "mixed", mesh)
  # One all-gather of the first layer norm feeds q, k and v (planned once, shared).
  assert block.collectives()["all-gather"] == 2
  assert block.collectives()["reduce-scatter"] == 2
  assert "all-gather(dim 1 over mp)" in block.summary()
  data_parallel = partitioned(models.mlp, "data_parallel", mesh)
  assert set(data_parallel.collectives()) == {"all-reduce"}  # only the loss


@pytest.mark.slow  # default: tests/experiments/test_parallel.py trains through train.train
def test_training_matches_single_device_step_by_step(mesh):
  graph, specs = models.mlp("mixed")
  sliced = graph_lib.partition(graph, mesh, specs)
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(6):
    x = rng.normal(size=graph.tensors["x"].shape).astype(np.float32)
    labels = np.eye(10, dtype=np.float32)[rng.integers(10, size=x.shape[0])]
    batches.append({"x": x, "labels": labels})
  params = graph_lib.init_params(graph, jax.random.key(3))
  optimizer = optax.adam(1e-2)
  _, want = train.train(graph_lib.reference_fn(graph), optimizer, params, batches)
  final, got = train.train(sliced.fn, optimizer, params, batches, sliced.param_shardings(),
                           sliced.input_shardings())
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert want[-1] < want[0]
  assert final["w2"].sharding.is_equivalent_to(sliced.param_shardings()["w2"], 2)


def test_bad_strategies_are_refused(mesh):
  g = graph_lib.GraphBuilder()
  x, w = g.input("x", (8, 16)), g.param("w", (16, 12))
  with pytest.raises(graph_lib.GraphError, match="strategy has 1 entries for 2 inputs"):
    g.matmul(x, w, (("dp", None),))
  with pytest.raises(graph_lib.GraphError, match=r"expected 2 entries"):
    g.matmul(x, w, (("dp",), (None, None)))
  with pytest.raises(graph_lib.GraphError, match=r"\(8, 16\) @ \(12, 12\) do not contract"):
    g.matmul(x, g.param("v", (12, 12)), (("dp", None), (None, None)))
  out = g.matmul(x, w, (("dp", "mp"), (None, None)), name="mm")
  with pytest.raises(graph_lib.GraphError, match=r"matmul 'mm': contracted dimension split by "
                                                 r"\('mp',\) in the left operand but \(\)"):
    graph_lib.partition(g.build(out), mesh)
  g2 = graph_lib.GraphBuilder()
  y = g2.matmul(g2.input("x", (8, 16)), g2.param("w", (16, 10)), (("dp", None), (None, "mp")),
                name="mm")
  with pytest.raises(graph_lib.GraphError, match=r"dimension 1 of shape \(16, 10\) has size 10, "
                                                 r"not divisible by mesh axes \('mp',\)"):
    graph_lib.partition(g2.build(y), mesh)
  with pytest.raises(graph_lib.GraphError, match="unknown mesh axis 'tp'"):
    g3 = graph_lib.GraphBuilder()
    z = g3.unary("relu", g3.input("x", (8,)), (("tp",),))
    graph_lib.partition(g3.build(z), mesh)
  with pytest.raises(graph_lib.GraphError, match="sequence dimension must not be split"):
    _attention_split_sequence(mesh)
  with pytest.raises(graph_lib.GraphError, match="6 heads do not divide over"):
    partitioned(models.transformer_block, "megatron", mesh, width=48, heads=6)
  with pytest.raises(graph_lib.GraphError, match="strategy 'zero'"):
    models.mlp("zero")


def _attention_split_sequence(mesh):
  g = graph_lib.GraphBuilder()
  q = g.input("q", (2, 8, 16))
  out = g.attention(q, q, q, 4, ((None, "mp", None),) * 3, name="att")
  graph_lib.partition(g.build(out), mesh)
