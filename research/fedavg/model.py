"""A small flax (nnx) MLP classifier, used functionally: `apply(params, x) -> logits`.

The project uses flax.nnx throughout, split once into a static graph definition and a params
pytree (`nnx.split`), so training code is pure functions over params that jit, vmap (one params
copy per client) and optax handle directly.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

Params = Any  # an nnx.State pytree of float arrays
ApplyFn = Callable[[Params, jax.Array], jax.Array]


class MLP(nnx.Module):
  """Dense ReLU network: sizes = (in_features, hidden..., num_classes)."""

  def __init__(self, sizes: Sequence[int], *, rngs: nnx.Rngs):
    if len(sizes) < 2 or any(not isinstance(s, int) or s < 1 for s in sizes):
      raise ValueError(f"MLP sizes={tuple(sizes)}: expected >= 2 positive ints "
                       "(in_features, hidden..., num_classes)")
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.layers[:-1]:
      x = nnx.relu(layer(x))
    return self.layers[-1](x)


def mlp(sizes: Sequence[int], seed: int) -> tuple[ApplyFn, Params]:
  """Builds the MLP and returns its pure apply function and initial params."""
  graphdef, params = nnx.split(MLP(tuple(sizes), rngs=nnx.Rngs(seed)), nnx.Param)

  def apply(params: Params, x: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params)(x)

  return apply, params


def cross_entropy_loss(apply: ApplyFn) -> Callable[[Params, jax.Array, jax.Array], jax.Array]:
  """Mean softmax cross-entropy with integer labels."""
  def loss_fn(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y).mean()
  return loss_fn


def accuracy(apply: ApplyFn, params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(apply(params, x), axis=-1) == y)


def param_count(params: Params) -> int:
  return sum(int(leaf.size) for leaf in jax.tree.leaves(params))
