"""Plain flax nnx models for the jaxpr pass, each parameter tagged with logical axis names
(`logical=` metadata), and their train step as one pure function.

- `MLP`: the digits classifier of `models.mlp` (64 -> hidden -> hidden -> 10) in nnx;
- `Block`: the transformer block of `models.transformer_block` (multi-head attention and an
  MLP, pre-layer-norm, residuals) with a vocabulary head;
- `LM`: a small decoder-only language model: embedding, `layers` blocks, head (the larger one).

`RULES` is the MaxText-style table the experiments use: batch over 'dp', heads / mlp / vocab
over 'mp', embedding and sequence dimensions unsplit.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

RULES = (("batch", "dp"), ("mlp", "mp"), ("heads", "mp"), ("vocab", "mp"), ("embed", None),
         ("kv", None), ("length", None))


def _param(rngs: nnx.Rngs, shape, logical, scale=None):
  fan_in = shape[0] if scale is None else scale
  return nnx.Param(jax.random.normal(rngs.params(), shape) / jnp.sqrt(fan_in), logical=logical)


class MLP(nnx.Module):
  def __init__(self, features: int = 64, hidden: int = 128, classes: int = 10, *,
               rngs: nnx.Rngs):
    self.w1 = _param(rngs, (features, hidden), ("embed", "mlp"))
    self.b1 = nnx.Param(jnp.zeros(hidden), logical=("mlp",))
    self.w2 = _param(rngs, (hidden, hidden), ("mlp", "embed"))
    self.w3 = _param(rngs, (hidden, classes), ("embed", "vocab"))

  def __call__(self, x):
    h = jax.nn.relu(x @ self.w1 + self.b1)
    h = jax.nn.relu(h @ self.w2)
    return h @ self.w3


class Block(nnx.Module):
  def __init__(self, width: int = 64, heads: int = 8, hidden: int = 128, *, rngs: nnx.Rngs):
    head = width // heads
    self.ln1 = nnx.Param(jnp.ones(width), logical=("embed",))
    self.wq = _param(rngs, (width, heads, head), ("embed", "heads", "kv"))
    self.wk = _param(rngs, (width, heads, head), ("embed", "heads", "kv"))
    self.wv = _param(rngs, (width, heads, head), ("embed", "heads", "kv"))
    self.wo = _param(rngs, (heads, head, width), ("heads", "kv", "embed"), scale=width)
    self.ln2 = nnx.Param(jnp.ones(width), logical=("embed",))
    self.w1 = _param(rngs, (width, hidden), ("embed", "mlp"))
    self.w2 = _param(rngs, (hidden, width), ("mlp", "embed"))

  def __call__(self, x):
    def norm(v, scale):
      v = v - v.mean(-1, keepdims=True)
      return v * jax.lax.rsqrt((v * v).mean(-1, keepdims=True) + 1e-5) * scale

    h = norm(x, self.ln1)
    q = jnp.einsum("bsd,dhk->bshk", h, self.wq)
    k = jnp.einsum("bsd,dhk->bshk", h, self.wk)
    v = jnp.einsum("bsd,dhk->bshk", h, self.wv)
    scores = jnp.einsum("bshk,bthk->bhst", q, k) / jnp.sqrt(q.shape[-1])
    mask = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
    attn = jax.nn.softmax(jnp.where(mask, scores, -1e9), axis=-1)
    x = x + jnp.einsum("bhst,bthk,hkd->bsd", attn, v, self.wo)
    h = norm(x, self.ln2)
    return x + jax.nn.gelu(h @ self.w1) @ self.w2


class BlockClassifier(nnx.Module):
  """One block on embedded inputs, a vocabulary head per position."""

  def __init__(self, width: int = 64, heads: int = 8, hidden: int = 128, vocab: int = 16, *,
               rngs: nnx.Rngs):
    self.block = Block(width, heads, hidden, rngs=rngs)
    self.head = _param(rngs, (width, vocab), ("embed", "vocab"))

  def __call__(self, x):
    return self.block(x) @ self.head


class LM(nnx.Module):
  def __init__(self, vocab: int = 64, width: int = 64, heads: int = 8, hidden: int = 256,
               layers: int = 4, *, rngs: nnx.Rngs):
    self.embed = _param(rngs, (vocab, width), ("vocab", "embed"), scale=1.0)
    self.blocks = nnx.List([Block(width, heads, hidden, rngs=rngs) for _ in range(layers)])
    self.head = _param(rngs, (width, vocab), ("embed", "vocab"))

  def __call__(self, tokens):
    x = jnp.take(self.embed, tokens, axis=0) * 0.1
    for block in self.blocks:
      x = block(x)
    return x @ self.head


def split(model: nnx.Module):
  """(graphdef, state template, parameters as a pure dict of arrays, their logical names as the
  same dict of tuples): what the train step and the pass take."""
  graphdef, state = nnx.split(model)
  names: dict = {}
  for path, variable in nnx.to_flat_state(state):
    node = names
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = variable.get_metadata().get("logical")
  return graphdef, state, nnx.to_pure_dict(state), names


def train_step_fn(graphdef, template, optimizer: optax.GradientTransformation):
  """(params, opt_state, inputs, labels) -> (params, opt_state, loss): cross-entropy of the
  model's logits, gradients, and one optimizer update, as one pure function over pure dicts."""

  def loss_fn(params, inputs, labels):
    state = jax.tree.map(lambda x: x, template)  # a fresh copy to fill (tracing only)
    nnx.replace_by_pure_dict(state, params)
    logits = nnx.merge(graphdef, state)(inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def step(params, opt_state, inputs, labels):
    loss, grads = jax.value_and_grad(loss_fn)(params, inputs, labels)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def step_logical(optimizer, opt_state, names, input_names, label_names):
  """`in_logical` for `train_step_fn`'s arguments: parameters and the optimizer's per-parameter
  state by their logical names, its counters replicated."""
  is_names = lambda x: isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)
  opt_names = optax.tree_map_params(optimizer, lambda _, n: n, opt_state, names,
                                    transform_non_params=lambda _: None, is_leaf=is_names)
  return names, opt_names, input_names, label_names
