"""Benchmark: the agents' decision time per agent per round, from 100 to 10,000 hosts.

One protocol round of every agent at once (research/placement/agent.play_round: observe, score
every action and inbox offer, the exchange), jitted, on clusters of `--hosts` hosts (racks of
10 hosts, 10 racks per zone, 2 zones per cluster; 2.5 instances per host in apps of 3
services), median wall time over `--repeats` rounds (experiments/_timing.median_seconds),
divided by the number of hosts. The agents all run in this one process, vectorized; "flat"
means the per-agent time does not grow with the number of hosts (each agent looks only at
itself and its neighbours). The ratio to the smallest size is the measure; absolute times are
this machine's (named in the result).

The control: the same number of agents as `hosts / 100` independent copies of the 100-host
cluster, vmapped in one round, their neighbour tables padded to the larger cluster's slot count
(padding changes no decision, see cluster.with_neighbour_slots). Each agent then does the same
work as in the large cluster and the process holds the same working set; only the size of the
cluster an agent is part of differs. "cluster / copies" is that size's cost per agent: 1 means
that a bigger cluster costs an agent nothing, whatever the cache does to both.

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
SMALLEST = 100  # hosts: the first size, and the cluster the control copies


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


def time_round(problem, placement, repeats: int, copies: int = 1) -> float:
  """Median seconds of one jitted round of every agent (of `copies` vmapped copies)."""
  config = agent_lib.AgentConfig()
  nets, params = agent_lib.init_params(config, problem.num_hosts, 0)
  weights = cluster.Weights()
  load = jnp.ones(problem.num_apps)
  stack = lambda tree: jax.tree.map(lambda x: jnp.stack([x] * copies), tree)
  problems, placements = stack(problem), stack(placement)

  @jax.jit
  def round_(placements, key):
    def one(problem, placement, key):
      return agent_lib.play_round(config, nets, params, problem, placement, load, weights,
                                  key)[0]
    return jax.vmap(one)(problems, placements, jax.random.split(key, copies))

  return _timing.median_seconds(round_, placements, jax.random.key(1), repeats=repeats)


def measure(hosts: int, repeats: int) -> dict:
  """One size, and the control: hosts / 100 copies of the 100-host cluster, equal slots."""
  problem, placement = problem_of(hosts)
  slots = int(problem.neighbours.shape[1])
  seconds = time_round(problem, placement, repeats)
  small, small_placement = problem_of(SMALLEST)
  copies = time_round(cluster.with_neighbour_slots(small, slots), small_placement, repeats,
                      copies=hosts // SMALLEST)
  return {"hosts": hosts, "instances": int(len(baselines.running_instances(problem))),
          "neighbours": slots, "round_s": seconds, "per_agent_us": seconds / hosts * 1e6,
          "copies": hosts // SMALLEST, "round_copies_s": copies,
          "per_agent_copies_us": copies / hosts * 1e6, "cluster_over_copies": seconds / copies}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.bench_placement",
                                   description=__doc__)
  parser.add_argument("--hosts", default="100,1000,10000")
  parser.add_argument("--repeats", type=int, default=7)
  paper.add_paper_argument(parser, default_key="bench_placement.cpu")
  args = parser.parse_args(argv)
  sizes = [int(h) for h in args.hosts.split(",")]
  if sizes[0] != SMALLEST or any(h % SMALLEST for h in sizes):
    parser.error(f"--hosts {args.hosts}: expected {SMALLEST} first and multiples of it")
  rows = []
  for hosts in sizes:
    rows.append(measure(hosts, args.repeats))
    print(rows[-1], flush=True)
  for row in rows:
    row["per_agent_vs_smallest"] = row["per_agent_us"] / rows[0]["per_agent_us"]
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
  hosts = [r["hosts"] for r in rows]
  axes.plot(hosts, [r["per_agent_us"] for r in rows], marker="o", label="one cluster of that size")
  axes.plot(hosts, [r["per_agent_copies_us"] for r in rows], marker="s", linestyle="--",
            label=f"as many agents in {SMALLEST}-host clusters")
  axes.set(xscale="log", xlabel="hosts (one agent each)", ylabel="µs per agent per round",
           ylim=(0, 1.3 * max(max(r["per_agent_us"], r["per_agent_copies_us"]) for r in rows)),
           title="decision time per agent (one jitted round)")
  axes.legend(loc="lower right", fontsize=8)
  figure.tight_layout()
  return records.atomic_save_figure(path, figure)


def paper_tables(*results) -> dict[str, str]:
  rows = []
  for result in results:
    for r in result["summary"]["rows"]:
      rows.append((f"{r['hosts']:,}", f"{r['instances']:,}", str(r["neighbours"]),
                   f"{r['round_s'] * 1e3:.1f}", f"{r['per_agent_us']:.1f}",
                   f"{r['per_agent_vs_smallest']:.2f}", str(r["copies"]),
                   f"{r['per_agent_copies_us']:.1f}", f"{r['cluster_over_copies']:.2f}"))
  return {"bench": records.write_markdown_table(
      ("hosts", "instances", "neighbour slots", "round (ms)", "per agent per round (µs)",
       "per agent vs 100 hosts", "control: copies of the 100-host cluster",
       "control: per agent (µs)", "cluster / copies"), rows)}


if __name__ == "__main__":
  sys.exit(main())
