"""Training a graph: the same optax step for the sliced graph and for the one-device reference.

`train_step(loss_fn, optimizer)` is a pure jitted (params, opt_state, inputs) -> (params,
opt_state, loss). With the partitioned graph's `fn` as `loss_fn` and params placed with its
parameter shardings, jit keeps every parameter, gradient and optimizer moment in the parameter's
layout (the update is elementwise); with `reference_fn` it is plain single-device training.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import jax
import optax


def train_step(loss_fn: Callable, optimizer: optax.GradientTransformation) -> Callable:

  def step(params, opt_state, inputs):
    loss, grads = jax.value_and_grad(loss_fn)(params, inputs)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step)


def train(loss_fn: Callable, optimizer: optax.GradientTransformation, params: Mapping[str, Any],
          batches: Iterable[Mapping[str, Any]], param_shardings: Mapping[str, Any] | None = None,
          input_shardings: Mapping[str, Any] | None = None):
  """Runs the steps; returns (final params, losses as floats). Shardings place the arrays."""
  if param_shardings is not None:
    params = jax.device_put(dict(params), dict(param_shardings))
  step = train_step(loss_fn, optimizer)
  opt_state = optimizer.init(params)
  losses = []
  for inputs in batches:
    if input_shardings is not None:
      inputs = jax.device_put(dict(inputs), dict(input_shardings))
    params, opt_state, loss = step(params, opt_state, inputs)
    losses.append(float(loss))
  return params, losses
