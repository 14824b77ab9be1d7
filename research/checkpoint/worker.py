"""A worker's training state and its pure step functions (synchronous data parallelism).

Every worker holds the same model and optimizer state (replicas) and its own shard of the
training set. One step: each worker computes the gradient of its minibatch; the gradients are
summed in worker order (a fixed order, so the float sum is the same whoever failed) and divided
by the number of workers; every worker applies that mean with optax. Everything a restarted
worker needs to continue bit for bit is in `WorkerState`: parameters, optimizer state, the step,
the data-iterator position in its shard and the RNG key (dropout), so a restore never depends on
which process computed what before.

The minibatch order is a function of (seed, worker, epoch) only: `minibatch` reads the position,
returns the rows and the next position.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.common import data as data_lib
from research.fedavg import model as model_lib


class WorkerState(NamedTuple):
  params: Any            # MLP params (nnx.State of float32 arrays), equal on every worker
  opt_state: Any         # optax state of `params`
  step: jax.Array        # shape=(), int32: steps completed
  data_position: jax.Array  # shape=(2,), int32: (epoch, offset) into this worker's shard order
  rng: jax.Array         # shape=(2,), uint32: raw PRNG key data (dropout)


@dataclasses.dataclass(frozen=True)
class Problem:
  """What every worker of a job agrees on: model, optimizer, data, batch, seed."""
  apply: Callable
  init_params: Any
  optimizer: optax.GradientTransformation
  x: np.ndarray          # all training rows; a worker reads only its shard
  y: np.ndarray
  shards: tuple[np.ndarray, ...]  # row indices per worker
  batch_size: int
  dropout: float
  seed: int

  @property
  def num_workers(self) -> int:
    return len(self.shards)


def make_problem(num_workers: int, hidden: tuple[int, ...] = (64,), batch_size: int = 32,
                 learning_rate: float = 0.05, dropout: float = 0.1, seed: int = 0,
                 data: tuple[np.ndarray, np.ndarray] | None = None) -> Problem:
  """The digits classifier the job trains: an MLP, Adam, an IID shard per worker.

  `data`: the training rows (x, y) of `data_lib.digits(seed=seed)`, when the caller has them
  (a process that gets them from its parent skips scikit-learn's import); None loads them.
  """
  if num_workers < 1:
    raise ValueError(f"num_workers={num_workers}; expected >= 1")
  if data is None:
    split = data_lib.digits(seed=seed)
    data = (split.x_train, split.y_train)
  x, y = data
  num_classes = int(y.max()) + 1  # the stratified training split holds every class
  apply, params = model_lib.mlp((x.shape[1], *hidden, num_classes), seed)
  shards = tuple(data_lib.iid_partition(len(x), num_workers, seed))
  if min(len(s) for s in shards) < batch_size:
    raise ValueError(f"batch_size={batch_size} exceeds the smallest shard "
                     f"({min(len(s) for s in shards)} rows)")
  return Problem(apply, params, optax.adam(learning_rate), x, y, shards, batch_size, dropout,
                 seed)


def init_state(problem: Problem, worker: int) -> WorkerState:
  key = jax.random.fold_in(jax.random.key(problem.seed), worker)
  return WorkerState(problem.init_params, problem.optimizer.init(problem.init_params),
                     jnp.zeros((), jnp.int32), jnp.zeros((2,), jnp.int32),
                     jax.random.key_data(key))


def shard_order(problem: Problem, worker: int, epoch: int) -> np.ndarray:
  """The worker's rows in the order of `epoch`: a permutation drawn from (seed, worker, epoch)."""
  rng = np.random.default_rng((problem.seed, worker, epoch))
  return problem.shards[worker][rng.permutation(len(problem.shards[worker]))]


def minibatch(problem: Problem, worker: int, position) -> tuple[np.ndarray, np.ndarray]:
  """Rows of the next minibatch at `position` (epoch, offset) and the position after it."""
  epoch, offset = (int(v) for v in np.asarray(position))
  if offset + problem.batch_size > len(problem.shards[worker]):  # drop the ragged tail
    epoch, offset = epoch + 1, 0
  rows = shard_order(problem, worker, epoch)[offset:offset + problem.batch_size]
  return rows, np.array([epoch, offset + problem.batch_size], np.int32)


def loss_with_dropout(problem: Problem) -> Callable:
  """Cross-entropy with inverted dropout on the input features (the RNG the state carries)."""
  def loss_fn(params, x, y, key):
    keep = jax.random.bernoulli(key, 1.0 - problem.dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - problem.dropout), 0.0)
    return optax.softmax_cross_entropy_with_integer_labels(problem.apply(params, x), y).mean()
  return loss_fn


def make_step_fns(problem: Problem):
  """(gradient, update): the two halves of a step, jitted.

  gradient(state, x, y) -> (grads, loss): this worker's minibatch gradient.
  update(state, mean_grads, next_position) -> state: the optax step with the all-worker mean.
  """
  loss_fn = loss_with_dropout(problem)

  @jax.jit
  def gradient(state: WorkerState, x, y):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    loss, grads = jax.value_and_grad(loss_fn)(state.params, x, y, key)
    return grads, loss

  @jax.jit
  def update(state: WorkerState, mean_grads, next_position) -> WorkerState:
    updates, opt_state = problem.optimizer.update(mean_grads, state.opt_state, state.params)
    return WorkerState(optax.apply_updates(state.params, updates), opt_state, state.step + 1,
                       next_position, state.rng)

  return gradient, update


def batch_for(problem: Problem, worker: int, state: WorkerState):
  """The worker's (x, y) for its next step and the position after it."""
  rows, next_position = minibatch(problem, worker, state.data_position)
  return problem.x[rows], problem.y[rows], next_position


def sum_in_order(trees: list) -> Any:
  """Sums gradient pytrees left to right (float addition order fixed by the caller's order)."""
  total = trees[0]
  for tree in trees[1:]:
    total = jax.tree.map(np.add, total, tree)
  return total


def mean_of_sum(total, num_workers: int):
  return jax.tree.map(lambda g: (np.asarray(g) / np.float32(num_workers)).astype(g.dtype), total)


def reference_run(problem: Problem, steps: int) -> WorkerState:
  """The fault-free run in one process: what every recovered job must equal bit for bit."""
  gradient, update = make_step_fns(problem)
  states = [init_state(problem, w) for w in range(problem.num_workers)]
  for _ in range(steps):
    grads, batches = [], []
    for w, state in enumerate(states):
      x, y, next_position = batch_for(problem, w, state)
      g, _ = gradient(state, x, y)
      grads.append(jax.tree.map(np.asarray, g))
      batches.append(next_position)
    mean = mean_of_sum(sum_in_order(grads), problem.num_workers)
    states = [update(s, mean, p) for s, p in zip(states, batches)]
  return states[0]
