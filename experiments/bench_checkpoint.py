"""Benchmark: restore from node-local memory vs from orbax on disk; snapshot overhead per step.

For worker states (MLP params + Adam moments + step, data position, RNG) of about 1 MB to 1 GB:

- restore from local memory, two ways: as a node's warm spare does it (slots mapped with
  MAP_POPULATE and restore buffers touched while it stood by; the restore is one copy per leaf
  into them), and as a new process does it (a new mapping, fresh 64-byte-aligned arrays); both
  end in jax arrays (device_put adopts the aligned buffers without a copy); vs
  `PersistentStore.restore` (orbax, OCDBT) of the same state from disk into numpy arrays (its
  fastest form; the device_put that would follow is not counted for it), once with the files
  in the page cache ("warm") and once after dropping them from it with posix_fadvise(DONTNEED)
  ("cold"); ratio disk / local (anchor: Gemini, 13x from CPU memory of peers vs remote
  storage; goal: at least 10x at 100 MB and above);
- steps lost per failure: 0 for a worker (snapshot every step), at most 2P - 1 for a node,
  with P the smallest orbax save period at which one async save ends before the next (from
  the measured save time and step time);
- snapshot overhead: median step time (gradient + Adam update, jitted, batch 1024) with a
  local-memory snapshot every step, written synchronously after the update or by a background
  thread overlapping the next step (CheckFreq's pipelining), vs no snapshot (anchor: CheckFreq,
  at most 3.5 %). Each mode is measured in interleaved rounds in one process.

  python -m experiments.bench_checkpoint [--sizes-mb 1 10 100 1000] [--steps 8] [--paper]

Writes runs/bench_checkpoint/<timestamp>/ (summary.json, tables.md, bench_checkpoint.png); with
--paper also keeps the summary as papers/results/bench_checkpoint.<backend>.json, fills the
blocks of papers/checkpoint.md and copies the plot to papers/figures/bench_checkpoint.png. A
timing benchmark: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import numpy as np

from experiments import paper
from experiments._timing import median_seconds
from research.checkpoint import store
from research.checkpoint import worker as worker_lib
from research.common import records

ROOT = Path(__file__).resolve().parent.parent
PAPER_PAGE = "papers/checkpoint.md"
FIGURE = "bench_checkpoint.png"
RESTORE_GOAL = 10.0     # disk / local memory at 100 MB and above (Gemini: about 13x)
RESTORE_GOAL_MB = 100
OVERHEAD_GOAL_PCT = 3.5  # snapshot overhead per step (CheckFreq)


def hidden_for(megabytes: float) -> int:
  """Width h of a 64-h-h-10 MLP whose params + two Adam moments take about `megabytes`."""
  params = megabytes * 1e6 / 12  # float32 params, mu, nu
  return max(8, int((-74 + math.sqrt(74 ** 2 + 4 * params)) / 2))


def _drop_page_cache(directory: Path) -> None:
  for path in directory.rglob("*"):
    if path.is_file():
      fd = os.open(path, os.O_RDONLY)
      try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
      finally:
        os.close(fd)


def bench_problem(megabytes: float, batch_size: int) -> worker_lib.Problem:
  """One worker, a 64-h-h-10 MLP of about `megabytes` of state, synthetic rows."""
  import optax  # pylint: disable=import-outside-toplevel
  from research.fedavg import model as model_lib  # pylint: disable=import-outside-toplevel

  rows = 2 * batch_size
  rng = np.random.default_rng(0)
  apply, params = model_lib.mlp((64, hidden_for(megabytes), hidden_for(megabytes), 10), 0)
  return worker_lib.Problem(apply, params, optax.adam(1e-3),
                            rng.normal(size=(rows, 64)).astype(np.float32),
                            rng.integers(0, 10, rows), (np.arange(rows),), batch_size, 0.1, 0)


def bench_size(megabytes: float, steps: int, repeats: int, batch_size: int,
               scratch: Path) -> dict:
  problem = bench_problem(megabytes, batch_size)
  gradient, update = worker_lib.make_step_fns(problem)
  state = worker_lib.init_state(problem, 0)
  state_bytes = store.packed_size(state)
  slots = store.LocalSlots(store.local_memory_root() / f"meshwork-bench-{os.getpid()}",
                           state_bytes, create=True)

  def step(s):
    x, y, next_position = worker_lib.batch_for(problem, 0, s)
    grads, _ = gradient(s, x, y)
    return jax.block_until_ready(update(s, grads, next_position))

  state = step(step(state))  # compile
  steps_per_round = 1 if megabytes >= 500 else 3
  times = {"none": [], "sync": [], "async": []}
  modes = list(times)
  for round_ in range(steps):  # interleaved rounds: the modes see the same machine noise
    for mode in modes[round_ % 3:] + modes[:round_ % 3]:  # and take turns at going first
      writer = None
      start = time.perf_counter()
      for _ in range(steps_per_round):
        state = step(state)
        if mode == "sync":
          slots.write(int(state.step), state)
        elif mode == "async":
          if writer is not None:
            writer.join()  # one snapshot in flight at a time
          writer = threading.Thread(target=slots.write, args=(int(state.step), state))
          writer.start()
      if writer is not None:
        writer.join()
      times[mode].append((time.perf_counter() - start) / steps_per_round)
  step_seconds = {mode: statistics.median(t) for mode, t in times.items()}
  # Overhead from each round's own ratio (paired: a round's modes ran back to back), median.
  overhead = {mode: 100 * (statistics.median(a / b for a, b in zip(times[mode], times["none"]))
                           - 1) for mode in ("sync", "async")}

  snapshot_seconds = median_seconds(lambda: slots.write(int(state.step), state), repeats=repeats,
                                    warmup=0)

  def restore_local():  # a new process: a new mapping, fresh arrays
    reader = store.LocalSlots(slots.path, state_bytes)
    _, restored = reader.read(state)  # jax arrays
    reader.close()
    return jax.block_until_ready(restored)

  spare_slots = store.LocalSlots(slots.path, state_bytes, populate=True)

  persistent = store.PersistentStore(scratch / f"persist-{megabytes}", log=lambda _: None)
  start = time.perf_counter()
  persistent.save(int(state.step), state)
  persistent.commit_finished(wait=True)
  persist_seconds = time.perf_counter() - start
  step_dir = persistent.directory / "steps" / str(int(state.step))

  def restore_disk_cold():
    _drop_page_cache(step_dir)
    return persistent.restore(int(state.step), state)

  local = median_seconds(restore_local, repeats=repeats, warmup=0)
  # The warm spare: mapping populated and buffers touched beforehand (untimed, per call).
  spare = median_seconds(lambda buffers: spare_slots.read(state, out=buffers)[1],
                         repeats=repeats, warmup=0,
                         setup=lambda: (store.restore_buffers(state),))
  spare_slots.close()
  warm = median_seconds(lambda: persistent.restore(int(state.step), state), repeats=repeats,
                        warmup=0)
  cold = median_seconds(restore_disk_cold, repeats=repeats, warmup=0)
  restored = restore_local()
  assert store.pack(restored) == store.pack(state), "local-memory restore is not exact"
  assert store.pack(persistent.restore(int(state.step), state)) == store.pack(state)
  persistent.close()
  slots.close()
  slots.path.unlink()
  persist_every = max(1, math.ceil(persist_seconds / step_seconds["none"]))
  return {
      "target_mb": megabytes, "state_bytes": state_bytes, "hidden": hidden_for(megabytes),
      "batch_size": batch_size,
      "restore_local_s": local, "restore_spare_s": spare,
      "restore_disk_warm_s": warm, "restore_disk_cold_s": cold,
      "disk_over_local_warm": warm / local, "disk_over_local_cold": cold / local,
      "disk_over_spare_warm": warm / spare, "disk_over_spare_cold": cold / spare,
      "snapshot_s": snapshot_seconds, "persist_blocking_s": persist_seconds,
      "step_s": step_seconds["none"],
      "snapshot_over_step_pct": 100 * snapshot_seconds / step_seconds["none"],
      # Steps lost per failure under the policy these numbers allow: a snapshot every step
      # (a worker failure redoes only the step in flight), an orbax save every P steps with P
      # the smallest period at which one async save ends before the next begins; a node
      # failure goes back to the newest committed save: at most 2P - 1 steps (P - 1 since
      # the newest save, P more when that save was still in flight).
      "persist_every_min": persist_every,
      "steps_lost_worker": 0, "steps_lost_node_max": 2 * persist_every - 1,
      "overhead_sync_pct": overhead["sync"], "overhead_async_pct": overhead["async"],
  }


def table(rows: list[dict]) -> str:
  """The costs table: one row per state size."""
  return records.write_markdown_table(
      ["state", "local: warm spare (ms)", "local: new process (ms)", "orbax warm (ms)",
       "orbax cold (ms)", "disk / spare (warm, cold)", "disk / new process (warm, cold)",
       "step (ms)", "snapshot (ms)", "snapshot / step (%)",
       "measured overhead sync / async (%)", "orbax save (s)",
       "steps lost: worker / node (max)"],
      [[_size(r), f"{1e3 * r['restore_spare_s']:.1f}",
        f"{1e3 * r['restore_local_s']:.1f}",
        f"{1e3 * r['restore_disk_warm_s']:.1f}", f"{1e3 * r['restore_disk_cold_s']:.1f}",
        f"{r['disk_over_spare_warm']:.1f}x, {r['disk_over_spare_cold']:.1f}x",
        f"{r['disk_over_local_warm']:.1f}x, {r['disk_over_local_cold']:.1f}x",
        f"{1e3 * r['step_s']:.1f}", f"{1e3 * r['snapshot_s']:.1f}",
        f"{r['snapshot_over_step_pct']:.1f}",
        f"{r['overhead_sync_pct']:+.1f} / {r['overhead_async_pct']:+.1f}",
        f"{r['persist_blocking_s']:.2f}",
        f"{r['steps_lost_worker']} / {r['steps_lost_node_max']} "
        f"(save every {r['persist_every_min']})"] for r in rows])


def _size(row: dict) -> str:
  return f"{row['state_bytes'] / 1e6:,.1f} MB"


def goals_table(rows: list[dict]) -> str:
  """The anchors' goals read from the costs table: per size, and whether this run meets them."""
  large = [r for r in rows if r["state_bytes"] >= RESTORE_GOAL_MB * 1e6 * 0.99]

  def restore(label, key):
    holds = bool(large) and all(r[key] >= RESTORE_GOAL for r in large)
    return [f"restore: {label}", *(f"{r[key]:.1f}x" for r in rows),
            ("yes" if holds else "no") + f" (>= {RESTORE_GOAL:g}x from {RESTORE_GOAL_MB} MB up)"]

  def overhead(label, key, sign=""):
    met = [_size(r) for r in rows if r[key] < OVERHEAD_GOAL_PCT]
    return [label, *(f"{r[key]:{sign}.1f} %" for r in rows),
            f"under {OVERHEAD_GOAL_PCT:g} % at " + (", ".join(met) if met else "no size")]

  return records.write_markdown_table(
      ["reading", *(_size(r) for r in rows), "goal met in this run"],
      [restore("orbax (page cache) / warm spare", "disk_over_spare_warm"),
       restore("orbax (disk) / warm spare", "disk_over_spare_cold"),
       restore("orbax (page cache) / new process", "disk_over_local_warm"),
       restore("orbax (disk) / new process", "disk_over_local_cold"),
       overhead("snapshot time / step time", "snapshot_over_step_pct"),
       overhead("measured overhead, snapshot after the update", "overhead_sync_pct", "+"),
       overhead("measured overhead, snapshot in a background thread", "overhead_async_pct",
                "+"),
       ["snapshot copy rate (state bytes / snapshot time)",
        *(f"{r['state_bytes'] / r['snapshot_s'] / 1e9:.1f} GB/s" for r in rows), "-"]])


def paper_tables(result: dict) -> dict[str, str]:
  """The page's tables from a kept result (`result["summary"]` is what `main` measured)."""
  summary = result["summary"]
  machine = (f"{summary['backend']} backend, {summary['cpu_count']} cores "
             f"({summary['machine']}), jax {summary['jax']}")
  return {"costs": f"Measured on: {machine}.\n\n" + table(summary["rows"]),
          "goals": goals_table(summary["rows"])}


def plot(rows: list[dict], path: Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  mb = [r["state_bytes"] / 1e6 for r in rows]
  fig, (restore, overhead) = plt.subplots(1, 2, figsize=(11, 4))
  restore.loglog(mb, [r["restore_spare_s"] for r in rows], "D-", label="local memory, warm spare")
  restore.loglog(mb, [r["restore_local_s"] for r in rows], "o-", label="local memory, new process")
  restore.loglog(mb, [r["restore_disk_warm_s"] for r in rows], "s-", label="orbax, page cache")
  restore.loglog(mb, [r["restore_disk_cold_s"] for r in rows], "^-", label="orbax, from disk")
  restore.set_xlabel("worker state (MB)")
  restore.set_ylabel("restore seconds")
  restore.legend()
  overhead.semilogx(mb, [r["snapshot_over_step_pct"] for r in rows], "D--",
                    label="snapshot time / step time")
  overhead.semilogx(mb, [r["overhead_sync_pct"] for r in rows], "o-", label="sync snapshot")
  overhead.semilogx(mb, [r["overhead_async_pct"] for r in rows], "s-",
                    label="async snapshot (overlaps next step)")
  overhead.axhline(3.5, color="grey", linestyle=":", label="CheckFreq 3.5 %")
  overhead.set_xlabel("worker state (MB)")
  overhead.set_ylabel("step time overhead (%)")
  overhead.legend()
  for ax in (restore, overhead):
    ax.grid(alpha=0.3)
  fig.suptitle("checkpoint states: restore and snapshot cost (CPU)")
  records.atomic_save_figure(path, fig)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.bench_checkpoint",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 10, 100, 1000])
  parser.add_argument("--steps", type=int, default=8, help="interleaved rounds per mode")
  parser.add_argument("--batch-size", type=int, default=1024)
  parser.add_argument("--repeats", type=int, default=5)
  paper.add_paper_argument(parser, default_key=f"bench_checkpoint.{jax.default_backend()}")
  args = parser.parse_args(argv)
  rows = []
  with tempfile.TemporaryDirectory(prefix="bench-checkpoint-", dir=ROOT) as scratch:
    for megabytes in args.sizes_mb:
      rows.append(bench_size(megabytes, args.steps, args.repeats, args.batch_size,
                             Path(scratch)))
      print(table(rows[-1:]).splitlines()[-1], flush=True)
  summary = {"backend": jax.default_backend(), "cpu_count": os.cpu_count(),
             "machine": platform.machine(), "jax": jax.__version__,
             "settings": {"sizes_mb": args.sizes_mb, "steps": args.steps,
                          "batch_size": args.batch_size, "repeats": args.repeats},
             "rows": rows}
  print(table(rows))
  run_dir = paper.finish_benchmark("bench_checkpoint", PAPER_PAGE, summary, args.paper,
                                   sys.argv[1:] if argv is None else argv)
  plot(rows, run_dir / FIGURE)
  if args.paper is not None:
    shutil.copyfile(run_dir / FIGURE, ROOT / "papers" / "figures" / FIGURE)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
