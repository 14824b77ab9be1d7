"""Pytrees of arrays (model params) to and from .npz files, one array per leaf path.

Beside records.py rather than in it: records is shared with the FHE environment, which has no
jax; this module is the jax side.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from research.common import records


def flat_tree(tree: Any) -> dict[str, np.ndarray]:
  """A pytree as {jax.tree_util.keystr(path): array}, the layout of a saved .npz."""
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def save_tree_npz(path: str | os.PathLike, tree: Any) -> Path:
  """A pytree of arrays (e.g. model params) as an .npz, one array per leaf path, atomically."""
  return records.atomic_save_npz(path, **flat_tree(tree))


def load_tree_npz(path: str | os.PathLike, like: Any) -> Any:
  """Arrays saved by `save_tree_npz`, in the structure of `like` (arrays or ShapeDtypeStructs):
  every leaf path present with its shape, no other; otherwise a ValueError naming a path."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
  with np.load(path) as saved:
    expected = {jax.tree_util.keystr(p): tuple(leaf.shape) for p, leaf in leaves}
    got = {k: saved[k].shape for k in saved.files}
    differ = sorted(k for k in got.keys() | expected.keys() if got.get(k) != expected.get(k))
    if differ:
      raise ValueError(f"{path}: saved params do not fit the model ({len(differ)} paths differ "
                       f"in presence or shape, e.g. {differ[0]}: saved {got.get(differ[0])}, "
                       f"model {expected.get(differ[0])})")
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(saved[k]) for k in expected])
