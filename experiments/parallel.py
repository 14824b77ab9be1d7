"""Hybrid-parallel training through the graph pass, against one-device training; plan vs XLA bytes.

For each model (the digits MLP, a transformer block) and each strategy set (data parallel,
Megatron tensor parallel, a mixed set that forces all-to-alls / all-gathers / reduce-scatters)
on a ('dp', 'mp') mesh of the local devices, research/parallel's graph pass inserts the planned
redistributions and the sliced graph is trained with Adam; the same steps on the same batches run
unsliced on one device. Losses are compared step by step. With `bench_pairs > 0` the run also
measures, on a seeded sample of rank-2 layout pairs per benchmark mesh, the bytes each device
receives under our plan and under XLA's own resharding (`experiments.bench_parallel`; the full
sweep is `python -m experiments.bench_parallel`). Headline: bytes of our plans vs XLA's with
`bench_pairs > 0`, else the first run's final sliced loss vs one device's.

  python -m experiments.run configs/parallel/smoke.py --cpu-devices 8
  python -m experiments.run configs/parallel/train.py --cpu-devices 8 --paper parallel.train
"""

from __future__ import annotations

import ml_collections
import numpy as np

from research.common import config as config_lib
from research.common import records

MODELS = ("mlp", "transformer_block")


def config_schema() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "mesh_shape": (2, 4),          # ('dp', 'mp')
      "models": MODELS,
      "strategies": ("data_parallel", "megatron", "mixed"),
      "steps": 100,
      "learning_rate": 0.01,
      "mlp_batch": 64,
      "mlp_hidden": 128,
      "block_batch": 8,
      "block_seq": 16,
      "block_width": 64,
      "block_heads": 8,
      "block_hidden": 128,
      "loss_rtol": 1e-4,             # the equality the run asserts (relative, per step)
      "bench_pairs": 0,              # rank-2 layout pairs per benchmark mesh; 0: no bytes table
  })


PAPER_PAGE = "papers/parallel.md"


def validate_config(config) -> None:
  from research.parallel import models  # pylint: disable=import-outside-toplevel
  config_lib.check_positive(config, "steps", "learning_rate", "mlp_batch", "mlp_hidden",
                            "block_batch", "block_seq", "block_width", "block_heads",
                            "block_hidden", "loss_rtol")
  if len(config.mesh_shape) != 2:
    raise config_lib.ConfigError(f"config key 'mesh_shape': got {config.mesh_shape}, expected "
                                 "two sizes (dp, mp)")
  for key, known in (("models", MODELS), ("strategies", models.STRATEGIES)):
    unknown = [m for m in config[key] if m not in known]
    if unknown or not config[key]:
      raise config_lib.ConfigError(f"config key {key!r}: got {tuple(config[key])}, expected a "
                                   f"non-empty subset of {known}")
  if config.bench_pairs < 0:
    raise config_lib.ConfigError(f"config key 'bench_pairs': got {config.bench_pairs}, "
                                 "expected >= 0")


def build(model: str, strategy: str, config):
  from research.parallel import models  # pylint: disable=import-outside-toplevel
  if model == "mlp":
    return models.mlp(strategy, batch=config.mlp_batch, hidden=config.mlp_hidden)
  return models.transformer_block(strategy, batch=config.block_batch, seq=config.block_seq,
                                  width=config.block_width, heads=config.block_heads,
                                  hidden=config.block_hidden)


def batches(model: str, graph, config) -> list[dict[str, np.ndarray]]:
  """The steps' batches: digits rows for the MLP; for the block, a sequence task (predict a
  fixed linear map of the previous position)."""
  from research.common import data  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(config.seed)
  out = []
  if model == "mlp":
    split = data.digits(seed=config.seed)
    for _ in range(config.steps):
      rows = rng.choice(len(split.x_train), config.mlp_batch, replace=False)
      out.append({"x": split.x_train[rows],
                  "labels": np.eye(10, dtype=np.float32)[split.y_train[rows]]})
    return out
  shape = graph.tensors["x"].shape
  mixing = rng.normal(size=(shape[-1], shape[-1])).astype(np.float32) / np.sqrt(shape[-1])
  for _ in range(config.steps):
    x = rng.normal(size=shape).astype(np.float32)
    out.append({"x": x, "target": np.roll(x, 1, axis=1) @ mixing})
  return out


def run(config, run):
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  from research.common import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from research.parallel import graph as graph_lib  # pylint: disable=import-outside-toplevel
  from research.parallel import train  # pylint: disable=import-outside-toplevel

  mesh = mesh_lib.make_mesh(tuple(config.mesh_shape), ("dp", "mp"))
  optimizer = optax.adam(config.learning_rate)
  results, summaries = {}, []
  jobs = [(m, s) for m in config.models for s in config.strategies]
  references = {}
  for model, strategy in run.progress(jobs, description="model x strategy"):
    graph, specs = build(model, strategy, config)
    sliced = graph_lib.partition(graph, mesh, specs)
    summaries.append(f"## {model} / {strategy}\n\n```\n{sliced.summary()}\n```\n")
    steps = batches(model, graph, config)
    params = graph_lib.init_params(graph, jax.random.key(config.seed))
    if model not in references:
      references[model] = train.train(graph_lib.reference_fn(graph), optimizer, params, steps)[1]
    reference = references[model]
    _, losses = train.train(sliced.fn, optimizer, params, steps, sliced.param_shardings(),
                            sliced.input_shardings())
    rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, reference)]
    for step, (a, b) in enumerate(zip(losses, reference)):
      run.log(step, model=model, strategy=strategy, loss=a, reference_loss=b)
    results[f"{model}/{strategy}"] = {
        "model": model, "strategy": strategy, "losses": losses, "reference_losses": reference,
        "max_rel_diff": max(rel), "equal_within_rtol": max(rel) <= config.loss_rtol,
        "collectives": dict(sliced.collectives()), "predicted_bytes": sliced.predicted_bytes}
  run.save_text("graphs.md", "\n".join(summaries))
  print(training_table(results))
  _plot(run, results)
  worst = max(r["max_rel_diff"] for r in results.values())
  all_equal = all(r["equal_within_rtol"] for r in results.values())
  runs = ", ".join(results) if len(results) <= 2 else f"{len(results)} model x strategy runs"
  note = (f"{config.steps} Adam steps, {runs} on a {tuple(config.mesh_shape)} mesh: sliced = "
          f"one device in "
          f"{sum(r['equal_within_rtol'] for r in results.values())}/{len(results)} (worst rel. "
          f"loss diff {worst:.1e})")
  summary = {"training": results, "all_equal": all_equal}
  if config.bench_pairs:
    from experiments import bench_parallel  # pylint: disable=import-outside-toplevel
    bytes_summary = bench_parallel.sample_summary(config.bench_pairs, config.seed)
    summary["bytes"] = bytes_summary
    headline = {"metric": "bytes received per device, our plans (sum over sampled pairs)",
                "value": bytes_summary["ours"], "baseline": "XLA resharding (jit out_shardings)",
                "baseline_value": bytes_summary["xla"],
                "note": note + f"; {bytes_summary['pairs']} sampled rank-2 layout pairs on "
                               f"{len(bench_parallel.MESHES)} meshes: XLA replicates in "
                               f"{bytes_summary['xla_replicates']}, ours worse in "
                               f"{bytes_summary['ours_worse']}"}
  else:
    final = [r for r in results.values()][0]
    headline = {"metric": "final loss, sliced graph", "value": final["losses"][-1],
                "baseline": "final loss, one device", "baseline_value":
                final["reference_losses"][-1], "note": note}
  summary["headline"] = headline
  if not all_equal:
    raise AssertionError(f"sliced training differs from one-device training beyond "
                         f"loss_rtol={config.loss_rtol}: {note}")
  return summary


def training_table(results: dict) -> str:
  rows = []
  for r in results.values():
    kinds = ", ".join(f"{k} x{v}" for k, v in sorted(r["collectives"].items()))
    rows.append((r["model"], r["strategy"], kinds, f"{r['predicted_bytes']:.0f}",
                 f"{r['reference_losses'][0]:.4f}", f"{r['reference_losses'][-1]:.4f}",
                 f"{r['losses'][-1]:.4f}", f"{r['max_rel_diff']:.1e}"))
  header = ("model", "strategy", "collectives per forward", "predicted bytes / device",
            "loss step 0", "final loss (1 device)", "final loss (sliced)",
            "max rel. diff over steps")
  return records.write_markdown_table(header, rows)


def paper_tables(result: dict) -> dict[str, str]:
  """The page's tables from a kept result: training (setting and per-run losses) and, when the
  run sampled layout pairs, their bytes."""
  config, summary = result["config"], result["summary"]
  dp, mp = config["mesh_shape"]
  setting = (f"({dp}, {mp}) mesh ('dp', 'mp'), Adam {config['learning_rate']:g}, "
             f"{config['steps']} steps, seed {config['seed']}; MLP (hidden "
             f"{config['mlp_hidden']}) on digits batches of {config['mlp_batch']}, transformer "
             f"block (batch {config['block_batch']}, sequence {config['block_seq']}, width "
             f"{config['block_width']}, {config['block_heads']} heads, hidden "
             f"{config['block_hidden']}) on a synthetic sequence task.\n\n")
  tables = {"training": setting + training_table(summary["training"])}
  if "bytes" in summary:
    b = summary["bytes"]
    tables["bytes"] = records.write_markdown_table(
        ("rank-2 pairs sampled", "bytes / device, ours (sum)", "XLA (sum)", "lower bound (sum)",
         "ours > XLA", "XLA replicates", "ours < XLA there"),
        [(b["pairs"], f"{b['ours']:.0f}", f"{b['xla']:.0f}", f"{b['bound']:.0f}",
          b["ours_worse"], b["xla_replicates"], b["ours_better_where_xla_replicates"])])
  return tables


def _plot(run, results) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  models = sorted({r["model"] for r in results.values()})
  fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
  for ax, model in zip(axes[0], models):
    shown = False
    for r in results.values():
      if r["model"] != model:
        continue
      if not shown:
        ax.plot(r["reference_losses"], color="black", lw=3, alpha=0.3, label="one device")
        shown = True
      ax.plot(r["losses"], ls="--", label=f"sliced: {r['strategy']}")
    ax.set_title(model)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
  fig.tight_layout()
  run.save_figure("losses.png", fig)
  plt.close(fig)

