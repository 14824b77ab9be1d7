"""The package versions a run used (recorded in every run's config.json and kept result).

Standard library only: both environments (.venv and .venv-fhe) import it.
"""

from __future__ import annotations

import platform
from importlib import metadata

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
