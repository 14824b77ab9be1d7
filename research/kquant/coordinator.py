"""The coordinator's policies: which range and which K it sends with the model each round.

Range policies (`range_policy`):
  fixed          [-radius, radius] for every bucket, every round.
  last_round     symmetric, margin x max|aggregate| of last round's decoded aggregate, per bucket
                 or per tensor; the first round uses the fixed radius.
  client_minmax  clients first report min and max of their (error-corrected) update per bucket
                 (64 bits per bucket each, counted); the coordinator sends [min over clients,
                 max over clients], per bucket or per tensor.
Every range is widened to at least `min_width` (an all-zero update would otherwise give lo = hi).
K policy: fixed K, or a per-round schedule ((round, K), ...): K from the last entry whose round
is <= the current round.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from research.kquant.buckets import BucketLayout
from research.kquant.quantize import RangeSpec

RANGE_POLICIES = ("fixed", "last_round", "client_minmax")


def _per_tensor(values: jax.Array, layout: BucketLayout, reduce) -> jax.Array:
  """Reduces a (rows,) statistic over each leaf's rows and repeats it back over them."""
  row_leaf = jnp.asarray(layout.row_leaf)
  per_leaf = reduce(values, row_leaf, num_segments=len(layout.rows))
  return per_leaf[row_leaf]


def widen(spec: RangeSpec, min_width: float) -> RangeSpec:
  center, half = (spec.lo + spec.hi) / 2, jnp.maximum((spec.hi - spec.lo) / 2, min_width / 2)
  return RangeSpec(center - half, center + half)


def fixed_range(layout: BucketLayout, radius: float) -> RangeSpec:
  return RangeSpec(jnp.full((layout.num_rows,), -radius, jnp.float32),
                   jnp.full((layout.num_rows,), radius, jnp.float32))


def range_from_aggregate(aggregate: jax.Array, layout: BucketLayout, *, per_tensor: bool,
                         margin: float, min_width: float) -> RangeSpec:
  radius = jnp.max(jnp.abs(aggregate), axis=1) * margin
  if per_tensor:
    radius = _per_tensor(radius, layout, jax.ops.segment_max)
  return widen(RangeSpec(-radius, radius), min_width)


def range_from_client_minmax(updates: jax.Array, include: jax.Array, layout: BucketLayout, *,
                             per_tensor: bool, min_width: float) -> RangeSpec:
  """updates: (clients, rows, bucket_size); include: (clients,) bool, clients that count."""
  big = jnp.float32(3.0e38)
  lo = jnp.min(jnp.where(include[:, None], jnp.min(updates, axis=2), big), axis=0)
  hi = jnp.max(jnp.where(include[:, None], jnp.max(updates, axis=2), -big), axis=0)
  lo, hi = jnp.where(lo > hi, 0.0, lo), jnp.where(lo > hi, 0.0, hi)  # nobody reported
  if per_tensor:
    lo = _per_tensor(lo, layout, jax.ops.segment_min)
    hi = _per_tensor(hi, layout, jax.ops.segment_max)
  return widen(RangeSpec(lo, hi), min_width)


def k_for_round(round_index: int, k: int, schedule: Sequence[Sequence[int]] = ()) -> int:
  """K for this round: the fixed K, or the schedule's entry in force at `round_index`."""
  current = k
  for start, scheduled_k in sorted(tuple(entry) for entry in schedule):
    if start <= round_index:
      current = scheduled_k
  return current


def range_message_bits(layout: BucketLayout, per_tensor: bool) -> int:
  """Downlink bits of one range message: two float32 per bucket or per tensor, plus K (8 bits)."""
  return 64 * (len(layout.rows) if per_tensor else layout.num_rows) + 8
