"""The cloud provider's build step: compile the training circuit, write the two packages.

  python -m research.fhe.package build --out PACKAGES --features 4 [--p-error 0.01]
      [--parameters-range -1 1] [--overwrite]

writes PACKAGES/client (client.zip: circuit specs and quantizers, no keys) and PACKAGES/server
(server.zip: the compiled training circuit), each a verified bundle (see transport.py) whose
meta is the same manifest: versions of Python, concrete-ml and concrete-python, the trainer spec
(feature count, parameter range, batch size, p_error), the sha256 of both zips and a package id
derived from them. Uploads and models name the package id; a file meant for another package or
made with other library versions is refused.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

from research.common import records
from research.fhe import train
from research.fhe import transport


def versions() -> dict[str, str]:
  import concrete.fhe  # pylint: disable=import-outside-toplevel
  import concrete.ml  # pylint: disable=import-outside-toplevel

  return {"python": platform.python_version(), "concrete_ml": concrete.ml.__version__,
          "concrete_python": concrete.fhe.__version__}


def build(out: str | Path, spec: train.TrainerSpec, overwrite: bool = False) -> dict[str, Any]:
  """Compiles the training circuit for `spec` and writes both packages; returns the manifest."""
  from concrete.ml.deployment import FHEModelDev  # pylint: disable=import-outside-toplevel

  trainer = train.compile_trainer(spec)
  with tempfile.TemporaryDirectory(prefix="fhe-build-") as scratch:
    dev_dir = Path(scratch) / "dev"
    FHEModelDev(str(dev_dir), trainer).save(mode="training")
    return write_packages(out, spec, dev_dir / "client.zip", dev_dir / "server.zip", overwrite)


def write_packages(out: str | Path, spec: train.TrainerSpec, client_zip: Path, server_zip: Path,
                   overwrite: bool = False) -> dict[str, Any]:
  """Writes `out/client` and `out/server` around the two zips; returns their manifest."""
  out = Path(out)
  client_sha, server_sha = records.sha256_file(client_zip), records.sha256_file(server_zip)
  manifest = {
      "versions": versions(),
      "spec": spec.to_json(),
      "shapes": spec.shapes(),
      "client_zip_sha256": client_sha,
      "server_zip_sha256": server_sha,
      "package_id": transport.sha256(f"{client_sha}:{server_sha}".encode())[:32],
  }
  transport.write_bundle(out / "client", "client-package", {"client.zip": client_zip},
                         manifest, overwrite=overwrite)
  transport.write_bundle(out / "server", "server-package", {"server.zip": server_zip},
                         manifest, overwrite=overwrite)
  return manifest


def read_package(directory: str | Path, side: str) -> transport.Bundle:
  """A verified package for `side` ("client" or "server") built with the installed versions."""
  bundle = transport.read_bundle(directory, f"{side}-package")
  installed = versions()
  if bundle.meta.get("versions") != installed:
    raise transport.MessageError(
        f"{side} package {str(directory)!r} was built with {bundle.meta.get('versions')}, this "
        f"environment has {installed}; rebuild the packages or match the versions")
  zip_name = f"{side}.zip"
  if bundle.files[zip_name]["sha256"] != bundle.meta[f"{side}_zip_sha256"]:
    raise transport.MessageError(f"{side} package {str(directory)!r}: {zip_name} is not the zip "
                                 "the manifest names")
  train.TrainerSpec.from_json(bundle.meta["spec"])  # validates the spec fields
  return bundle


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m research.fhe.package", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  build_cmd = commands.add_parser("build", help="compile the circuit and write both packages")
  build_cmd.add_argument("--out", required=True)
  build_cmd.add_argument("--features", type=int, required=True)
  build_cmd.add_argument("--p-error", type=float, default=0.01)
  build_cmd.add_argument("--parameters-range", type=float, nargs=2, default=(-1.0, 1.0))
  build_cmd.add_argument("--overwrite", action="store_true")
  args = parser.parse_args(argv)
  return transport.run_command(
      lambda: build(args.out, train.TrainerSpec(args.features, tuple(args.parameters_range),
                                                args.p_error), overwrite=args.overwrite),
      printed=lambda manifest: {"package_id": manifest["package_id"], "out": args.out})


if __name__ == "__main__":
  sys.exit(main())
