"""The one timer for benchmarks: median wall time of a jitted call, results blocked on."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import jax


def median_seconds(fn: Callable, *args, repeats: int = 5, warmup: int = 1,
                   setup: Callable[[], tuple] | None = None) -> float:
  """Median over `repeats` timed calls, after `warmup` untimed ones (compilation).

  `setup`, when given, runs untimed before every call and returns the call's arguments (for
  inputs a call consumes).
  """
  for _ in range(warmup):
    jax.block_until_ready(fn(*(setup() if setup else args)))
  times = []
  for _ in range(repeats):
    if setup:
      args = setup()
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)
