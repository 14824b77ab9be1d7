"""Shared fixtures for the VFL interaction-layer tests: key pairs, one small split network on a
synthetic data set, its jitted functions (compiled once per module), and a deep state comparison.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from research.vfl import he
from research.vfl import model as model_lib
from research.vfl import parties

NUM_SAMPLES = 64
BATCH_SIZE = 8
TEST_FRACTION = 0.125  # 8 test rows: one eval batch


@dataclasses.dataclass(frozen=True)
class World:
  """One network and data set; protocols that differ only in schedule length, codec, masks and
  noise (they share the optimizers object, so one `Jitted` serves all of them)."""
  spec: model_lib.NetworkSpec
  network: model_lib.Network
  init: model_lib.InitialState
  optimizers: model_lib.Optimizers
  ids: tuple
  x_passive: np.ndarray  # (NUM_SAMPLES, 20) float32
  x_active: np.ndarray   # (NUM_SAMPLES, 10) float32
  labels: np.ndarray     # (NUM_SAMPLES,) int
  train_rows: np.ndarray
  test_rows: np.ndarray

  def protocol(self, *, train_batches: int = 1, noise_scale: float = 0.0, mask_bits: int = 128,
               codec: he.FixedPoint = he.FixedPoint()) -> parties.Protocol:
    schedule = parties.schedule(self.train_rows, self.test_rows, epochs=1,
                                batch_size=BATCH_SIZE, seed=0, max_train_batches=train_batches)
    return parties.Protocol(self.spec, self.network, self.optimizers, schedule, codec=codec,
                            mask_bits=mask_bits, noise_scale=noise_scale)

  def states(self, protocol: parties.Protocol, *, key_bits: int | None,
             init: model_lib.InitialState | None = None):
    return parties.initial_states(
        protocol, self.init if init is None else init, passive_ids=self.ids,
        passive_x=self.x_passive, active_ids=self.ids, active_x=self.x_active,
        labels=self.labels, key_bits=key_bits, noise_seed=3)


def make_world() -> World:
  rng = np.random.default_rng(0)
  x = rng.normal(size=(NUM_SAMPLES, 30)).astype(np.float32)
  labels = (x @ rng.normal(size=30) > 0).astype(np.int32)
  spec = model_lib.NetworkSpec(passive_features=20, active_features=10)
  network, init = model_lib.build(spec, 0)
  train_rows, test_rows = parties.split_rows(NUM_SAMPLES, TEST_FRACTION, 0)
  assert len(test_rows) == BATCH_SIZE
  return World(spec, network, init, model_lib.optimizers(0.01, 0.1),
               tuple(f"id{i:03d}" for i in range(NUM_SAMPLES)), x[:, 10:], x[:, :10], labels,
               train_rows, test_rows)


@pytest.fixture(scope="session")
def keypair():
  return he.generate_keypair(1024)


@pytest.fixture(scope="session")
def other_keypair():
  return he.generate_keypair(1024)


@pytest.fixture(scope="module")
def world() -> World:
  return make_world()


@pytest.fixture(scope="module")
def jit(world) -> parties.Jitted:
  """Compiled once per module: every protocol of `world` shares its network and optimizers."""
  return world.protocol().jitted()


@pytest.fixture(scope="module")
def quiet_start(world):
  """Encrypted starting states without noise (e_acc = 0), shared by protocols that differ only in
  mask_bits (states are immutable: every run starts from these same objects)."""
  return world.states(world.protocol(noise_scale=0.0), key_bits=1024)


@pytest.fixture(scope="module")
def noisy_start(world):
  """Encrypted starting states with noise_scale 0.1: W_p = W' + e_acc with e_acc != 0."""
  return world.states(world.protocol(noise_scale=0.1), key_bits=1024)


# --- deep equality of party states ----------------------------------------------------------------


def _assert_leaf_same(a, b, where: str) -> None:
  if isinstance(a, (np.ndarray, jax.Array)) or isinstance(b, (np.ndarray, jax.Array)):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, f"{where}: {a.shape}/{a.dtype} vs " \
                                                      f"{b.shape}/{b.dtype}"
    assert np.array_equal(a, b), f"{where}: arrays differ"
  else:
    assert type(a) is type(b) and a == b, f"{where}: {a!r} != {b!r}"


def assert_same(a, b, where: str = "state") -> None:
  """Exact equality of two party states (or any of their fields): dataclasses field by field,
  keys by their numbers, pytrees by structure and leaves (arrays with np.array_equal)."""
  if dataclasses.is_dataclass(a) and not isinstance(a, type):
    assert type(a) is type(b), f"{where}: {type(a)} vs {type(b)}"
    for field in dataclasses.fields(a):
      assert_same(getattr(a, field.name), getattr(b, field.name), f"{where}.{field.name}")
  elif isinstance(a, he.PublicKey):
    assert isinstance(b, he.PublicKey) and a.n == b.n, f"{where}: other public key"
  elif isinstance(a, he.PrivateKey):
    assert isinstance(b, he.PrivateKey) and (a.p, a.q) == (b.p, b.q), f"{where}: other key"
  elif isinstance(a, np.ndarray):
    _assert_leaf_same(a, b, where)
  else:
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b, f"{where}: structure {tree_a} vs {tree_b}"
    for i, (x, y) in enumerate(zip(leaves_a, leaves_b)):
      _assert_leaf_same(x, y, f"{where}[leaf {i}]")


def snapshot(state):
  """A copy of a party state that later changes to `state` cannot reach: arrays copied, pytrees
  rebuilt leaf by leaf (copy.deepcopy does not keep nnx State's Param nodes)."""
  def copy_leaf(leaf):
    return np.array(leaf, copy=True) if isinstance(leaf, (np.ndarray, jax.Array)) else leaf
  copies = {}
  for field in dataclasses.fields(state):
    value = getattr(state, field.name)
    if isinstance(value, np.ndarray):
      copies[field.name] = value.copy()
    elif not isinstance(value, (he.PublicKey, he.PrivateKey)):
      copies[field.name] = jax.tree.map(copy_leaf, value)
  return dataclasses.replace(state, **copies)


@pytest.fixture(scope="session")
def same():
  return assert_same


@pytest.fixture(scope="session")
def refused(same):
  """refused(call, states, error, match): call() raises `error` matching `match`, and every state
  in `states` is exactly as it was before the call."""
  def check(call, states, error, match):
    saved = [snapshot(state) for state in states]
    with pytest.raises(error, match=match):
      call()
    for state, copy in zip(states, saved):
      assert_same(state, copy)
  return check
