"""Statistics for comparisons over seeds and held-out images (pure numpy, no jax).

A comparison of two methods is over paired samples: the same (seed, image) scored by both, so
the per-sample difference removes what the image and the seed's test noise contribute. Reported:
the mean difference, an exact two-sided sign test (ties dropped) and a percentile bootstrap
interval of the mean difference (resampling the pairs, seeded). The bootstrap treats pairs as
independent; pairs of one image across seeds are not, so with few images the interval is
optimistic, and the sign test's count says how many pairs point each way.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np


def seed_spread(per_seed: Sequence[float]) -> dict:
  """Mean and sample standard deviation (ddof 1; 0 for one seed) of per-seed values."""
  values = np.asarray(per_seed, np.float64)
  if values.ndim != 1 or values.size == 0 or not np.all(np.isfinite(values)):
    raise ValueError(f"per-seed values: got {per_seed!r}, expected a non-empty list of finite "
                     "numbers")
  std = float(values.std(ddof=1)) if values.size > 1 else 0.0
  return {"mean": float(values.mean()), "std": std, "n": int(values.size)}


def sign_test(differences: Sequence[float]) -> dict:
  """Exact two-sided sign test of median 0: positives, negatives, ties (dropped), p-value."""
  d = np.asarray(differences, np.float64)
  pos, neg = int(np.sum(d > 0)), int(np.sum(d < 0))
  n, k = pos + neg, min(pos, neg)
  p = 1.0 if n == 0 else min(1.0, 2.0 * sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n)
  return {"positive": pos, "negative": neg, "ties": int(d.size - n), "p": p}


def bootstrap_interval(differences: Sequence[float], *, level: float = 0.95,
                       resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
  """Percentile bootstrap interval of the mean of `differences` (pairs resampled, seeded)."""
  d = np.asarray(differences, np.float64)
  if d.ndim != 1 or d.size == 0:
    raise ValueError(f"differences: got shape {d.shape}, expected a non-empty 1-D list")
  if not 0 < level < 1:
    raise ValueError(f"level: got {level}, expected a number in (0, 1)")
  rng = np.random.default_rng(seed)
  means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
  tail = (1 - level) / 2
  return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def paired(ours: Mapping[str, Mapping[str, float]], other: Mapping[str, Mapping[str, float]]
           ) -> dict:
  """ours - other over every (seed, sample): {seed: {sample: score}} for each method.

  Refuses pairs that do not match (a seed or sample scored by one method only)."""
  keys = sorted((s, n) for s in ours for n in ours[s])
  other_keys = sorted((s, n) for s in other for n in other[s])
  if keys != other_keys:
    missing = sorted(set(keys) ^ set(other_keys))[:3]
    raise ValueError(f"paired scores: the two methods' (seed, sample) sets differ, e.g. "
                     f"{missing}")
  d = [ours[s][n] - other[s][n] for s, n in keys]
  lo, hi = bootstrap_interval(d)
  return {"mean": float(np.mean(d)), "interval": [lo, hi], "pairs": len(d),
          "sign_test": sign_test(d)}
