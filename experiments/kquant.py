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

from experiments import fedavg as fedavg_experiment
from kernels import _common as kernels_common
from research.common import config as config_lib
from research.common import data as data_lib
from research.common import records
from research.fedavg import model as model_lib
from research.fedavg import rounds as fedavg_rounds
from research.kquant import buckets as buckets_lib
from research.kquant import coordinator
from research.kquant import quantize
from research.kquant import rounds

PAPER_PAGE = "papers/kquant.md"

# Every method of the comparison on the page.
PAPER_METHODS = ("float32", "kquant:256", "kquant:16", "kquant:16+ef", "kquant:4", "kquant:4+ef",
                 "kquant:2", "kquant:2+ef", "qsgd:4", "terngrad", "terngrad+ef", "sign", "sign+ef")


def config_schema() -> ml_collections.ConfigDict:
  """The goal setting of the page (digits, 100 clients, Dirichlet 0.1, 60 rounds, every method).

  Data, clients, model and local training are the FedAvg experiment's keys (one place for their
  defaults and meaning, experiments/fedavg.py); only the defaults of this page's main setting
  differ. Then the compression keys.
  """
  schema = fedavg_experiment.config_schema()
  del schema["centralized_steps"]  # no centralized baseline here: float32 FedAvg is the baseline
  schema.update({"num_clients": 100, "partition": "dirichlet", "dirichlet_alpha": 0.1,
                 "rounds": 60})
  schema.update({
      "methods": PAPER_METHODS,
      "headline_method": "kquant:16",
      "bucket_size": 256,
      "range_policy": "client_minmax",  # fixed | last_round | client_minmax
      "per_tensor_range": False,
      "fixed_radius": 0.05,             # fixed policy, and last_round's first round
      "range_margin": 2.0,              # last_round: radius = margin * max|last aggregate|
      "stochastic": True,               # stochastic (unbiased) or nearest rounding
      "k_schedule": (),                 # ((round, K), ...) for kquant:schedule
      "impl": "auto",                   # auto (pallas on GPU/TPU, reference on CPU) | pallas | reference
      "target_accuracy": 0.9,
  })
  return schema


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
  config_lib.check_choice(config, "impl", kernels_common.IMPLS)
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
  return kernels_common.select_impl(config.impl)  # "auto": by backend, in one place


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
                client_optimizer=fedavg_rounds.client_optimizer(config.client_learning_rate),
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
  headline = results[config.headline_method]
  partition = ("IID" if config.partition == "iid"
               else f"Dirichlet {config.dirichlet_alpha:g}")
  note = f"{config.dataset}, {config.num_clients} clients ({partition}), {config.rounds} rounds"
  if "compression_vs_float32" in headline:
    note += f"; {headline['compression_vs_float32']:.1f}x fewer uplink bits than float32"
  return {
      "headline": {"metric": f"{config.headline_method} test accuracy",
                   "value": headline["final_accuracy"],
                   "baseline": "float32 FedAvg" if baseline else config.methods[0],
                   "baseline_value": (baseline or results[config.methods[0]])["final_accuracy"],
                   "note": note},
      "methods": methods,
      "num_params": layout.num_params,
      "num_buckets": layout.num_rows,
      "client_sizes": np.asarray(count).tolist(),
      "impl": _impl(config),
  }


def setting_name(config: dict) -> str:
  """A result's setting as the page's keys spell it: kquant.<dataset>_<clients>_<a0.1 | iid>."""
  part = "iid" if config["partition"] == "iid" else f"a{config['dirichlet_alpha']}"
  return f"{config['dataset']}_{config['num_clients']}_{part}"


def _fmt(value, spec: str, suffix: str = "") -> str:
  return "-" if value is None else format(value, spec) + suffix


def results_table(methods: dict, method_order, target_accuracy: float) -> str:
  """One setting's per-method table, from a summary's "methods" entry."""
  return records.write_markdown_table(
      ["method", "final accuracy", "gap to float32 (points)", "uplink bits / round",
       "compression vs float32", f"rounds to {target_accuracy:g}"],
      [[m, f"{r['final_accuracy']:.4f}", _fmt(r.get("accuracy_gap_points"), "+.2f"),
        f"{r['uplink_bits_per_round']:,.0f}", _fmt(r.get("compression_vs_float32"), ".1f", "x"),
        _fmt(r["rounds_to_target"], "d")] for m, r in ((m, methods[m]) for m in method_order)])


def uplink_table(config: dict, summary: dict) -> str:
  """What one client sends per round under each method, and where the bits go."""
  methods = summary["methods"]
  plain = [m for m in config["methods"] if not m.endswith("+ef")]  # +ef sends the same bits
  rows = [[m, f"{methods[m]['uplink_bits_per_round'] / config['num_clients']:,.0f}",
           _fmt(methods[m].get("compression_vs_float32"), ".1f", "x")] for m in plain]
  buckets, size = summary["num_buckets"], config["bucket_size"]
  report = ("; the client_minmax range costs each client 64 bits (a float32 min and max) per "
            "bucket" if config["range_policy"] == "client_minmax" else "")
  return (f"{summary['num_params']:,} parameters in {buckets} buckets of {size} "
          f"({buckets * size:,} slots: a bucket never spans two tensors){report}.\n\n"
          + records.write_markdown_table(
              ["method", "uplink bits per client per round", "compression vs float32"], rows))


def gaps_table(results) -> str:
  """Accuracy gap to float32 (points) of every method, one column per kept setting."""
  configs = [r["config"] for r in results]
  methods = [r["summary"]["methods"] for r in results]
  order = list(dict.fromkeys(m for config in configs for m in config["methods"]))
  header = ["method", *(setting_name(c).replace("_", " ") for c in configs), "largest abs gap"]
  rows = [["float32 final accuracy", *(_fmt(m.get("float32", {}).get("final_accuracy"), ".4f")
                                       for m in methods), ""]]
  for method in order:
    if method == "float32":
      continue
    gaps = [m[method].get("accuracy_gap_points") if method in m else None for m in methods]
    known = [abs(g) for g in gaps if g is not None]
    rows.append([method, *(_fmt(g, "+.2f") for g in gaps),
                 _fmt(max(known) if known else None, ".2f")])
  return records.write_markdown_table(header, rows)


def paper_tables(*results: dict) -> dict[str, str]:
  """The page's tables from kept results: per setting `results` and `uplink` (one result), and
  `gaps` across every result a block's key names (e.g. kquant.digits_*)."""
  tables = {"gaps": gaps_table(results)}
  if len(results) == 1:
    config, summary = results[0]["config"], results[0]["summary"]
    tables["results"] = results_table(summary["methods"], config["methods"],
                                      config["target_accuracy"])
    tables["uplink"] = uplink_table(config, summary)
  return tables


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

