"""The compressed round: float32 reduces to FedAvg; NaN clients are dropped; error feedback."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from research.common import data as data_lib
from research.fedavg import model as model_lib
from research.fedavg import rounds as fedavg
from research.kquant import buckets, quantize, rounds

HYPER = dict(local_steps=3, batch_size=8)


@functools.lru_cache(maxsize=None)
def setup(num_clients=4):
  split = data_lib.digits()
  parts = data_lib.iid_partition(200, num_clients, 0)
  shards = data_lib.stack_clients(split.x_train[:200], split.y_train[:200], parts)
  apply, params = model_lib.mlp((64, 16, 10), 0)
  lay = buckets.bucket_layout(params, 64)
  return apply, params, lay, tuple(map(jnp.asarray, shards))


@functools.lru_cache(maxsize=None)
def kquant_round(name="float32", k=16, stochastic=True, impl="reference", error_feedback=False,
                 policy="client_minmax"):
  """The jitted round for one compressor setting, compiled once for every test that uses it."""
  apply, _, lay, _ = setup()
  compressor = quantize.by_name(name, lay, k=k, stochastic=stochastic, impl=impl)
  return compressor, jax.jit(functools.partial(
      rounds.round_fn, compressor=compressor, layout=lay, range_policy=policy, per_tensor=False,
      range_margin=2.0, min_width=1e-6, error_feedback=error_feedback,
      loss_fn=model_lib.cross_entropy_loss(apply), client_optimizer=optax.sgd(0.1),
      server_optimizer=optax.sgd(1.0), **HYPER))


@functools.lru_cache(maxsize=None)
def client_deltas():
  """FedAvg's local training of every client (what the tests expect rounds from), jitted once."""
  apply = setup()[0]
  return jax.jit(functools.partial(fedavg.client_deltas,
                                   loss_fn=model_lib.cross_entropy_loss(apply),
                                   client_optimizer=optax.sgd(0.1), **HYPER))


def test_float32_compressor_round_is_the_fedavg_round():
  apply, params, lay, shards = setup()
  key = jax.random.key(7)
  state, _ = kquant_round("float32")[1](rounds.init(params, optax.sgd(1.0), lay, 4, 0.1), *shards,
                                        key)
  # FedAvg (tests/fedavg/test_rounds.py pins fedavg.round_fn to this): the params plus the
  # size-weighted mean of the client deltas, from the same train key (round_fn splits its key
  # into (train, encode)).
  deltas, _ = client_deltas()(params, *shards, jax.random.split(key)[0])
  count = np.asarray(shards[2])
  expected = jax.tree.map(lambda p, d: p + np.tensordot(count / count.sum(), d, axes=1), params,
                          deltas)
  chex.assert_trees_all_close(state.server.params, expected, atol=1e-6)


def test_a_client_with_nan_is_dropped_and_the_rest_renormalized():
  _, params, lay, (x, y, count) = setup()
  x = x.at[1, :].set(jnp.nan)  # client 1's update becomes NaN
  key = jax.random.key(3)
  state, metrics = kquant_round("float32")[1](
      rounds.init(params, optax.sgd(1.0), lay, 4, 0.1), x, y, count, key)
  assert int(metrics["dropped_clients"]) == 1
  assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(state.server.params))
  deltas, _ = client_deltas()(params, x, y, count, jax.random.split(key)[0])
  keep = np.array([0, 2, 3])
  weights = np.asarray(count)[keep] / np.asarray(count)[keep].sum()
  expected = jax.tree.map(lambda p, d: p + np.tensordot(weights, np.asarray(d)[keep], axes=1),
                          params, deltas)
  chex.assert_trees_all_close(state.server.params, expected, atol=1e-6)


def test_all_clients_dropped_keeps_the_model():
  _, params, lay, (x, y, count) = setup()
  state, metrics = kquant_round("kquant")[1](
      rounds.init(params, optax.sgd(1.0), lay, 4, 0.1), x * jnp.nan, y, count, jax.random.key(0))
  assert int(metrics["dropped_clients"]) == 4
  chex.assert_trees_all_equal(state.server.params, params)


def test_error_feedback_keeps_what_the_message_lost():
  _, params, lay, shards = setup()
  compressor, round_step = kquant_round("kquant", k=2, stochastic=False, error_feedback=True,
                                        policy="fixed")
  init = rounds.init(params, optax.sgd(1.0), lay, 4, 0.05)
  key = jax.random.key(5)
  state, _ = round_step(init, *shards, key)
  deltas, _ = client_deltas()(params, *shards, jax.random.split(key)[0])
  # Nearest rounding: the encode key does not matter, the fixed range stays init.spec.
  lost = jax.vmap(lambda v: v - compressor.decode(compressor.encode(v, init.spec, key),
                                                  init.spec))
  updates = jax.vmap(buckets.to_buckets, (0, None))(deltas, lay)
  np.testing.assert_allclose(state.clients.error, lost(updates), atol=1e-6)
  assert float(jnp.abs(state.clients.error).max()) > 0
  # The next round adds the residual to each client's new delta before encoding.
  # (Without error feedback the state stays zero: tests/kquant/test_quantize.py.)
  second_key = jax.random.key(6)
  second, _ = round_step(state, *shards, second_key)
  deltas, _ = client_deltas()(state.server.params, *shards, jax.random.split(second_key)[0])
  carried = jax.vmap(buckets.to_buckets, (0, None))(deltas, lay) + state.clients.error
  np.testing.assert_allclose(second.clients.error, lost(carried), atol=1e-5)


@pytest.mark.slow
def test_kquant_round_with_pallas_matches_reference():
  # Bit-exact at the kernel boundary (tests/kernels); inside one jitted round XLA may fuse the
  # reference's decode arithmetic differently, so here the check is to float rounding. Slow (the
  # interpreted kernels compiled inside a round); by default the compressor's Pallas path is
  # checked by tests/kquant/test_quantize.py::test_kquant_aggregate_is_the_weighted_sum_of_decodes.
  _, params, lay, shards = setup()
  init = rounds.init(params, optax.sgd(1.0), lay, 4, 0.1)
  outs = [kquant_round("kquant", impl=impl)[1](init, *shards, jax.random.key(1))[0]
          for impl in ("pallas", "reference")]
  chex.assert_trees_all_close(outs[0].server.params, outs[1].server.params, atol=1e-6)
