"""FedAvg of a small flax MLP across simulated clients, against centralized training.

The clients are vmapped inside one jitted round (`research.fedavg.rounds.round_fn`); the
centralized baseline trains the same model with the same optimizer on the union of the clients'
data for `centralized_steps` steps. Headline: FedAvg test accuracy vs centralized test accuracy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from research.common import config as config_lib
from research.common import data as data_lib
from research.common import records
from research.fedavg import model as model_lib
from research.fedavg import rounds


def config_schema() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "dataset": "digits",            # digits | synthetic
      "num_clients": 10,
      "partition": "iid",             # iid | dirichlet
      "dirichlet_alpha": 1.0,         # used when partition = dirichlet
      "hidden": (128,),               # MLP hidden layer widths
      "rounds": 40,
      "local_steps": 10,              # client optimizer steps per round
      "batch_size": 32,
      "client_learning_rate": 0.05,   # client SGD with momentum 0.9
      "server_learning_rate": 1.0,    # server SGD on the averaged delta (1.0 = FedAvg)
      "centralized_steps": 2000,      # baseline: SGD steps on the pooled training data
  })


PAPER_PAGE = "papers/fedavg.md"


def validate_config(config) -> None:
  config_lib.check_choice(config, "dataset", sorted(data_lib.CLASSIFICATION_SETS))
  config_lib.check_choice(config, "partition", data_lib.PARTITIONS)
  config_lib.check_positive(config, "num_clients", "rounds", "local_steps", "batch_size",
                            "centralized_steps", "dirichlet_alpha", "client_learning_rate",
                            "server_learning_rate")
  if any(h < 1 for h in config.hidden):
    raise config_lib.ConfigError(f"config key 'hidden': got {config.hidden!r}, expected positive "
                                 "layer widths")


def run(config, run):
  split, shards = data_lib.federated_split(config.dataset, config.num_clients, config.partition,
                                           config.dirichlet_alpha, config.seed)
  sizes = (split.x_train.shape[1], *config.hidden, split.num_classes)
  apply, params = model_lib.mlp(sizes, config.seed)
  loss_fn = model_lib.cross_entropy_loss(apply)
  x_test, y_test = jnp.asarray(split.x_test), jnp.asarray(split.y_test)
  evaluate = jax.jit(lambda p: model_lib.accuracy(apply, p, x_test, y_test))

  # Centralized baseline: same model, initial params and client optimizer on pooled data.
  key_central, key_rounds = jax.random.split(jax.random.key(config.seed))
  central_train = jax.jit(functools.partial(
      rounds.local_train, loss_fn=loss_fn, optimizer=rounds.client_optimizer(config.client_learning_rate),
      steps=config.centralized_steps, batch_size=config.batch_size))
  central_params, _ = central_train(params, jnp.asarray(split.x_train),
                                    jnp.asarray(split.y_train),
                                    jnp.asarray(len(split.y_train), jnp.int32), key_central)
  central_accuracy = float(evaluate(central_params))

  server_optimizer = optax.sgd(config.server_learning_rate)
  round_step = jax.jit(functools.partial(
      rounds.round_fn, loss_fn=loss_fn,
      client_optimizer=rounds.client_optimizer(config.client_learning_rate),
      server_optimizer=server_optimizer, local_steps=config.local_steps,
      batch_size=config.batch_size))
  state = rounds.init(params, server_optimizer)
  x, y, count = map(jnp.asarray, shards)
  accuracies = []
  for r in run.progress(range(config.rounds), description="fedavg round"):
    state, metrics = round_step(state, x, y, count, jax.random.fold_in(key_rounds, r))
    accuracies.append(float(evaluate(state.params)))
    run.log(r + 1, test_accuracy=accuracies[-1], client_loss=float(metrics["client_loss"]),
            update_norm=float(metrics["update_norm"]))

  _plot(run, accuracies, central_accuracy, config)
  return {
      "headline": {"metric": "FedAvg test accuracy", "value": accuracies[-1],
                   "baseline": "centralized", "baseline_value": central_accuracy,
                   "note": (f"{config.dataset}, {config.num_clients} {config.partition} clients, "
                            f"{config.rounds} rounds x {config.local_steps} local steps; "
                            f"centralized: {config.centralized_steps} steps on the pooled "
                            "data")},
      "final_test_accuracy": accuracies[-1],
      "best_test_accuracy": max(accuracies),
      "centralized_test_accuracy": central_accuracy,
      "accuracy_gap_points": 100 * (central_accuracy - accuracies[-1]),
      "num_clients": config.num_clients,
      "client_sizes": np.asarray(shards.count).tolist(),
      "param_count": model_lib.param_count(params),
  }


def paper_tables(result: dict) -> dict[str, str]:
  """The page's table from a kept result (its config and summary)."""
  config, summary = result["config"], result["summary"]
  setting = (f"{config['num_clients']} clients ({config['partition']}), {config['rounds']} "
             f"rounds x {config['local_steps']} local steps (batch {config['batch_size']}, SGD "
             f"{config['client_learning_rate']:g} momentum {rounds.CLIENT_MOMENTUM:g})")
  return {"results": records.write_markdown_table(
      ["model", "setting", "test accuracy"],
      [["FedAvg", setting, f"{summary['final_test_accuracy']:.4f}"],
       ["centralized", f"same model and optimizer, {config['centralized_steps']} steps on the "
        "pooled data", f"{summary['centralized_test_accuracy']:.4f}"],
       ["gap (points)", "", f"{summary['accuracy_gap_points']:.2f}"]])}


def _plot(run, accuracies, central_accuracy, config) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(np.arange(1, len(accuracies) + 1), accuracies, marker=".",
          label=f"FedAvg, {config.num_clients} clients ({config.partition})")
  ax.axhline(central_accuracy, color="k", linestyle="--", label="centralized")
  ax.set_xlabel("round")
  ax.set_ylabel("test accuracy")
  ax.set_title(f"FedAvg on {config.dataset}")
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right")
  run.save_figure("accuracy.png", fig)
  plt.close(fig)
