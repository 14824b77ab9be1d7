"""A compressed FedAvg round: distribute, local training, encode, decode + aggregate, update.

Clients are vmapped inside one jitted call. Protocol rules this file fixes:
- Non-finite updates: a client whose update holds any NaN or +-Inf still sends a message (its
  non-finite entries encoded as 0), but the coordinator counts it as dropped and gives it weight
  0; the other clients' weights are renormalized. If every client is dropped the model stays.
- Error feedback: each client keeps the residual v + e - decode(message) and adds it to the next
  round's update; the residual is zero where the update was non-finite. The clients run through
  the pytree compressor (`quantize.for_pytrees`), which holds that rule; this file only stacks
  their states.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from research.fedavg import rounds as fedavg
from research.kquant import buckets as buckets_lib
from research.kquant import coordinator
from research.kquant import quantize
from research.kquant.quantize import Compressor, RangeSpec

Params = Any


class KQuantState(NamedTuple):
  server: fedavg.ServerState
  spec: RangeSpec                    # the range the coordinator sends next round (fixed / last_round)
  clients: quantize.CompressorState  # every client's, stacked: error (clients, rows, bucket_size)


def init(params: Params, server_optimizer: optax.GradientTransformation,
         layout: buckets_lib.BucketLayout, num_clients: int, radius: float) -> KQuantState:
  return KQuantState(fedavg.init(params, server_optimizer), coordinator.fixed_range(layout, radius),
                     quantize.zero_state(layout, num_clients))


def round_fn(state: KQuantState, x: jax.Array, y: jax.Array, count: jax.Array, key: jax.Array, *,
             compressor: Compressor, layout: buckets_lib.BucketLayout, range_policy: str,
             per_tensor: bool, range_margin: float, min_width: float, error_feedback: bool,
             loss_fn, client_optimizer: optax.GradientTransformation,
             server_optimizer: optax.GradientTransformation, local_steps: int,
             batch_size: int) -> tuple[KQuantState, dict[str, jax.Array]]:
  if range_policy not in coordinator.RANGE_POLICIES:
    raise ValueError(f"range_policy={range_policy!r}: expected one of "
                     f"{coordinator.RANGE_POLICIES}")
  train_key, encode_key = jax.random.split(key)
  deltas, losses = fedavg.client_deltas(
      state.server.params, x, y, count, train_key, loss_fn=loss_fn,
      client_optimizer=client_optimizer, local_steps=local_steps, batch_size=batch_size)
  client = quantize.for_pytrees(compressor, layout, error_feedback=error_feedback)
  prepared = jax.vmap(client.prepare)(deltas, state.clients)
  included = jnp.sum(~prepared.finite, axis=(1, 2)) == 0

  if range_policy == "client_minmax":
    spec = coordinator.range_from_client_minmax(prepared.v, included, layout,
                                                per_tensor=per_tensor, min_width=min_width)
  else:
    spec = state.spec
  messages, clients = jax.vmap(client.encode, (0, None, 0))(
      prepared, spec, jax.random.split(encode_key, count.shape[0]))

  weights = jnp.where(included, count, 0).astype(jnp.float32)
  total = jnp.sum(weights)
  weights = weights / jnp.where(total > 0, total, 1.0)
  aggregate = compressor.aggregate(messages, weights, spec)
  aggregate = jnp.where(total > 0, aggregate, 0.0)
  server = fedavg.server_update(state.server, buckets_lib.from_buckets(aggregate, layout),
                                server_optimizer)
  if range_policy == "last_round":
    spec = coordinator.range_from_aggregate(aggregate, layout, per_tensor=per_tensor,
                                            margin=range_margin, min_width=min_width)

  exact = jnp.tensordot(weights, jnp.where(prepared.finite, prepared.v, 0.0), axes=1)
  metrics = {
      "client_loss": jnp.dot(weights, losses),
      "update_norm": jnp.linalg.norm(aggregate),
      "relative_error": jnp.linalg.norm(aggregate - exact) / jnp.maximum(
          jnp.linalg.norm(exact), 1e-12),
      "dropped_clients": jnp.sum(~included),
  }
  return KQuantState(server, spec, clients), metrics
