"""Buckets: a params pytree as one float32 (rows, bucket_size) array, and back.

Each leaf is raveled and zero-padded to a whole number of buckets, so a bucket never spans two
tensors: per-tensor ranges are a range repeated over the leaf's rows, per-bucket ranges one per
row. The layout is static (shapes only) and hashable, so it can be a jit static argument.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Params = Any


class BucketLayout(NamedTuple):
  treedef: Any
  shapes: tuple[tuple[int, ...], ...]
  rows: tuple[int, ...]          # buckets per leaf
  bucket_size: int

  @property
  def num_rows(self) -> int:
    return sum(self.rows)

  @property
  def num_params(self) -> int:
    return sum(math.prod(s) for s in self.shapes)

  @property
  def row_leaf(self) -> np.ndarray:
    """(num_rows,) int: which leaf each bucket belongs to."""
    return np.repeat(np.arange(len(self.rows)), self.rows)


def bucket_layout(params: Params, bucket_size: int) -> BucketLayout:
  if not isinstance(bucket_size, int) or bucket_size < 8 or bucket_size % 8:
    raise ValueError(f"bucket_size={bucket_size!r}: expected a positive multiple of 8")
  leaves, treedef = jax.tree.flatten(params)
  shapes = tuple(tuple(int(d) for d in leaf.shape) for leaf in leaves)
  rows = tuple(max(1, -(-math.prod(s) // bucket_size)) for s in shapes)
  return BucketLayout(treedef, shapes, rows, bucket_size)


def to_buckets(tree: Params, layout: BucketLayout) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  if len(leaves) != len(layout.shapes):
    raise ValueError(f"tree has {len(leaves)} leaves, layout expects {len(layout.shapes)}")
  parts = []
  for leaf, shape, rows in zip(leaves, layout.shapes, layout.rows):
    if tuple(leaf.shape) != shape:
      raise ValueError(f"leaf shape {tuple(leaf.shape)} does not match layout shape {shape}")
    flat = jnp.ravel(leaf).astype(jnp.float32)
    flat = jnp.pad(flat, (0, rows * layout.bucket_size - flat.size))
    parts.append(flat.reshape(rows, layout.bucket_size))
  return jnp.concatenate(parts, axis=0)


def from_buckets(buckets: jax.Array, layout: BucketLayout) -> Params:
  if buckets.shape != (layout.num_rows, layout.bucket_size):
    raise ValueError(f"buckets: got shape {buckets.shape}, expected "
                     f"{(layout.num_rows, layout.bucket_size)}")
  leaves, start = [], 0
  for shape, rows in zip(layout.shapes, layout.rows):
    flat = buckets[start:start + rows].reshape(-1)[:math.prod(shape)]
    leaves.append(flat.reshape(shape))
    start += rows
  return jax.tree.unflatten(layout.treedef, leaves)


def valid_mask(layout: BucketLayout) -> np.ndarray:
  """(num_rows, bucket_size) bool: True where a bucket holds a real parameter, not padding."""
  mask = []
  for shape, rows in zip(layout.shapes, layout.rows):
    flat = np.zeros(rows * layout.bucket_size, bool)
    flat[:math.prod(shape)] = True
    mask.append(flat.reshape(rows, layout.bucket_size))
  return np.concatenate(mask)
