"""Shape arithmetic the kernels share: block-multiple and power-of-two sizes, zero padding."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= n."""
  return -(-n // multiple) * multiple


def next_power_of_two(n: int) -> int:
  """The smallest power of two >= n (Triton block dimensions must be powers of two)."""
  return 1 << max(0, (n - 1).bit_length())


def pad_to(a: jax.Array, sizes: Mapping[int, int]) -> jax.Array:
  """Zero-pads the end of each axis in `sizes` to that length, in one pad (a no-op if none)."""
  widths = [(0, sizes.get(axis, n) - n) for axis, n in enumerate(a.shape)]
  return a if not any(w for _, w in widths) else jnp.pad(a, widths)
