"""Data-parallel least squares over every global device: the multi-process sanity experiment.

The training set is sharded over a 1-D mesh axis `data` spanning all devices of all processes;
each step runs one `jax.shard_map` body where every shard computes its local gradient and
`jax.lax.pmean` averages them over `data`. The same steps run unsharded on one local device as the
reference. Run it as one process or as several (`--processes N`): the final params must agree
with the single-device reference and across process counts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from research.common import config as config_lib
from research.common import mesh as mesh_lib


def config_schema() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "examples_per_device": 64,
      "features": 16,
      "steps": 50,
      "learning_rate": 0.1,
      "noise": 0.1,
  })


def validate_config(config) -> None:
  config_lib.check_positive(config, "examples_per_device", "features", "steps", "learning_rate")


def make_problem(seed: int, num_examples: int, features: int, noise: float):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(num_examples, features)).astype(np.float32)
  w_true = rng.normal(size=(features,)).astype(np.float32)
  y = (x @ w_true + noise * rng.normal(size=num_examples)).astype(np.float32)
  return x, y


def mean_squared_error(w, x, y):
  return 0.5 * jnp.mean((x @ w - y) ** 2)


def sgd_step(w, x, y, learning_rate):
  loss, grad = jax.value_and_grad(mean_squared_error)(w, x, y)
  return w - learning_rate * grad, loss


def sharded_step(mesh, learning_rate):
  """One SGD step on the global mean loss, averaged over the `data` axis with `pmean`.

  The pmean sits inside the differentiated function: with shard_map's varying-axis checks,
  the gradient of the replicated `w` is then the global gradient (the transpose of the implicit
  broadcast of `w` sums the shards' contributions once).
  """
  def body(w, x, y):
    global_loss = lambda w: jax.lax.pmean(mean_squared_error(w, x, y), "data")
    loss, grad = jax.value_and_grad(global_loss)(w)
    return w - learning_rate * grad, loss

  return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                               out_specs=(P(), P())))


def _local(array: jax.Array) -> np.ndarray:
  """A replicated global array's value, read from this process's first shard."""
  return np.asarray(array.addressable_shards[0].data)


def run(config, run):
  num_devices = jax.device_count()
  mesh = mesh_lib.make_mesh((num_devices,), ("data",))
  num_examples = config.examples_per_device * num_devices
  x, y = make_problem(config.seed, num_examples, config.features, config.noise)

  data_sharding = NamedSharding(mesh, P("data"))
  x_global = jax.make_array_from_callback(x.shape, data_sharding, lambda index: x[index])
  y_global = jax.make_array_from_callback(y.shape, data_sharding, lambda index: y[index])
  w = jax.device_put(np.zeros(config.features, np.float32), NamedSharding(mesh, P()))
  step = sharded_step(mesh, config.learning_rate)

  # An exact check of the global reduction: sum of 0..n-1 over the sharded index vector.
  index = jax.make_array_from_callback((num_examples,), data_sharding,
                                       lambda i: np.arange(num_examples, dtype=np.int32)[i])
  global_sum = int(_local(jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(index)))

  device = jax.local_devices()[0]
  w_ref = jax.device_put(np.zeros(config.features, np.float32), device)
  x_ref, y_ref = jax.device_put(x, device), jax.device_put(y, device)
  ref_step = jax.jit(functools.partial(sgd_step, learning_rate=config.learning_rate))

  for s in run.progress(range(config.steps), description="data-parallel step"):
    w, loss = step(w, x_global, y_global)
    w_ref, loss_ref = ref_step(w_ref, x_ref, y_ref)
    run.log(s + 1, loss=float(_local(loss)), reference_loss=float(loss_ref))

  w_final, w_ref_final = _local(w), np.asarray(w_ref)
  return {
      "headline": {"metric": f"loss, data-parallel on {num_devices} devices",
                   "value": float(_local(loss)), "baseline": "single device",
                   "baseline_value": float(loss_ref),
                   "note": (f"least squares, {config.steps} SGD steps; gradient mean by "
                            f"jax.lax.pmean in shard_map over {jax.process_count()} process(es), "
                            f"{num_devices} devices")},
      "final_params": w_final.tolist(),
      "reference_params": w_ref_final.tolist(),
      "max_abs_param_diff": float(np.max(np.abs(w_final - w_ref_final))),
      "global_index_sum": global_sum,
      "expected_index_sum": num_examples * (num_examples - 1) // 2,
      "mesh_devices": num_devices,
      "steps_run": config.steps,
  }
