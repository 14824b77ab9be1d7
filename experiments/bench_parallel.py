"""Benchmark: bytes each device receives to redistribute a tensor, our plan vs XLA vs the bound.

For every ordered pair of distinct layouts (`layout.all_layouts`) of a rank-2 (64 x 64) and a
rank-3 (16 x 16 x 16) float32 tensor on the meshes (8,), (2, 4), (4, 2) and (2, 2, 2):

- (a) our plan (`plan_redistribution` under `bytes_model()`: alpha = launch = 0, so the plan
  minimizes bytes received, then steps) lowered to one shard_map and compiled; bytes read back from the compiled HLO (`lower.hlo_collectives`);
- (b) XLA's own resharding, `jax.jit(identity, out_shardings=target)` on an array with the source
  sharding, compiled; bytes from its HLO, and whether some collective materializes the whole
  tensor on a device while the target is not replicated ("XLA replicates");
- (c) the exact lower bound (`lower_bound_bytes`, from `NamedSharding.devices_indices_map`).

Wall time of (a) vs (b) on the CPU devices for a seeded sample of pairs at larger shapes
(1024 x 1024, 64 x 128 x 128), run in the same process, interleaved; outputs checked equal.

  python -m experiments.bench_parallel [--max-pairs N] [--timed-pairs 40] [--quick]

Writes papers/results/bench_parallel.cpu.{json,md}, papers/figures/bench_parallel.png and the
`bench:cpu` block of papers/parallel.md (unless --out-dir points elsewhere).
"""

from __future__ import annotations

import argparse
import collections
import platform
import statistics
import time
from pathlib import Path

from research.common import mesh as mesh_lib
from research.common import records

ROOT = Path(__file__).resolve().parent.parent
MESHES = (((8,), ("a",)), ((2, 4), ("x", "y")), ((4, 2), ("x", "y")),
          ((2, 2, 2), ("x", "y", "z")))
SHAPES = {2: (64, 64), 3: (16, 16, 16)}
TIMED_SHAPES = {2: (1024, 1024), 3: (64, 128, 128)}
DTYPE = "float32"


def bytes_model():
  """The benchmark's cost model: bytes received only (no launch or hop cost); ties go to fewer
  steps. Its goal is bytes; the default model would trade bytes for fewer collectives on these
  small tensors, as a real interconnect should."""
  from research.parallel import plan as plan_lib  # pylint: disable=import-outside-toplevel
  return plan_lib.CostModel(default_alpha=0.0, default_beta=1.0, launch=0.0)


def layout_pairs(mesh, shape, max_pairs: int, seed: int) -> tuple[list, int]:
  """Ordered pairs of distinct layouts; a seeded sample of `max_pairs` if there are more."""
  import numpy as np  # pylint: disable=import-outside-toplevel
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
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from research.parallel import lower  # pylint: disable=import-outside-toplevel
  from research.parallel import plan as plan_lib  # pylint: disable=import-outside-toplevel

  plan = plan_lib.plan_redistribution(shape, DTYPE, source, target, bytes_model())
  placed = jax.device_put(jnp.zeros(shape, DTYPE), source.sharding(mesh))
  ours = lower.hlo_collectives(lower.compiled_text(lower.redistribute_fn(plan, mesh), placed),
                               mesh.size)
  xla_text = lower.compiled_text(lower.xla_reshard_fn(source, target, mesh), placed)
  xla = lower.hlo_collectives(xla_text, mesh.size)
  global_bytes = int(placed.size * placed.dtype.itemsize)
  return {
      "mesh": list(mesh.devices.shape), "shape": list(shape), "source": str(source),
      "target": str(target), "ours": sum(b for _, b in ours), "predicted": plan.predicted_bytes,
      "xla": sum(b for _, b in xla),
      "bound": plan_lib.lower_bound_bytes(shape, DTYPE, source, target, mesh),
      "xla_replicates": bool(target.used_axes) and lower.replicates(xla_text, global_bytes),
      "ours_kinds": dict(collections.Counter(k for k, _ in ours)),
      "xla_kinds": dict(collections.Counter(k for k, _ in xla)),
      "plan": plan.summary()}


def measure_pairs(mesh_shape, axis_names, shape, pairs, progress=None) -> list[dict]:
  mesh = mesh_lib.make_mesh(mesh_shape, axis_names)
  found = []
  for source, target in pairs:
    found.append(measure_pair(mesh, shape, source, target))
    if progress:
      progress()
  return found


def _ratio(a: float, b: float) -> float:
  if b == 0:
    return 1.0 if a == 0 else float("inf")
  return a / b


def _quantile(values, q):
  values = sorted(values)
  if not values:
    return float("nan")
  return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summarize(rows: list[dict]) -> dict:
  """Distribution of ours/XLA and ours/bound; the XLA-replicates cases; any case we lose."""
  vs_xla = [_ratio(r["ours"], r["xla"]) for r in rows]
  vs_bound = [_ratio(r["ours"], r["bound"]) for r in rows if r["bound"] > 0]
  replicating = [r for r in rows if r["xla_replicates"]]
  worse = [r for r in rows if r["ours"] > r["xla"] + 1e-9]
  return {
      "pairs": len(rows),
      "ours": float(sum(r["ours"] for r in rows)), "xla": float(sum(r["xla"] for r in rows)),
      "bound": float(sum(r["bound"] for r in rows)),
      "ours_over_xla": {"min": min(vs_xla), "median": statistics.median(vs_xla),
                        "max": max(vs_xla)} if rows else {},
      "ours_better": sum(r["ours"] < r["xla"] - 1e-9 for r in rows),
      "ours_equal": sum(abs(r["ours"] - r["xla"]) <= 1e-9 for r in rows),
      "ours_worse": len(worse),
      "ours_over_bound": {"median": statistics.median(vs_bound), "p90": _quantile(vs_bound, 0.9),
                          "max": max(vs_bound)} if vs_bound else {},
      "zero_bound_pairs": sum(r["bound"] == 0 for r in rows),
      "xla_replicates": len(replicating),
      "ours_better_where_xla_replicates": sum(r["ours"] < r["xla"] - 1e-9 for r in replicating),
      "plan_equals_hlo": sum(abs(r["ours"] - r["predicted"]) <= 1e-6 for r in rows),
      "worse_cases": [{k: r[k] for k in ("mesh", "shape", "source", "target", "ours", "xla",
                                         "plan")} for r in worse[:20]],
  }


def sample_summary(pairs_per_mesh: int, seed: int) -> dict:
  """Rank-2 pairs, a seeded sample per mesh, summarized (the experiment's bytes headline)."""
  rows = []
  for mesh_shape, names in MESHES:
    mesh = mesh_lib.make_mesh(mesh_shape, names)
    pairs, _ = layout_pairs(mesh, SHAPES[2], pairs_per_mesh, seed)
    rows += measure_pairs(mesh_shape, names, SHAPES[2], pairs)
  return summarize(rows)


def time_pairs(sets: dict, count: int, seed: int, repeats: int) -> list[dict]:
  """Median seconds of our redistribution vs XLA's for a sample of pairs at larger shapes."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from experiments._timing import median_seconds  # pylint: disable=import-outside-toplevel
  from research.parallel import lower  # pylint: disable=import-outside-toplevel
  from research.parallel import plan as plan_lib  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(seed)
  candidates = [(key, s, t) for key, pairs in sets.items() for s, t in pairs]
  chosen = [candidates[i] for i in rng.choice(len(candidates), min(count, len(candidates)),
                                             replace=False)]
  timed = []
  for (mesh_shape, names, rank), source, target in chosen:
    mesh = mesh_lib.make_mesh(mesh_shape, names)
    shape = TIMED_SHAPES[rank]
    if not (source.divides(shape) and target.divides(shape)):
      continue
    array = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
    placed = jax.device_put(array, source.sharding(mesh))
    plan = plan_lib.plan_redistribution(shape, DTYPE, source, target, bytes_model())
    ours = lower.redistribute_fn(plan, mesh)
    xla = lower.xla_reshard_fn(source, target, mesh)
    exact = bool(np.array_equal(np.asarray(ours(placed)), np.asarray(array)))
    t_ours, t_xla = [], []
    for _ in range(repeats):  # interleaved: both see the same machine state
      t_ours.append(median_seconds(ours, placed, repeats=3))
      t_xla.append(median_seconds(xla, placed, repeats=3))
    timed.append({"mesh": list(mesh_shape), "shape": list(shape), "source": str(source),
                  "target": str(target), "ours_s": statistics.median(t_ours),
                  "xla_s": statistics.median(t_xla), "exact": exact})
  return timed


def tables(sets_summary: dict, overall: dict, timed: list[dict]) -> str:
  rows = []
  for key, s in list(sets_summary.items()) + [("all", overall)]:
    r = s["summary"] if key != "all" else s
    measured = f"{r['pairs']}/{s['total']}" if key != "all" else str(r["pairs"])
    rows.append((key, measured, f"{r['ours_over_xla']['median']:.3f}",
                 f"{r['ours_over_xla']['max']:.3f}", r["ours_better"], r["ours_worse"],
                 r["xla_replicates"], r["ours_better_where_xla_replicates"],
                 f"{r['ours_over_bound'].get('median', float('nan')):.3f}",
                 f"{r['ours_over_bound'].get('p90', float('nan')):.3f}",
                 f"{r['ours_over_bound'].get('max', float('nan')):.3f}",
                 f"{r['plan_equals_hlo']}/{r['pairs']}"))
  text = records.write_markdown_table(
      ("mesh / rank", "pairs measured", "median ours/XLA", "max ours/XLA", "ours < XLA",
       "ours > XLA", "XLA replicates", "ours < XLA there", "median ours/bound",
       "p90 ours/bound", "max ours/bound", "plan bytes = HLO bytes"), rows)
  if timed:
    ratios = [t["ours_s"] / t["xla_s"] for t in timed]
    text += "\n" + records.write_markdown_table(
        ("timed pairs", "median ours/XLA time", "min", "max", "outputs exact"),
        [(len(timed), f"{statistics.median(ratios):.3f}", f"{min(ratios):.3f}",
          f"{max(ratios):.3f}", f"{sum(t['exact'] for t in timed)}/{len(timed)}")])
  return text


def plot(rows: list[dict], path: Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, key, label in ((axes[0], "xla", "ours / XLA"), (axes[1], "bound", "ours / lower bound")):
    for mesh in sorted({tuple(r["mesh"]) for r in rows}):
      values = np.sort([_ratio(r["ours"], r[key]) for r in rows
                        if tuple(r["mesh"]) == mesh and r[key] > 0])
      if len(values):
        ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post",
                label=f"mesh {mesh}")
    ax.axvline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel(f"bytes received per device, {label}")
    ax.set_ylabel("fraction of layout pairs")
    ax.legend()
  fig.tight_layout()
  records.atomic_save_figure(path, fig)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.bench_parallel",
                                   description=__doc__)
  parser.add_argument("--max-pairs", type=int, default=0, help="per mesh x rank; 0: all")
  parser.add_argument("--timed-pairs", type=int, default=40)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--quick", action="store_true",
                      help="rank 2 on (2, 4) and (2, 2, 2), 30 pairs each, 4 timed")
  parser.add_argument("--out-dir", default=str(ROOT / "papers" / "results"))
  parser.add_argument("--figure", default=str(ROOT / "papers" / "figures" / "bench_parallel.png"))
  parser.add_argument("--paper", default=str(ROOT / "papers" / "parallel.md"))
  args = parser.parse_args(argv)
  if "device_count" not in __import__("os").environ.get("XLA_FLAGS", ""):
    mesh_lib.set_cpu_device_count(8)
  import jax  # pylint: disable=import-outside-toplevel
  from rich.progress import Progress  # pylint: disable=import-outside-toplevel

  meshes, ranks = MESHES, (2, 3)
  if args.quick:
    meshes, ranks = (MESHES[1], MESHES[3]), (2,)
    args.max_pairs, args.timed_pairs = args.max_pairs or 30, min(args.timed_pairs, 4)
  start = time.perf_counter()
  sets, all_rows, sets_summary = {}, [], {}
  for mesh_shape, names in meshes:
    mesh = mesh_lib.make_mesh(mesh_shape, names)
    for rank in ranks:
      pairs, total = layout_pairs(mesh, SHAPES[rank], args.max_pairs, args.seed)
      sets[(mesh_shape, names, rank)] = pairs
      sets_summary[f"{mesh_shape} rank {rank}"] = {"total": total, "pairs": pairs}
  with Progress() as progress:
    task = progress.add_task("layout pairs", total=sum(len(p) for p in sets.values()))
    for (mesh_shape, names, rank), pairs in sets.items():
      rows = measure_pairs(mesh_shape, names, SHAPES[rank], pairs,
                           lambda: progress.advance(task))
      all_rows += rows
      entry = sets_summary[f"{mesh_shape} rank {rank}"]
      entry["pairs"], entry["summary"] = len(rows), summarize(rows)
  timed = time_pairs(sets, args.timed_pairs, args.seed, args.repeats)
  overall = summarize(all_rows)
  result = {
      "machine": {"platform": platform.platform(), "processor": platform.processor(),
                  "cpu_count": __import__("os").cpu_count(), "jax": jax.__version__,
                  "backend": jax.default_backend(), "devices": jax.device_count()},
      "dtype": DTYPE, "shapes": {str(k): v for k, v in SHAPES.items()},
      "timed_shapes": {str(k): v for k, v in TIMED_SHAPES.items()},
      "args": vars(args), "seconds": round(time.perf_counter() - start, 1),
      "sets": sets_summary, "overall": overall, "timed": timed, "pairs": all_rows}
  out = Path(args.out_dir)
  records.atomic_write_json(out / "bench_parallel.cpu.json", result)
  text = tables(sets_summary, overall, timed)
  records.atomic_write_text(out / "bench_parallel.cpu.md", text)
  plot(all_rows, Path(args.figure))
  print(text)
  print(f"{len(all_rows)} pairs in {result['seconds']} s -> {out}")
  if Path(args.paper).exists() and out.resolve() == (ROOT / "papers" / "results").resolve():
    cpu = result["machine"]
    block = (f"CPU, {cpu['devices']} host devices on {cpu['cpu_count']} cores, jax {cpu['jax']}; "
             f"{result['seconds']:.0f} s. Pairs per set: all unless the column says N/total "
             f"(seeded sample, `--max-pairs`).\n\n" + text +
             "\n![ours / XLA and ours / bound](figures/bench_parallel.png)\n")
    records.replace_marked_block(args.paper, "bench:cpu", block)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
