"""Benchmark: wasted time per failure and snapshot overhead of the checkpoint runtime.

Wasted time per failure = from the failure to the first step past the pre-failure step:
detection + restart + restore + recomputed steps (Gemini's measure). Three policies:

  (a) local  a snapshot into the node's local memory every step; a failed process's job
             restarts from it (nothing recomputed but the step in flight)
  (b) peer   the same, the node lost: its processes restart on a spare node from the replica
             the peer node's agent kept (staged through Ray's object store)
  (c) orbax  no local memory; async orbax saves every k steps, k chosen so that orbax costs
             the same overhead per step as (a); restart from the newest committed step

Two parts, both in this process's measurement:

1. Components per state size (10 MB, 100 MB, 1 GB of params + Adam moments; one process,
   one CPU device): step time; the overhead of a snapshot every step from N alternated runs
   (each about RUN_SECONDS of steps) with and without it (median of the paired differences,
   95 % bootstrap interval); orbax's
   cost per save measured the same way (saves every step), hence k for (c); restore times: a
   new process reading local memory, the peer's replica through a Ray actor and the object
   store then local memory, orbax from disk with the page cache dropped.
2. End to end on Ray's multi-node test cluster at the smallest size: the three policies as
   real jobs (2 jax processes, one per node) with kill -9 (a) or a node removed (b, c); the
   wasted time measured on the driver's clock, plus its size-independent parts (detection,
   restart until the restored step is reported).

The wasted time at every size is then the size-independent part measured in part 2 (detection,
stop, relaunch, process start, compile: the measured wasted time less its restore and its
steps) + this size's restore (part 1) + the steps computed until the first step past the
pre-failure one x this size's step time: 1 for (a) and (b) (the step in flight, redone), on
average (k - 1) / 2 + 1 for (c). At the smallest size the model differs from the measurement
only in that expected number of steps.

(b)'s node is removed by the experiment's fault injector (experiments/checkpoint.py) once the
peer holds replicas of the node's processes at or past the step every process had completed
when the fault came due; the surviving process may snapshot a step further meanwhile, so (b)
can compute one step more than the model's 1 (the kept run's end-to-end table shows it).

  python -m experiments.bench_checkpoint [--sizes-mb 10 100 1000] [--runs 10] [--paper]

Writes runs/bench_checkpoint/<timestamp>/; with --paper keeps papers/results/
bench_checkpoint.<backend>.json and fills papers/checkpoint.md. A timing benchmark: run it on a
quiet machine.
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
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback addresses only

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from experiments import paper  # pylint: disable=wrong-import-position
from research.checkpoint import store  # pylint: disable=wrong-import-position
from research.checkpoint import worker  # pylint: disable=wrong-import-position
from research.common import records  # pylint: disable=wrong-import-position

ROOT = Path(__file__).resolve().parent.parent
PAPER_PAGE = "papers/checkpoint.md"
FIGURE = "bench_checkpoint.png"
WASTE_GOAL = 10.0        # (c) / (a): Gemini recovers about 13x faster than from remote storage
OVERHEAD_GOAL_PCT = 3.5  # snapshot every step (CheckFreq)
RUN_SECONDS = 1.0        # each alternated run of the overhead measurement lasts about this long


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


def paired_overhead(times_with: list[float], times_without: list[float],
                    seed: int = 0) -> dict:
  """Median and 95 % bootstrap interval of the paired relative differences (percent)."""
  diffs = np.array([100 * (a / b - 1) for a, b in zip(times_with, times_without)])
  rng = np.random.default_rng(seed)
  medians = np.median(rng.choice(diffs, size=(4000, len(diffs)), replace=True), axis=1)
  low, high = np.percentile(medians, [2.5, 97.5])
  return {"median_pct": float(np.median(diffs)), "low_pct": float(low), "high_pct": float(high),
          "runs": len(diffs)}


def components(megabytes: float, runs: int, batch_per_device: int, scratch: Path) -> dict:
  """Part 1 for one state size."""
  import ray  # pylint: disable=import-outside-toplevel
  from research.checkpoint import transport  # pylint: disable=import-outside-toplevel

  width = hidden_for(megabytes)
  rng = np.random.default_rng(0)
  rows = 2 * batch_per_device
  data = (rng.normal(size=(rows, 64)).astype(np.float32), np.arange(rows) % 10)
  problem = worker.make_problem((width, width), batch_per_device, 1e-3, 0.1, 0, data=data)
  mesh = worker.data_mesh(jax.devices()[:1])
  abstract = worker.abstract_state(problem, mesh)
  template = store.local_shards_template(abstract)
  state_bytes = store.packed_size(template)
  job = worker.fingerprint(problem, 1, 10 ** 6)
  train_step = worker.make_train_step(problem, mesh)
  state = worker.replicate(worker.init_state(problem), mesh)
  position = np.zeros(2, np.int32)
  memory = store.local_memory_root() / f"meshwork-bench-{os.getpid()}-{megabytes:g}"
  slots = store.LocalSlots(memory, state_bytes, create=True)
  persistent = store.PersistentStore(scratch / f"orbax-{megabytes:g}", max_to_keep=2)

  def step(s):
    nonlocal position
    batch_rows, position = worker.global_batch_rows(problem, 1, position)
    x, y = worker.process_batch(problem, mesh, batch_rows)
    s, _ = train_step(s, x, y, worker.replicate(position, mesh))
    return jax.block_until_ready(s)

  state = step(step(state))  # compile
  start = time.perf_counter()
  state = step(step(state))
  # Runs of about RUN_SECONDS each (at least 2 steps): a run of a few short steps is mostly the
  # machine's noise.
  steps_per_run = max(2, math.ceil(RUN_SECONDS / ((time.perf_counter() - start) / 2)))
  modes = ("none", "local", "orbax")
  times = {m: [] for m in modes}
  for run in range(runs):  # alternated: the modes see the same machine, and take turns first
    for mode in modes[run % 3:] + modes[:run % 3]:
      start = time.perf_counter()
      for _ in range(steps_per_run):
        state = step(state)
        if mode == "local":
          slots.write(int(state.step), store.local_shards(state), job)
        elif mode == "orbax":
          persistent.save(int(state.step), state)  # waits for the previous save first
      if mode == "orbax":
        persistent.commit_finished()  # the run pays for all of its saves
      times[mode].append((time.perf_counter() - start) / steps_per_run)
  step_s = statistics.median(times["none"])
  local = paired_overhead(times["local"], times["none"])
  orbax = paired_overhead(times["orbax"], times["none"], seed=1)
  # (c)'s interval: orbax every k steps costs orbax's per-save overhead / k per step; the same
  # overhead as a snapshot every step means k = (per-save cost) / (per-snapshot cost).
  per_snapshot = max(local["median_pct"], 1e-3)
  orbax_interval = max(1, math.ceil(orbax["median_pct"] / per_snapshot))

  def timed(fn, repeats=3):
    results, seconds = None, []
    for _ in range(repeats):
      start = time.perf_counter()
      results = fn()
      seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), results

  def fresh_memory():  # what a restore into new arrays pays first: the kernel's fresh pages
    buffer = store.aligned_empty((state_bytes,), np.uint8)
    buffer.fill(1)
    return buffer

  fresh_s, _ = timed(fresh_memory)
  snapshot_s, _ = timed(lambda: slots.write(int(state.step), store.local_shards(state), job))
  saved_step = int(state.step)
  slots.write(saved_step, store.local_shards(state), job)
  persistent.save(saved_step, state)
  persistent.commit_finished()
  expected = store.pack(store.local_shards(state))

  def restore_local():  # a new process: a new mapping, fresh arrays, then global jax arrays
    reader = store.LocalSlots(memory, state_bytes)
    restored = store.from_local_shards(abstract, reader.read(template, saved_step, job))
    reader.close()
    return jax.block_until_ready(restored)

  def restore_orbax():
    _drop_page_cache(persistent.directory / "steps" / str(saved_step))
    return jax.block_until_ready(persistent.restore(saved_step, abstract))

  local_s, restored = timed(restore_local)
  assert store.pack(store.local_shards(restored)) == expected, "local restore is not exact"
  orbax_s, restored = timed(restore_orbax)
  assert store.pack(store.local_shards(restored)) == expected, "orbax restore is not exact"

  # The peer: a node agent actor keeps the replica; a new node's agent stages it (one copy
  # through the object store into its local memory), then the process reads local memory.
  holder = ray.remote(transport.NodeAgent).options(num_cpus=0).remote(
      "peer", job, str(store.local_memory_root() / f"meshwork-bench-peer-{os.getpid()}"),
      "unused")
  ray.get(holder.ping.remote())  # the actor's process started (not part of a replication)
  _, payload = slots.read_bytes(saved_step)
  replicate_s, _ = timed(lambda: ray.get(holder.store_replica.remote(0, saved_step,
                                                                    store.job_number(job),
                                                                    payload)), repeats=1)
  del payload
  stager = transport.NodeAgent("new", job, str(scratch / "stager"), "unused")
  stage_s, _ = timed(lambda: stager.stage(0, saved_step, holder))
  staged = store.LocalSlots(stager.memory_file(0), state_bytes)
  assert store.pack(staged.read(template, saved_step, job)) == expected, "staging is not exact"
  staged.close()
  stager.shutdown()
  ray.get(holder.shutdown.remote())
  ray.kill(holder)
  persistent.close()
  slots.close()
  memory.unlink()
  return {
      "target_mb": megabytes, "state_bytes": state_bytes, "hidden": width,
      "batch_per_device": batch_per_device, "steps_per_run": steps_per_run,
      "step_s": step_s, "times": times,
      "snapshot_overhead": local, "orbax_overhead_per_save": orbax,
      "orbax_interval": orbax_interval,
      "restore_local_s": local_s, "restore_orbax_cold_s": orbax_s,
      "fresh_memory_gbps": state_bytes / fresh_s / 1e9,
      "snapshot_gbps": state_bytes / snapshot_s / 1e9,
      "replicate_s": replicate_s, "stage_s": stage_s,
      "restore_peer_s": stage_s + local_s,
  }


def end_to_end(megabytes: float, workdir: Path, orbax_interval: int) -> dict:
  """Part 2: the three policies as real jobs on Ray's test cluster; wasted time measured."""
  import ray  # pylint: disable=import-outside-toplevel
  from experiments import checkpoint as experiment  # pylint: disable=import-outside-toplevel
  from experiments import run as launcher  # pylint: disable=import-outside-toplevel

  width = hidden_for(megabytes)
  k = orbax_interval
  policies = {  # name: (config, fault, step of the fault); (c) after two saves
      "local": (dict(snapshot_every=1, persist_every=0, steps=12), "kill_process", 7),
      # (b) runs longer: its node goes once the peer's replicas reach the fault's step, which
      # can take a few steps; the steps after the recovery do not count.
      "peer": (dict(snapshot_every=1, persist_every=0, steps=40), "kill_node", 7),
      "orbax": (dict(snapshot_every=0, persist_every=k, steps=2 * k + 4), "kill_node",
                2 * k + 1),
  }
  cluster, worker_nodes = experiment.start_test_cluster(2 + len(policies))  # a spare per fault
  out = {}
  cache = str(workdir / "compilation_cache")
  try:
    for name, (overrides, kind, fault_step) in policies.items():
      nodes = experiment.live_nodes(worker_nodes, cluster)
      settings = dict(overrides, hidden=(width, width), batch_per_device=16, memory_slots=4,
                      min_step_seconds=0.0, spare_nodes=1, faults=())
      config, _ = launcher.load("configs/checkpoint/faults.py",
                                [f"{k}={v}" for k, v in settings.items()])
      faults = [experiment.Fault(kind, fault_step, 1)]
      lines: list[str] = []
      result, _ = experiment.run_job(config, workdir / name, name, cluster, nodes, faults, cache,
                                     log=lines.append)
      if faults[0].fired_at is None or not result.recoveries:
        raise RuntimeError(f"end to end, policy {name}: the {kind} fault at step {fault_step} "
                           "never fired or was never recovered from (log:\n"
                           + "\n".join(lines[-20:]) + ")")
      recovery = result.recoveries[0]
      restored = [e for e in result.events if e["event"] == "restored" and e["attempt"] == 2]
      out[name] = {
          "fault": kind, "fault_step": faults[0].step, "restored_step": recovery.plan.step,
          "restored_from": sorted(set(recovery.plan.sources)),
          "wasted_s": recovery.recovered_at - faults[0].fired_at,
          "detection_s": recovery.failure.detected_at - faults[0].fired_at,
          "relaunch_s": recovery.relaunched_at - recovery.failure.detected_at,
          "process_restore_s": max(e["restore_s"] for e in restored),
          "process_init_s": max(e["init_s"] for e in restored),
          "log": lines}
  finally:
    ray.shutdown()
    cluster.shutdown()
  return out


POLICIES = ("local", "peer", "orbax")  # (a), (b), (c)
RESTORE_KEYS = {"local": "restore_local_s", "peer": "restore_peer_s",
                "orbax": "restore_orbax_cold_s"}


def expected_steps(policy: str, interval: int) -> float:
  """Steps computed after a restart until the first step past the pre-failure step.

  A failure during step s + 1: (a), (b) restore step s and run step s + 1 again: 1 step. (c)
  restores the newest save c <= s, a multiple of the interval k; over a uniform s that is
  s - c + 1 = (k - 1) / 2 + 1 steps on average.
  """
  return 1.0 if policy in ("local", "peer") else (interval - 1) / 2 + 1


def model_wasted(row: dict, fixed: dict) -> dict:
  """Wasted seconds per failure at this size: the size-independent part measured end to end
  (detection, stop, relaunch, process start, compile) + this size's restore + its steps."""
  return {name: fixed[name] + row[RESTORE_KEYS[name]]
          + expected_steps(name, row["orbax_interval"]) * row["step_s"] for name in fixed}


def table(summary: dict) -> str:
  rows = summary["rows"]
  return records.write_markdown_table(
      ["state", "step (ms)", "snapshot overhead: median [95 %] (%)", "orbax per save (%)",
       "orbax interval k", "restore: local (ms)", "restore: peer (ms)",
       "restore: orbax, cold (ms)", "wasted (a) local (s)", "wasted (b) peer (s)",
       "wasted (c) orbax (s)", "(c) / (a)"],
      [[_size(r), f"{1e3 * r['step_s']:.1f}", _interval(r["snapshot_overhead"]),
        f"{r['orbax_overhead_per_save']['median_pct']:.1f}", r["orbax_interval"],
        f"{1e3 * r['restore_local_s']:.1f}", f"{1e3 * r['restore_peer_s']:.1f}",
        f"{1e3 * r['restore_orbax_cold_s']:.1f}", f"{r['wasted']['local']:.2f}",
        f"{r['wasted']['peer']:.2f}", f"{r['wasted']['orbax']:.2f}",
        f"{r['wasted']['orbax'] / r['wasted']['local']:.2f}x"] for r in rows])


def e2e_table(summary: dict) -> str:
  e2e, first = summary["end_to_end"], summary["rows"][0]

  def rest(r):  # interpreter start and imports, compilation, the steps computed
    return (r["wasted_s"] - r["detection_s"] - r["relaunch_s"] - r["process_init_s"]
            - r["process_restore_s"])

  return records.write_markdown_table(
      ["policy", "fault", "restored", "detection (s)", "stop + plan + relaunch (s)",
       "process: distributed init, inputs, mesh (s)", "restore in the process (ms)",
       "the rest: interpreter + imports, compile, steps (s)", "steps computed",
       "wasted, measured (s)", "wasted, model (s)"],
      [[f"({'abc'[i]}) {name}", f"{r['fault']} @ step {r['fault_step']}",
        f"step {r['restored_step']} from {'+'.join(r['restored_from'])}",
        f"{r['detection_s']:.2f}", f"{r['relaunch_s']:.2f}", f"{r['process_init_s']:.2f}",
        f"{1e3 * r['process_restore_s']:.1f}", f"{rest(r):.2f}", r["steps_computed"],
        f"{r['wasted_s']:.2f}", f"{first['wasted'][name]:.2f}"]
       for i, (name, r) in enumerate((n, e2e[n]) for n in POLICIES)])


def goals_table(summary: dict) -> str:
  rows = summary["rows"]

  def holds(values, test):
    return "yes" if all(test(v) for v in values) else "no"

  ratios = [r["wasted"]["orbax"] / r["wasted"]["local"] for r in rows]
  overheads = [r["snapshot_overhead"] for r in rows]
  return records.write_markdown_table(
      ["goal", *(_size(r) for r in rows), "met at every size"],
      [[f"wasted time per failure: (c) orbax / (a) local >= {WASTE_GOAL:g}x",
        *(f"{v:.2f}x" for v in ratios), holds(ratios, lambda v: v >= WASTE_GOAL)],
       [f"snapshot every step: overhead < {OVERHEAD_GOAL_PCT:g} % (median; upper 95 % bound)",
        *(f"{o['median_pct']:+.1f} %; {o['high_pct']:+.1f} %" for o in overheads),
        holds(overheads, lambda o: o["high_pct"] < OVERHEAD_GOAL_PCT)
        + " (upper bound), " + holds(overheads, lambda o: o["median_pct"] < OVERHEAD_GOAL_PCT)
        + " (median)"],
       ["(reading) snapshot copy rate, into touched slots",
        *(f"{r['snapshot_gbps']:.1f} GB/s" for r in rows), "-"],
       ["(reading) fresh memory rate, first touch of new pages",
        *(f"{r['fresh_memory_gbps']:.2f} GB/s" for r in rows), "-"]])


def _size(row: dict) -> str:
  return f"{row['state_bytes'] / 1e6:,.0f} MB"


def _interval(o: dict) -> str:
  return f"{o['median_pct']:+.1f} [{o['low_pct']:+.1f}, {o['high_pct']:+.1f}]"


def paper_tables(result: dict) -> dict[str, str]:
  """The page's tables from a kept result (`result["summary"]` is what `main` measured)."""
  summary = result["summary"]
  machine = (f"{summary['backend']} backend, {summary['cpu_count']} cores "
             f"({summary['machine']}), jax {summary['jax']}, {summary['runs']} alternated runs")
  return {"costs": f"Measured on: {machine}.\n\n" + table(summary),
          "end_to_end": e2e_table(summary), "goals": goals_table(summary)}


def plot(summary: dict, path: Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  rows = summary["rows"]
  mb = [r["state_bytes"] / 1e6 for r in rows]
  fig, (wasted, overhead) = plt.subplots(1, 2, figsize=(11, 4))
  for name, marker in (("local", "o-"), ("peer", "s-"), ("orbax", "^-")):
    wasted.loglog(mb, [r["wasted"][name] for r in rows], marker, label=name)
  wasted.set_xlabel("state (MB)")
  wasted.set_ylabel("wasted seconds per failure (model from measured parts)")
  wasted.legend()
  med = [r["snapshot_overhead"]["median_pct"] for r in rows]
  low = [r["snapshot_overhead"]["low_pct"] for r in rows]
  high = [r["snapshot_overhead"]["high_pct"] for r in rows]
  overhead.errorbar(mb, med, yerr=[np.subtract(med, low), np.subtract(high, med)], fmt="o-",
                    capsize=3, label="snapshot every step (median, 95 %)")
  overhead.axhline(OVERHEAD_GOAL_PCT, color="grey", linestyle=":", label="CheckFreq 3.5 %")
  overhead.set_xscale("log")
  overhead.set_xlabel("state (MB)")
  overhead.set_ylabel("step time overhead (%)")
  overhead.legend()
  for ax in (wasted, overhead):
    ax.grid(alpha=0.3)
  fig.suptitle("checkpoint runtime: wasted time per failure and snapshot overhead (CPU)")
  records.atomic_save_figure(path, fig)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.bench_checkpoint",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes-mb", type=float, nargs="+", default=[10, 100, 1000])
  parser.add_argument("--runs", type=int, default=10, help="alternated runs per mode")
  parser.add_argument("--batch-per-device", type=int, default=1024)
  paper.add_paper_argument(parser, default_key=f"bench_checkpoint.{jax.default_backend()}")
  args = parser.parse_args(argv)
  if args.runs < 10:
    parser.error(f"--runs={args.runs}: expected >= 10 (the 95 % interval needs them)")
  import ray  # pylint: disable=import-outside-toplevel
  rows = []
  with tempfile.TemporaryDirectory(prefix="bench-checkpoint-", dir=ROOT) as scratch:
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
      for megabytes in args.sizes_mb:
        rows.append(components(megabytes, args.runs, args.batch_per_device, Path(scratch)))
        r = rows[-1]
        print(f"{_size(r)}: step {r['step_s'] * 1e3:.1f} ms, snapshot overhead "
              f"{_interval(r['snapshot_overhead'])} %, orbax k={r['orbax_interval']}", flush=True)
    finally:
      ray.shutdown()
    e2e = end_to_end(args.sizes_mb[0], Path(scratch), rows[0]["orbax_interval"])
  first, fixed = rows[0], {}
  for name, r in e2e.items():
    r["steps_computed"] = r["fault_step"] - r["restored_step"] + 1
    fixed[name] = (r["wasted_s"] - first[RESTORE_KEYS[name]]
                   - r["steps_computed"] * first["step_s"])
    del r["log"]
  for row in rows:
    row["wasted"] = model_wasted(row, fixed)
  summary = {"backend": jax.default_backend(), "cpu_count": os.cpu_count(),
             "machine": platform.machine(), "jax": jax.__version__, "runs": args.runs,
             "settings": {"sizes_mb": args.sizes_mb, "runs": args.runs,
                          "batch_per_device": args.batch_per_device},
             "rows": rows, "end_to_end": e2e}
  print(table(summary))
  print(e2e_table(summary))
  run_dir = paper.finish_benchmark("bench_checkpoint", PAPER_PAGE, summary, args.paper,
                                   sys.argv[1:] if argv is None else argv)
  plot(summary, run_dir / FIGURE)
  if args.paper is not None:
    shutil.copyfile(run_dir / FIGURE, ROOT / "papers" / "figures" / FIGURE)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
