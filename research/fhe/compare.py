"""The references an encrypted run is judged against, computed on clear data by its owner.

  python -m research.fhe.compare --train train.npz --test test.npz --features 30 \\
      --iterations 200 --seed 0 [--every 10] [--p-error 0.01] [--mode simulate] --out report.json

Fits the client's preprocessing for `--features` features, compiles the same training circuit the
package holds, runs it over the same seeded schedule in FHE simulation (or quantized in the
clear, `--mode disable`), and trains the clear models (scikit-learn's LogisticRegression and
SGDClassifier, concrete-ml's SGDClassifier with fit_encrypted=False) on the same features. With
the seed, feature count and iterations of an encrypted run, its snapshots are what the decrypted
model is compared with. This runs where the clear data is (the hospital, or an experiment that
plays it); nothing here goes to the server.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from research.common import versions
from research.fhe import train
from research.fhe import transport


def compare(train_path, test_path, n_features: int, iterations: int, seed: int, every: int = 10,
            p_error: float = 0.01, mode: str = "simulate") -> dict[str, Any]:
  x_train, y_train = train.load_table(train_path)
  x_test, y_test = train.load_table(test_path)
  if x_test.shape[1] != x_train.shape[1]:
    raise ValueError(f"{test_path}: {x_test.shape[1]} columns, {train_path} has "
                     f"{x_train.shape[1]}")
  spec = train.TrainerSpec(n_features, p_error=p_error)
  preprocessing = train.fit_preprocessing(x_train, y_train, n_features)
  x_fit, x_eval = preprocessing.apply(x_train), preprocessing.apply(x_test)

  start = time.perf_counter()
  trainer = train.compile_trainer(spec)
  compile_seconds = time.perf_counter() - start
  plan = train.schedule(len(x_fit), spec, iterations, seed)
  start = time.perf_counter()
  snapshots = train.train_quantized(trainer, x_fit, y_train, plan, mode, every)
  train_seconds = time.perf_counter() - start
  return {
      "mode": mode, "spec": spec.to_json(), "seed": seed, "iterations": iterations,
      "features": list(preprocessing.features),
      "weight_step": float(trainer.training_quantized_module.output_quantizers[0].scale.ravel()[0]),
      "curve": train.summarize(snapshots, x_eval, y_test),
      "snapshots": [{"iteration": s.iteration, "weights": s.weights.tolist(), "bias": s.bias}
                    for s in snapshots],
      "clear": train.clear_baselines(x_fit, y_train, x_eval, y_test, seed),
      "compile_seconds": compile_seconds, "seconds_per_iteration": train_seconds / iterations,
      "environment": versions.resolved_versions(),  # the FHE environment's packages
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m research.fhe.compare", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--train", required=True)
  parser.add_argument("--test", required=True)
  parser.add_argument("--features", type=int, required=True)
  parser.add_argument("--iterations", type=int, required=True)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--every", type=int, default=10)
  parser.add_argument("--p-error", type=float, default=0.01)
  parser.add_argument("--mode", choices=("simulate", "disable"), default="simulate")
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  return transport.run_command(
      lambda: compare(args.train, args.test, args.features, args.iterations, args.seed,
                      args.every, args.p_error, args.mode), args.out,
      printed=lambda report: {"out": args.out, "final": report["curve"][-1],
                              "clear": report["clear"]})


if __name__ == "__main__":
  sys.exit(main())
