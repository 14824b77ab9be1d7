"""The compressed round: float32 reduces to FedAvg; NaN clients are dropped; error feedback."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.common import data as data_lib
from research.fedavg import model as model_lib
from research.fedavg import rounds as fedavg
from research.kquant import buckets, quantize, rounds

HYPER = dict(local_steps=3, batch_size=8)


def setup(num_clients=4):
  split = data_lib.digits()
  parts = data_lib.iid_partition(200, num_clients, 0)
  shards = data_lib.stack_clients(split.x_train[:200], split.y_train[:200], parts)
  apply, params = model_lib.mlp((64, 16, 10), 0)
  lay = buckets.bucket_layout(params, 64)
  return apply, params, lay, tuple(map(jnp.asarray, shards))


def kquant_round(apply, lay, compressor, error_feedback=False, policy="client_minmax"):
  return jax.jit(functools.partial(
      rounds.round_fn, compressor=compressor, layout=lay, range_policy=policy, per_tensor=False,
      range_margin=2.0, min_width=1e-6, error_feedback=error_feedback,
      loss_fn=model_lib.cross_entropy_loss(apply), client_optimizer=optax.sgd(0.1),
      server_optimizer=optax.sgd(1.0), **HYPER))


def test_float32_compressor_round_is_the_fedavg_round():
  apply, params, lay, shards = setup()
  key = jax.random.key(7)
  state, _ = kquant_round(apply, lay, quantize.float32(lay))(
      rounds.init(params, optax.sgd(1.0), lay, 4, 0.1), *shards, key)
  # round_fn splits the key into (train, encode); FedAvg gets the same train key.
  train_key = jax.random.split(key)[0]
  expected, _ = fedavg.round_fn(
      fedavg.init(params, optax.sgd(1.0)), *shards, train_key,
      loss_fn=model_lib.cross_entropy_loss(apply), client_optimizer=optax.sgd(0.1),
      server_optimizer=optax.sgd(1.0), **HYPER)
  chex.assert_trees_all_close(state.server.params, expected.params, atol=1e-6)


def test_a_client_with_nan_is_dropped_and_the_rest_renormalized():
  apply, params, lay, (x, y, count) = setup()
  x = x.at[1, :].set(jnp.nan)  # client 1's update becomes NaN
  key = jax.random.key(3)
  state, metrics = kquant_round(apply, lay, quantize.float32(lay))(
      rounds.init(params, optax.sgd(1.0), lay, 4, 0.1), x, y, count, key)
  assert int(metrics["dropped_clients"]) == 1
  assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(state.server.params))
  deltas, _ = fedavg.client_deltas(params, x, y, count, jax.random.split(key)[0],
                                   loss_fn=model_lib.cross_entropy_loss(apply),
                                   client_optimizer=optax.sgd(0.1), **HYPER)
  keep = np.array([0, 2, 3])
  weights = np.asarray(count)[keep] / np.asarray(count)[keep].sum()
  expected = jax.tree.map(lambda p, d: p + np.tensordot(weights, np.asarray(d)[keep], axes=1),
                          params, deltas)
  chex.assert_trees_all_close(state.server.params, expected, atol=1e-6)


def test_all_clients_dropped_keeps_the_model():
  apply, params, lay, (x, y, count) = setup()
  state, metrics = kquant_round(apply, lay, quantize.kquant(lay, k=16))(
      rounds.init(params, optax.sgd(1.0), lay, 4, 0.1), x * jnp.nan, y, count, jax.random.key(0))
  assert int(metrics["dropped_clients"]) == 4
  chex.assert_trees_all_equal(state.server.params, params)


def test_error_feedback_keeps_what_the_message_lost():
  apply, params, lay, shards = setup()
  compressor = quantize.kquant(lay, k=2, stochastic=False)
  init = rounds.init(params, optax.sgd(1.0), lay, 4, 0.05)
  key = jax.random.key(5)
  state, _ = kquant_round(apply, lay, compressor, error_feedback=True, policy="fixed")(
      init, *shards, key)
  deltas, _ = fedavg.client_deltas(params, *shards, jax.random.split(key)[0],
                                   loss_fn=model_lib.cross_entropy_loss(apply),
                                   client_optimizer=optax.sgd(0.1), **HYPER)
  updates = jax.vmap(buckets.to_buckets, (0, None))(deltas, lay)
  decoded = jax.vmap(lambda v: compressor.decode(compressor.encode(v, init.spec, key),
                                                 init.spec))(updates)
  np.testing.assert_allclose(state.clients.error, updates - decoded, atol=1e-6)
  assert float(jnp.abs(state.clients.error).max()) > 0
  without, _ = kquant_round(apply, lay, compressor, policy="fixed")(init, *shards, key)
  np.testing.assert_array_equal(without.clients.error, 0.0)


def test_kquant_round_with_pallas_matches_reference():
  # Bit-exact at the kernel boundary (tests/kernels); inside one jitted round XLA may fuse the
  # reference's decode arithmetic differently, so here the check is to float rounding.
  apply, params, lay, shards = setup()
  init = rounds.init(params, optax.sgd(1.0), lay, 4, 0.1)
  outs = [kquant_round(apply, lay, quantize.kquant(lay, k=16, impl=impl))(
      init, *shards, jax.random.key(1))[0] for impl in ("pallas", "reference")]
  chex.assert_trees_all_close(outs[0].server.params, outs[1].server.params, atol=1e-6)
