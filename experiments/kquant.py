"""K-quant compressed FedAvg against float32 FedAvg and QSGD / TernGrad / sign baselines.

Every method trains the same initial model on the same client shards for `rounds` rounds;
per round it logs test accuracy and cumulative uplink bits. The summary holds, per method, final
accuracy, uplink bits per round (all clients), compression vs float32 and rounds to
`target_accuracy`; the plots are accuracy vs cumulative uplink bits and accuracy vs round.

Method names: `float32`, `kquant:K`, `kquant:schedule` (K from `k_schedule`), `qsgd:S`,
`terngrad`, `sign`; a `+ef` suffix adds error feedback (e.g. `kquant:4+ef`).
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
from research.kquant import buckets as buckets_lib
from research.kquant import coordinator
from research.kquant import quantize
from research.kquant import rounds



def config_schema() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      # Data and clients.
      "dataset": "digits",             # digits | synthetic
      "num_clients": 100,
      "partition": "dirichlet",        # iid | dirichlet
      "dirichlet_alpha": 0.1,
      # Model and local training (as the FedAvg experiment).
      "hidden": (128,),
      "rounds": 60,
      "local_steps": 10,
      "batch_size": 32,
      "client_learning_rate": 0.05,
      "server_learning_rate": 1.0,
      # Compression.
      "methods": ("float32", "kquant:16", "kquant:4+ef"),
      "headline_method": "kquant:16",
      "bucket_size": 256,
      "range_policy": "client_minmax",  # fixed | last_round | client_minmax
      "per_tensor_range": False,
      "fixed_radius": 0.05,             # fixed policy, and last_round's first round
      "range_margin": 2.0,              # last_round: radius = margin * max|last aggregate|
      "stochastic": True,               # stochastic (unbiased) or nearest rounding
      "k_schedule": (),                 # ((round, K), ...) for kquant:schedule
      "impl": "auto",                   # auto (pallas on GPU, reference on CPU) | pallas | reference
      "target_accuracy": 0.9,
  })


def parse_method(method: str) -> tuple[str, int | None, bool]:
  """'kquant:4+ef' -> ('kquant', 4, True); 'kquant:schedule' -> ('kquant', None, False)."""
  body, error_feedback = (method[:-3], True) if method.endswith("+ef") else (method, False)
  name, _, arg = body.partition(":")
  known = {"float32": False, "kquant": True, "qsgd": True, "terngrad": False, "sign": False}
  if name not in known or bool(arg) != known[name]:
    raise config_lib.ConfigError(
        f"config key 'methods': got {method!r}, expected float32, kquant:K, kquant:schedule, "
        "qsgd:S, terngrad or sign, each optionally with +ef")
  if arg == "schedule" and name == "kquant":
    return name, None, error_feedback
  if arg:
    try:
      return name, int(arg), error_feedback
    except ValueError:
      raise config_lib.ConfigError(f"config key 'methods': {method!r} needs an int after "
                                   "':'") from None
  return name, None, error_feedback


def validate_config(config) -> None:
  config_lib.check_choice(config, "dataset", sorted(data_lib.CLASSIFICATION_SETS))
  config_lib.check_choice(config, "partition", data_lib.PARTITIONS)
  config_lib.check_choice(config, "range_policy", coordinator.RANGE_POLICIES)
  config_lib.check_choice(config, "impl", ("auto", "pallas", "reference"))
  config_lib.check_positive(config, "num_clients", "rounds", "local_steps", "batch_size",
                            "bucket_size", "fixed_radius", "range_margin", "dirichlet_alpha")
  if not config.methods:
    raise config_lib.ConfigError("config key 'methods': got (), expected at least one method")
  for method in config.methods:
    name, k, _ = parse_method(method)
    if name == "kquant" and k is None and not config.k_schedule:
      raise config_lib.ConfigError(f"config key 'k_schedule': method {method!r} needs a "
                                   "non-empty ((round, K), ...) schedule")
    if name == "kquant" and k is not None and not 2 <= k <= 256:
      raise config_lib.ConfigError(f"config key 'methods': {method!r}: expected 2 <= K <= 256")
  if config.headline_method not in config.methods:
    raise config_lib.ConfigError(f"config key 'headline_method': got "
                                 f"{config.headline_method!r}, expected one of {config.methods}")


def _impl(config) -> str:
  if config.impl != "auto":
    return config.impl
  return "reference" if jax.default_backend() == "cpu" else "pallas"


def run(config, run):
  split, shards = data_lib.federated_split(config.dataset, config.num_clients, config.partition,
                                           config.dirichlet_alpha, config.seed)
  x, y, count = map(jnp.asarray, shards)
  apply, params = model_lib.mlp((split.x_train.shape[1], *config.hidden, split.num_classes),
                                config.seed)
  layout = buckets_lib.bucket_layout(params, config.bucket_size)
  x_test, y_test = jnp.asarray(split.x_test), jnp.asarray(split.y_test)
  evaluate = jax.jit(lambda p: model_lib.accuracy(apply, p, x_test, y_test))
  server_optimizer = optax.sgd(config.server_learning_rate)
  common = dict(layout=layout, range_policy=config.range_policy,
                per_tensor=config.per_tensor_range, range_margin=config.range_margin,
                min_width=1e-6, loss_fn=model_lib.cross_entropy_loss(apply),
                client_optimizer=optax.sgd(config.client_learning_rate, momentum=0.9),
                server_optimizer=server_optimizer, local_steps=config.local_steps,
                batch_size=config.batch_size)
  range_bits = coordinator.range_message_bits(layout, config.per_tensor_range)
  minmax_bits = 64 * layout.num_rows if config.range_policy == "client_minmax" else 0

  results, step = {}, 0
  for method in config.methods:
    name, k, error_feedback = parse_method(method)
    state = rounds.init(params, server_optimizer, layout, config.num_clients,
                        config.fixed_radius)
    round_fns = {}
    accuracies, cumulative_bits, bits = [], [], 0
    key = jax.random.key(config.seed)  # every method sees the same client sampling keys
    for r in run.progress(range(config.rounds), description=method):
      round_k = k if name != "kquant" or k is not None else coordinator.k_for_round(
          r, 0, config.k_schedule)
      if round_k not in round_fns:
        # round_k is K for kquant and the level count for qsgd (both required by parse_method).
        compressor = quantize.by_name(name, layout, k=round_k or 16, qsgd_levels=round_k or 4,
                                      stochastic=config.stochastic, impl=_impl(config))
        round_fns[round_k] = (compressor, jax.jit(functools.partial(
            rounds.round_fn, compressor=compressor, error_feedback=error_feedback, **common)))
      compressor, round_step = round_fns[round_k]
      state, metrics = round_step(state, x, y, count, jax.random.fold_in(key, r))
      uplink = config.num_clients * (compressor.uplink_bits +
                                     (minmax_bits if compressor.uses_range else 0))
      bits += uplink
      accuracies.append(float(evaluate(state.server.params)))
      cumulative_bits.append(bits)
      step += 1
      run.log(step, method=method, round=r + 1, test_accuracy=accuracies[-1],
              uplink_bits=uplink, cumulative_uplink_bits=bits,
              downlink_range_bits=range_bits if compressor.uses_range else 0,
              client_loss=float(metrics["client_loss"]),
              relative_error=float(metrics["relative_error"]),
              dropped_clients=int(metrics["dropped_clients"]))
    reached = [i for i, a in enumerate(accuracies) if a >= config.target_accuracy]
    results[method] = {
        "final_accuracy": accuracies[-1],
        "best_accuracy": max(accuracies),
        "uplink_bits_per_round": cumulative_bits[-1] / config.rounds,
        "rounds_to_target": reached[0] + 1 if reached else None,
        "bits_to_target": cumulative_bits[reached[0]] if reached else None,
        "accuracy_curve": accuracies,
        "cumulative_bits": cumulative_bits,
    }
  baseline = results.get("float32")
  for result in results.values():
    if baseline:
      result["compression_vs_float32"] = (baseline["uplink_bits_per_round"] /
                                          result["uplink_bits_per_round"])
      result["accuracy_gap_points"] = 100 * (baseline["final_accuracy"] -
                                             result["final_accuracy"])
  _plot(run, results, config)
  methods = {m: {k: v for k, v in r.items() if k not in ("accuracy_curve", "cumulative_bits")}
             for m, r in results.items()}
  run.save_text("table.md", results_table(methods, config.target_accuracy))
  headline = results[config.headline_method]
  return {
      "headline": {"metric": f"{config.headline_method} test accuracy",
                   "value": headline["final_accuracy"],
                   "baseline": "float32 FedAvg" if baseline else config.methods[0],
                   "baseline_value": (baseline or results[config.methods[0]])["final_accuracy"]},
      "methods": methods,
      "num_params": layout.num_params,
      "client_sizes": np.asarray(count).tolist(),
      "impl": _impl(config),
  }


def results_table(methods: dict, target_accuracy: float) -> str:
  """The per-method table of the paper page, from a summary's "methods" entry."""
  def fmt(value, spec):
    return "-" if value is None else format(value, spec)

  return records.write_markdown_table(
      ["method", "final accuracy", "gap to float32 (points)", "uplink bits / round",
       "compression vs float32", f"rounds to {target_accuracy:g}"],
      [[m, f"{r['final_accuracy']:.4f}", fmt(r.get("accuracy_gap_points"), "+.2f"),
        f"{r['uplink_bits_per_round']:,.0f}", fmt(r.get("compression_vs_float32"), ".1f") + "x",
        fmt(r["rounds_to_target"], "d")] for m, r in methods.items()])


def _plot(run, results, config) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, (by_bits, by_round) = plt.subplots(1, 2, figsize=(12, 4.5))
  colors = plt.get_cmap("tab20").colors
  for i, (method, result) in enumerate(results.items()):
    style = dict(label=method, color=colors[i % len(colors)],
                 linestyle="--" if method.endswith("+ef") else "-")
    by_bits.plot(result["cumulative_bits"], result["accuracy_curve"], **style)
    by_round.plot(np.arange(1, len(result["accuracy_curve"]) + 1), result["accuracy_curve"],
                  **style)
  by_bits.set_xscale("log")
  by_bits.set_xlabel("cumulative uplink bits (all clients)")
  by_round.set_xlabel("round")
  for ax in (by_bits, by_round):
    ax.set_ylabel("test accuracy")
    ax.set_ylim(max(0.0, min(min(r["accuracy_curve"]) for r in results.values())), 1.0)
    ax.grid(alpha=0.3)
  by_round.legend(loc="lower right", fontsize=8)
  partition = (f"Dirichlet alpha={config.dirichlet_alpha}" if config.partition == "dirichlet"
               else "IID")
  fig.suptitle(f"{config.dataset}, {config.num_clients} clients, {partition}")
  run.save_figure("accuracy_vs_bits.png", fig)
  plt.close(fig)


PAPER = "papers/kquant.md"


def paper_block(config: dict) -> str:
  """The marker in papers/kquant.md for a run's setting, e.g. table:digits_100_a0.1."""
  part = "iid" if config["partition"] == "iid" else f"a{config['dirichlet_alpha']}"
  return f"table:{config['dataset']}_{config['num_clients']}_{part}"


def fill_paper(run_dirs, paper: str = PAPER) -> None:
  """Copies each run's results table into the paper page at its setting's marker."""
  from pathlib import Path  # pylint: disable=import-outside-toplevel
  for run_dir in map(Path, run_dirs):
    config = records.read_json(run_dir / "config.json")
    methods = records.read_json(run_dir / "summary.json")["methods"]
    table = results_table({m: methods[m] for m in config["methods"]}, config["target_accuracy"])
    block = paper_block(config)
    written = records.replace_marked_block(paper, block, table)
    print(f"{run_dir} -> {block}: {'written' if written else 'no such marker'}")


if __name__ == "__main__":
  import sys  # pylint: disable=import-outside-toplevel
  if len(sys.argv) < 3 or sys.argv[1] != "--paper":
    sys.exit("usage: python -m experiments.kquant --paper RUN_DIR [RUN_DIR ...]")
  fill_paper(sys.argv[2:])
