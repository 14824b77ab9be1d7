"""Benchmark: getting each parameter version to every actor, and env steps per second vs actors.

Measured on this machine with Ray actors (one process each):

- publish-to-all-actors latency: from the learner's publish until every actor holds the new
  version (median over `--repeats` versions), and the learner's egress bytes per version, for
  1 ... 64 actors and three broadcasts:
    tree   research/rl_cache/ray_backend.RayParameterService: cache nodes as Ray actors (fanout
           `--fanout`, at most `--actors-per-leaf` actors per leaf), each actor reading its
           leaf (which pulls from its ancestors) until it holds the version;
    flat   the learner sends the blob to every actor itself (one Ray call each, the blob by
           value);
    store  Ray's plain object-store broadcast: the learner puts the blob once and hands every
           actor the reference (each actor gets it from its machine's store);
  for the CartPole Q-network of the rl_cache experiment and for a larger blob (`--large-mb`).
- a projection to 10,000 actors: research/rl_cache/broadcast_model.py's tree costs (fixed, per
  hop, per actor served by a leaf) fitted by least squares on calibration runs with little
  contention (chains of 1 ... 4 cache nodes to one actor; one node serving 1, 2, 4 actors), the
  flat and store costs (per actor) on the sweep, then evaluated at 100 ... 10,000 actors
  assuming every node and actor has its own core (the sweep's measured / modelled ratio says
  how far one shared 2-core machine is from that) (learner egress there follows from counting:
  one blob per version for the tree, one per actor for flat, at most one per machine for the
  store, with `--actors-per-machine`).
- environment steps per second vs actors: `--throughput-actors` RL actors (RayActorPool, one
  CPU thread each) rolling out into a replay table without a rate limiter, no learner.

  python -m experiments.bench_rl_cache [--paper]

Writes runs/bench_rl_cache/<timestamp>/ (summary.json, tables.md, bench_rl_cache.png); with
--paper also keeps the summary as papers/results/bench_rl_cache.cpu.json, fills the blocks of
papers/rl_cache.md and copies the plot to papers/figures/bench_rl_cache.png. Every process
shares this machine's cores, so the latencies include that contention: the machine is named in
the summary.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import ray  # pylint: disable=wrong-import-position

from experiments import paper  # pylint: disable=wrong-import-position
from research.common import records  # pylint: disable=wrong-import-position
from research.rl_cache import agent as agent_lib  # pylint: disable=wrong-import-position
from research.rl_cache import broadcast_model as bm  # pylint: disable=wrong-import-position
from research.rl_cache import cache  # pylint: disable=wrong-import-position
from research.rl_cache import ray_backend  # pylint: disable=wrong-import-position
from research.rl_cache import replay  # pylint: disable=wrong-import-position

ROOT = Path(__file__).resolve().parent.parent
PAPER_PAGE = "papers/rl_cache.md"
FIGURE = "bench_rl_cache.png"
METHODS = ("tree", "flat", "store")
PROJECT_TO = (100, 1_000, 10_000)


@ray.remote(num_cpus=0, max_concurrency=4)  # ready() answers while read_until waits
class Receiver:
  """One actor's side of a broadcast (no RL: only what receiving a version costs)."""

  def __init__(self, actor: int):
    self._actor = actor
    self._reader = None

  def attach(self, reader: ray_backend.LeafReader) -> bool:
    self._reader = reader
    return True

  def ready(self) -> bool:
    return True

  def read_until(self, version: int, timeout_s: float = 60.0) -> int:
    """Waits at its leaf for the push that brings `version` (tree; a long poll, no pulls)."""
    deadline = time.monotonic() + timeout_s
    while True:
      held, _ = self._reader.read(self._actor, wait_newer_s=1.0)
      if held >= version:
        return held
      if time.monotonic() > deadline:
        raise TimeoutError(f"actor {self._actor}: version {version} not at its leaf after "
                           f"{timeout_s} s (holds {held})")

  def take(self, blob: cache.ParamBlob) -> int:
    """The blob by value (flat)."""
    return blob.version

  def take_ref(self, wrapped: list) -> int:
    """The blob through the object store (store)."""
    return ray.get(wrapped[0]).version


def params_of_bytes(nbytes: int) -> dict:
  """A params pytree of about `nbytes` bytes (float32)."""
  n = max(nbytes // 4, 1)
  return {"w": np.zeros((n,), np.float32)}


def cartpole_params() -> dict:
  config = agent_lib.AgentConfig()
  return jax.tree.map(np.asarray, agent_lib.init_learner(config, jax.random.key(0)).params)


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def bench_tree(params, receivers, fanout: int, actors_per_leaf: int, repeats: int) -> dict:
  return bench_topology(params, receivers, bm.topology_for(len(receivers), fanout,
                                                           actors_per_leaf), repeats)


def bench_topology(params, receivers, topology: cache.Topology, repeats: int) -> dict:
  k = len(receivers)
  spec = cache.ParamSpec.from_params(params)
  # A generous timeout: on a small machine the node actors of a big tree start slowly.
  with ray_backend.RayParameterService(topology, spec, timeout_s=600.0) as service:
    reader = service.leaf_reader()
    ray.get([r.attach.remote(reader) for r in receivers])
    times = []
    for version in range(repeats + 1):  # version 0 warms every path up
      # Every actor is waiting at its leaf before the publish (as actors between rollouts
      # would be); the clock runs from the publish until the last one holds the version.
      waiting = [r.read_until.remote(version) for r in receivers]
      ray.get([r.ready.remote() for r in receivers])
      time.sleep(0.2)  # the waits reach the leaves (a late one only adds to the time)
      start = time.perf_counter()
      service.publish(params, version)
      ray.get(waiting)
      if version:
        times.append(time.perf_counter() - start)
    service.settle(60.0)
    egress = service.egress_bytes()[cache.LEARNER] / (repeats + 1)
  return {"method": "tree", "actors": k, "tree_depth": topology.depth,
          "latency_s": statistics.median(times), "latency_s_all": times,
          "learner_egress_bytes": egress}


def bench_flat(params, receivers, repeats: int) -> dict:
  spec = cache.ParamSpec.from_params(params)
  times, sent = [], 0
  for version in range(repeats + 1):
    blob = cache.to_blob(params, version, spec)
    seconds = _timed(lambda b=blob: ray.get([r.take.remote(b) for r in receivers]))
    sent += blob.nbytes * len(receivers)  # the blob went by value in every call
    if version:
      times.append(seconds)
  return {"method": "flat", "actors": len(receivers), "latency_s": statistics.median(times),
          "latency_s_all": times, "learner_egress_bytes": sent / (repeats + 1)}


def bench_store(params, receivers, repeats: int) -> dict:
  spec = cache.ParamSpec.from_params(params)
  times, sent = [], 0
  for version in range(repeats + 1):
    blob = cache.to_blob(params, version, spec)
    def put_and_get(b=blob):
      ref = ray.put(b)
      ray.get([r.take_ref.remote([ref]) for r in receivers])
    seconds = _timed(put_and_get)
    sent += blob.nbytes  # one put; the actors share this machine's store
    if version:
      times.append(seconds)
  return {"method": "store", "actors": len(receivers), "latency_s": statistics.median(times),
          "latency_s_all": times, "learner_egress_bytes": sent / (repeats + 1)}


def bench_throughput(actor_counts, rollouts: int) -> list[dict]:
  """Env steps per second of k RL actors (RayActorPool) filling a table with no limiter."""
  config = agent_lib.AgentConfig()
  params = cartpole_params()
  example = jax.eval_shape(lambda p, s: agent_lib.rollout(config, p, s, 1.0)[1], params,
                           agent_lib.init_actor(config, jax.random.key(0)))
  spec = replay.ItemSpec.from_example({k: np.zeros(v.shape, v.dtype)
                                       for k, v in example._asdict().items()})
  rows = []
  for k in actor_counts:
    topology = cache.Topology(depth=1, fanout=2, num_actors=k)
    with ray_backend.RayParameterService(topology, cache.ParamSpec.from_params(params)) as \
        service, ray_backend.RayReplayService(
            replay.TableConfig(max_size=64, samples_per_insert=None, min_size_to_sample=1),
            spec) as table:
      service.publish(params, 0)
      pool = ray_backend.RayActorPool(config, list(range(k)), service.leaf_reader(), table)
      try:
        def run_all(n):
          for actor in range(k):
            pool.submit(actor, n, 1.0)
          reports = []
          while pool.in_flight:
            reports += [r for _, r in pool.wait(1.0)]
          return sum(r.env_steps for r in reports)
        run_all(1)  # start-up and jit in every actor
        start = time.perf_counter()
        steps = run_all(rollouts)
        seconds = time.perf_counter() - start
      finally:
        pool.close()
    rows.append({"actors": k, "env_steps": steps, "seconds": seconds,
                 "env_steps_per_s": steps / seconds})
    print(f"throughput: {k} actors {steps / seconds:,.0f} env steps/s", flush=True)
  return rows


def bench(actor_counts, fanout, actors_per_leaf, repeats, large_mb, actors_per_machine,
          throughput_actors, throughput_rollouts) -> dict:
  blobs = {"cartpole": cartpole_params(), "large": params_of_bytes(int(large_mb * 2**20))}
  receivers = [Receiver.remote(a) for a in range(max(actor_counts))]
  ray.get([r.take.remote(cache.to_blob(blobs["cartpole"], 0,
                                       cache.ParamSpec.from_params(blobs["cartpole"])))
           for r in receivers])  # every receiver process is up
  rows = []
  for name, params in blobs.items():
    nbytes = cache.ParamSpec.from_params(params).nbytes
    for k in actor_counts:
      for method in METHODS:
        if method == "tree":
          row = bench_tree(params, receivers[:k], fanout, actors_per_leaf, repeats)
        elif method == "flat":
          row = bench_flat(params, receivers[:k], repeats)
        else:
          row = bench_store(params, receivers[:k], repeats)
        rows.append({"blob": name, "blob_bytes": nbytes, **row})
        print(f"{name} ({nbytes:,} B) {method:5s} {k:3d} actors: "
              f"{row['latency_s'] * 1e3:8.2f} ms, learner egress "
              f"{row['learner_egress_bytes']:,.0f} B/version", flush=True)
  # Per-hop costs with little contention: chains of 1 ... 4 cache nodes to one actor, and one
  # node serving 1, 2, 4 actors; the projection uses these (one core per node and actor).
  calibration_topologies = ([cache.Topology(depth=d, fanout=1, num_actors=1) for d in (1, 2, 3, 4)]
                            + [cache.Topology(depth=1, fanout=1, num_actors=m) for m in (2, 4)])
  calibration = []
  for name, params in blobs.items():
    for topology in calibration_topologies:
      row = bench_topology(params, receivers[:topology.num_actors], topology, repeats)
      terms = bm.tree_terms(topology)
      calibration.append({"blob": name, "depth": topology.depth, "hops": terms.hops,
                          "serves": terms.serves, **row})
      print(f"calibration {name}: depth {topology.depth}, {topology.num_actors} actors: "
            f"{row['latency_s'] * 1e3:.2f} ms", flush=True)
  for r in receivers:
    ray.kill(r)
  fits, projections = {}, []
  for name, params in blobs.items():
    nbytes = cache.ParamSpec.from_params(params).nbytes
    of = {m: [r for r in rows if r["blob"] == name and r["method"] == m] for m in METHODS}
    points = [c for c in calibration if c["blob"] == name]
    tree = bm.fit_tree([cache.Topology(depth=c["depth"], fanout=1, num_actors=c["actors"])
                        for c in points], [c["latency_s"] for c in points])
    flat = bm.fit_linear([r["actors"] for r in of["flat"]], [r["latency_s"] for r in of["flat"]])
    store = bm.fit_linear([r["actors"] for r in of["store"]],
                          [r["latency_s"] for r in of["store"]])
    modelled = [bm.tree_latency(bm.topology_for(r["actors"], fanout, actors_per_leaf), *tree)
                for r in of["tree"]]
    fits[name] = {"tree": tree._asdict(), "flat": flat._asdict(), "store": store._asdict(),
                  "tree_modelled_s": modelled,
                  "tree_measured_over_modelled": [r["latency_s"] / m
                                                  for m, r in zip(modelled, of["tree"])]}
    for k in PROJECT_TO:
      projections.append({"blob": name, **bm.project(
          k, tree=tree, flat=flat, store=store, fanout=fanout, actors_per_leaf=actors_per_leaf,
          actors_per_machine=actors_per_machine, blob_bytes=nbytes)})
  throughput = bench_throughput(throughput_actors, throughput_rollouts)
  return {"machine": {"cpu_count": os.cpu_count(), "machine": platform.machine(),
                      "processor": platform.processor() or platform.machine(),
                      "ray": ray.__version__, "jax": jax.__version__},
          "settings": {"actor_counts": list(actor_counts), "fanout": fanout,
                       "actors_per_leaf": actors_per_leaf, "repeats": repeats,
                       "large_mb": large_mb, "actors_per_machine": actors_per_machine,
                       "throughput_actors": list(throughput_actors),
                       "throughput_rollouts": throughput_rollouts},
          "rows": rows, "calibration": calibration, "fits": fits, "projections": projections,
          "throughput": throughput}


def paper_tables(result: dict) -> dict[str, str]:
  s = result["summary"]
  by = {(r["blob"], r["method"], r["actors"]): r for r in s["rows"]}
  blobs = list(dict.fromkeys(r["blob"] for r in s["rows"]))
  counts = s["settings"]["actor_counts"]
  tables = {}
  rows = []
  for blob in blobs:
    nbytes = by[(blob, "tree", counts[0])]["blob_bytes"]
    for k in counts:
      t, f, o = (by[(blob, m, k)] for m in METHODS)
      rows.append((f"{blob} ({nbytes / 1e6:.3f} MB)", str(k), str(t["tree_depth"]),
                   f"{t['latency_s'] * 1e3:.1f}", f"{f['latency_s'] * 1e3:.1f}",
                   f"{o['latency_s'] * 1e3:.1f}",
                   f"{t['learner_egress_bytes'] / nbytes:.0f}",
                   f"{f['learner_egress_bytes'] / nbytes:.0f}",
                   f"{o['learner_egress_bytes'] / nbytes:.0f}"))
  tables["broadcast"] = records.write_markdown_table(
      ("blob", "actors", "tree depth", "tree ms", "flat ms", "store ms",
       "tree egress (blobs/version)", "flat egress", "store egress"), rows)
  rows = []
  for p in s["projections"]:
    fit = s["fits"][p["blob"]]
    rows.append((p["blob"], f"{p['actors']:,}", str(p["tree_depth"]),
                 f"{p['tree_latency_s'] * 1e3:,.0f}", f"{p['flat_latency_s'] * 1e3:,.0f}",
                 f"{p['store_latency_s'] * 1e3:,.0f}",
                 f"{p['tree_egress_bytes'] / 1e6:,.3f}", f"{p['flat_egress_bytes'] / 1e6:,.1f}",
                 f"{p['store_egress_bytes_at_most'] / 1e6:,.2f}"))
  tables["projection"] = records.write_markdown_table(
      ("blob", "actors", "tree depth", "tree ms", "flat ms", "store ms (one machine's rate)",
       "tree egress MB/version", "flat egress MB", "store egress MB (at most)"), rows)
  fits = []
  for blob, fit in s["fits"].items():
    ratios = fit["tree_measured_over_modelled"]
    fits.append((blob, f"{fit['tree']['fixed_s'] * 1e3:.2f}", f"{fit['tree']['hop_s'] * 1e3:.2f}",
                 f"{fit['tree']['serve_s'] * 1e3:.2f}", f"{fit['flat']['per_actor_s'] * 1e3:.2f}",
                 f"{fit['store']['per_actor_s'] * 1e3:.2f}",
                 f"{min(ratios):.1f}x ... {max(ratios):.1f}x"))
  tables["fits"] = records.write_markdown_table(
      ("blob", "tree fixed ms", "per hop ms", "per actor served by a leaf ms",
       "flat per actor ms", "store per actor ms",
       "tree measured / modelled over the sweep"), fits)
  tables["calibration"] = records.write_markdown_table(
      ("blob", "cache levels", "actors", "hops on the path", "actors served", "ms"),
      [(c["blob"], str(c["depth"]), str(c["actors"]), str(c["hops"]), str(c["serves"]),
        f"{c['latency_s'] * 1e3:.2f}") for c in s["calibration"]])
  tables["throughput"] = records.write_markdown_table(
      ("RL actors", "env steps / s", "vs 1 actor"),
      [(str(r["actors"]), f"{r['env_steps_per_s']:,.0f}",
        f"{r['env_steps_per_s'] / s['throughput'][0]['env_steps_per_s']:.2f}x")
       for r in s["throughput"]])
  return tables


def plot(summary: dict, path: Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  figure, axes = plt.subplots(1, 3, figsize=(15, 4))
  blobs = list(dict.fromkeys(r["blob"] for r in summary["rows"]))
  for blob, style in zip(blobs, ("-", "--")):
    for method, color in zip(METHODS, ("C0", "C1", "C2")):
      rows = [r for r in summary["rows"] if r["blob"] == blob and r["method"] == method]
      axes[0].plot([r["actors"] for r in rows], [r["latency_s"] * 1e3 for r in rows],
                   style, color=color, marker="o", label=f"{method}, {blob}")
      axes[1].plot([r["actors"] for r in rows],
                   [r["learner_egress_bytes"] / r["blob_bytes"] for r in rows], style,
                   color=color, marker="o", label=f"{method}, {blob}")
  axes[0].set(xscale="log", yscale="log", xlabel="actors", ylabel="publish to all actors (ms)",
              title="latency (measured)")
  axes[1].set(xscale="log", yscale="log", xlabel="actors", ylabel="learner egress (blobs/version)",
              title="learner egress (measured)")
  throughput = summary["throughput"]
  axes[2].plot([r["actors"] for r in throughput], [r["env_steps_per_s"] for r in throughput],
               marker="o")
  axes[2].set(xlabel="RL actors", ylabel="env steps / s",
              title=f"CartPole actors on {summary['machine']['cpu_count']} cores")
  axes[0].legend(fontsize=7)
  figure.tight_layout()
  records.atomic_save_figure(path, figure)
  plt.close(figure)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.bench_rl_cache", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
  parser.add_argument("--fanout", type=int, default=4)
  parser.add_argument("--actors-per-leaf", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--large-mb", type=float, default=4.0)
  parser.add_argument("--actors-per-machine", type=int, default=64)
  parser.add_argument("--throughput-actors", type=int, nargs="+", default=[1, 2, 4, 8])
  parser.add_argument("--throughput-rollouts", type=int, default=40)
  paper.add_paper_argument(parser, default_key="bench_rl_cache.cpu")
  args = parser.parse_args(argv)
  started = ray.is_initialized()
  if not started:
    ray.init(include_dashboard=False, log_to_driver=False,
             num_cpus=max(os.cpu_count() or 1, max(args.throughput_actors) + 1))
  try:
    summary = bench(args.actors, args.fanout, args.actors_per_leaf, args.repeats, args.large_mb,
                    args.actors_per_machine, args.throughput_actors, args.throughput_rollouts)
  finally:
    if not started:
      ray.shutdown()
  for name, text in paper_tables({"summary": records.to_jsonable(summary)}).items():
    print(f"## {name}\n\n{text}")
  run_dir = paper.finish_benchmark("bench_rl_cache", PAPER_PAGE, summary, args.paper,
                                   sys.argv[1:] if argv is None else argv)
  plot(records.to_jsonable(summary), run_dir / FIGURE)
  if args.paper is not None:
    shutil.copyfile(run_dir / FIGURE, ROOT / "papers" / "figures" / FIGURE)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
