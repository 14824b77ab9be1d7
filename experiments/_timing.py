"""The one timer for benchmarks: median wall time of a jitted call, results blocked on."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import jax


def median_seconds(fn: Callable, *args, repeats: int = 5, warmup: int = 1) -> float:
  """Median over `repeats` timed calls, after `warmup` untimed ones (compilation)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)
