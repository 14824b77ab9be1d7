import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import parameterized

from research.common import data as data_lib
from research.fedavg import model as model_lib
from research.fedavg import rounds


def setup(num_clients=4, seed=0):
  split = data_lib.digits()
  parts = data_lib.iid_partition(300, num_clients, seed)
  shards = data_lib.stack_clients(split.x_train[:300], split.y_train[:300], parts)
  apply, params = model_lib.mlp((64, 16, 10), seed)
  return apply, params, shards


HYPER = dict(local_steps=3, batch_size=8)


class RoundTest(chex.TestCase):

  def test_mlp_param_count_is_pinned(self):
    _, params = model_lib.mlp((64, 128, 10), 0)
    self.assertEqual(model_lib.param_count(params), 64 * 128 + 128 + 128 * 10 + 10)

  @chex.variants(with_jit=True, without_jit=True)
  def test_one_client_round_is_local_training(self):
    apply, params, shards = setup(num_clients=1)
    loss_fn = model_lib.cross_entropy_loss(apply)
    client_opt, server_opt = optax.sgd(0.1), optax.sgd(1.0)
    key = jax.random.key(3)
    round_fn = self.variant(functools.partial(
        rounds.round_fn, loss_fn=loss_fn, client_optimizer=client_opt,
        server_optimizer=server_opt, **HYPER))
    state, metrics = round_fn(rounds.init(params, server_opt), *map(jnp.asarray, shards), key)
    trained, loss = rounds.local_train(
        params, jnp.asarray(shards.x[0]), jnp.asarray(shards.y[0]), jnp.asarray(shards.count[0]),
        jax.random.split(key, 1)[0], loss_fn=loss_fn, optimizer=client_opt,
        steps=HYPER["local_steps"], batch_size=HYPER["batch_size"])
    chex.assert_trees_all_close(state.params, trained, atol=1e-6)
    np.testing.assert_allclose(metrics["client_loss"], loss, rtol=1e-6)
    self.assertEqual(int(state.round), 1)

  @chex.variants(with_jit=True, without_jit=True)
  def test_round_is_the_size_weighted_mean_of_client_updates(self):
    apply, params, shards = setup(num_clients=3)
    shards = shards._replace(count=np.array([100, 60, 20], np.int32))
    loss_fn = model_lib.cross_entropy_loss(apply)
    client_opt, server_opt = optax.sgd(0.1, momentum=0.9), optax.sgd(1.0)
    key = jax.random.key(0)
    round_fn = self.variant(functools.partial(
        rounds.round_fn, loss_fn=loss_fn, client_optimizer=client_opt,
        server_optimizer=server_opt, **HYPER))
    state, _ = round_fn(rounds.init(params, server_opt), *map(jnp.asarray, shards), key)
    # The same clients one at a time, averaged by hand with numpy.
    deltas = []
    for k, client_key in enumerate(jax.random.split(key, 3)):
      trained, _ = rounds.local_train(
          params, jnp.asarray(shards.x[k]), jnp.asarray(shards.y[k]),
          jnp.asarray(shards.count[k]), client_key, loss_fn=loss_fn, optimizer=client_opt,
          steps=HYPER["local_steps"], batch_size=HYPER["batch_size"])
      deltas.append(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), trained, params))
    weights = np.array([100, 60, 20]) / 180
    expected = jax.tree.map(lambda p, *d: np.asarray(p) + sum(w * x for w, x in zip(weights, d)),
                            params, *deltas)
    chex.assert_trees_all_close(state.params, expected, atol=1e-6)

  def test_zero_server_learning_rate_keeps_the_model(self):
    apply, params, shards = setup()
    server_opt = optax.sgd(0.0)
    state, metrics = rounds.round_fn(
        rounds.init(params, server_opt), *map(jnp.asarray, shards), jax.random.key(0),
        loss_fn=model_lib.cross_entropy_loss(apply), client_optimizer=optax.sgd(0.1),
        server_optimizer=server_opt, **HYPER)
    chex.assert_trees_all_equal(state.params, params)
    self.assertGreater(float(metrics["update_norm"]), 0.0)

  def test_local_train_only_samples_valid_examples(self):
    # Padding rows carry a label the model would otherwise learn; count=2 must ignore them.
    x = jnp.concatenate([jnp.ones((2, 4)), jnp.ones((6, 4))])
    y = jnp.array([0, 0, 1, 1, 1, 1, 1, 1])
    apply, params = model_lib.mlp((4, 2), 0)
    trained, _ = rounds.local_train(params, x, y, jnp.asarray(2), jax.random.key(0),
                                    loss_fn=model_lib.cross_entropy_loss(apply),
                                    optimizer=optax.sgd(0.5), steps=20, batch_size=4)
    self.assertEqual(int(jnp.argmax(apply(trained, jnp.ones((1, 4))))), 0)

  @parameterized.parameters(1, 5)
  def test_weighted_mean_matches_numpy(self, num_clients):
    tree = {"a": jnp.arange(num_clients * 6.0).reshape(num_clients, 2, 3)}
    weights = jnp.arange(1.0, num_clients + 1) / jnp.sum(jnp.arange(1.0, num_clients + 1))
    out = rounds.weighted_mean(tree, weights)
    np.testing.assert_allclose(out["a"], np.average(tree["a"], axis=0, weights=weights),
                               rtol=1e-6)
