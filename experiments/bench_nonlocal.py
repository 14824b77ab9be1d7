"""Benchmark: cost of the two-stage non-local CNN (a) vs a full-resolution non-local CNN (c).

For square greyscale images of 64^2 .. 1024^2 pixels (batch 1, 32 features, depth 6, s = 4):

- FLOPs: XLA's cost analysis of the compiled forward with the jnp reference attention (the
  Pallas interpreter's loops are not counted by XLA), and the attention's own share
  (2 * N * M * (C + D) per non-local block, M = N / s^2 for (a), N for (c));
- memory: the largest intermediate array of the forward program (from its jaxpr, sub-jaxprs
  included), with the reference attention (the N x M scores) and with the Pallas kernel (never
  N x M), and XLA's reported temp size of the compiled reference program on this backend;
- wall time on this backend as a ratio (a) / (c), both with the reference attention where (c)
  fits in memory (`--time-max`), same process, interleaved;
- on a GPU (`jax.default_backend() == "gpu"`): kernel time vs `jax.nn.dot_product_attention`
  for the stage-two shapes (N queries, N / s^2 keys). Skipped elsewhere, and said so.

  python -m experiments.bench_nonlocal [--sizes 64 128 256 512 1024] [--time-max 128] [--paper]

`--train-large SIZE` (kept as bench_nonlocal_train.<backend>) measures training at SIZE^2 crops
instead, where the full-resolution model (c) cannot run: XLA's memory plan of one compiled
training step (batch 1, Adam) for (a) with the Pallas kernel and with the jnp attention, (b) and
(c) with either (compiled, never run), against this machine's memory; then (a) with the kernel
trained for `--steps` steps on the exposure task (research/nonlocal_cnn/data.py) in a child
process whose peak resident memory (ru_maxrss) is the measured footprint.

  python -m experiments.bench_nonlocal --train-large 512 --steps 10 --paper   # the kept run

Writes runs/bench_nonlocal/<timestamp>/ (summary.json, tables.md, bench_nonlocal.png). With
--paper also keeps the summary as papers/results/bench_nonlocal.<backend>.json, the figure as
papers/figures/bench_nonlocal.<backend>.png, and fills the blocks of papers/nonlocal_cnn.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments import paper
from experiments._timing import median_seconds
from research.common import records
from research.common.jaxpr import largest_intermediate
from research.nonlocal_cnn import model

PAPER_PAGE = "papers/nonlocal_cnn.md"
SIZES = dict(channels=1, features=32, depth=6, factor=4, global_depth=2)


def attention_flops(kind: str, n: int, features: int, factor: int) -> float:
  inner = features // 2
  if kind == "two_stage":  # stage one: self-attention on N/s^2; stage two: N x N/s^2
    m = n // factor ** 2
    return 2.0 * m * m * 2 * inner + 2.0 * n * m * 2 * inner
  return 2.0 * n * n * 2 * inner


def measure_size(size: int) -> dict:
  row = {"size": size, "pixels": size * size}
  x = jax.ShapeDtypeStruct((1, size, size, 1), jnp.float32)
  for kind in ("two_stage", "full_nonlocal"):
    for impl in ("reference", "pallas"):
      apply, params, _ = model.build(kind, 0, impl=impl, **SIZES)
      jaxpr = jax.make_jaxpr(apply)(params, x)
      row[f"{kind}/{impl}/largest_bytes"] = 4 * largest_intermediate(jaxpr.jaxpr)
      if impl == "reference":
        compiled = jax.jit(apply).lower(params, x).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        row[f"{kind}/flops"] = float(cost.get("flops", float("nan")))
        memory = compiled.memory_analysis()
        row[f"{kind}/xla_temp_bytes"] = float(getattr(memory, "temp_size_in_bytes", np.nan))
    row[f"{kind}/attention_flops"] = attention_flops(kind, size * size, SIZES["features"],
                                                     SIZES["factor"])
  return row


def time_size(size: int, repeats: int) -> dict:
  x = jax.random.uniform(jax.random.key(0), (1, size, size, 1))
  fns = {}
  for kind in ("two_stage", "full_nonlocal"):
    apply, params, _ = model.build(kind, 0, impl="reference", **SIZES)
    fns[kind] = (jax.jit(apply), params)
  times = {k: [] for k in fns}
  for _ in range(repeats):  # interleaved rounds
    for kind, (fn, params) in fns.items():
      times[kind].append(median_seconds(fn, params, x, repeats=3))
  med = {k: float(np.median(v)) for k, v in times.items()}
  return {"size": size, "two_stage_s": med["two_stage"], "full_nonlocal_s": med["full_nonlocal"],
          "ratio": med["two_stage"] / med["full_nonlocal"]}


def gpu_kernel_times(sizes, repeats: int) -> list[dict]:
  from kernels.nonlocal_attention import nonlocal_attention  # pylint: disable=import-outside-toplevel
  rows = []
  for size in sizes:
    n, inner = size * size, SIZES["features"] // 2
    m = n // SIZES["factor"] ** 2
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (1, n, inner))
    k = jax.random.normal(keys[1], (1, m, inner))
    v = jax.random.normal(keys[2], (1, m, inner))
    ours = jax.jit(lambda q, k, v: nonlocal_attention(q, k, v))
    xla = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q[:, :, None], k[:, :, None], v[:, :, None])[:, :, 0])
    np.testing.assert_allclose(np.asarray(ours(q, k, v)), np.asarray(xla(q, k, v)), atol=2e-3)
    t_ours = median_seconds(ours, q, k, v, repeats=repeats)
    t_xla = median_seconds(xla, q, k, v, repeats=repeats)
    rows.append({"size": size, "n": n, "m": m, "kernel_s": t_ours, "dot_product_attention_s":
                 t_xla, "ratio": t_ours / t_xla})
  return rows


LETTERS = {"two_stage": "a", "plain": "b", "full_nonlocal": "c"}
TRAIN_VARIANTS = (("two_stage", "pallas"), ("two_stage", "reference"), ("plain", "reference"),
                  ("full_nonlocal", "pallas"), ("full_nonlocal", "reference"))


def _train_step(kind: str, impl: str, abstract: bool = True):
  """(jitted Adam step, params (shapes only when `abstract`), optimizer, apply) at seed 0."""
  from research.nonlocal_cnn import train  # pylint: disable=import-outside-toplevel
  apply, params, _ = model.build(kind, 0, impl=impl, abstract=abstract,
                                 **model.equal_size(kind, **SIZES))
  tx = train.optimizer(1e-3, 1000)
  return train.train_step(apply, tx), params, tx, apply


def train_memory_plan(size: int) -> list[dict]:
  """XLA's plan for one training step of each variant at size^2 (compiled, not run)."""
  rows = []
  x = jax.ShapeDtypeStruct((1, size, size, 1), jnp.float32)
  for kind, impl in TRAIN_VARIANTS:
    step, params, tx, _ = _train_step(kind, impl)
    opt_state = jax.eval_shape(tx.init, params)
    memory = step.lower(params, opt_state, x, x).compile().memory_analysis()
    rows.append({"model": kind, "attention": impl if kind != "plain" else "-",
                 "params": model.param_count(params),
                 "temp_bytes": float(memory.temp_size_in_bytes),
                 "argument_bytes": float(memory.argument_size_in_bytes),
                 "attention_flops": (attention_flops(kind, size * size, SIZES["features"],
                                                     SIZES["factor"]) if kind != "plain" else 0.0)})
  return rows


def train_child(size: int, steps: int) -> dict:
  """(a) with the Pallas kernel, `steps` Adam steps at size^2 on the exposure task; run in its
  own process, so ru_maxrss is this training's peak."""
  import resource  # pylint: disable=import-outside-toplevel
  from research.nonlocal_cnn import data  # pylint: disable=import-outside-toplevel
  rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
  images = [im for im in data.train_images() if min(im.shape[:2]) >= size]
  if not images:
    raise ValueError(f"--train-large: got {size}, expected a size no larger than the largest "
                     "training photograph's shorter side")
  step, params, tx, apply = _train_step("two_stage", "pallas", abstract=False)
  opt_state = tx.init(params)
  # Held-out: the test photographs at size^2, one fixed exposure draw each.
  held_rng = np.random.default_rng([1, size])
  held_clean = np.stack(list(data.resized_images(data.TEST_IMAGES, size).values()))
  held_input = data.degrade_exposure_batch(held_clean, held_rng)
  forward = jax.jit(apply)
  held_loss = lambda p: float(np.mean([np.mean((np.asarray(forward(p, held_input[i:i + 1]))
                                                 - held_clean[i:i + 1]) ** 2)
                                        for i in range(len(held_clean))]))
  held_before = held_loss(params)
  rng = np.random.default_rng([0, size])
  before = rss()
  losses, seconds = [], []
  for i in range(steps):
    clean = data.random_patches(images, size, 1, rng)
    degraded = data.degrade_exposure_batch(clean, rng)
    start = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, degraded, clean)
    losses.append(float(loss))
    seconds.append(time.perf_counter() - start)
    print(f"step {i}: loss {losses[-1]:.5f}, {seconds[-1]:.1f} s", file=sys.stderr, flush=True)
  return {"images": len(images), "losses": losses, "step_seconds": seconds,
          "held_out_loss_before": held_before, "held_out_loss_after": held_loss(params),
          "rss_before_bytes": before, "peak_rss_bytes": rss()}


def train_large(size: int, steps: int) -> dict:
  import json  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import psutil  # pylint: disable=import-outside-toplevel
  plan = train_memory_plan(size)
  out = subprocess.run([sys.executable, "-m", "experiments.bench_nonlocal", "--train-child",
                        str(size), "--steps", str(steps)], check=True, stdout=subprocess.PIPE,
                       text=True).stdout
  child = json.loads(out.strip().splitlines()[-1])
  return {"size": size, "steps": steps, "machine_memory_bytes":
          float(psutil.virtual_memory().total), "plan": plan, "trained": child}


def train_tables(summary: dict) -> dict[str, str]:
  t, machine = summary["train_large"], summary["machine"]
  size, memory = t["size"], t["machine_memory_bytes"]
  rows = []
  for r in t["plan"]:
    need = r["temp_bytes"] + r["argument_bytes"]
    rows.append((f"({LETTERS[r['model']]}) {r['model']}", r["attention"], r["params"],
                 f"{need / 1e9:.3g}", "yes" if need < memory else "no",
                 f"{r['attention_flops']:.3g}"))
  plan = records.write_markdown_table(
      ("model", "attention", "params", "XLA plan of one step, GB (temp + arguments)",
       f"fits in {memory / 2**30:.0f} GiB", "attention FLOPs per forward"), rows)
  trained = t["trained"]
  losses = trained["losses"]
  run = records.write_markdown_table(
      ("reading", "value"),
      [("steps of (a) with the Pallas kernel (batch 1, exposure task)", len(losses)),
       ("training photographs at least this large", trained["images"]),
       ("held-out MSE (test photographs at this size, one exposure draw each), before -> "
        "after", f"{trained['held_out_loss_before']:.4f} -> {trained['held_out_loss_after']:.4f}"),
       ("training loss, first step -> mean of the last three", f"{losses[0]:.4f} -> "
        f"{np.mean(losses[-3:]):.4f}"),
       ("seconds per step (median, after the first)",
        f"{np.median(trained['step_seconds'][1:]):.1f}"),
       ("peak resident memory of the training process, GB",
        f"{trained['peak_rss_bytes'] / 1e9:.2f}"),
       ("resident memory after the held-out pass, before the first step, GB",
        f"{trained['rss_before_bytes'] / 1e9:.2f}")])
  return {"train_large": (f"{machine['device']} ({machine['backend']}), jax {machine['jax']}, "
                          f"{memory / 2**30:.0f} GiB; {size}^2 crops; {summary['seconds']:.0f} s."
                          f"\n\n{plan}\n\n{run}")}


def paper_tables(result: dict) -> dict[str, str]:
  """The page's tables from a kept result (`result["summary"]` is what `main` measured):
  `cost` (FLOPs and largest array per size), `time` ((a) vs (c) on this backend), `gpu` (kernel vs
  `jax.nn.dot_product_attention`, or why not measured) and `claims` (the readings the page's
  prose quotes)."""
  summary = result["summary"]
  if "train_large" in summary:
    return train_tables(summary)
  rows, timed, gpu, machine = summary["rows"], summary["timed"], summary["gpu"], summary["machine"]
  cost = records.write_markdown_table(
      ("image", "pixels N", "FLOPs (a)", "FLOPs (c)", "(c)/(a)", "attention FLOPs (a), N*N/s^2",
       "attention FLOPs (c), N^2", "largest array (a), jnp MB", "largest array (c), jnp MB",
       "largest array (a), kernel MB", "largest array (c), kernel MB"),
      [(r["size"], f"{r['pixels']}", f"{r['two_stage/flops']:.3g}",
        f"{r['full_nonlocal/flops']:.3g}",
        f"{r['full_nonlocal/flops'] / r['two_stage/flops']:.1f}",
        f"{r['two_stage/attention_flops']:.3g}", f"{r['full_nonlocal/attention_flops']:.3g}",
        f"{r['two_stage/reference/largest_bytes'] / 1e6:.3g}",
        f"{r['full_nonlocal/reference/largest_bytes'] / 1e6:.3g}",
        f"{r['two_stage/pallas/largest_bytes'] / 1e6:.3g}",
        f"{r['full_nonlocal/pallas/largest_bytes'] / 1e6:.3g}") for r in rows])
  tables = {"cost": (f"{machine['device']} ({machine['backend']}), jax {machine['jax']}; "
                     f"{summary['seconds']:.0f} s.\n\n{cost}")}
  tables["time"] = (records.write_markdown_table(
      ("image", "(a) seconds", "(c) seconds", "(a)/(c) time"),
      [(t["size"], f"{t['two_stage_s']:.4f}", f"{t['full_nonlocal_s']:.4f}",
        f"{t['ratio']:.3f}") for t in timed]) if timed else
      f"Not timed on {machine['backend']} (`--time-max` below the smallest size).\n")
  tables["gpu"] = (records.write_markdown_table(
      ("image", "N", "M", "kernel ms", "dot_product_attention ms", "kernel / dpa"),
      [(g["size"], g["n"], g["m"], f"{g['kernel_s'] * 1e3:.3f}",
        f"{g['dot_product_attention_s'] * 1e3:.3f}", f"{g['ratio']:.3f}") for g in gpu])
      if gpu else f"Kernel vs `jax.nn.dot_product_attention` needs a GPU; not measured on "
      f"{machine['backend']}.\n")
  largest = rows[-1]
  flops_ratio = largest["full_nonlocal/flops"] / largest["two_stage/flops"]
  claims = [("(c)/(a) forward FLOPs (XLA's count) at the largest image",
             f"{largest['size']}^2", f"{flops_ratio:.1f}"),
            ("largest array of (c) with the jnp attention (N x N scores)", f"{largest['size']}^2",
             f"{largest['full_nonlocal/reference/largest_bytes'] / 1e12:.1f} TB"),
            ("largest array of (c) with the Pallas kernel", f"{largest['size']}^2",
             f"{largest['full_nonlocal/pallas/largest_bytes'] / 1e6:.0f} MB")]
  if timed:
    ratios = [t["ratio"] for t in timed]
    claims.append((f"(a)'s time as a share of (c)'s on {machine['backend']}",
                   ", ".join(f"{t['size']}^2" for t in timed),
                   f"{100 * min(ratios):.0f}-{100 * max(ratios):.0f} %"))
  tables["claims"] = records.write_markdown_table(("reading", "image", "value"), claims)
  return tables


def plot(rows, path: Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  n = np.array([r["pixels"] for r in rows], float)
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for kind, label in (("two_stage", "(a) two-stage"), ("full_nonlocal", "(c) full-res")):
    axes[0].loglog(n, [r[f"{kind}/flops"] for r in rows], "o-", label=label)
    axes[1].loglog(n, [r[f"{kind}/reference/largest_bytes"] for r in rows], "o-",
                   label=f"{label}, jnp attention")
    axes[1].loglog(n, [r[f"{kind}/pallas/largest_bytes"] for r in rows], "s--",
                   label=f"{label}, Pallas kernel")
  axes[0].loglog(n, rows[0]["full_nonlocal/flops"] * (n / n[0]) ** 2, ":", color="gray",
                 label="slope N^2")
  axes[0].set_xlabel("pixels N")
  axes[0].set_ylabel("forward FLOPs (XLA cost analysis)")
  axes[1].set_xlabel("pixels N")
  axes[1].set_ylabel("largest intermediate array (bytes)")
  for ax in axes:
    ax.legend(fontsize=7)
  fig.tight_layout()
  records.atomic_save_figure(path, fig)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.bench_nonlocal",
                                   description=__doc__)
  parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
  parser.add_argument("--time-max", type=int, default=128,
                      help="largest image timed (the full-resolution model's N^2 scores)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--train-large", type=int, default=0, metavar="SIZE",
                      help="measure training at SIZE^2 crops instead (see above)")
  parser.add_argument("--steps", type=int, default=8, help="--train-large: steps of (a)")
  parser.add_argument("--train-child", type=int, default=0, help=argparse.SUPPRESS)
  backend = jax.default_backend()
  args, _ = parser.parse_known_args(argv)
  train_key = f"bench_nonlocal_train.{backend}" if args.train_large else None
  paper.add_paper_argument(parser, default_key=train_key or f"bench_nonlocal.{backend}")
  args = parser.parse_args(argv)
  if args.train_child:
    import json  # pylint: disable=import-outside-toplevel
    print(json.dumps(train_child(args.train_child, args.steps)))
    return 0
  start = time.perf_counter()
  if args.train_large:
    if args.train_large % SIZES["factor"] or args.steps < 2:
      parser.error(f"--train-large {args.train_large} --steps {args.steps}: expected a multiple "
                   f"of the downscale factor {SIZES['factor']} and at least 2 steps")
    large = train_large(args.train_large, args.steps)
    summary = {"machine": {"platform": platform.platform(), "backend": backend,
                           "device": jax.devices()[0].device_kind, "jax": jax.__version__},
               "model": SIZES, "seconds": round(time.perf_counter() - start, 1),
               "train_large": large}
    run_dir = paper.finish_benchmark("bench_nonlocal", PAPER_PAGE, summary, args.paper,
                                     sys.argv[1:] if argv is None else argv)
    print((run_dir / "tables.md").read_text())
    return 0
  rows = [measure_size(s) for s in args.sizes]
  timed = [time_size(s, args.repeats) for s in args.sizes if s <= args.time_max]
  gpu = gpu_kernel_times(args.sizes, 20) if backend == "gpu" else []
  summary = {"machine": {"platform": platform.platform(), "backend": backend,
                         "device": jax.devices()[0].device_kind, "jax": jax.__version__},
             "model": SIZES, "seconds": round(time.perf_counter() - start, 1), "rows": rows,
             "timed": timed, "gpu": gpu}
  run_dir = paper.finish_benchmark("bench_nonlocal", PAPER_PAGE, summary, args.paper,
                                   sys.argv[1:] if argv is None else argv)
  plot(rows, run_dir / "bench_nonlocal.png")
  if args.paper:
    records.atomic_write_bytes(paper.PAPERS / "figures" / f"{args.paper}.png",
                               (run_dir / "bench_nonlocal.png").read_bytes())
  print((run_dir / "tables.md").read_text())
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
