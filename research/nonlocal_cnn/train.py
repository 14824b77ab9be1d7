"""Training the denoisers: a pure optax step on (noisy, clean) batches, MSE on the output."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax


def optimizer(learning_rate: float, steps: int) -> optax.GradientTransformation:
  """Adam with a cosine decay to 1 % over `steps` (the same for every model)."""
  schedule = optax.cosine_decay_schedule(learning_rate, max(steps, 1), alpha=0.01)
  return optax.adam(schedule)


def train_step(apply: Callable, tx: optax.GradientTransformation) -> Callable:
  """(params, opt_state, noisy, clean) -> (params, opt_state, loss), jitted."""

  def loss_fn(params, noisy, clean):
    return jnp.mean((apply(params, noisy) - clean) ** 2)

  def step(params, opt_state, noisy, clean):
    loss, grads = jax.value_and_grad(loss_fn)(params, noisy, clean)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step)
