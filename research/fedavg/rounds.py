"""Federated averaging (McMahan et al., 2017) as pure functions over a server-state pytree.

One round: the coordinator sends the current params to every client; each client runs
`local_steps` optimizer steps on minibatches of its own shard (clients vmapped, so one jitted call
trains all of them); the coordinator averages the clients' deltas weighted by shard size and
applies the negated average as a pseudo-gradient with a server optax optimizer (FedOpt, Reddi et
al. 2021: `optax.sgd(1.0)` is exactly FedAvg). Compressors (e.g. K-quant) slot in between the
client deltas and the aggregate.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

Params = Any
LossFn = Callable[[Params, jax.Array, jax.Array], jax.Array]


class ServerState(NamedTuple):
  params: Params            # the global model
  opt_state: optax.OptState  # the server optimizer's state
  round: chex.Array          # shape=(), dtype=int32: rounds completed


# Client SGD momentum of every FedAvg-style experiment here (FedAvg, K-quant): one place.
CLIENT_MOMENTUM = 0.9


def client_optimizer(learning_rate: float,
                     momentum: float = CLIENT_MOMENTUM) -> optax.GradientTransformation:
  """The clients' optimizer: SGD with momentum, fresh at every round."""
  return optax.sgd(learning_rate, momentum=momentum)


def local_train(params: Params, x: jax.Array, y: jax.Array, count: jax.Array, key: jax.Array, *,
                loss_fn: LossFn, optimizer: optax.GradientTransformation, steps: int,
                batch_size: int) -> tuple[Params, jax.Array]:
  """Runs `steps` optimizer steps on minibatches drawn with replacement from x[:count].

  Returns the trained params and the mean minibatch loss. The optimizer state starts fresh, as a
  client that only receives params would.
  """
  chex.assert_rank(count, 0)

  def step(carry, step_key):
    params, opt_state = carry
    index = jax.random.randint(step_key, (batch_size,), 0, count)
    loss, grads = jax.value_and_grad(loss_fn)(params, x[index], y[index])
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)),
                                     jax.random.split(key, steps))
  return params, losses.mean()


def weighted_mean(trees: Params, weights: jax.Array) -> Params:
  """Mean over the leading (client) axis of every leaf, with weights summing to one."""
  return jax.tree.map(lambda leaf: jnp.tensordot(weights, leaf, axes=1), trees)


def init(params: Params, server_optimizer: optax.GradientTransformation) -> ServerState:
  return ServerState(params, server_optimizer.init(params), jnp.zeros((), jnp.int32))


def client_deltas(params: Params, x: jax.Array, y: jax.Array, count: jax.Array, key: jax.Array,
                  *, loss_fn: LossFn, client_optimizer: optax.GradientTransformation,
                  local_steps: int, batch_size: int) -> tuple[Params, jax.Array]:
  """Every client trains from `params` on its shard (vmapped); returns stacked deltas and losses.

  Args:
    x, y, count: per-client shards, (num_clients, max_len, ...), (num_clients, max_len),
      (num_clients,) valid lengths (see `research.common.data.stack_clients`).
  Returns:
    (deltas with a leading client axis, mean local loss per client).
  """
  chex.assert_equal_shape_prefix((x, y, count), 1)

  def client(x_k, y_k, count_k, key_k):
    trained, loss = local_train(params, x_k, y_k, count_k, key_k, loss_fn=loss_fn,
                                optimizer=client_optimizer, steps=local_steps,
                                batch_size=batch_size)
    return jax.tree.map(jnp.subtract, trained, params), loss

  return jax.vmap(client)(x, y, count, jax.random.split(key, count.shape[0]))


def server_update(state: ServerState, mean_delta: Params,
                  server_optimizer: optax.GradientTransformation) -> ServerState:
  """Applies the negated aggregate delta as a pseudo-gradient (FedOpt; sgd(1.0) is FedAvg)."""
  pseudo_grad = jax.tree.map(jnp.negative, mean_delta)
  updates, opt_state = server_optimizer.update(pseudo_grad, state.opt_state, state.params)
  return ServerState(optax.apply_updates(state.params, updates), opt_state, state.round + 1)


def round_fn(state: ServerState, x: jax.Array, y: jax.Array, count: jax.Array, key: jax.Array, *,
             loss_fn: LossFn, client_optimizer: optax.GradientTransformation,
             server_optimizer: optax.GradientTransformation, local_steps: int,
             batch_size: int) -> tuple[ServerState, dict[str, jax.Array]]:
  """One FedAvg round over all clients: local training, size-weighted mean delta, server step.

  Returns the new server state and round metrics (mean client loss, update norm).
  """
  deltas, losses = client_deltas(state.params, x, y, count, key, loss_fn=loss_fn,
                                 client_optimizer=client_optimizer, local_steps=local_steps,
                                 batch_size=batch_size)
  weights = count.astype(jnp.float32) / jnp.sum(count)
  mean_delta = weighted_mean(deltas, weights)
  metrics = {"client_loss": jnp.dot(weights, losses), "update_norm": optax.tree.norm(mean_delta)}
  return server_update(state, mean_delta, server_optimizer), metrics
