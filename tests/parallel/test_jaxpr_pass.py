"""research/parallel/jaxpr_pass.py: layouts from logical rules through a plain jax program;
training through the pass equals one-device training step by step."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from research.common.mesh import make_mesh
from research.parallel import jaxpr_pass
from research.parallel import lower
from research.parallel import nnx_models
from research.parallel import plan as plan_lib
from research.parallel.layout import Layout, LayoutError


def test_logical_layout_maps_names_and_refuses_bad_rules():
  mesh = (("dp", 2), ("mp", 4))
  rules = (("batch", "dp"), ("mlp", "mp"), ("heads", "mp"), ("embed", None))
  assert jaxpr_pass.logical_layout(mesh, ("batch", "embed", "mlp"), (8, 8, 8), rules) == \
      Layout(mesh, (("dp",), (), ("mp",)))
  # An axis is used once (first wins), and only where it divides the dimension.
  assert jaxpr_pass.logical_layout(mesh, ("mlp", "heads"), (8, 8), rules) == \
      Layout(mesh, (("mp",), ()))
  assert jaxpr_pass.logical_layout(mesh, ("mlp", None), (6, 8), rules) == \
      Layout(mesh, ((), ()))
  with pytest.raises(LayoutError, match="logical axis 'vocab' has no rule"):
    jaxpr_pass.logical_layout(mesh, ("vocab",), (8,), rules)
  with pytest.raises(LayoutError, match="maps to mesh axis 'tp'"):
    jaxpr_pass.logical_layout(mesh, ("batch",), (8,), (("batch", "tp"),))
  with pytest.raises(LayoutError, match="one name"):
    jaxpr_pass.logical_layout(mesh, ("batch",), (8, 8), rules)


def test_a_disagreeing_operand_moves_by_the_planned_collectives():
  """a @ b with both free dimensions asking for 'mp': b gives it up (an all-gather planned and
  found in the compiled program), and the value is a @ b."""
  mesh = make_mesh((2, 4), ("dp", "mp"))
  rules = (("rows", "mp"), ("cols", "mp"), ("inner", None))
  a = jnp.arange(32 * 16, dtype=jnp.float32).reshape(32, 16) / 100
  b = jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8) / 50
  sharded = jaxpr_pass.shard(lambda x, y: x @ y, mesh, rules,
                             (("rows", "inner"), ("inner", "cols")), a, b)
  moves = sharded.program.moves()
  assert [(str(s), str(t)) for _, s, t, _, _ in moves] == [("[None, mp]", "[None, None]")]
  np.testing.assert_allclose(sharded.fn(a, b), a @ b, rtol=1e-6)
  text = sharded.fn.lower(a, b).compile().as_text()
  found = collections.Counter(k for k, _ in lower.hlo_collectives(text, 8))
  planned = plan_lib.plan_redistribution((16, 8), "float32", moves[0][1], moves[0][2])
  assert found["all-gather"] >= planned.collectives()["all-gather"]
  assert sharded.program.predicted_bytes() == planned.predicted_bytes > 0
  with pytest.raises(LayoutError, match="in_logical"):
    jaxpr_pass.shard(lambda x, y: x @ y, mesh, rules, (("rows", "inner"),), a, b)


def _train(model, inputs, labels, input_names, label_names, steps):
  graphdef, template, params, names = nnx_models.split(model)
  optimizer = optax.adam(0.01)
  opt_state = optimizer.init(params)
  step = nnx_models.train_step_fn(graphdef, template, optimizer)
  mesh = make_mesh((2, 4), ("dp", "mp"))
  logical = nnx_models.step_logical(optimizer, opt_state, names, input_names, label_names)
  sharded = jaxpr_pass.shard(step, mesh, nnx_models.RULES, logical, params, opt_state, inputs,
                             labels)
  reference = jax.jit(step)
  ours, one = (params, opt_state), (params, opt_state)
  losses = []
  for _ in range(steps):
    *ours, loss = sharded.fn(*ours, inputs, labels)
    *one, loss_one = reference(*one, inputs, labels)
    losses.append((float(loss), float(loss_one)))
  return losses, sharded, ours


@pytest.mark.parametrize("which", ["mlp", pytest.param("block", marks=pytest.mark.slow)])
def test_training_through_the_pass_equals_one_device_step_by_step(which):
  key = jax.random.key(0)
  if which == "mlp":
    model = nnx_models.MLP(rngs=nnx.Rngs(0))
    inputs = jax.random.normal(key, (64, 64))
    labels = jax.random.randint(jax.random.key(1), (64,), 0, 10)
    names = ("batch", "embed"), ("batch",)
  else:
    model = nnx_models.BlockClassifier(rngs=nnx.Rngs(0))
    inputs = jax.random.normal(key, (8, 16, 64))
    labels = jax.random.randint(jax.random.key(1), (8, 16), 0, 16)
    names = ("batch", "length", "embed"), ("batch", "length")
  losses, sharded, (params, _) = _train(model, inputs, labels, *names, steps=4)
  ours, one = np.array(losses).T
  np.testing.assert_allclose(ours, one, rtol=2e-5)
  assert ours[-1] < ours[0]  # it trains
  # The parameters keep the layouts their logical names give.
  for value, layout in zip(jax.tree.leaves(params), sharded.in_layouts):
    assert value.sharding.is_equivalent_to(layout.sharding(value.sharding.mesh), value.ndim)
