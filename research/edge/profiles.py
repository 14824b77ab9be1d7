"""Variant profiles measured on this machine, cached as JSON (this module is the edge module's
store: it reads clocks and files, nothing else in research/edge does).

A profile is a `selector.VariantProfile`: latency of one frame (p50 and p95 over `repeats`
timed calls of the compiled variant, idle, and again while a load generator keeps a known
fraction of the CPU busy), peak memory (the parameters plus the compiled program's arguments,
outputs and temporaries from XLA's memory analysis) and the stage score (from accuracy,
computed by the caller on held-out data).

The cache file holds the machine's description (platform, processor, cores, jax version and
backend), a `context` (the frame shape and the data the scores were computed on) and per
variant its fingerprint (variants.fingerprint: architecture + parameter bytes) with its profile.
`load` returns only the entries still valid: a file that does not parse or has another format,
machine or context is discarded entirely (with the reason), an entry whose fingerprint differs
from the variant's is dropped, so a retrained or edited model is profiled again. Writes go to a
temporary name and are renamed.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, ContextManager

import jax
import numpy as np

from research.edge.selector import VariantProfile

FORMAT = "meshwork.edge-profiles/2"


def machine() -> dict[str, Any]:
  return {"platform": platform.platform(), "processor": platform.processor() or
          platform.machine(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "backend": jax.default_backend(),
          "device_kind": jax.devices()[0].device_kind}


def time_calls(fn: Callable[[], Any], repeats: int, gap_s: float = 0.0,
               clock: Callable[[], float] = time.perf_counter) -> np.ndarray:
  """Milliseconds of `repeats` calls of fn() (each waited for), after one untimed call, with
  `gap_s` of sleep before each: frames arrive at a period, and a call after an idle gap is
  slower than one right after another (caches and thread pools go cold)."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    if gap_s > 0:
      time.sleep(gap_s)
    start = clock()
    jax.block_until_ready(fn())
    times.append((clock() - start) * 1e3)
  return np.asarray(times)


def compiled_memory_mb(jitted, *args) -> float:
  """Arguments + outputs + temporaries of the compiled program, from XLA's memory analysis."""
  stats = jitted.lower(*args).compile().memory_analysis()
  if stats is None:  # a backend without the analysis: the arguments and outputs only
    out = jax.eval_shape(jitted, *args)
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize
               for a in jax.tree.leaves((args, out))) / 2**20
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes
          + stats.temp_size_in_bytes) / 2**20


def measure(stage: str, name: str, jitted, params, frame, score: float, repeats: int,
            under_load: Callable[[], ContextManager[Callable[[], float]]],
            gap_s: float = 0.0) -> VariantProfile:
  """One variant's profile. `under_load()` is a context manager that keeps the CPU busy and
  yields a function returning the background fraction measured while it ran."""
  call = lambda: jitted(params, frame)
  idle = time_calls(call, repeats, gap_s)
  with under_load() as background:
    loaded = time_calls(call, repeats, gap_s)
    fraction = background()
  return VariantProfile(stage, name, float(np.percentile(idle, 50)),
                        float(np.percentile(idle, 95)), float(np.percentile(loaded, 50)),
                        float(np.percentile(loaded, 95)),
                        float(min(max(fraction, 0.05), 1.0)),
                        compiled_memory_mb(jitted, params, frame), float(score))


def load(path: Path, fingerprints: dict[str, str],
         context: dict[str, Any]) -> tuple[dict[str, VariantProfile], str]:
  """(the cached profiles still valid, keyed by variant key, and why any were discarded)."""
  path = Path(path)
  if not path.exists():
    return {}, "no cache file"
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") != FORMAT:
      return {}, f"format {data.get('format')!r} is not {FORMAT!r}"
    if data.get("machine") != machine():
      return {}, "profiled on another machine (or jax version)"
    if data.get("context") != json.loads(json.dumps(context)):
      return {}, "profiled for another frame shape or data"
    valid, stale = {}, []
    for key, fingerprint in fingerprints.items():
      entry = data.get("variants", {}).get(key)
      if entry is None:
        continue
      if entry.get("fingerprint") != fingerprint:
        stale.append(key)
        continue
      valid[key] = VariantProfile(**entry["profile"])
  except (ValueError, TypeError, KeyError, AttributeError) as error:
    return {}, f"unreadable cache ({type(error).__name__}: {error})"
  return valid, (f"stale (model changed): {', '.join(stale)}" if stale else "")


def save(path: Path, profiles: dict[str, VariantProfile], fingerprints: dict[str, str],
         context: dict[str, Any]) -> Path:
  from research.common import records  # pylint: disable=import-outside-toplevel
  data = {"format": FORMAT, "machine": machine(), "context": context,
          "variants": {key: {"fingerprint": fingerprints[key], "profile": p._asdict()}
                       for key, p in profiles.items()}}
  return records.atomic_write_json(Path(path), data)
