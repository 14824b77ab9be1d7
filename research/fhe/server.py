"""The cloud's side: train on ciphertexts with the client's evaluation keys, return ciphertexts.

  python -m research.fhe.server train --package PACKAGES/server --upload UPLOAD --out MODEL \\
      [--snapshot-every 1] [--report r.json] [--overwrite]

The server holds the server package and the upload, nothing else: no secret key, no clear
feature, label or statistic. It checks the upload (format, its package id, the shapes the
package's circuit takes, every file's hash, the key id being the evaluation keys' hash), then
runs one encrypted iteration per uploaded batch, the encrypted weights and bias of one iteration
feeding the next (concrete's composable circuit), and writes the model bundle: the encrypted
parameters after every `--snapshot-every` iterations and after the last, under the client's key
id.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from research.fhe import package as package_lib
from research.fhe import train
from research.fhe import transport


def read_upload(upload_dir, package: transport.Bundle) -> transport.Bundle:
  """A verified upload made for `package`: ids, shapes, one x and one y file per batch."""
  upload = transport.read_bundle(upload_dir, "upload", expect={
      "package_id": package.meta["package_id"], "shapes": package.meta["shapes"]})
  batches = upload.meta.get("batches")
  if not isinstance(batches, int) or batches < 1:
    raise transport.MessageError(f"upload {str(upload_dir)!r}: batches={batches!r}, expected a "
                                 "positive int")
  expected = {"evaluation_keys.bin", "weights.bin", "bias.bin"}
  expected |= {f"{v}_{t:05d}.bin" for t in range(1, batches + 1) for v in ("x", "y")}
  if set(upload.files) != expected:
    raise transport.MessageError(
        f"upload {str(upload_dir)!r}: files {sorted(set(upload.files) ^ expected)} do not fit "
        f"batches={batches} (expected evaluation_keys.bin, weights.bin, bias.bin, x_/y_00001.bin"
        " ...)")
  if upload.files["evaluation_keys.bin"]["sha256"] != upload.meta.get("key_id"):
    raise transport.MessageError(f"upload {str(upload_dir)!r}: key_id is not the hash of "
                                 "evaluation_keys.bin")
  return upload


def train_encrypted(package_dir, upload_dir, out, snapshot_every: int = 1,
                    overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
  """Runs the encrypted iterations; returns a report (timings, sizes)."""
  from concrete import fhe  # pylint: disable=import-outside-toplevel
  from concrete.ml.deployment import FHEModelServer  # pylint: disable=import-outside-toplevel

  transport.refuse_existing(out, overwrite)  # before the encrypted iterations, not after
  package = package_lib.read_package(package_dir, "server")
  upload = read_upload(upload_dir, package)
  batches = upload.meta["batches"]
  keep = set(train.snapshot_iterations(batches, snapshot_every))

  start = time.perf_counter()
  server = FHEModelServer(str(package.directory))
  evaluation_keys = fhe.EvaluationKeys.deserialize(upload.read("evaluation_keys.bin"))
  load_seconds = time.perf_counter() - start

  weights, bias = upload.read("weights.bin"), upload.read("bias.bin")
  files, iteration_seconds = {}, []
  steps = range(1, batches + 1)
  if progress:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    steps = tqdm(steps, desc="encrypted iterations", file=sys.stderr)
  for t in steps:
    start = time.perf_counter()
    weights, bias = server.run(
        (upload.read(f"x_{t:05d}.bin"), upload.read(f"y_{t:05d}.bin"), weights, bias),
        evaluation_keys)
    iteration_seconds.append(time.perf_counter() - start)
    if t in keep:
      files[f"weights_{t:05d}.bin"], files[f"bias_{t:05d}.bin"] = weights, bias
  meta = {"package_id": package.meta["package_id"], "key_id": upload.meta["key_id"],
          "upload_id": upload.index_sha256, "iterations": batches, "snapshots": sorted(keep)}
  transport.write_bundle(out, "model", files, meta, overwrite=overwrite)
  return {"load_seconds": load_seconds, "iteration_seconds": iteration_seconds,
          "seconds_per_iteration": sum(iteration_seconds) / len(iteration_seconds),
          "iterations": batches, "upload_bytes": upload.total_bytes,
          "model_bytes": sum(len(v) for v in files.values())}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m research.fhe.server", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  cmd = commands.add_parser("train", help="train on an upload, write the encrypted model")
  cmd.add_argument("--package", required=True, help="the server package folder")
  cmd.add_argument("--upload", required=True)
  cmd.add_argument("--out", required=True)
  cmd.add_argument("--snapshot-every", type=int, default=1)
  cmd.add_argument("--report")
  cmd.add_argument("--overwrite", action="store_true")
  args = parser.parse_args(argv)
  return transport.run_command(lambda: train_encrypted(args.package, args.upload, args.out,
                                                       args.snapshot_every, args.overwrite),
                               args.report)


if __name__ == "__main__":
  sys.exit(main())
