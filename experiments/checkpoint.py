"""Checkpoint states in node-local memory: a faulted job against the fault-free one.

Two agents (nodes) with their workers train the digits MLP synchronously (research/checkpoint);
the same job runs once without faults and once with faults at steps drawn from the seed: kill -9
of workers (restored from their node's local memory), optionally a hung worker, and kill -9 of
an agent (the node: the job restores from the newest committed orbax checkpoint, optionally with
that checkpoint corrupted first so the one before it is used). Both runs are compared bit for
bit with the single-process reference computation of the same seed. Headline: wall time of the
faulted job vs the fault-free job; the note says whether both ended bit-exact and the steps each
failure cost.

  python -m experiments.run configs/checkpoint/smoke.py
  python -m experiments.run configs/checkpoint/faults.py --paper checkpoint.faults
"""

from __future__ import annotations

import shutil

import ml_collections
import numpy as np

from research.common import config as config_lib
from research.common import records


def config_schema() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "num_agents": 2,               # nodes
      "workers_per_agent": 2,
      "steps": 40,
      "hidden": (64,),
      "batch_size": 32,
      "learning_rate": 0.05,
      "snapshot_every": 1,           # local-memory snapshot period (steps)
      "persist_every": 5,            # orbax period (steps)
      "min_step_seconds": 0.1,       # emulated compute time per step
      "heartbeat_timeout": 2.0,
      "worker_failures": 2,          # kill -9 of random workers at random steps
      "hung_workers": 1,             # workers that stop (no heartbeats) for 2 x the timeout
      "agent_failures": 1,           # kill -9 of a random agent at a random step
      "corrupt_before_node_failure": True,  # corrupt the newest persisted step first
      # One jax compilation cache for the jobs' processes (a process after the first loads its
      # programs instead of compiling them; startup only): "run" = a folder in the run folder,
      # removed at the end; "off"; or a folder to keep (e.g. one the tests share).
      "compilation_cache": "run",
  })


PAPER_PAGE = "papers/checkpoint.md"


def validate_config(config) -> None:
  config_lib.check_positive(config, "num_agents", "workers_per_agent", "steps", "batch_size",
                            "snapshot_every", "persist_every", "heartbeat_timeout")
  if config.persist_every % config.snapshot_every:
    raise config_lib.ConfigError(f"config key 'persist_every': got {config.persist_every}, "
                                 f"expected a multiple of snapshot_every="
                                 f"{config.snapshot_every}")
  for key in ("worker_failures", "hung_workers", "agent_failures"):
    if config[key] < 0:
      raise config_lib.ConfigError(f"config key {key!r}: got {config[key]}, expected >= 0")
  if not config.compilation_cache:
    raise config_lib.ConfigError("config key 'compilation_cache': got '', expected 'run', "
                                 "'off' or a folder")
  if config.steps < 3:
    raise config_lib.ConfigError(f"config key 'steps': got {config.steps}, expected >= 3 "
                                 "(faults go at steps 2 .. steps)")


def draw_faults(config, spec) -> list:
  """Fault steps and targets from the seed (a node failure after the first persist)."""
  from research.checkpoint import transport  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(config.seed)
  faults = []
  for _ in range(config.worker_failures):
    faults.append(transport.Fault("kill_worker", int(rng.integers(spec.num_workers)),
                                  int(rng.integers(2, config.steps + 1))))
  for _ in range(config.hung_workers):
    faults.append(transport.Fault("hang_worker", int(rng.integers(spec.num_workers)),
                                  int(rng.integers(2, config.steps + 1)),
                                  seconds=2 * config.heartbeat_timeout))
  for _ in range(config.agent_failures):
    step = int(rng.integers(min(config.persist_every + 2, config.steps), config.steps + 1))
    agent = int(rng.integers(spec.num_agents))
    if config.corrupt_before_node_failure:
      worker = int(rng.choice(spec.workers_of(agent)))
      faults.append(transport.Fault("corrupt_checkpoint", worker, step))
    faults.append(transport.Fault("kill_agent", agent, step))
  return faults


def run(config, run):
  from research.checkpoint import store  # pylint: disable=import-outside-toplevel
  from research.checkpoint import transport  # pylint: disable=import-outside-toplevel
  from research.checkpoint import worker as worker_lib  # pylint: disable=import-outside-toplevel

  cache = {"run": str(run.workdir / "compilation_cache"), "off": ""}.get(
      config.compilation_cache, config.compilation_cache)

  def spec_for(name, warm_spare=True):
    return transport.JobSpec(
        workdir=str(run.workdir / name), num_agents=config.num_agents,
        workers_per_agent=config.workers_per_agent, steps=config.steps, seed=config.seed,
        hidden=tuple(config.hidden), batch_size=config.batch_size,
        learning_rate=config.learning_rate, snapshot_every=config.snapshot_every,
        persist_every=config.persist_every, min_step_seconds=config.min_step_seconds,
        heartbeat_timeout=config.heartbeat_timeout, warm_spare=warm_spare,
        compilation_cache=cache)

  with transport.compiling_into(cache):  # the jobs' processes load what the reference compiled
    problem = worker_lib.make_problem(config.num_agents * config.workers_per_agent,
                                      tuple(config.hidden), config.batch_size,
                                      config.learning_rate, seed=config.seed)
    reference = store.pack(worker_lib.reference_run(problem, config.steps))
  results, events = {}, {}
  for name in ("fault_free", "faulted"):
    faults = draw_faults(config, spec_for(name)) if name == "faulted" else []
    # No failure, nothing for a warm spare to take over: the fault-free job starts none (a
    # spare stands by idle, so this changes its start, not its step loop).
    spec = spec_for(name, warm_spare=bool(faults))
    lines = []
    for _ in run.progress([name], description=f"{name} job"):
      result = transport.run_job(spec, faults, log=lines.append,
                                 on_step=lambda s, n=name: run.log(s, job=n))
    for step, seconds in result.step_seconds:
      run.log(step, job=name, step_seconds=seconds)
    events[name] = lines
    results[name] = {
        "bit_exact": result.final_state == reference, "replicas_equal": result.replicas_equal,
        "seconds": float(sum(s for _, s in result.step_seconds)), "restarts": result.restarts,
        "steps_lost": result.steps_lost, "faults": [f.__dict__ for f in faults],
        "local_restores": result.local_restores,
        "step_seconds": result.step_seconds}
  if config.compilation_cache == "run":
    shutil.rmtree(cache, ignore_errors=True)  # compiled programs, not results
  run.save_text("events.log", "\n".join(f"[{n}] {line}" for n in events for line in events[n])
                + "\n")
  _plot(run, results)
  faulted, clean = results["faulted"], results["fault_free"]
  bit_exact = faulted["bit_exact"] and clean["bit_exact"]
  faults = ", ".join(_fault_text(f) for f in faulted["faults"]) or "no faults"
  restores = "; ".join(faulted["local_restores"]) or "none"
  return {
      "headline": {
          "metric": "faulted job seconds (step loop)", "value": faulted["seconds"],
          "baseline": "fault-free job seconds", "baseline_value": clean["seconds"],
          "note": (f"{config.num_agents} node{'s' * (config.num_agents > 1)} x "
                   f"{config.workers_per_agent} workers, "
                   f"{config.steps} steps; {faults}; restored from local memory: {restores}; "
                   f"both jobs bit-exact vs the single-process reference: "
                   f"{'yes' if bit_exact else 'NO'}; steps lost per failure "
                   f"{faulted['steps_lost']}"),
      },
      "bit_exact": bit_exact,
      "jobs": results,
  }


def _plot(run, results) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(7.5, 4))
  for name, result in results.items():
    steps, seconds = zip(*result["step_seconds"])
    ax.plot(np.cumsum(seconds), steps, marker=".", label=name.replace("_", "-"))
  for fault in results["faulted"]["faults"]:
    ax.axhline(fault["step"], color="grey", linestyle=":", linewidth=0.8)
    ax.annotate(f"{fault['kind']} {fault['target']}", (0, fault["step"]), fontsize=7,
                va="bottom")
  ax.set_xlabel("seconds since the job's first step (restarts and replays included)")
  ax.set_ylabel("step completed")
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right")
  ax.set_title("synchronous training under faults (dotted: fault steps)")
  run.save_figure("steps_vs_time.png", fig)
  plt.close(fig)


def _fault_text(fault: dict) -> str:
  return f"{fault['kind']} {fault['target']} @ step {fault['step']}"


def paper_tables(result: dict) -> dict[str, str]:
  """The page's recovery table from a kept result (its summary)."""
  rows = []
  for name, job in result["summary"]["jobs"].items():
    rows.append([name.replace("_", "-"), ", ".join(map(_fault_text, job["faults"])) or "-",
                 "yes" if job["bit_exact"] else "NO", "yes" if job["replicas_equal"] else "NO",
                 job["restarts"], str(job["steps_lost"]),
                 "; ".join(job["local_restores"]) or "-", f"{job['seconds']:.1f}"])
  return {"faults": records.write_markdown_table(
      ["job", "faults", "final state == reference (bits)", "replicas equal", "job restarts",
       "steps lost per failure", "local-memory restores (who, time)", "step-loop seconds"],
      rows)}
