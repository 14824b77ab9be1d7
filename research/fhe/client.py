"""The hospital's side: keys, preprocessing, encryption of its data, decryption of its model.

  python -m research.fhe.client encrypt --package PACKAGES/client --state STATE \\
      --data train.npz --iterations 2 --seed 0 --out UPLOAD [--report r.json] [--overwrite]
  python -m research.fhe.client decrypt --package PACKAGES/client --state STATE \\
      --model MODEL --out model.npz [--evaluate test.npz] [--report r.json]

STATE is the client's private folder and never leaves it: the secret key set (keys/), the
preprocessing it fit on its own data (selected features, their ranges) and its seed. `encrypt`
selects and scales features into [-1, 1] itself, draws the batch order and initial parameters
from the seed (as concrete-ml's SGDClassifier would), encrypts every batch and the initial
parameters, and writes the upload bundle: ciphertexts plus the evaluation keys, whose sha256 is
the key id. `decrypt` accepts only a model trained for its package under its own key id, then
decrypts the final parameters and every snapshot the server returned.

Data: `.npz` with arrays x (rows, features) and y (rows,) of 0/1, or `.csv` with a header row and
the label in the last column.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from research.common import records
from research.fhe import package as package_lib
from research.fhe import train
from research.fhe import transport

STATE_FILE = "client.json"


def _fhe_client(package: transport.Bundle, state: Path):
  from concrete.ml.deployment import FHEModelClient  # pylint: disable=import-outside-toplevel

  client = FHEModelClient(str(package.directory), key_dir=str(state / "keys"))
  client.generate_private_and_evaluation_keys(force=False)  # loads the cached key set if any
  return client


def encrypt(package_dir, state_dir, data_path, out, iterations: int, seed: int,
            overwrite: bool = False) -> dict[str, Any]:
  """Preprocesses, encrypts and writes the upload; returns a report (timings and sizes).

  The state file is written only once the upload is: a refused or failed upload leaves the
  state as it was (an existing `out` is refused before key generation)."""
  transport.refuse_existing(out, overwrite)
  package = package_lib.read_package(package_dir, "client")
  spec = train.TrainerSpec.from_json(package.meta["spec"])
  state = Path(state_dir)
  x, y = train.load_table(data_path)
  if x.shape[1] < spec.n_features:
    raise ValueError(f"{data_path}: {x.shape[1]} feature columns, the package trains on "
                     f"{spec.n_features}")
  preprocessing = train.fit_preprocessing(x, y, spec.n_features)
  x_scaled = preprocessing.apply(x)
  plan = train.schedule(len(x_scaled), spec, iterations, seed)

  start = time.perf_counter()
  client = _fhe_client(package, state)
  evaluation_keys = client.get_serialized_evaluation_keys()
  keygen_seconds = time.perf_counter() - start
  key_id = transport.sha256(evaluation_keys)

  start = time.perf_counter()
  files: dict[str, bytes] = {"evaluation_keys.bin": evaluation_keys}
  _, _, files["weights.bin"], files["bias.bin"] = client.quantize_encrypt_serialize(
      None, None, plan.weights, plan.bias)
  for t, rows in enumerate(plan.batches, start=1):
    x_batch, y_batch = train.batch(x_scaled, y, rows)
    files[f"x_{t:05d}.bin"], files[f"y_{t:05d}.bin"], _, _ = client.quantize_encrypt_serialize(
        x_batch, y_batch, None, None)
  encrypt_seconds = time.perf_counter() - start

  meta = {"package_id": package.meta["package_id"], "key_id": key_id, "batches": iterations,
          "shapes": spec.shapes()}
  transport.write_bundle(out, "upload", files, meta, overwrite=overwrite)
  records.atomic_write_json(state / STATE_FILE, {
      "package_id": package.meta["package_id"], "key_id": key_id, "seed": seed,
      "iterations": iterations, "rows": len(x), "preprocessing": preprocessing.to_json()})
  batch_bytes = [len(files[f"x_{t:05d}.bin"]) + len(files[f"y_{t:05d}.bin"])
                 for t in range(1, iterations + 1)]
  return {"package_id": package.meta["package_id"], "key_id": key_id,
          "features": list(preprocessing.features), "keygen_seconds": keygen_seconds,
          "encrypt_seconds": encrypt_seconds, "evaluation_key_bytes": len(evaluation_keys),
          "batch_ciphertext_bytes": int(np.mean(batch_bytes)),
          "parameter_ciphertext_bytes": len(files["weights.bin"]) + len(files["bias.bin"]),
          "upload_bytes": sum(len(v) for v in files.values())}


def read_state(state_dir) -> dict[str, Any]:
  path = Path(state_dir) / STATE_FILE
  if not path.is_file():
    raise ValueError(f"{str(state_dir)!r} holds no {STATE_FILE}: run `encrypt` with this state "
                     "folder first")
  return records.read_json(path)


def read_model(model_dir, package: transport.Bundle, key_id: str) -> transport.Bundle:
  """A verified model bundle made for `package` under `key_id`, this client's key id.

  concrete decrypts ciphertexts under another key set without complaint (into garbage), so a
  model trained under other evaluation keys is refused here, before any decryption; so is one
  whose `snapshots` do not name the ciphertexts it holds (`_check_snapshots`).
  """
  model = transport.read_bundle(model_dir, "model", expect={
      "package_id": package.meta["package_id"]})
  if model.meta.get("key_id") != key_id:
    raise transport.MessageError(
        f"model {str(model_dir)!r} was trained under key id {model.meta.get('key_id')}, this "
        f"client's key id is {key_id}: it cannot be decrypted with these keys")
  _check_snapshots(model)
  return model


def _check_snapshots(model: transport.Bundle) -> None:
  """`snapshots`: the iterations the server kept, increasing, ending at `iterations` (as
  `train.snapshot_iterations` makes them), each with its weights and bias ciphertexts."""
  where = f"model {str(model.directory)!r}"
  iterations, snapshots = model.meta.get("iterations"), model.meta.get("snapshots")
  if type(iterations) is not int or iterations < 1:  # pylint: disable=unidiomatic-typecheck
    raise transport.MessageError(f"{where}: meta field 'iterations' is {iterations!r}, expected "
                                 "a positive integer")
  if (not isinstance(snapshots, list) or not snapshots
      or any(type(t) is not int for t in snapshots)  # pylint: disable=unidiomatic-typecheck
      or snapshots != sorted(set(snapshots)) or snapshots[0] < 1
      or snapshots[-1] != iterations):
    raise transport.MessageError(
        f"{where}: meta field 'snapshots' is {snapshots!r}, expected increasing iterations in "
        f"1..{iterations} ending at {iterations}")
  missing = [name for t in snapshots for name in (f"weights_{t:05d}.bin", f"bias_{t:05d}.bin")
             if name not in model.files]
  if missing:
    raise transport.MessageError(f"{where}: meta field 'snapshots' names iterations whose files "
                                 f"{missing} the bundle does not hold")


def decrypt(package_dir, state_dir, model_dir, out, evaluate=None) -> dict[str, Any]:
  """Checks and decrypts the returned model; writes it (and the preprocessing) to `out`."""
  package = package_lib.read_package(package_dir, "client")
  state = read_state(state_dir)
  if state["package_id"] != package.meta["package_id"]:
    raise transport.MessageError(f"state {str(state_dir)!r} belongs to package "
                                 f"{state['package_id']}, not {package.meta['package_id']}")
  client = _fhe_client(package, Path(state_dir))
  model = read_model(model_dir, package,
                     key_id=transport.sha256(client.get_serialized_evaluation_keys()))
  start = time.perf_counter()
  snapshots = []
  for iteration in model.meta["snapshots"]:
    weights, bias = client.deserialize_decrypt_dequantize(
        model.read(f"weights_{iteration:05d}.bin"), model.read(f"bias_{iteration:05d}.bin"))
    snapshots.append(train.Snapshot(int(iteration), np.ravel(weights).copy(),
                                    float(np.ravel(bias)[0])))
  decrypt_seconds = time.perf_counter() - start
  final = snapshots[-1]
  preprocessing = train.Preprocessing.from_json(state["preprocessing"])
  arrays = {"weights": final.weights, "bias": np.float64(final.bias),
            "iteration": np.int64(final.iteration),
            "snapshot_iterations": np.array([s.iteration for s in snapshots]),
            "snapshot_weights": np.stack([s.weights for s in snapshots]),
            "snapshot_bias": np.array([s.bias for s in snapshots]),
            "features": np.array(preprocessing.features), "low": np.array(preprocessing.low),
            "high": np.array(preprocessing.high)}
  records.atomic_save_npz(out, **arrays)
  report = {"decrypt_seconds": decrypt_seconds, "iterations": final.iteration,
            "weights": final.weights.tolist(), "bias": final.bias}
  if evaluate:
    x_test, y_test = train.load_table(evaluate)
    report["curve"] = train.summarize(snapshots, preprocessing.apply(x_test), y_test)
    report["test"] = report["curve"][-1]
  return report


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m research.fhe.client", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  enc = commands.add_parser("encrypt", help="keys, preprocessing, encrypted upload")
  dec = commands.add_parser("decrypt", help="check and decrypt the returned model")
  for cmd in (enc, dec):
    cmd.add_argument("--package", required=True, help="the client package folder")
    cmd.add_argument("--state", required=True, help="the client's private folder")
    cmd.add_argument("--out", required=True)
    cmd.add_argument("--report", help="write the report JSON here as well")
  enc.add_argument("--data", required=True)
  enc.add_argument("--iterations", type=int, required=True)
  enc.add_argument("--seed", type=int, default=0)
  enc.add_argument("--overwrite", action="store_true")
  dec.add_argument("--model", required=True, help="the model bundle the server returned")
  dec.add_argument("--evaluate", help="held-out .npz/.csv to score every snapshot on")
  args = parser.parse_args(argv)
  if args.command == "encrypt":
    return transport.run_command(lambda: encrypt(args.package, args.state, args.data, args.out,
                                                 args.iterations, args.seed, args.overwrite),
                                 args.report)
  return transport.run_command(lambda: decrypt(args.package, args.state, args.model, args.out,
                                               args.evaluate), args.report)


if __name__ == "__main__":
  sys.exit(main())
