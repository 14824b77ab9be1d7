"""Encrypted training of a diagnosis model, end to end, as separate parties in separate processes.

The hospital's data is scikit-learn's breast-cancer table (398 train / 171 test rows, 30
features, benign vs malignant). Every step runs in the FHE environment (`.venv-fhe`) as its own
process, the parties talking only through bundles on disk:

  1. cloud:    python -m research.fhe.package build   -> packages/client, packages/server
  2. hospital: python -m research.fhe.client encrypt  -> wire/upload (ciphertexts, eval keys)
  3. cloud:    python -m research.fhe.server train    -> wire/model (encrypted parameters)
  4. hospital: python -m research.fhe.client decrypt  -> hospital/model.npz, test metrics
  5. hospital: python -m research.fhe.compare         -> the same run in FHE simulation and the
               clear models, on the reduced feature set (execute) and on all features (simulate)

Real encryption (execute mode) runs on `execute_features` features; simulation on
`simulate_features`. Headline: simulated encrypted test accuracy on all features vs clear
logistic regression; the note gives the execute-mode accuracy and seconds per encrypted
iteration.

  python -m experiments.run configs/fhe/breast_cancer.py
"""

from __future__ import annotations

import json
import os
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
      "execute_iterations": 10,     # encrypted iterations (batches of 8) the server runs
      "simulate_features": 30,      # features of the simulated encrypted run
      "simulate_iterations": 200,
      "eval_every": 10,             # snapshot / curve spacing of the simulated run
      "p_error": 0.01,              # per-PBS error probability of the training circuit
      "max_gap_points": 4.0,        # goal: simulated accuracy within this of the clear model
      "fhe_python": ".venv-fhe/bin/python",  # interpreter of the FHE environment (repo-relative)
  })


def validate_config(config) -> None:
  for key in ("execute_features", "simulate_features"):
    if not 1 <= config[key] <= N_FEATURES:
      raise config_lib.ConfigError(f"config key {key!r}: got {config[key]}, expected 1..."
                                   f"{N_FEATURES} (breast cancer has {N_FEATURES} features)")
  for key in ("execute_iterations", "simulate_iterations", "eval_every"):
    config_lib.check_positive(config, key)
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

  steps = [
      ("build packages", "package", ["build", "--out", packages, "--features",
                                     config.execute_features, "--p-error", config.p_error]),
      ("keys + encrypt", "client", ["encrypt", "--package", packages / "client", "--state",
                                    hospital / "state", "--data", train, "--iterations",
                                    config.execute_iterations, "--seed", config.seed,
                                    "--out", wire / "upload"]),
      ("encrypted training", "server", ["train", "--package", packages / "server", "--upload",
                                        wire / "upload", "--out", wire / "model"]),
      ("decrypt", "client", ["decrypt", "--package", packages / "client", "--state",
                             hospital / "state", "--model", wire / "model", "--out",
                             hospital / "model.npz", "--evaluate", test]),
      ("simulate reduced", "compare", ["--train", train, "--test", test, "--features",
                                       config.execute_features, "--iterations",
                                       config.execute_iterations, "--seed", config.seed,
                                       "--every", 1, "--p-error", config.p_error, "--out",
                                       work / "compare_execute_config.json"]),
      ("simulate all", "compare", ["--train", train, "--test", test, "--features",
                                   config.simulate_features, "--iterations",
                                   config.simulate_iterations, "--seed", config.seed, "--every",
                                   config.eval_every, "--p-error", config.p_error, "--out",
                                   work / "compare_simulate.json"]),
  ]
  reports = {}
  for step, (name, module, args) in enumerate(run.progress(steps, description="fhe round trip")):
    reports[name] = run_party(config, module, *args)
    run.log(step, party_step=name)
  encrypt, server, decrypt = (reports[k] for k in ("keys + encrypt", "encrypted training",
                                                   "decrypt"))
  reduced = records.read_json(work / "compare_execute_config.json")
  full = records.read_json(work / "compare_simulate.json")

  # The decrypted model against the simulated run of the same config, in weight-quantizer steps.
  simulated = {s["iteration"]: s for s in reduced["snapshots"]}
  model = np.load(hospital / "model.npz")
  # Both sides sit on the quantizer's grid, so this is a whole number of steps up to float
  # noise in the division (3.0000000000000004 was seen): rounded to 6 decimals.
  steps_apart = round(max(
      float(np.max(np.abs(np.append(w, b) - np.append(simulated[int(i)]["weights"],
                                                     simulated[int(i)]["bias"]))))
      for i, w, b in zip(model["snapshot_iterations"], model["snapshot_weights"],
                         model["snapshot_bias"])) / reduced["weight_step"], 6)
  for point in decrypt["curve"]:
    run.log(point["iteration"], mode="execute", features=config.execute_features,
            test_accuracy=point["accuracy"], test_f1=point["f1"])
  for point in full["curve"]:
    run.log(point["iteration"], mode="simulate", features=config.simulate_features,
            test_accuracy=point["accuracy"], test_f1=point["f1"])

  clear_full = full["clear"][CLEAR_REFERENCE]
  simulated_full = full["curve"][-1]
  gap_points = 100 * (clear_full["accuracy"] - simulated_full["accuracy"])
  execute = {
      "features": config.execute_features, "feature_columns": encrypt["features"],
      "iterations": config.execute_iterations, "test": decrypt["test"],
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
  simulate = {"features": config.simulate_features, "iterations": config.simulate_iterations,
              "test": simulated_full, "clear": full["clear"], "gap_points": gap_points,
              "goal_met": gap_points <= config.max_gap_points,
              "seconds_per_iteration": full["seconds_per_iteration"]}
  _plot(run, decrypt["curve"], reduced["curve"], full["curve"], execute, simulate)
  run.save_text("table.md", results_table(execute, simulate))
  return {
      "headline": {
          "metric": f"test accuracy, encrypted training (simulated, {config.simulate_features} "
                    "features)",
          "value": simulated_full["accuracy"],
          "baseline": f"clear logistic regression ({config.simulate_features} features)",
          "baseline_value": clear_full["accuracy"],
          "note": (f"execute, {config.execute_features} features: accuracy "
                   f"{decrypt['test']['accuracy']:.3f} (clear "
                   f"{reduced['clear'][CLEAR_REFERENCE]['accuracy']:.3f}), "
                   f"{server['seconds_per_iteration']:.1f} s per encrypted iteration"),
      },
      "execute": execute,
      "simulate": simulate,
  }


def results_table(execute: dict, simulate: dict) -> str:
  """The accuracy table and the cost table of the paper page, from a summary."""
  def row(name, features, iterations, result, seconds="-"):
    return [name, features, iterations, f"{result['accuracy']:.4f}", f"{result['f1']:.4f}",
            seconds]

  rows = [row("encrypted training, execute (decrypted model)", execute["features"],
              execute["iterations"], execute["test"], f"{execute['seconds_per_iteration']:.2f}"),
          row("same config in FHE simulation", execute["features"], execute["iterations"],
              execute["simulated_same_config"])]
  rows += [row(f"clear: {name}", execute["features"], "-", result)
           for name, result in execute["clear"].items()]
  rows.append(row("encrypted training, FHE simulation", simulate["features"],
                  simulate["iterations"], simulate["test"],
                  f"{simulate['seconds_per_iteration']:.3f} (simulated)"))
  rows += [row(f"clear: {name}", simulate["features"], "-", result)
           for name, result in simulate["clear"].items()]
  accuracy = records.write_markdown_table(
      ["model", "features", "iterations (batches of 8)", "test accuracy", "test F1",
       "s / iteration"], rows)
  mb = 1e6
  cost = records.write_markdown_table(
      ["key generation (s)", "evaluation keys (MB)", "ciphertext per batch (kB)",
       "encrypted parameters in / out (kB)", "server load (s)", "s / encrypted iteration",
       "decrypted vs simulated (max weight steps)"],
      [[f"{execute['keygen_seconds']:.1f}", f"{execute['evaluation_key_bytes'] / mb:.1f}",
        f"{execute['batch_ciphertext_bytes'] / 1e3:.2f}",
        f"{execute['parameter_ciphertext_bytes'] / 1e3:.2f} / "
        f"{execute['model_bytes_per_snapshot'] / 1e3:.1f}",
        f"{execute['server_load_seconds']:.1f}", f"{execute['seconds_per_iteration']:.2f}",
        f"{execute['max_steps_from_simulation']:.0f}"]])
  return accuracy + "\n" + cost


def _plot(run, execute_curve, reduced_curve, full_curve, execute, simulate) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(7.5, 4.5))
  curve = lambda c: ([p["iteration"] for p in c], [p["accuracy"] for p in c])
  ax.plot(*curve(full_curve), "-", color="tab:blue",
          label=f"encrypted, simulated ({simulate['features']} features)")
  ax.axhline(simulate["clear"][CLEAR_REFERENCE]["accuracy"], color="tab:blue", linestyle=":",
             label=f"clear logistic regression ({simulate['features']} features)")
  ax.plot(*curve(reduced_curve), "-", color="tab:orange", alpha=0.6,
          label=f"simulated ({execute['features']} features)")
  ax.plot(*curve(execute_curve), "o", color="tab:orange",
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


PAPER = "papers/fhe.md"
FIGURE = "papers/figures/fhe_accuracy_vs_iterations.png"


def fill_paper(run_dir, paper: str = PAPER) -> None:
  """Copies a run's tables into the paper page (marker `table:fhe`) and its figure beside it."""
  run_dir = Path(run_dir)
  config = records.read_json(run_dir / "config.json")
  summary = records.read_json(run_dir / "summary.json")
  text = (f"Run `{run_dir.name}` ({config['execute_features']} features x "
          f"{config['execute_iterations']} encrypted iterations; {config['simulate_features']} "
          f"features x {config['simulate_iterations']} simulated iterations; seed "
          f"{config['seed']}, p_error {config['p_error']}), {summary['seconds']:.0f} s in all:\n\n"
          + results_table(summary["execute"], summary["simulate"]))
  written = records.replace_marked_block(paper, "table:fhe", text)
  records.atomic_write_bytes(REPO / FIGURE, (run_dir / "accuracy_vs_iterations.png").read_bytes())
  print(f"{run_dir} -> {paper}: {'written' if written else 'no table:fhe marker'}; {FIGURE}")


if __name__ == "__main__":
  if len(sys.argv) != 3 or sys.argv[1] != "--paper":
    sys.exit("usage: python -m experiments.fhe --paper RUN_DIR")
  fill_paper(sys.argv[2])
