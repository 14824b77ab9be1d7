"""The job's training state and its step: synchronous data parallelism over a global mesh.

One multi-controller jax program (`jax.distributed`): every process runs the same code over a
global mesh with one `data` axis across all processes' devices. Each device takes its slice of
the global minibatch; the gradient mean is `psum` over the data axis inside a `shard_map` body
(gloo between CPU processes, NCCL between GPUs), whose reduction order is fixed by the mesh,
not by timing, so a job restarted with the same processes reaches the same bits.

Everything a restarted job needs to continue bit for bit is in `TrainState`: parameters,
optimizer state, the step, the data position and the RNG key (dropout); the minibatch of a step
is a function of (seed, epoch, offset) only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from research.common import data as data_lib
from research.fedavg import model as model_lib

DATA_AXIS = "data"


class TrainState(NamedTuple):
  params: Any               # MLP params (nnx.State of float32 arrays), replicated
  opt_state: Any            # optax state of `params`, replicated
  step: jax.Array           # shape=(), int32: steps completed
  data_position: jax.Array  # shape=(2,), int32: (epoch, offset) into the epoch's row order
  rng: jax.Array            # shape=(2,), uint32: raw PRNG key data (dropout)


@dataclasses.dataclass(frozen=True)
class Problem:
  """What every process of a job agrees on: model, optimizer, data, batch, seed."""
  apply: Callable
  init_params: Any
  optimizer: optax.GradientTransformation
  x: np.ndarray              # all training rows (every process can read every row)
  y: np.ndarray
  batch_per_device: int
  dropout: float
  seed: int
  hidden: tuple[int, ...]
  learning_rate: float


def make_problem(hidden: tuple[int, ...] = (64,), batch_per_device: int = 16,
                 learning_rate: float = 0.05, dropout: float = 0.1, seed: int = 0,
                 data: tuple[np.ndarray, np.ndarray] | None = None,
                 init_params: list[np.ndarray] | None = None) -> Problem:
  """The digits classifier the job trains: an MLP with Adam.

  `data`: the training rows (x, y) of `data_lib.digits(seed=seed)`; `init_params`: the leaves
  of the MLP's initial params for `seed`. A job process gets both from the job's inputs file
  (`write_inputs` / `read_problem`), which spares it scikit-learn's import and the eager
  initialization (seconds on a busy machine); None computes them.
  """
  if batch_per_device < 1:
    raise ValueError(f"batch_per_device={batch_per_device}: expected a positive int")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"dropout={dropout}: expected a float in [0, 1)")
  if data is None:
    split = data_lib.digits(seed=seed)
    data = (split.x_train, split.y_train)
  x, y = (np.asarray(a) for a in data)
  num_classes = int(y.max()) + 1  # the stratified training split holds every class
  sizes = (x.shape[1], *hidden, num_classes)
  if init_params is None:
    apply, params = model_lib.mlp(sizes, seed)
  else:
    graphdef, abstract = nnx.split(
        nnx.eval_shape(lambda: model_lib.MLP(sizes, rngs=nnx.Rngs(seed))), nnx.Param)
    shapes = [(tuple(a.shape), np.dtype(a.dtype)) for a in jax.tree.leaves(abstract)]
    if [(tuple(a.shape), a.dtype) for a in init_params] != shapes:
      raise ValueError(f"init_params: expected leaves {shapes} for an MLP {sizes}")
    params = jax.tree.unflatten(jax.tree.structure(abstract), list(init_params))

    def apply(params, x):
      return nnx.merge(graphdef, params)(x)
  return Problem(apply, params, optax.adam(learning_rate), x, y, batch_per_device, dropout, seed,
                 tuple(hidden), learning_rate)


def write_inputs(problem: Problem, path) -> None:
  """The job's inputs (training rows, initial params) as one .npz, written atomically."""
  from research.common import records  # pylint: disable=import-outside-toplevel
  leaves = {f"param_{i:04d}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(
      problem.init_params))}
  records.atomic_save_npz(path, x=problem.x, y=problem.y, **leaves)


def read_problem(path, hidden, batch_per_device, learning_rate, dropout, seed) -> Problem:
  with np.load(path) as inputs:
    names = sorted(k for k in inputs.files if k.startswith("param_"))
    return make_problem(hidden, batch_per_device, learning_rate, dropout, seed,
                        data=(inputs["x"], inputs["y"]), init_params=[inputs[k] for k in names])


def init_state(problem: Problem) -> TrainState:
  return TrainState(problem.init_params, problem.optimizer.init(problem.init_params),
                    jnp.zeros((), jnp.int32), jnp.zeros((2,), jnp.int32),
                    jax.random.key_data(jax.random.key(problem.seed)))


def abstract_state(problem: Problem, mesh: jax.sharding.Mesh) -> TrainState:
  """The state's shapes, dtypes and shardings (replicated on `mesh`), without computing it."""
  replicated = NamedSharding(mesh, P())
  shapes = jax.eval_shape(lambda: init_state(problem))
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                      shapes)


def fingerprint(problem: Problem, num_devices: int, steps: int) -> str:
  """Names a job: what a snapshot must match to restore into it (config and state shapes)."""
  shapes = jax.eval_shape(lambda: init_state(problem))
  signature = {
      "hidden": list(problem.hidden), "batch_per_device": problem.batch_per_device,
      "learning_rate": problem.learning_rate, "dropout": problem.dropout,
      "seed": problem.seed, "rows": list(problem.x.shape), "devices": num_devices,
      "steps": steps,
      "leaves": [[list(s.shape), str(s.dtype)] for s in jax.tree.leaves(shapes)]}
  return hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:16]


def epoch_order(problem: Problem, epoch: int) -> np.ndarray:
  """All training rows in the order of `epoch`: a permutation drawn from (seed, epoch)."""
  return np.random.default_rng((problem.seed, epoch)).permutation(len(problem.x))


def global_batch_rows(problem: Problem, num_devices: int, position) -> tuple[np.ndarray,
                                                                             np.ndarray]:
  """Rows of the next global minibatch at `position` (epoch, offset) and the position after.

  Device d of the data axis takes rows [d * batch_per_device, (d + 1) * batch_per_device).
  """
  size = problem.batch_per_device * num_devices
  if size > len(problem.x):
    raise ValueError(f"global batch {size} (batch_per_device={problem.batch_per_device} x "
                     f"{num_devices} devices) exceeds the {len(problem.x)} training rows")
  epoch, offset = (int(v) for v in np.asarray(position))
  if offset + size > len(problem.x):  # drop the ragged tail
    epoch, offset = epoch + 1, 0
  rows = epoch_order(problem, epoch)[offset:offset + size]
  return rows, np.array([epoch, offset + size], np.int32)


def data_mesh(devices=None) -> jax.sharding.Mesh:
  """One `data` axis over every device of the job (all processes'), in device-id order."""
  devices = sorted(jax.devices() if devices is None else devices, key=lambda d: d.id)
  return jax.sharding.Mesh(np.array(devices), (DATA_AXIS,),
                           axis_types=(jax.sharding.AxisType.Explicit,))


def process_batch(problem: Problem, mesh: jax.sharding.Mesh, rows: np.ndarray):
  """(x, y) as global arrays sharded over the data axis, from this process's rows only."""
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  per_device = problem.batch_per_device
  devices = list(mesh.devices.flat)
  local = [i for i, d in enumerate(devices) if d.process_index == jax.process_index()]

  def build(values):
    shape = (len(rows),) + values.shape[1:]
    arrays = [jax.device_put(values[rows[i * per_device:(i + 1) * per_device]], devices[i])
              for i in local]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)

  return build(problem.x), build(problem.y)


def make_train_step(problem: Problem, mesh: jax.sharding.Mesh):
  """state, x, y, next_position -> (state, loss): one synchronous data-parallel step, jitted.

  Each device: gradient of its slice with its own dropout key (fold_in(step, device)); the mean
  over the data axis is an explicit psum; every device applies the same optax update, so the
  state stays replicated.
  """
  n = mesh.shape[DATA_AXIS]

  def loss_fn(params, x, y, key):
    keep = jax.random.bernoulli(key, 1.0 - problem.dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - problem.dropout), 0.0)
    return optax.softmax_cross_entropy_with_integer_labels(problem.apply(params, x), y).mean()

  def body(state: TrainState, x, y, next_position):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    key = jax.random.fold_in(key, jax.lax.axis_index(DATA_AXIS))
    loss, grads = jax.value_and_grad(loss_fn)(state.params, x, y, key)
    grads = jax.tree.map(lambda g: jax.lax.psum(g, DATA_AXIS) / n, grads)
    loss = jax.lax.psum(loss, DATA_AXIS) / n
    updates, opt_state = problem.optimizer.update(grads, state.opt_state, state.params)
    return TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1,
                      next_position, state.rng), loss

  step = jax.shard_map(body, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS), P()),
                       out_specs=(P(), P()))
  return jax.jit(step, donate_argnums=0)


def replicate(tree, mesh: jax.sharding.Mesh):
  """Host arrays (equal on every process) as replicated global arrays on `mesh`."""
  sharding = NamedSharding(mesh, P())
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)),
                      tree)


def run_steps(problem: Problem, mesh: jax.sharding.Mesh, state: TrainState, steps: int,
              on_step: Callable[[TrainState], None] | None = None) -> TrainState:
  """Steps from `state` up to `steps` completed, on this process's share of every batch."""
  train_step = make_train_step(problem, mesh)
  n = mesh.shape[DATA_AXIS]
  position = np.asarray(jax.device_get(state.data_position))
  while int(state.step) < steps:
    rows, position = global_batch_rows(problem, n, position)
    x, y = process_batch(problem, mesh, rows)
    state, _ = train_step(state, x, y, replicate(position, mesh))
    if on_step is not None:
      on_step(state)
  return state
