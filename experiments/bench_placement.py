"""Benchmark: the agents' decision time per agent per round, from 100 to 10,000 hosts.

One protocol round of every agent at once (research/placement/agent.play_round: observe, score
every action and inbox offer, the exchange), jitted, on clusters of `--hosts` hosts (racks of
10 hosts, 10 racks per zone, 2 zones per cluster; 2.5 instances per host in apps of 3
services), median wall time over `--repeats` rounds (experiments/_timing.median_seconds),
divided by the number of hosts. The agents all run in this one process, vectorized; "flat"
means the per-agent time does not grow with the number of hosts (each agent looks only at
itself and its neighbours). The ratio to the smallest size is the measure; absolute times are
this machine's (named in the result).

  python -m experiments.bench_placement [--paper]

Writes runs/bench_placement/<timestamp>/ (summary.json, tables.md, bench_placement.png); with
--paper also keeps papers/results/bench_placement.cpu.json, fills papers/placement.md's blocks
and copies the plot to papers/figures/bench_placement.png.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from experiments import _timing
from experiments import paper
from research.common import records
from research.placement import agent as agent_lib
from research.placement import baselines
from research.placement import cluster

ROOT = Path(__file__).resolve().parent.parent
PAPER_PAGE = "papers/placement.md"
FIGURE = "bench_placement.png"


def problem_of(hosts: int, seed: int = 0):
  racks = hosts // 10
  zones = max(1, racks // 10)
  clusters = max(1, zones // 2)
  topology = cluster.TopologySpec(clusters=clusters, zones_per_cluster=zones // clusters,
                                  racks_per_zone=racks // zones, hosts_per_rack=10)
  if topology.num_hosts != hosts:
    raise SystemExit(f"--hosts {hosts}: expected a multiple of 10 racks of 10 hosts "
                     f"(100, 1000, 2000, ... 10000); this shape gives {topology.num_hosts}")
  workload = cluster.WorkloadSpec(apps=hosts * 5 // 6, services_per_app=3,
                                  instances=hosts * 5 // 2)
  apps = cluster.generate_apps(workload, topology.latency_ms, seed, topology.clusters)
  problem = cluster.build_problem(topology, apps, replica_slots=workload.max_replicas,
                                  peer_slots=2)
  return problem, baselines.random_schedule(problem, 8, seed)


def measure(hosts: int, repeats: int) -> dict:
  problem, placement = problem_of(hosts)
  config = agent_lib.AgentConfig()
  nets, params = agent_lib.init_params(config, hosts, 0)
  weights = cluster.Weights()
  load = jnp.ones(problem.num_apps)

  @jax.jit
  def round_(placement, key):
    return agent_lib.play_round(config, nets, params, problem, placement, load, weights, key)[0]

  start = time.perf_counter()
  jax.block_until_ready(round_(placement, jax.random.key(0)))
  compile_s = time.perf_counter() - start
  seconds = _timing.median_seconds(round_, placement, jax.random.key(1), repeats=repeats)
  return {"hosts": hosts, "instances": int(len(baselines.running_instances(problem))),
          "neighbours": int(problem.neighbours.shape[1]), "round_s": seconds,
          "per_agent_us": seconds / hosts * 1e6, "compile_s": compile_s}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.bench_placement",
                                   description=__doc__)
  parser.add_argument("--hosts", default="100,1000,10000")
  parser.add_argument("--repeats", type=int, default=7)
  paper.add_paper_argument(parser, default_key="bench_placement.cpu")
  args = parser.parse_args(argv)
  rows = []
  for hosts in (int(h) for h in args.hosts.split(",")):
    rows.append(measure(hosts, args.repeats))
    print(rows[-1], flush=True)
  base = rows[0]["per_agent_us"]
  for row in rows:
    row["per_agent_vs_smallest"] = row["per_agent_us"] / base
  summary = {"rows": rows, "machine": f"{platform.node()}: {platform.processor() or 'cpu'}, "
             f"{os.cpu_count()} cores, jax {jax.__version__} on {jax.devices()[0].platform}",
             "repeats": args.repeats}
  print(paper_tables({"summary": summary})["bench"])
  run_dir = paper.finish_benchmark("bench_placement", PAPER_PAGE, summary, args.paper,
                                   sys.argv[1:] if argv is None else argv)
  plot(run_dir / FIGURE, rows)
  if args.paper is not None:
    shutil.copyfile(run_dir / FIGURE, ROOT / "papers" / "figures" / FIGURE)
  return 0


def plot(path: Path, rows) -> Path:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  figure, axes = plt.subplots(figsize=(5.5, 3.4))
  axes.plot([r["hosts"] for r in rows], [r["per_agent_us"] for r in rows], marker="o")
  axes.set(xscale="log", xlabel="hosts (one agent each)", ylabel="µs per agent per round",
           ylim=(0, 1.3 * max(r["per_agent_us"] for r in rows)),
           title="decision time per agent (one jitted round)")
  figure.tight_layout()
  return records.atomic_save_figure(path, figure)


def paper_tables(*results) -> dict[str, str]:
  rows = []
  for result in results:
    for r in result["summary"]["rows"]:
      rows.append((f"{r['hosts']:,}", f"{r['instances']:,}", str(r["neighbours"]),
                   f"{r['round_s'] * 1e3:.1f}", f"{r['per_agent_us']:.1f}",
                   f"{r['per_agent_vs_smallest']:.2f}"))
  return {"bench": records.write_markdown_table(
      ("hosts", "instances", "neighbours per agent", "round (ms)", "per agent per round (µs)",
       "per agent vs 100 hosts"), rows)}


if __name__ == "__main__":
  sys.exit(main())
