"""The package versions a run used (recorded in every run's config.json and kept result).

Standard library only: both environments (.venv and .venv-fhe) import it.

`resolved_versions()` reads the installed distributions (importlib.metadata); `lock_sha256()`
names the lock file (requirements.lock / requirements-fhe.lock) the running environment was
built from, as recorded by scripts/ensure_venv.sh in the environment's stamp.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy",
            "ml-collections", "scikit-learn", "scikit-image", "concrete-ml", "concrete-python",
            "torch")


def resolved_versions(packages=None) -> dict[str, str]:
  """{package: installed version} for the packages that matter; missing ones are left out."""
  found = {"python": platform.python_version()}
  for name in packages or PACKAGES:
    try:
      found[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      continue
  return found


STAMP = ".meshwork-stamp"


def lock_sha256(prefix: str | Path | None = None) -> str | None:
  """sha256 (hex) of the lock file the environment at `prefix` (default: this one) was built from.

  Read from PREFIX/.meshwork-stamp, which scripts/ensure_venv.sh writes as
  "<sha256 of the lock file> <python version>" once the environment is complete; the lock file
  itself is not hashed here (it may have changed since). None when there is no such stamp (an
  environment not made by `make venv` / `make venv-fhe`) or it is not in that form.
  """
  stamp = Path(sys.prefix if prefix is None else prefix) / STAMP
  try:
    fields = stamp.read_text().split()
  except OSError:
    return None
  if fields and re.fullmatch(r"[0-9a-f]{64}", fields[0]):
    return fields[0]
  return None


def machine_description() -> dict[str, Any]:
  """The host a CPU result was made on: XLA compiles CPU code for the host's vector ISA, so
  float results can differ between machines (seen for K-quant's +ef and sign methods)."""
  description: dict[str, Any] = {"machine": platform.machine(), "cpus": os.cpu_count()}
  try:
    cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
  except OSError:
    return description
  for line in cpuinfo.splitlines():
    name, _, value = line.partition(":")
    if name.strip() == "model name" and "cpu_model" not in description:
      description["cpu_model"] = value.strip()
    if name.strip() == "flags" and "vector_isa" not in description:
      flags = set(value.split())
      description["vector_isa"] = [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f",
                                               "avx512_bf16", "amx_tile") if f in flags]
  return description


def environment() -> dict[str, Any]:
  """What a run records beside its config: package versions, the lock it was built from, the
  host."""
  return dict(resolved_versions(), lock_sha256=lock_sha256(), host=machine_description())
