"""Encrypted training of a diagnosis model, end to end, as separate parties in separate processes.

The hospital's data is scikit-learn's breast-cancer table (30 features, benign vs malignant;
the split of `research.common.data`). Every step runs in the FHE environment (`.venv-fhe`) as
its own process, the parties talking only through bundles on disk:

  1. cloud:    python -m research.fhe.package build   -> packages/client, packages/server
  2. hospital: python -m research.fhe.client encrypt  -> wire/upload (ciphertexts, eval keys)
  3. cloud:    python -m research.fhe.server train    -> wire/model (encrypted parameters)
  4. hospital: python -m research.fhe.client decrypt  -> hospital/model.npz, test metrics
  5. hospital: python -m research.fhe.compare         -> the same run in FHE simulation and the
               clear models, on the reduced feature set (execute) and on all features (simulate)

Real encryption (execute mode, steps 1-4 and the reduced comparison) runs on `execute_features`
features for `execute_iterations` iterations; `execute_iterations = 0` leaves it out (simulation
only: the demo row and the seed sweep). Simulation runs on `simulate_features` features, once per
seed `seed, seed + 1, ...` (`simulate_seeds` runs). Headline: simulated encrypted test accuracy
on all features (seed `seed`) vs clear logistic regression; the note says what ran.

  python -m experiments.run configs/fhe/breast_cancer.py
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from research.common import config as config_lib
from research.common import data as data_lib
from research.common import records

REPO = Path(__file__).resolve().parent.parent
N_FEATURES = 30  # breast cancer
CLEAR_REFERENCE = "sklearn_logistic_regression"


def config_schema() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "execute_features": 4,        # features of the real encrypted (execute-mode) run
      "execute_iterations": 20,     # encrypted iterations (batches of 8); 0: no real encryption
      "simulate_features": 30,      # features of the simulated encrypted run
      "simulate_iterations": 200,
      "simulate_seeds": 1,          # simulated runs, on seeds seed, seed + 1, ...
      "eval_every": 10,             # snapshot / curve spacing of the simulated run
      "p_error": 0.01,              # per-PBS error probability of the training circuit
      "max_gap_points": 4.0,        # goal: simulated accuracy within this of the clear model
      "fhe_python": ".venv-fhe/bin/python",  # interpreter of the FHE environment (repo-relative)
  })


PAPER_PAGE = "papers/fhe.md"

# concrete-ml's own notebook (zama-ai/concrete-ml, docs/advanced_examples/
# LogisticRegressionTraining.ipynb) on breast cancer, as papers/fhe.md has cited it since
# concrete-ml 1.9: citations, not results of ours (a later version of the notebook uses Iris).
PUBLISHED = {
    "source": "concrete-ml notebook LogisticRegressionTraining.ipynb",
    "features": 30,                    # all of them, as our simulated run
    "simulated_accuracy": 0.936,       # encrypted training in FHE simulation
    "clear_accuracy": 0.959,           # scikit-learn in the clear
    "seconds_per_iteration": 2.3,      # one real encrypted iteration (a batch of 8), their machine
    "iteration_features": 2,           # features of that timing
}


def validate_config(config) -> None:
  for key in ("execute_features", "simulate_features"):
    if not 1 <= config[key] <= N_FEATURES:
      raise config_lib.ConfigError(f"config key {key!r}: got {config[key]}, expected 1..."
                                   f"{N_FEATURES} (breast cancer has {N_FEATURES} features)")
  config_lib.check_positive(config, "simulate_iterations", "simulate_seeds", "eval_every")
  if config.execute_iterations < 0:
    raise config_lib.ConfigError(f"config key 'execute_iterations': got "
                                 f"{config.execute_iterations}, expected >= 0 (0: simulation "
                                 "only)")
  if not 0 < config.p_error < 1:
    raise config_lib.ConfigError(f"config key 'p_error': got {config.p_error}, expected a "
                                 "probability in (0, 1)")
  if not fhe_python(config).is_file():
    raise config_lib.ConfigError(f"config key 'fhe_python': {str(fhe_python(config))!r} does not "
                                 "exist; create the FHE environment with `make venv-fhe`")


def fhe_python(config) -> Path:
  path = Path(config.fhe_python)
  return path if path.is_absolute() else REPO / path


def run_party(config, module: str, *args: str) -> dict[str, Any]:
  """Runs `python -m research.fhe.<module> ...` in the FHE environment; returns its JSON line."""
  env = dict(os.environ, PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)
  command = [str(fhe_python(config)), "-m", f"research.fhe.{module}", *map(str, args)]
  done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
  sys.stderr.write(_tail(done.stderr, 8))
  if done.returncode != 0:
    raise RuntimeError(f"{' '.join(command[1:])} exited with {done.returncode}:\n"
                       f"{_tail(done.stderr, 30)}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def _tail(text: str, lines: int) -> str:
  noise = ("Warning", "warn(", "No CUDA runtime")
  kept = [l for l in text.splitlines() if not any(n in l for n in noise)]
  return "\n".join(kept[-lines:]) + ("\n" if kept else "")


def run(config, run):
  work = run.workdir
  hospital, packages, wire = work / "hospital", work / "packages", work / "wire"
  hospital.mkdir(parents=True, exist_ok=True)
  split = data_lib.breast_cancer(standardize=False)  # the client scales its own data
  records.atomic_save_npz(hospital / "train.npz", x=split.x_train, y=split.y_train)
  records.atomic_save_npz(hospital / "test.npz", x=split.x_test, y=split.y_test)
  train, test = hospital / "train.npz", hospital / "test.npz"
  load_before = os.getloadavg()[0]

  def compare(features, iterations, seed, every, out):
    return ("compare", ["--train", train, "--test", test, "--features", features, "--iterations",
                        iterations, "--seed", seed, "--every", every, "--p-error",
                        config.p_error, "--out", work / out])

  steps = []
  if config.execute_iterations:
    steps += [
        ("build packages", "package", ["build", "--out", packages, "--features",
                                       config.execute_features, "--p-error", config.p_error]),
        ("keys + encrypt", "client", ["encrypt", "--package", packages / "client", "--state",
                                      hospital / "state", "--data", train, "--iterations",
                                      config.execute_iterations, "--seed", config.seed,
                                      "--out", wire / "upload"]),
        ("encrypted training", "server", ["train", "--package", packages / "server",
                                          "--upload", wire / "upload", "--out", wire / "model"]),
        ("decrypt", "client", ["decrypt", "--package", packages / "client", "--state",
                               hospital / "state", "--model", wire / "model", "--out",
                               hospital / "model.npz", "--evaluate", test]),
        ("simulate reduced", *compare(config.execute_features, config.execute_iterations,
                                      config.seed, 1, "compare_execute_config.json")),
    ]
  seeds = [config.seed + i for i in range(config.simulate_seeds)]
  simulate_files = {s: "compare_simulate.json" if s == config.seed else
                    f"compare_simulate_seed{s}.json" for s in seeds}
  steps += [(f"simulate all, seed {s}", *compare(config.simulate_features,
                                                 config.simulate_iterations, s,
                                                 config.eval_every, simulate_files[s]))
            for s in seeds]
  reports = {}
  for step, (name, module, args) in enumerate(run.progress(steps, description="fhe round trip")):
    reports[name] = run_party(config, module, *args)
    run.log(step, party_step=name)

  runs = {s: records.read_json(work / simulate_files[s]) for s in seeds}
  full = runs[config.seed]
  clear_full = full["clear"][CLEAR_REFERENCE]
  simulated_full = full["curve"][-1]
  gap_points = 100 * (clear_full["accuracy"] - simulated_full["accuracy"])
  simulate = {"features": config.simulate_features, "iterations": config.simulate_iterations,
              "test": simulated_full, "clear": full["clear"], "gap_points": gap_points,
              "goal_met": gap_points <= config.max_gap_points,
              "compile_seconds": full["compile_seconds"],
              "seconds_per_iteration": full["seconds_per_iteration"],
              "seeds": [{"seed": s, "test": r["curve"][-1],
                         "clear": r["clear"][CLEAR_REFERENCE],
                         "gap_points": 100 * (r["clear"][CLEAR_REFERENCE]["accuracy"]
                                              - r["curve"][-1]["accuracy"])}
                        for s, r in runs.items()]}
  execute = _execute_summary(config, work, reports) if config.execute_iterations else None
  for point in [] if execute is None else execute["curve"]:
    run.log(point["iteration"], mode="execute", features=config.execute_features,
            test_accuracy=point["accuracy"], test_f1=point["f1"])
  for point in full["curve"]:
    run.log(point["iteration"], mode="simulate", features=config.simulate_features,
            test_accuracy=point["accuracy"], test_f1=point["f1"])
  _plot(run, execute, full["curve"], simulate)
  if execute is None:
    note = (f"FHE simulation only, {config.simulate_features} features x "
            f"{config.simulate_iterations} iterations (no real encryption; the paper setting "
            f"adds it); bootstrap errors sampled at p_error {config.p_error}, so a rerun of the "
            "seed may differ")
  else:
    note = (f"execute, {config.execute_features} features x {config.execute_iterations} "
            f"iterations: accuracy {execute['test']['accuracy']:.3f} (clear "
            f"{execute['clear'][CLEAR_REFERENCE]['accuracy']:.3f}), "
            f"{execute['seconds_per_iteration']:.1f} s per encrypted iteration")
  return {
      "headline": {
          "metric": f"test accuracy, encrypted training (simulated, {config.simulate_features} "
                    "features)",
          "value": simulated_full["accuracy"],
          "baseline": f"clear logistic regression ({config.simulate_features} features)",
          "baseline_value": clear_full["accuracy"],
          "note": note,
      },
      "data": {"train_rows": len(split.y_train), "test_rows": len(split.y_test)},
      "execute": execute,
      "simulate": simulate,
      # Timings depend on what else the machine runs: where and under what load they were taken.
      "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                  "load_average_1min": [load_before, os.getloadavg()[0]]},
      "fhe_environment": full["environment"],  # .venv-fhe's packages (the launcher records .venv's)
  }


def _execute_summary(config, work: Path, reports: dict[str, Any]) -> dict[str, Any]:
  """The real encrypted round trip: the decrypted model's quality, cost, and its distance from
  the simulated run of the same config."""
  encrypt, server, decrypt = (reports[k] for k in ("keys + encrypt", "encrypted training",
                                                   "decrypt"))
  reduced = records.read_json(work / "compare_execute_config.json")
  simulated = {s["iteration"]: s for s in reduced["snapshots"]}
  model = np.load(work / "hospital" / "model.npz")
  # In weight-quantizer steps (the bias has its own grid, so not always a whole number); 0 when
  # no bootstrap error hit either run, which a low p_error makes near certain.
  steps_apart = max(
      float(np.max(np.abs(np.append(w, b) - np.append(simulated[int(i)]["weights"],
                                                     simulated[int(i)]["bias"]))))
      for i, w, b in zip(model["snapshot_iterations"], model["snapshot_weights"],
                         model["snapshot_bias"])) / reduced["weight_step"]
  return {
      "features": config.execute_features, "feature_columns": encrypt["features"],
      "iterations": config.execute_iterations, "test": decrypt["test"],
      "curve": decrypt["curve"], "simulated_curve": reduced["curve"],
      "simulated_same_config": reduced["curve"][-1],
      "max_steps_from_simulation": steps_apart, "weight_step": reduced["weight_step"],
      "seconds_per_iteration": server["seconds_per_iteration"],
      "iteration_seconds": server["iteration_seconds"],
      "keygen_seconds": encrypt["keygen_seconds"], "encrypt_seconds": encrypt["encrypt_seconds"],
      "server_load_seconds": server["load_seconds"], "decrypt_seconds": decrypt["decrypt_seconds"],
      "evaluation_key_bytes": encrypt["evaluation_key_bytes"],
      "batch_ciphertext_bytes": encrypt["batch_ciphertext_bytes"],
      "parameter_ciphertext_bytes": encrypt["parameter_ciphertext_bytes"],
      "upload_bytes": encrypt["upload_bytes"],
      "model_bytes_per_snapshot": server["model_bytes"] / len(decrypt["curve"]),
      "clear": reduced["clear"],
  }


# --- the page's tables, from a kept result ----------------------------------------------------


def _percent(value: float) -> str:
  return f"{100 * value:.2f} %"


def _load(machine: dict) -> str:
  return (f"{machine['cpus']} CPUs, 1-min load average {machine['load_average_1min'][0]:.1f} at "
          f"the start, {machine['load_average_1min'][1]:.1f} at the end")


def paper_tables(result: dict) -> dict[str, str]:
  """The page's tables from a kept result: accuracy (`results`), the real round trip's cost
  (`cost`), ours beside the published figures (`anchors`), and every simulated seed (`seeds`)."""
  config, summary = result["config"], result["summary"]
  execute, simulate = summary["execute"], summary["simulate"]

  def row(name, features, iterations, scores, seconds="-"):
    return [name, features, iterations, f"{scores['accuracy']:.4f}", f"{scores['f1']:.4f}",
            seconds]

  rows = []
  if execute is not None:
    rows += [row("encrypted training, execute (decrypted model)", execute["features"],
                 execute["iterations"], execute["test"],
                 f"{execute['seconds_per_iteration']:.2f}"),
             row("same config in FHE simulation", execute["features"], execute["iterations"],
                 execute["simulated_same_config"])]
    rows += [row(f"clear: {name}", execute["features"], "-", scores)
             for name, scores in execute["clear"].items()]
  rows.append(row("encrypted training, FHE simulation", simulate["features"],
                  simulate["iterations"], simulate["test"],
                  f"{simulate['seconds_per_iteration']:.3f} (simulated)"))
  rows += [row(f"clear: {name}", simulate["features"], "-", scores)
           for name, scores in simulate["clear"].items()]
  data = summary["data"]
  fhe_environment = summary["fhe_environment"]
  tables = {"results": (
      f"Breast cancer, {data['train_rows']} train / {data['test_rows']} test rows; seed "
      f"{config['seed']}, p_error {config['p_error']}; concrete-ml "
      f"{fhe_environment['concrete-ml']}, concrete-python {fhe_environment['concrete-python']}; "
      f"{summary['seconds']:.0f} s in all on {_load(summary['machine'])}.\n\n"
      + records.write_markdown_table(
          ["model", "features", "iterations (batches of 8)", "test accuracy", "test F1",
           "s / iteration"], rows))}

  if execute is not None:
    later = execute["iteration_seconds"][1:] or execute["iteration_seconds"]
    tables["cost"] = records.write_markdown_table(
        ["key generation (s)", "evaluation keys (MB)", "ciphertext per batch (kB)",
         "encrypted parameters in / out (kB)", "server load (s)", "s / encrypted iteration",
         "first / later iterations (s)", "weight step", "decrypted vs simulated (weight steps)"],
        [[f"{execute['keygen_seconds']:.1f}", f"{execute['evaluation_key_bytes'] / 1e6:.1f}",
          f"{execute['batch_ciphertext_bytes'] / 1e3:.2f}",
          f"{execute['parameter_ciphertext_bytes'] / 1e3:.2f} / "
          f"{execute['model_bytes_per_snapshot'] / 1e3:.1f}",
          f"{execute['server_load_seconds']:.1f}", f"{execute['seconds_per_iteration']:.2f}",
          f"{execute['iteration_seconds'][0]:.1f} / {np.mean(later):.1f}",
          f"{execute['weight_step']:.4f}", f"{execute['max_steps_from_simulation']:.0f}"]])

  seeds = simulate["seeds"]
  ours = [[f"ours, seed {config['seed']} ({simulate['features']} features)",
           _percent(simulate["test"]["accuracy"]),
           _percent(simulate["clear"][CLEAR_REFERENCE]["accuracy"]) + " (LogisticRegression)",
           f"{simulate['gap_points']:.1f}",
           "-" if execute is None else
           f"{execute['seconds_per_iteration']:.2f} ({execute['features']} features, "
           f"{summary['machine']['cpus']} CPUs at load "
           f"{np.mean(summary['machine']['load_average_1min']):.0f})"]]
  if len(seeds) > 1:
    accuracies = [s["test"]["accuracy"] for s in seeds]
    gaps = [s["gap_points"] for s in seeds]
    clear = sorted({_percent(s["clear"]["accuracy"]) for s in seeds})
    ours.append([f"ours, seeds {seeds[0]['seed']}-{seeds[-1]['seed']} ({simulate['features']} "
                 "features)",
                 f"{_percent(np.mean(accuracies))} mean ({min(accuracies):.4f}-"
                 f"{max(accuracies):.4f})", " / ".join(clear),
                 f"{np.mean(gaps):.1f} mean, {max(gaps):.1f} worst", "-"])
  tables["anchors"] = records.write_markdown_table(
      ["", "encrypted training, simulated", "clear, scikit-learn", "gap (points)",
       "s / real encrypted iteration"],
      [[f"{PUBLISHED['source']} (published, {PUBLISHED['features']} features)",
        _percent(PUBLISHED["simulated_accuracy"]), _percent(PUBLISHED["clear_accuracy"]),
        f"{100 * (PUBLISHED['clear_accuracy'] - PUBLISHED['simulated_accuracy']):.1f}",
        f"{PUBLISHED['seconds_per_iteration']} ({PUBLISHED['iteration_features']} features, "
        "their machine)"], *ours])

  if len(seeds) > 1:
    def seed_row(name, accuracy, f1, clear, gap):
      return [name, f"{accuracy:.4f}", f"{f1:.4f}", f"{clear:.4f}", f"{gap:.1f}",
              "yes" if gap <= config["max_gap_points"] else "no"]

    rows = [seed_row(s["seed"], s["test"]["accuracy"], s["test"]["f1"], s["clear"]["accuracy"],
                     s["gap_points"]) for s in seeds]
    rows.append(seed_row("mean", *np.mean([[s["test"]["accuracy"], s["test"]["f1"],
                                            s["clear"]["accuracy"], s["gap_points"]]
                                           for s in seeds], axis=0)))
    worst = max(seeds, key=lambda s: s["gap_points"])
    rows.append(seed_row(f"largest gap (seed {worst['seed']})", worst["test"]["accuracy"],
                         worst["test"]["f1"], worst["clear"]["accuracy"], worst["gap_points"]))
    tables["seeds"] = records.write_markdown_table(
        ["seed", "test accuracy", "test F1", "clear LogisticRegression", "gap (points)",
         f"within {config['max_gap_points']:g} points"], rows)
  return tables


def _plot(run, execute, full_curve, simulate) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(7.5, 4.5))
  curve = lambda c: ([p["iteration"] for p in c], [p["accuracy"] for p in c])
  ax.plot(*curve(full_curve), "-", color="tab:blue",
          label=f"encrypted, simulated ({simulate['features']} features)")
  ax.axhline(simulate["clear"][CLEAR_REFERENCE]["accuracy"], color="tab:blue", linestyle=":",
             label=f"clear logistic regression ({simulate['features']} features)")
  if execute is not None:
    ax.plot(*curve(execute["simulated_curve"]), "-", color="tab:orange", alpha=0.6,
            label=f"simulated ({execute['features']} features)")
    ax.plot(*curve(execute["curve"]), "o", color="tab:orange",
            label=f"encrypted, executed + decrypted ({execute['features']} features)")
    ax.axhline(execute["clear"][CLEAR_REFERENCE]["accuracy"], color="tab:orange", linestyle=":",
               label=f"clear logistic regression ({execute['features']} features)")
  ax.set_xlabel("iteration (encrypted batch of 8)")
  ax.set_ylabel("test accuracy")
  ax.set_ylim(0.3, 1.0)
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize=8)
  ax.set_title("breast cancer diagnosis: training on encrypted data")
  run.save_figure("accuracy_vs_iterations.png", fig)
  plt.close(fig)
