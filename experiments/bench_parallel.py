"""Benchmark: bytes each device receives to redistribute a tensor, our plan vs XLA vs the bound.

For every ordered pair of distinct layouts (`layout.all_layouts`; or a seeded sample of
`--max-pairs` per set) of a rank-2 (64 x 64) and a rank-3 (16 x 16 x 16) float32 tensor on the
meshes (8,), (2, 4), (4, 2) and (2, 2, 2):

- (a) our plan (`plan_redistribution` under `bytes_model()`: alpha = launch = 0, so the plan
  minimizes bytes received, then steps) lowered to one shard_map and compiled; bytes read back
  from the compiled HLO (`lower.hlo_collectives`) and checked against `plan.predicted_bytes`;
- (b) XLA's own resharding, `jax.jit(identity, out_shardings=target)` on an array with the source
  sharding, compiled; bytes from its HLO, and whether some collective materializes the whole
  tensor on a device while the target is not replicated ("XLA replicates");
- (c) the exact lower bound (`lower_bound_bytes`, from `NamedSharding.devices_indices_map`).

Wall time of (a) vs (b) on the CPU devices for a seeded sample of pairs spread over the sets, at
larger shapes (1024 x 1024, 64 x 128 x 128), interleaved in one process; outputs checked equal.
Writes runs/bench_parallel/<timestamp>/ (summary.json, tables.md, pairs.jsonl.gz with one record
per pair, bench_parallel.png). With --paper also keeps the summary as
papers/results/bench_parallel.cpu.json, the pairs as papers/results/bench_parallel.cpu.pairs.jsonl.gz
and the figure as papers/figures/bench_parallel.png, and fills the blocks of papers/parallel.md.

  python -m experiments.bench_parallel [--max-pairs N] [--timed-pairs 40] [--quick] [--paper]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from experiments import paper
from research.common import mesh as mesh_lib
from research.common import records

PAPER_PAGE = "papers/parallel.md"
FIGURE = paper.PAPERS / "figures" / "bench_parallel.png"
MESHES = (((8,), ("a",)), ((2, 4), ("x", "y")), ((4, 2), ("x", "y")),
          ((2, 2, 2), ("x", "y", "z")))
SHAPES = {2: (64, 64), 3: (16, 16, 16)}
TIMED_SHAPES = {2: (1024, 1024), 3: (64, 128, 128)}
DTYPE = "float32"
TOL = 1e-6  # bytes: HLO, plan and bound are sums of exact fractions of powers of two
PLANNER_KEY = "bench_parallel_plan.cpu"


def bytes_model():
  """The benchmark's cost model: bytes received only (no launch or hop cost); ties go to fewer
  steps. Its goal is bytes; the default model would trade bytes for fewer collectives on these
  small tensors, as a real interconnect should."""
  from research.parallel import plan as plan_lib  # pylint: disable=import-outside-toplevel
  return plan_lib.CostModel(default_alpha=0.0, default_beta=1.0, launch=0.0)


def layout_pairs(mesh, shape, max_pairs: int, seed: int) -> tuple[list, int]:
  """Ordered pairs of distinct layouts; a seeded sample of `max_pairs` if there are more."""
  from research.parallel.layout import all_layouts  # pylint: disable=import-outside-toplevel
  layouts = all_layouts(mesh, shape)
  pairs = [(s, t) for s in layouts for t in layouts if s != t]
  total = len(pairs)
  if max_pairs and total > max_pairs:
    rng = np.random.default_rng(seed)
    pairs = [pairs[i] for i in sorted(rng.choice(total, max_pairs, replace=False))]
  return pairs, total


def measure_pair(mesh, shape, source, target) -> dict:
  """Bytes received per device by our plan (HLO and predicted), by XLA, and the bound."""
  import jax  # pylint: disable=import-outside-toplevel
  from research.parallel import lower  # pylint: disable=import-outside-toplevel
  from research.parallel import plan as plan_lib  # pylint: disable=import-outside-toplevel

  plan = plan_lib.plan_redistribution(shape, DTYPE, source, target, bytes_model())
  placed = jax.device_put(np.zeros(shape, DTYPE), source.sharding(mesh))
  ours = lower.hlo_collectives(lower.compiled_text(lower.redistribute_fn(plan, mesh), placed),
                               mesh.size)
  xla_text = lower.compiled_text(lower.xla_reshard_fn(target, mesh), placed)
  xla = lower.hlo_collectives(xla_text, mesh.size)
  global_bytes = int(placed.size * placed.dtype.itemsize)
  found = sum(b for _, b in ours)
  return {
      "mesh": list(mesh.devices.shape), "rank": len(shape), "shape": list(shape),
      "source": str(source), "target": str(target), "ours": found,
      "predicted": plan.predicted_bytes,
      "plan_matches_hlo": abs(found - plan.predicted_bytes) <= TOL,
      "xla": sum(b for _, b in xla),
      "bound": plan_lib.lower_bound_bytes(shape, DTYPE, source, target, mesh),
      "xla_replicates": bool(target.used_axes) and lower.replicates(xla_text, global_bytes),
      "ours_kinds": dict(collections.Counter(k for k, _ in ours)),
      "xla_kinds": dict(collections.Counter(k for k, _ in xla)),
      "plan": plan.summary()}


def measure_pairs(mesh_shape, axis_names, shape, pairs, progress=None) -> list[dict]:
  """One record per (source, target) pair of layouts on the mesh (see `measure_pair`)."""
  mesh = mesh_lib.make_mesh(mesh_shape, axis_names)
  found = []
  for source, target in pairs:
    found.append(measure_pair(mesh, shape, source, target))
    if progress:
      progress()
  return found


def _ratio(a: float, b: float) -> float:
  """a / b, with 0 / 0 = 1 and a / 0 = inf for a > 0."""
  if b <= TOL:
    return 1.0 if a <= TOL else float("inf")
  return a / b


def _order(a: float, b: float) -> int:
  return -1 if a < b - TOL else (1 if a > b + TOL else 0)


def _quantile(values, q):
  values = sorted(values)  # nearest rank: safe with inf
  return values[int(round(q * (len(values) - 1)))] if values else float("nan")


def _case(r: dict) -> dict:
  keys = ("mesh", "shape", "source", "target", "ours", "predicted", "xla", "bound", "ours_kinds",
          "xla_kinds", "plan")
  return {k: r[k] for k in keys if k in r}  # records read back from the JSON have no "plan"


def summarize(rows: list[dict]) -> dict:
  """Distribution of ours/XLA and ours/bound; the XLA-replicates cases; any case we lose."""
  vs_xla = [_ratio(r["ours"], r["xla"]) for r in rows]
  order = collections.Counter(_order(r["ours"], r["xla"]) for r in rows)
  # ours/bound: pairs where both are 0 carry no information and are only counted.
  bounded = [r for r in rows if r["bound"] > TOL or r["ours"] > TOL]
  vs_bound = [_ratio(r["ours"], r["bound"]) for r in bounded]
  replicating = [r for r in rows if r["xla_replicates"]]
  better_there = sum(_order(r["ours"], r["xla"]) < 0 for r in replicating)
  worse = [r for r in rows if _order(r["ours"], r["xla"]) > 0]
  far = sorted(bounded, key=lambda r: -_ratio(r["ours"], r["bound"]))[:5]
  n = max(len(rows), 1)
  median_bound = statistics.median(vs_bound) if vs_bound else float("nan")
  return {
      "pairs": len(rows),
      "ours": float(sum(r["ours"] for r in rows)), "xla": float(sum(r["xla"] for r in rows)),
      "bound": float(sum(r["bound"] for r in rows)),
      "ours_over_xla": {"min": min(vs_xla), "median": statistics.median(vs_xla),
                        "max": max(vs_xla)} if rows else {},
      "ours_better": order[-1], "ours_equal": order[0], "ours_worse": order[1],
      "fraction_better": order[-1] / n, "fraction_equal": order[0] / n,
      "fraction_worse": order[1] / n,
      "ours_over_bound": {"median": median_bound, "p90": _quantile(vs_bound, 0.9),
                          "max": max(vs_bound)} if vs_bound else {},
      "zero_bound_pairs": len(rows) - len(bounded),
      "xla_replicates": len(replicating), "ours_better_where_xla_replicates": better_there,
      "plan_equals_hlo": sum(r["plan_matches_hlo"] for r in rows),
      "plan_hlo_mismatches": [_case(r) for r in rows if not r["plan_matches_hlo"]][:20],
      "worse_cases": [_case(r) for r in worse[:50]],
      "farthest_from_bound": [_case(r) for r in far],
      "goals": {"ours_never_worse": not worse,
                "better_wherever_xla_replicates": better_there == len(replicating),
                "median_ours_over_bound_le_1.5": median_bound <= 1.5},
  }


def sample_summary(pairs_per_mesh: int, seed: int) -> dict:
  """Rank-2 pairs, a seeded sample per mesh, summarized (the experiment's bytes headline)."""
  rows = []
  for mesh_shape, names in MESHES:
    mesh = mesh_lib.make_mesh(mesh_shape, names)
    pairs, _ = layout_pairs(mesh, SHAPES[2], pairs_per_mesh, seed)
    rows += measure_pairs(mesh_shape, names, SHAPES[2], pairs)
  return summarize(rows)


def _spread_sample(sets: dict, count: int, seed: int) -> list[tuple]:
  """Round robin over the sets, each shuffled (seeded), of pairs whose layouts divide the timed
  shape: `count` pairs spread evenly over the sets."""
  rng = np.random.default_rng(seed)
  queues = []
  for key, pairs in sets.items():
    shape = TIMED_SHAPES[key[2]]
    fit = [(key, s, t) for s, t in pairs if s.divides(shape) and t.divides(shape)]
    queues.append([fit[i] for i in rng.permutation(len(fit))])
  chosen = []
  while len(chosen) < count and any(queues):
    for queue in queues:
      if queue and len(chosen) < count:
        chosen.append(queue.pop())
  return chosen


def time_pairs(sets: dict, count: int, seed: int, repeats: int, rounds: int = 3) -> list[dict]:
  """Median seconds of our redistribution vs XLA's for a sample of pairs at larger shapes."""
  import jax  # pylint: disable=import-outside-toplevel
  from experiments._timing import median_seconds  # pylint: disable=import-outside-toplevel
  from research.parallel import lower  # pylint: disable=import-outside-toplevel
  from research.parallel import plan as plan_lib  # pylint: disable=import-outside-toplevel

  timed = []
  for (mesh_shape, names, rank), source, target in _spread_sample(sets, count, seed):
    mesh = mesh_lib.make_mesh(mesh_shape, names)
    shape = TIMED_SHAPES[rank]
    array = np.arange(np.prod(shape), dtype=DTYPE).reshape(shape)
    placed = jax.device_put(array, source.sharding(mesh))
    plan = plan_lib.plan_redistribution(shape, DTYPE, source, target, bytes_model())
    ours = lower.redistribute_fn(plan, mesh).lower(placed).compile()
    xla = lower.xla_reshard_fn(target, mesh).lower(placed).compile()
    out = ours(placed)
    exact = (bool(np.array_equal(np.asarray(out), array))
             and out.sharding.is_equivalent_to(target.sharding(mesh), rank))
    t_ours, t_xla = [], []
    for _ in range(rounds):  # interleaved rounds: both see the same machine state
      t_ours.append(median_seconds(ours, placed, repeats=repeats))
      t_xla.append(median_seconds(xla, placed, repeats=repeats))
    ours_s, xla_s = statistics.median(t_ours), statistics.median(t_xla)
    timed.append({
        "mesh": list(mesh_shape), "rank": rank, "shape": list(shape), "source": str(source),
        "target": str(target), "ours_s": ours_s, "xla_s": xla_s, "ratio": ours_s / xla_s,
        "ours_bytes": sum(b for _, b in lower.hlo_collectives(ours.as_text(), mesh.size)),
        "xla_bytes": sum(b for _, b in lower.hlo_collectives(xla.as_text(), mesh.size)),
        "exact": exact, "xla_exact": bool(np.array_equal(np.asarray(xla(placed)), array))})
  return timed


def _set_name(mesh, rank) -> str:
  return f"{tuple(mesh)} rank {rank}"


def _ordered_sets(sets: dict) -> list[str]:
  """Set names in MESHES x rank order (a kept JSON holds them sorted by name)."""
  names = [_set_name(shape, rank) for shape, _ in MESHES for rank in sorted(SHAPES)]
  return [n for n in names if n in sets] + sorted(n for n in sets if n not in names)


def _plan_steps(plan: str) -> str:
  """The steps of a `Plan.summary()` text: 'slice(dim 1 by x); all-to-all(...)' (each step line
  is the operator, then ' -> ' and the layout after it, which starts with '[')."""
  lines = plan.splitlines()[1:-1]
  return "; ".join(line.split(" -> [")[0].strip() for line in lines)


def paper_tables(result: dict) -> dict[str, str]:
  """The page's tables from a kept result (`result["summary"]` is what `main` measured)."""
  summary = result["summary"]
  if summary.get("planner"):
    return planner_tables(summary)
  if summary.get("cost_fit"):
    return cost_tables(summary)
  if summary.get("model_pass"):
    return model_tables(summary)
  sets, overall, timed = summary["sets"], summary["overall"], summary["timed"]
  machine = summary["machine"]
  order = _ordered_sets(sets)
  total = sum(sets[k]["total"] for k in order)
  b = collections.defaultdict(lambda: float("nan"), overall["ours_over_bound"])
  claims = records.write_markdown_table(
      ("layout pairs measured / total", "ours > XLA", "XLA replicates", "ours < XLA there",
       "median ours/bound", "p90 ours/bound", "max ours/bound", "plan bytes = HLO bytes",
       "median ours/XLA time (timed pairs)", "run time"),
      [(f"{overall['pairs']}/{total}", overall["ours_worse"], overall["xla_replicates"],
        overall["ours_better_where_xla_replicates"], f"{b['median']:.3f}", f"{b['p90']:.3f}",
        f"{b['max']:.3f}", f"{overall['plan_equals_hlo']}/{overall['pairs']}",
        f"{overall['timed_median_ratio']:.2f} ({len(timed)})" if timed else "-",
        f"{summary['seconds']:.0f} s ({summary['seconds'] / 60:.0f} min)")])
  rows = []
  for key, s in [(k, sets[k]) for k in order] + [("all", {"total": total, "summary": overall})]:
    r, b = s["summary"], s["summary"]["ours_over_bound"]
    rows.append((key, f"{r['pairs']}/{s['total']}", f"{r['ours_over_xla']['median']:.3f}",
                 f"{r['ours_over_xla']['max']:.3f}", f"{r['fraction_better']:.2f}",
                 r["ours_worse"], r["xla_replicates"], r["ours_better_where_xla_replicates"],
                 f"{b.get('median', float('nan')):.3f}", f"{b.get('p90', float('nan')):.3f}",
                 f"{b.get('max', float('nan')):.3f}", f"{r['plan_equals_hlo']}/{r['pairs']}"))
  bytes_table = (
      f"{machine['backend'].upper()}, {machine['devices']} host devices on "
      f"{machine['cpu_count']} cores, jax {machine['jax']}; {summary['seconds']:.0f} s. Pairs "
      "per set: measured / total (a seeded sample where fewer, `--max-pairs`).\n\n"
      + records.write_markdown_table(
          ("mesh / rank", "pairs measured / total", "median ours/XLA", "max ours/XLA",
           "fraction ours < XLA", "ours > XLA", "XLA replicates", "ours < XLA there",
           "median ours/bound", "p90 ours/bound", "max ours/bound", "plan bytes = HLO bytes"),
          rows))
  farthest = records.write_markdown_table(
      ("mesh", "shape", "source -> target", "our plan", "ours (B)", "XLA (B)", "bound (B)"),
      [(tuple(c["mesh"]), " x ".join(map(str, c["shape"])), f"{c['source']} -> {c['target']}",
        _plan_steps(c["plan"]) if "plan" in c else "", f"{c['ours']:.0f}", f"{c['xla']:.0f}",
        f"{c['bound']:.0f}") for c in overall["farthest_from_bound"]])
  tables = {"claims": claims, "bytes": bytes_table, "farthest": farthest}
  if timed:
    groups = collections.defaultdict(list)
    for t in timed:
      groups[_set_name(t["mesh"], t["rank"])].append(t)
    rows = []
    for key, group in [(k, groups[k]) for k in order if k in groups] + [("all", timed)]:
      ratios = [t["ratio"] for t in group]
      rows.append((key, " x ".join(map(str, group[0]["shape"])) if key != "all" else "",
                   len(group), f"{statistics.median(ratios):.3f}", f"{min(ratios):.3f}",
                   f"{max(ratios):.3f}", f"{sum(t['exact'] for t in group)}/{len(group)}",
                   f"{sum(t['xla_exact'] for t in group)}/{len(group)}"))
    tables["timing"] = records.write_markdown_table(
        ("mesh / rank", "shape", "timed pairs", "median ours/XLA time", "min", "max",
         "our output exact", "XLA output exact"), rows)
  return tables


# -- the planner alone (--planner): plan time vs mesh size, exactness, the fused all-to-all ----

PLAN_MESHES = ((2, 4), (2, 2, 2), (4, 4), (2, 2, 2, 2), (2, 4, 4), (8, 8), (4, 4, 4),
               (2, 2, 2, 2, 2, 2), (2, 4, 4, 4), (16, 16), (4, 4, 4, 4), (2, 2, 2, 2, 4, 4))
PLAN_DIM = 1024  # every dimension of the planned tensors (ranks 1 to 4): divides any mesh here
PLAN_TIME_GOAL_MS = 100.0


def _machine() -> dict:
  """The machine a result was measured on (every mode's summary names it)."""
  import jax  # pylint: disable=import-outside-toplevel
  return {"platform": platform.platform(), "processor": platform.processor(),
          "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "backend": jax.default_backend(), "devices": jax.device_count()}


def plan_times(meshes, pairs_per_mesh: int, seed: int, progress=None) -> list[dict]:
  """Per mesh, random layout pairs of ranks 1-4 (`layout.random_layout`), each planned from cold
  caches under the default cost model (timed) and under `bytes_model()` (timed; its bytes set
  against the exact bound and gather-then-slice)."""
  from research.parallel import plan as plan_lib  # pylint: disable=import-outside-toplevel
  from research.parallel.layout import random_layout  # pylint: disable=import-outside-toplevel

  rows = []
  warm = None  # one untimed plan first: imports and numpy's first calls
  for sizes in meshes:
    mesh_axes = tuple((f"m{i}", n) for i, n in enumerate(sizes))
    rng = np.random.default_rng([seed, *sizes])
    if warm is None:
      warm = plan_lib.plan_redistribution((PLAN_DIM,), DTYPE, random_layout(mesh_axes, (
          PLAN_DIM,), np.random.default_rng(seed)), random_layout(mesh_axes, (PLAN_DIM,), rng))
    for _ in range(pairs_per_mesh):
      shape = (PLAN_DIM,) * int(rng.integers(1, 5))
      source, target = (random_layout(mesh_axes, shape, rng) for _ in range(2))
      row = {"mesh": list(sizes), "devices": int(np.prod(sizes)), "rank": len(shape),
             "source": str(source), "target": str(target)}
      for name, model in (("default", plan_lib.CostModel()), ("bytes", bytes_model())):
        plan_lib.clear_caches()
        begin = time.perf_counter()
        plan = plan_lib.plan_redistribution(shape, DTYPE, source, target, model)
        row[f"{name}_ms"] = (time.perf_counter() - begin) * 1e3
        row[f"{name}_search"] = plan.search
      row["bytes"] = plan.predicted_bytes
      row["bound"] = plan_lib.lower_bound_bytes(shape, DTYPE, source, target)
      row["naive"] = plan_lib.gather_then_slice_plan(shape, DTYPE, source, target,
                                                     bytes_model()).predicted_bytes
      rows.append(row)
      if progress:
        progress()
  return rows


def exactness(seed: int, progress=None) -> dict:
  """Every ordered layout pair of the byte benchmark's sets (14,404), planned under
  `bytes_model()` three ways: "auto" (the default), "dijkstra" (the whole refined mesh) and
  "astar" (the large-mesh path forced): how often each differs from Dijkstra in bytes."""
  from research.parallel import plan as plan_lib  # pylint: disable=import-outside-toplevel
  from research.parallel.layout import all_layouts  # pylint: disable=import-outside-toplevel

  counts = collections.Counter()
  worst = {"auto": 1.0, "astar": 1.0}
  seconds = collections.Counter()
  for sizes, names in MESHES:
    mesh_axes = tuple(zip(names, sizes))
    for rank, shape in SHAPES.items():
      layouts = all_layouts(mesh_axes, shape)
      for source in layouts:
        for target in layouts:
          if source == target:
            continue
          found = {}
          for method in ("dijkstra", "auto", "astar"):
            begin = time.perf_counter()
            found[method] = plan_lib.plan_redistribution(
                shape, DTYPE, source, target, bytes_model(), method=method).predicted_bytes
            seconds[method] += time.perf_counter() - begin
          counts["pairs"] += 1
          for method in ("auto", "astar"):
            ratio = _ratio(found[method], found["dijkstra"])
            key = ("worse" if found[method] > found["dijkstra"] + TOL else
                   "better" if found[method] < found["dijkstra"] - TOL else "equal")
            counts[f"{method}_{key}"] += 1
            worst[method] = max(worst[method], ratio)
          if progress:
            progress()
  return {"counts": dict(counts), "max_ratio": worst,
          "seconds": {k: round(v, 1) for k, v in seconds.items()}}


def fused_cases(count: int, seed: int) -> list[dict]:
  """Rank-4 random pairs on the (2, 4) and (2, 2, 2) meshes whose plan (`bytes_model()`) uses a
  fused all-to-all, compiled: bytes from both HLOs, ours vs XLA's resharding vs the bound."""
  import jax  # pylint: disable=import-outside-toplevel
  from research.parallel import lower  # pylint: disable=import-outside-toplevel
  from research.parallel import plan as plan_lib  # pylint: disable=import-outside-toplevel
  from research.parallel.layout import random_layout  # pylint: disable=import-outside-toplevel

  shape, rows = (8, 8, 8, 8), []
  for sizes, names in (MESHES[1], MESHES[3]):
    mesh = mesh_lib.make_mesh(sizes, names)
    rng = np.random.default_rng([seed, *sizes])
    for _ in range(400):
      if sum(tuple(r["mesh"]) == sizes for r in rows) >= count // 2:
        break
      source, target = (random_layout(mesh, shape, rng) for _ in range(2))
      plan = plan_lib.plan_redistribution(shape, DTYPE, source, target, bytes_model())
      if not any(isinstance(s.op, plan_lib.FusedAllToAll) for s in plan.steps):
        continue
      array = np.arange(np.prod(shape), dtype=DTYPE).reshape(shape)
      placed = jax.device_put(array, source.sharding(mesh))
      fn = lower.redistribute_fn(plan, mesh)
      ours = lower.hlo_collectives(lower.compiled_text(fn, placed), mesh.size)
      xla = lower.hlo_collectives(lower.compiled_text(lower.xla_reshard_fn(target, mesh),
                                                      placed), mesh.size)
      rows.append({"mesh": list(sizes), "source": str(source), "target": str(target),
                   "plan": plan.summary(), "ours": sum(b for _, b in ours),
                   "predicted": plan.predicted_bytes, "xla": sum(b for _, b in xla),
                   "bound": plan_lib.lower_bound_bytes(shape, DTYPE, source, target, mesh),
                   "exact": bool(np.array_equal(np.asarray(fn(placed)), array))})
  return rows


def summarize_plan_times(rows: list[dict]) -> dict:
  out = {}
  for sizes in dict.fromkeys(tuple(r["mesh"]) for r in rows):
    group = [r for r in rows if tuple(r["mesh"]) == sizes]
    bounded = [r["bytes"] / r["bound"] for r in group if r["bound"] > TOL]
    naive = [_ratio(r["bytes"], r["naive"]) for r in group if r["naive"] > TOL]
    entry = {"devices": group[0]["devices"], "axes": len(sizes), "pairs": len(group),
             "fast_share": sum(r["default_search"] == "fast" for r in group) / len(group),
             "ours_over_bound": {"median": _quantile(bounded, 0.5),
                                 "p90": _quantile(bounded, 0.9), "max": max(bounded)},
             "at_bound": sum(abs(r["bytes"] - r["bound"]) <= TOL for r in group) / len(group),
             "ours_over_naive_median": _quantile(naive, 0.5)}
    for model in ("default", "bytes"):
      times = [r[f"{model}_ms"] for r in group]
      entry[f"{model}_ms"] = {"p50": _quantile(times, 0.5), "p90": _quantile(times, 0.9),
                              "p99": _quantile(times, 0.99), "max": max(times)}
    out[" x ".join(map(str, sizes))] = entry
  return out


def planner_tables(summary: dict) -> dict[str, str]:
  machine, times = summary["machine"], summary["plan_times"]
  rows = [(mesh, t["devices"], t["axes"], t["pairs"], f"{t['fast_share']:.2f}",
           *(f"{t['default_ms'][q]:.1f}" for q in ("p50", "p90", "p99", "max")),
           f"{t['bytes_ms']['p99']:.1f}",
           f"{t['ours_over_bound']['median']:.3f}", f"{t['ours_over_bound']['p90']:.3f}",
           f"{t['ours_over_bound']['max']:.3f}", f"{t['at_bound']:.2f}",
           f"{t['ours_over_naive_median']:.3f}")
          for mesh, t in sorted(times.items(),  # a kept JSON holds the meshes sorted by name
                                key=lambda item: (item[1]["devices"], item[1]["axes"], item[0]))]
  head = (f"{machine['processor'] or machine['platform']}, {machine['cpu_count']} cores, "
          f"Python planner, cold caches per plan; {summary['args']['plan_pairs']} random layout "
          f"pairs per mesh (ranks 1-4, every dimension {PLAN_DIM}), seed "
          f"{summary['args']['seed']}; {summary['seconds']:.0f} s in all. Times in ms under the "
          "default cost model (and p99 under the bytes-only model); bytes under the bytes-only "
          "model against the exact bound and gather-then-slice.\n\n")
  tables = {"plan_times": head + records.write_markdown_table(
      ("mesh", "devices", "axes", "pairs", "share on the fast path", "p50 ms", "p90 ms",
       "p99 ms", "max ms", "p99 ms (bytes model)", "median ours/bound", "p90 ours/bound",
       "max ours/bound", "share at the bound", "median ours/gather-then-slice"), rows)}
  exact = summary["exactness"]
  c = collections.defaultdict(int, exact["counts"])
  tables["exactness"] = records.write_markdown_table(
      ("layout pairs", "auto = Dijkstra", "auto > Dijkstra", "auto < Dijkstra",
       "fast path forced > Dijkstra", "its max ratio", "seconds: Dijkstra / auto / fast path"),
      [(c["pairs"], c["auto_equal"], c["auto_worse"], c["auto_better"], c["astar_worse"],
        f"{exact['max_ratio']['astar']:.3f}",
        " / ".join(f"{exact['seconds'][m]:.0f}" for m in ("dijkstra", "auto", "astar")))])
  tables["fused"] = records.write_markdown_table(
      ("mesh", "source -> target", "our plan", "ours (B, HLO)", "XLA (B, HLO)", "bound (B)",
       "output exact"),
      [(tuple(r["mesh"]), f"{r['source']} -> {r['target']}", _plan_steps(r["plan"]),
        f"{r['ours']:.0f}", f"{r['xla']:.0f}", f"{r['bound']:.0f}", r["exact"])
       for r in summary["fused"]])
  return tables


def planner_main(args, argv) -> int:
  from rich.progress import Progress  # pylint: disable=import-outside-toplevel

  meshes = PLAN_MESHES[:4] if args.quick else PLAN_MESHES
  pairs = min(args.plan_pairs, 20) if args.quick else args.plan_pairs
  args.plan_pairs = pairs
  start = time.perf_counter()
  with Progress() as progress:
    task = progress.add_task("plans", total=len(meshes) * pairs)
    rows = plan_times(meshes, pairs, args.seed, lambda: progress.advance(task))
    if args.quick:
      exact = {"counts": {}, "max_ratio": {"auto": 1.0, "astar": 1.0},
               "seconds": {"dijkstra": 0.0, "auto": 0.0, "astar": 0.0}}
    else:
      task = progress.add_task("the 14,404 pairs, three ways", total=14404)
      exact = exactness(args.seed, lambda: progress.advance(task))
  fused = fused_cases(4 if args.quick else 16, args.seed)
  times = summarize_plan_times(rows)
  goals = {"p99_under_100_ms": {m: t["default_ms"]["p99"] < PLAN_TIME_GOAL_MS and
                                t["bytes_ms"]["p99"] < PLAN_TIME_GOAL_MS
                                for m, t in times.items()},
           "no_byte_loss_on_the_pair_sets": exact["counts"].get("auto_worse", 0) == 0,
           "fused_at_most_xla": all(r["ours"] <= r["xla"] + TOL for r in fused)}
  summary = {
      "planner": True,
      "machine": _machine(),
      "args": vars(args), "seconds": round(time.perf_counter() - start, 1),
      "plan_times": times, "exactness": exact, "fused": fused, "goals": goals}
  run_dir = paper.finish_benchmark("bench_parallel", PAPER_PAGE, summary, args.paper, argv)
  lines = "".join(json.dumps(r) + "\n" for r in rows)
  records.atomic_write_bytes(run_dir / "plans.jsonl.gz", gzip.compress(lines.encode(), mtime=0))
  print((run_dir / "tables.md").read_text())
  print(f"{len(rows)} plans timed, {summary['seconds']} s -> {run_dir}; goals: {goals}")
  return 0


# -- a cost model fitted to this machine (--fit-cost) ----------------------------------------

FIT_GROUPS = (2, 4, 8)
FIT_BLOCKS = (1 << 10, 1 << 13, 1 << 16, 1 << 18, 1 << 20)  # float32 elements per device
COST_KEY = "bench_parallel_cost.cpu"


def _collective_fn(kind: str, mesh, group_axis: str):
  """A jitted global function running one collective of `kind` over the mesh's `group_axis`."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

  n = mesh.shape[group_axis]
  bodies = {
      "all-gather": lambda b: jax.lax.all_gather(b, group_axis, axis=0, tiled=True),
      "all-to-all": lambda b: jax.lax.all_to_all(b, group_axis, 0, 0, tiled=True),
      "reduce-scatter": lambda b: jax.lax.psum_scatter(b, group_axis, scatter_dimension=0,
                                                       tiled=True),
      "all-reduce": lambda b: jax.lax.psum(b, group_axis),
      "collective-permute": lambda b: jax.lax.ppermute(
          b, group_axis, [(i, (i + 1) % n) for i in range(n)]),
  }
  bodies["none"] = lambda b: b  # the program around a collective: dispatch
  spec = P(tuple(mesh.axis_names))
  return jax.jit(jax.shard_map(bodies[kind], mesh=mesh, in_specs=spec, out_specs=spec,
                               check_vma=False))


def _baseline_seconds(array, repeats: int) -> float:
  """A jitted program on `array`'s sharding with no collective (the shard_map of the identity):
  the part of a measured time that is dispatch, not communication."""
  import jax  # pylint: disable=import-outside-toplevel
  from experiments import _timing  # pylint: disable=import-outside-toplevel
  sharding = array.sharding
  fn = jax.jit(jax.shard_map(lambda b: b, mesh=sharding.mesh, in_specs=sharding.spec,
                             out_specs=sharding.spec, check_vma=False))
  return _timing.median_seconds(fn, array, repeats=repeats, warmup=2)


def measure_collectives(repeats: int, progress=None) -> list[dict]:
  """Median seconds of each collective kind over groups of 2, 4 and 8 of the 8 CPU devices and
  local blocks of 4 KiB to 4 MiB, less the dispatch of a jitted program (the identity program
  on the smallest block, `_baseline_seconds`; its own time grows with the buffer it writes, as
  a collective's does, so only the smallest is taken off); bytes received per device as the
  planner counts them."""
  import jax  # pylint: disable=import-outside-toplevel
  from experiments import _timing  # pylint: disable=import-outside-toplevel

  received = {"all-gather": lambda b, n: b * (n - 1), "all-to-all": lambda b, n: b * (n - 1) / n,
              "reduce-scatter": lambda b, n: b * (n - 1) / n,
              "all-reduce": lambda b, n: 2 * b * (n - 1) / n,
              "collective-permute": lambda b, n: float(b)}
  samples = []
  for n in FIT_GROUPS:
    mesh = mesh_lib.make_mesh((8 // n, n), ("rest", "group"))
    inputs = {e: jax.device_put(np.ones(8 * e, np.float32), jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(("rest", "group")))) for e in FIT_BLOCKS}
    baseline = _baseline_seconds(inputs[min(FIT_BLOCKS)], repeats)
    for kind, bytes_of in received.items():
      fn = _collective_fn(kind, mesh, "group")
      for elements, x in inputs.items():
        total = _timing.median_seconds(fn, x, repeats=repeats, warmup=2)
        samples.append({"kind": kind, "group": n, "hops": 1 if kind == "collective-permute"
                        else n - 1, "block_bytes": elements * 4,
                        "bytes": bytes_of(elements * 4, n), "total_seconds": total,
                        "baseline_seconds": baseline, "seconds": total - baseline,
                        "scale": total})
        if progress:
          progress()
  return samples


def held_out_moves(cost_model, dispatch: float, count: int, seed: int,
                   repeats: int) -> list[dict]:
  """Random layout pairs (ranks 2 and 3, larger shapes) on the 8-device meshes, planned under
  `cost_model` and under the default model: measured time of each plan's program against the
  model's prediction plus `dispatch` (seconds)."""
  import jax  # pylint: disable=import-outside-toplevel
  from experiments import _timing  # pylint: disable=import-outside-toplevel
  from research.parallel import lower  # pylint: disable=import-outside-toplevel
  from research.parallel import plan as plan_lib  # pylint: disable=import-outside-toplevel
  from research.parallel.layout import random_layout  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(seed + 1)  # not the fit's draw
  rows = []
  while len(rows) < count:
    sizes, names = MESHES[int(rng.integers(len(MESHES)))]
    mesh = mesh_lib.make_mesh(sizes, names)
    shape = TIMED_SHAPES[int(rng.integers(2, 4))]
    source, target = (random_layout(mesh, shape, rng) for _ in range(2))
    fitted = plan_lib.plan_redistribution(shape, DTYPE, source, target, cost_model)
    if not fitted.collectives():
      continue
    default = plan_lib.plan_redistribution(shape, DTYPE, source, target)
    placed = jax.device_put(np.arange(np.prod(shape), dtype=DTYPE).reshape(shape),
                            source.sharding(mesh))
    row = {"mesh": list(sizes), "shape": list(shape), "source": str(source),
           "target": str(target), "fitted_plan": _plan_steps(fitted.summary()),
           "default_plan": _plan_steps(default.summary()),
           "predicted_s": fitted.predicted_seconds,
           "default_predicted_s": default.predicted_seconds,
           "plans_differ": [(s.op, s.after) for s in fitted.steps] !=
                           [(s.op, s.after) for s in default.steps]}
    row["predicted_s"] += dispatch
    row["default_predicted_s"] += dispatch
    row["measured_s"] = _timing.median_seconds(lower.redistribute_fn(fitted, mesh), placed,
                                               repeats=repeats, warmup=2)
    row["default_measured_s"] = (row["measured_s"] if not row["plans_differ"] else
                                 _timing.median_seconds(lower.redistribute_fn(default, mesh),
                                                        placed, repeats=repeats, warmup=2))
    rows.append(row)
  return rows


def cost_tables(summary: dict) -> dict[str, str]:
  machine, fit = summary["machine"], summary["fit"]
  head = (f"{machine['processor'] or machine['platform']}, {machine['cpu_count']} cores, "
          f"{machine['devices']} CPU devices, jax {machine['jax']}; median of "
          f"{summary['args']['repeats']} calls per point; {summary['seconds']:.0f} s in all.\n\n")
  fit_table = head + records.write_markdown_table(
      ("collective", "launch (us)", "alpha (us per hop)", "beta (GB/s)", "samples",
       "median error / program time (fit)"),
      [(kind, f"{p['launch'] * 1e6:.1f}", f"{p['alpha'] * 1e6:.2f}",
        f"{1 / p['beta'] / 1e9:.2f}" if p["beta"] > 0 else "inf", p["samples"],
        f"{p['median_relative_error']:.2f}") for kind, p in fit["kinds"].items()])
  held = summary["held_out"]
  errors = [abs(r["predicted_s"] - r["measured_s"]) / r["measured_s"] for r in held]
  default_errors = [abs(r["default_predicted_s"] - r["default_measured_s"]) /
                    r["default_measured_s"] for r in held]
  differ = [r for r in held if r["plans_differ"]]
  ratios = [r["measured_s"] / r["default_measured_s"] for r in differ]
  held_table = ("Predicted time: the plan's modelled seconds plus the dispatch of one jitted "
                f"program ({fit['dispatch_seconds'] * 1e6:.0f} us, the identity program on the "
                "smallest block).\n\n") + \
      records.write_markdown_table(
      ("held-out moves", "median relative error, fitted model", "p90", "same, default model",
       "moves whose plans differ", "median measured time fitted plan / default plan",
       "min", "max"),
      [(len(held), f"{_quantile(errors, 0.5):.2f}", f"{_quantile(errors, 0.9):.2f}",
        f"{_quantile(default_errors, 0.5):.2f}", len(differ),
        f"{_quantile(ratios, 0.5):.3f}" if ratios else "-",
        f"{min(ratios):.3f}" if ratios else "-", f"{max(ratios):.3f}" if ratios else "-")])
  return {"fit": fit_table, "held_out": held_table}


def cost_main(args, argv) -> int:
  from rich.progress import Progress  # pylint: disable=import-outside-toplevel
  from research.parallel import plan as plan_lib  # pylint: disable=import-outside-toplevel

  start = time.perf_counter()
  with Progress() as progress:
    task = progress.add_task("collectives", total=len(FIT_GROUPS) * 5 * len(FIT_BLOCKS))
    samples = measure_collectives(args.repeats, lambda: progress.advance(task))
  fit = plan_lib.fit_cost_model(samples)
  fit["dispatch_seconds"] = statistics.median(s["baseline_seconds"] for s in samples)
  held = held_out_moves(plan_lib.CostModel.from_fit(fit), fit["dispatch_seconds"],
                        8 if args.quick else args.held_out, args.seed, args.repeats)
  summary = {
      "cost_fit": True,
      "machine": _machine(),
      "args": vars(args), "seconds": round(time.perf_counter() - start, 1),
      "samples": samples, "fit": fit, "held_out": held}
  run_dir = paper.finish_benchmark("bench_parallel", PAPER_PAGE, summary, args.paper, argv)
  print((run_dir / "tables.md").read_text())
  return 0


# -- the pass over plain jax programs (--model-pass) -----------------------------------------

MODEL_KEY = "bench_parallel_model.cpu"


def _model_case(which: str):
  """(model, inputs, labels, input names, label names) of one benchmark model."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from research.parallel import nnx_models  # pylint: disable=import-outside-toplevel

  key, labels_key = jax.random.key(0), jax.random.key(1)
  if which == "mlp":
    return (nnx_models.MLP(rngs=nnx.Rngs(0)), jax.random.normal(key, (64, 64)),
            jax.random.randint(labels_key, (64,), 0, 10), ("batch", "embed"), ("batch",))
  if which == "transformer_block":
    return (nnx_models.BlockClassifier(rngs=nnx.Rngs(0)), jax.random.normal(key, (8, 16, 64)),
            jax.random.randint(labels_key, (8, 16), 0, 16), ("batch", "length", "embed"),
            ("batch", "length"))
  tokens = jax.random.randint(key, (16, 33), 0, 64)
  return (nnx_models.LM(rngs=nnx.Rngs(0)), tokens[:, :-1], tokens[:, 1:],
          ("batch", "length"), ("batch", "length"))


def model_pass(which: str, steps: int, repeats: int) -> dict:
  """One model's train step (gradients and an Adam update) through the pass on a (2, 4) mesh
  ('dp', 'mp') under `nnx_models.RULES`, against XLA's partitioner given the same input
  shardings (`jax.jit(step, in_shardings=...)`) and one device: collective bytes per step from
  both compiled programs, step time, and the loss step by step."""
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from experiments import _timing  # pylint: disable=import-outside-toplevel
  from research.parallel import jaxpr_pass  # pylint: disable=import-outside-toplevel
  from research.parallel import lower  # pylint: disable=import-outside-toplevel
  from research.parallel import nnx_models  # pylint: disable=import-outside-toplevel

  model, inputs, labels, input_names, label_names = _model_case(which)
  graphdef, template, params, names = nnx_models.split(model)
  optimizer = optax.adam(0.01)
  opt_state = optimizer.init(params)
  step = nnx_models.train_step_fn(graphdef, template, optimizer)
  mesh = mesh_lib.make_mesh((2, 4), ("dp", "mp"))
  logical = nnx_models.step_logical(optimizer, opt_state, names, input_names, label_names)
  ours = jaxpr_pass.shard(step, mesh, nnx_models.RULES, logical, params, opt_state, inputs,
                          labels)
  xla = jax.jit(step, in_shardings=ours.in_shardings)
  one = jax.jit(step)
  args = jax.device_put((params, opt_state, inputs, labels), ours.in_shardings)
  row = {"model": which, "parameters": int(sum(np.size(p) for p in jax.tree.leaves(params))),
         "planned_moves": len(ours.program.moves()),
         "planned_bytes": ours.program.predicted_bytes()}
  for name, text in (("ours", ours.fn.lower(*args).compile().as_text()),
                     ("xla", xla.lower(*args).compile().as_text())):
    found = lower.hlo_collectives(text, 8)
    row[f"{name}_bytes"] = sum(b for _, b in found)
    row[f"{name}_collectives"] = dict(collections.Counter(k for k, _ in found))
  ours_state, xla_state, one_state = args[:2], args[:2], (params, opt_state)
  losses = []
  for _ in range(steps):
    *ours_state, a = ours.fn(*ours_state, inputs, labels)
    *xla_state, b = xla(*xla_state, *args[2:])
    *one_state, c = one(*one_state, inputs, labels)
    losses.append((float(a), float(b), float(c)))
  row["losses"] = losses
  row["max_rel_diff_vs_one_device"] = max(abs(a - c) / abs(c) for a, _, c in losses)
  times = collections.defaultdict(list)
  for _ in range(3):  # interleaved rounds
    times["ours"].append(_timing.median_seconds(ours.fn, *args, repeats=repeats))
    times["xla"].append(_timing.median_seconds(xla, *args, repeats=repeats))
  row["ours_s"] = statistics.median(times["ours"])
  row["xla_s"] = statistics.median(times["xla"])
  return row


def model_tables(summary: dict) -> dict[str, str]:
  machine = summary["machine"]
  head = (f"{machine['processor'] or machine['platform']}, {machine['cpu_count']} cores, "
          f"{machine['devices']} CPU devices, jax {machine['jax']}; (2, 4) mesh ('dp', 'mp'), "
          f"rules {summary['rules']}; Adam 0.01, {summary['args']['steps']} steps; step time "
          f"median of 3 interleaved rounds of {summary['args']['repeats']} calls.\n\n")
  kinds = lambda c: ", ".join(f"{k} x{n}" for k, n in sorted(c.items())) or "none"
  return {"models": head + records.write_markdown_table(
      ("model", "parameters", "planned moves", "planned bytes / device", "collective bytes / "
       "device: pass", "XLA partitioner", "collectives: pass", "XLA partitioner",
       "step time pass / XLA", "max rel. loss diff vs one device"),
      [(r["model"], r["parameters"], r["planned_moves"], f"{r['planned_bytes']:.0f}",
        f"{r['ours_bytes']:.0f}", f"{r['xla_bytes']:.0f}", kinds(r["ours_collectives"]),
        kinds(r["xla_collectives"]), f"{r['ours_s'] / r['xla_s']:.2f}",
        f"{r['max_rel_diff_vs_one_device']:.1e}") for r in summary["models"]])}


def model_main(args, argv) -> int:
  from research.parallel import nnx_models  # pylint: disable=import-outside-toplevel

  start = time.perf_counter()
  models = []
  for which in ("mlp", "transformer_block", "lm"):
    print(f"model pass: {which}", flush=True)
    models.append(model_pass(which, args.steps, args.repeats))
  summary = {
      "model_pass": True,
      "machine": _machine(),
      "args": vars(args), "rules": [list(r) for r in nnx_models.RULES],
      "seconds": round(time.perf_counter() - start, 1), "models": models}
  run_dir = paper.finish_benchmark("bench_parallel", PAPER_PAGE, summary, args.paper, argv)
  print((run_dir / "tables.md").read_text())
  return 0


def plot(rows: list[dict], path: Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, key, label in ((axes[0], "xla", "ours / XLA"), (axes[1], "bound", "ours / lower bound")):
    for mesh in sorted({tuple(r["mesh"]) for r in rows}):
      values = np.sort([_ratio(r["ours"], r[key]) for r in rows
                        if tuple(r["mesh"]) == mesh and r[key] > TOL])
      if len(values):
        ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post",
                label=f"mesh {mesh}")
    ax.axvline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel(f"bytes received per device, {label}")
    ax.set_ylabel("fraction of layout pairs (ECDF)")
    ax.legend()
  fig.tight_layout()
  records.atomic_save_figure(path, fig)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.bench_parallel",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--max-pairs", type=int, default=0, help="per mesh x rank; 0: all")
  parser.add_argument("--timed-pairs", type=int, default=40)
  parser.add_argument("--repeats", type=int, default=5, help="timed calls per round")
  parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--quick", action="store_true",
                      help="rank 2 on (2, 4) and (2, 2, 2), 30 pairs each, 4 timed")
  parser.add_argument("--planner", action="store_true",
                      help="the planner alone: plan time vs mesh size (8-256 devices), auto vs "
                           "Dijkstra on every pair of the sets above, fused all-to-all cases; "
                           f"--paper keeps it as {PLANNER_KEY}")
  parser.add_argument("--plan-pairs", type=int, default=200, help="--planner: pairs per mesh")
  parser.add_argument("--fit-cost", action="store_true",
                      help="fit launch / alpha / beta per collective kind to measured "
                           "collectives on the CPU devices and test the model on held-out "
                           f"moves; --paper keeps it as {COST_KEY} (CostModel.load reads it)")
  parser.add_argument("--held-out", type=int, default=40, help="--fit-cost: held-out moves")
  parser.add_argument("--model-pass", action="store_true",
                      help="the jaxpr pass on nnx train steps (MLP, transformer block, LM) vs "
                           f"XLA's partitioner; --paper keeps it as {MODEL_KEY}")
  parser.add_argument("--steps", type=int, default=5, help="--model-pass: training steps")
  paper.add_paper_argument(parser, default_key="bench_parallel.cpu")
  args = parser.parse_args(argv)
  if args.planner and args.paper == "bench_parallel.cpu":
    args.paper = PLANNER_KEY
  if args.fit_cost and args.paper == "bench_parallel.cpu":
    args.paper = COST_KEY
  if args.model_pass and args.paper == "bench_parallel.cpu":
    args.paper = MODEL_KEY
  if "device_count" not in os.environ.get("XLA_FLAGS", ""):
    mesh_lib.set_cpu_device_count(8)
  # XLA warns once per pair it reshards by replicating ("involuntary full rematerialization");
  # the JSON records those pairs (xla_replicates), so keep them out of the progress bar.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if args.planner:
    return planner_main(args, sys.argv[1:] if argv is None else argv)
  if args.fit_cost:
    return cost_main(args, sys.argv[1:] if argv is None else argv)
  if args.model_pass:
    return model_main(args, sys.argv[1:] if argv is None else argv)
  from rich.progress import Progress  # pylint: disable=import-outside-toplevel

  meshes, ranks = MESHES, (2, 3)
  if args.quick:
    meshes, ranks = (MESHES[1], MESHES[3]), (2,)
    args.max_pairs, args.timed_pairs = args.max_pairs or 30, min(args.timed_pairs, 4)
  start = time.perf_counter()
  sets, sets_summary, all_rows = {}, {}, []
  for mesh_shape, names in meshes:
    mesh = mesh_lib.make_mesh(mesh_shape, names)
    for rank in ranks:
      pairs, total = layout_pairs(mesh, SHAPES[rank], args.max_pairs, args.seed)
      sets[(mesh_shape, names, rank)] = pairs
      sets_summary[_set_name(mesh_shape, rank)] = {"axis_names": names, "shape": SHAPES[rank],
                                                   "total": total, "measured": len(pairs)}
  total = sum(len(p) for p in sets.values())
  with Progress() as progress:
    task = progress.add_task("layout pairs", total=total)

    def advance():  # the bar, and a line every 500 pairs for logs (no terminal)
      progress.advance(task)
      done = int(progress.tasks[0].completed)
      if done % 500 == 0:
        progress.console.print(f"{done}/{total} pairs, {time.perf_counter() - start:.0f} s")

    for (mesh_shape, names, rank), pairs in sets.items():
      set_start = time.perf_counter()
      rows = measure_pairs(mesh_shape, names, SHAPES[rank], pairs, advance)
      all_rows += rows
      sets_summary[_set_name(mesh_shape, rank)].update(
          summary=summarize(rows), seconds=time.perf_counter() - set_start)
  measure_seconds = time.perf_counter() - start
  timed = time_pairs(sets, args.timed_pairs, args.seed, args.repeats, args.rounds)
  overall = summarize(all_rows)
  if timed:
    overall["timed_median_ratio"] = statistics.median(t["ratio"] for t in timed)
  # The pairs file sits beside the summary: papers/results/ when kept, else the run folder.
  pairs_file = f"{args.paper}.pairs.jsonl.gz" if args.paper else "pairs.jsonl.gz"
  summary = {
      "machine": _machine(),
      "dtype": DTYPE, "shapes": {str(k): v for k, v in SHAPES.items()},
      "timed_shapes": {str(k): v for k, v in TIMED_SHAPES.items()},
      "args": vars(args), "seconds": round(time.perf_counter() - start, 1),
      "measure_seconds_per_pair": measure_seconds / max(len(all_rows), 1),
      "sets": sets_summary, "overall": overall, "timed": timed, "pairs_file": pairs_file}
  run_dir = paper.finish_benchmark("bench_parallel", PAPER_PAGE, summary, args.paper,
                                   sys.argv[1:] if argv is None else argv)
  # One JSON line per measured pair (without the plan text), gzipped: ~14k pairs stay small.
  lines = "".join(json.dumps({k: v for k, v in r.items() if k != "plan"}) + "\n"
                  for r in all_rows)
  records.atomic_write_bytes(run_dir / "pairs.jsonl.gz", gzip.compress(lines.encode(), mtime=0))
  plot(all_rows, run_dir / "bench_parallel.png")
  if args.paper:
    for name, dest in (("pairs.jsonl.gz", paper.RESULTS / pairs_file),
                       ("bench_parallel.png", FIGURE)):
      records.atomic_write_bytes(dest, (run_dir / name).read_bytes())
  print((run_dir / "tables.md").read_text())
  print(f"{len(all_rows)} pairs in {measure_seconds:.1f} s "
        f"({summary['measure_seconds_per_pair']:.3f} s/pair), {len(timed)} timed, "
        f"{summary['seconds']} s in all -> {run_dir}; goals: {overall['goals']}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
