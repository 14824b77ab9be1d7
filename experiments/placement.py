"""Decentralized RL placement: train the host agents, then compare them with the baselines.

One config describes a topology (clusters > zones > racks > hosts), a random workload shape
(apps of service graphs, replicas), a load trace, the objective weights and the agents. The run:

1. trains the agents (research/placement/agent.py: PPO, shared or per-host parameters) on
   `train.pool` generated problems (seeds train.seed, train.seed + 1, ...), each starting from
   a random placement (instances handed to random agents), `train.envs` of them per update,
   `train.rounds` protocol rounds each, under their own load traces, and keeps the parameters
   that score best on held-out validation problems (seeds below train.seed);
2. evaluates on `eval.seeds` other problems (seeds 0, 1, ...): each method places the same
   instances and faces the same load trace (`eval.rounds` rounds):
     agents           start from the random placement and exchange instances every round
                      (after `eval.warmup_rounds` uncounted rounds at the first load),
                      sampling their actions but for the last `eval.settle_rounds` rounds
                      (their most likely action there); `eval.rollouts` sampled runs per seed,
                      averaged;
     prior            the same with the untrained policy (agent.py: the local-search prior the
                      training starts from): what PPO added;
     least_allocated  kube-scheduler's spreading score, placed once (pods are not moved);
     most_allocated   kube-scheduler's bin-packing score, placed once;
     random           the random placement the agents start from, never improved;
     milp             (static scenario only) the exact optimum at load 1 (scipy HiGHS);
   per method: SLO violations (app-rounds over SLO), mean active hosts, network cost, the cost
   of the last round and migrations; per seed, for the static scenario, the agents' final cost
   over the MILP optimum's.

Scenarios: "static" (load 1 throughout: the placement problem the MILP solves exactly) and
"dynamic" (diurnal load with bursts: what the agents must follow).

  python -m experiments.run configs/placement/small.py     # 8 hosts vs the MILP, 20 seeds
  python -m experiments.run configs/placement/medium.py    # 100 hosts, 2 clusters, load trace
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from research.common import config as config_lib
from research.common import records
from research.common import tree_io
from research.placement import agent as agent_lib
from research.placement import baselines
from research.placement import cluster

PAPER_PAGE = "papers/placement.md"
SCENARIOS = ("static", "dynamic")
METHODS = ("agents", "prior", "least_allocated", "most_allocated", "random", "milp")


def _fields(cls, **overrides) -> dict:
  values = {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}
  values.update(overrides)
  return values


def config_schema() -> ml_collections.ConfigDict:
  topology = _fields(cluster.TopologySpec, cluster_links=())
  return ml_collections.ConfigDict({
      "scenario": "static",
      # cluster_links: () = a ring over the clusters; else pairs (a, b) of linked clusters
      "topology": topology,
      "workload": _fields(cluster.WorkloadSpec),
      "load": _fields(cluster.LoadSpec),  # the dynamic scenario's trace (static: load 1)
      "weights": _fields(cluster.Weights),
      "agent": _fields(agent_lib.AgentConfig),
      "slots_per_host": 8,  # instances an agent can hold (a kubelet's max pods)
      "train": {
          "iterations": 150,
          "envs": 16,       # problems per PPO update
          "rounds": 32,     # protocol rounds per training episode
          "pool": 256,      # generated training problems
          "seed": 1_000,    # training problems use seeds seed, seed + 1, ... (eval: 0, 1, ...)
          "validate_every": 10,   # updates between scores on the validation problems
          "validation_seeds": 16,  # held-out problems (seeds seed - 1, seed - 2, ...)
          # a smaller topology to train on (0 = the evaluated one); the policy only sees local
          # features, so it runs unchanged on any number of hosts
          "racks_per_zone": 0,
          "apps": 0,        # apps of the training workload (0 = workload.apps), same app shape
          # a kept agents.npz (written by every run) to start from instead of training; with
          # iterations 0 the run evaluates it as it is
          "params_file": "",
      },
      "eval": {
          "seeds": 20,
          "rounds": 32,
          # rounds at the trace's first load before it starts, not counted: the agents place
          # the instances handed to them (the schedulers place theirs before the trace too)
          "warmup_rounds": 0,
          "greedy": False,  # agents take their most likely action (else they sample)
          # sampled rollouts of the agents (and the prior) per seed, averaged: one rollout's
          # last placement carries the sampling noise of its last rounds
          "rollouts": 1,
          # the last rounds in which the agents take their most likely action (a descent to the
          # nearest local optimum after the sampled search; every agent counts the rounds)
          "settle_rounds": 0,
          "methods": METHODS,
          "milp_time_limit_s": 120.0,
      },
  })


def validate_config(config) -> None:
  config_lib.check_choice(config, "scenario", SCENARIOS)
  config_lib.check_positive(config, "slots_per_host")
  for key in ("envs", "rounds", "pool", "validate_every", "validation_seeds"):
    config_lib.check_positive(config.train, key)
  if config.train.seed - config.train.validation_seeds < config.eval.seeds:
    raise config_lib.ConfigError(
        f"config key 'train.seed': got {config.train.seed}, expected >= eval.seeds + "
        f"train.validation_seeds ({config.eval.seeds + config.train.validation_seeds}): "
        "validation seeds (below train.seed) must not be evaluation seeds")
  if config.train.iterations < 0:
    raise config_lib.ConfigError(f"config key 'train.iterations': got "
                                 f"{config.train.iterations}, expected >= 0 (0: evaluate the "
                                 "untrained policy or train.params_file)")
  for key in ("seeds", "rounds", "rollouts"):
    config_lib.check_positive(config.eval, key)
  if not 0 <= config.eval.settle_rounds < config.eval.rounds:
    raise config_lib.ConfigError(f"config key 'eval.settle_rounds': got "
                                 f"{config.eval.settle_rounds}, expected 0 ... eval.rounds - 1 "
                                 f"({config.eval.rounds - 1})")
  if config.eval.greedy and config.eval.rollouts > 1:
    raise config_lib.ConfigError(f"config key 'eval.rollouts': got {config.eval.rollouts}, "
                                 "expected 1 with eval.greedy (greedy rollouts are all the same)")
  if config.eval.warmup_rounds < 0:
    raise config_lib.ConfigError(f"config key 'eval.warmup_rounds': got "
                                 f"{config.eval.warmup_rounds}, expected >= 0")
  if config.train.pool < config.train.envs:
    raise config_lib.ConfigError(f"config key 'train.pool': got {config.train.pool}, expected "
                                 f">= train.envs ({config.train.envs})")
  if config.train.envs % config.agent.minibatches:
    raise config_lib.ConfigError(f"config key 'train.envs': got {config.train.envs}, expected a "
                                 f"multiple of agent.minibatches ({config.agent.minibatches})")
  unknown = set(config.eval.methods) - set(METHODS)
  reference = set(config.eval.methods) & {"milp", "least_allocated", "most_allocated"}
  if unknown or "agents" not in config.eval.methods or not reference:
    raise config_lib.ConfigError(f"config key 'eval.methods': got {tuple(config.eval.methods)}, "
                                 f"expected 'agents', one of 'milp', 'least_allocated', "
                                 f"'most_allocated' (the headline's baseline), and any of "
                                 f"{METHODS}")
  if "milp" in config.eval.methods and config.scenario != "static":
    raise config_lib.ConfigError("config key 'eval.methods': 'milp' solves the static problem; "
                                 "it needs scenario='static'")
  if config.agent.sharing == "per_agent" and config.train.racks_per_zone:
    raise config_lib.ConfigError("config key 'train.racks_per_zone': per_agent parameters are "
                                 "one set per host, so training must use the evaluated "
                                 "topology (set it to 0, or agent.sharing='shared')")
  try:
    topology_spec(config)
    agent_config(config)
    cluster.Weights(**config.weights.to_dict())
    for train in (False, True):
      topology = topology_spec(config, train)
      cluster.build_topology(topology)
      cluster.check_apps(cluster.generate_apps(workload_spec(config, train), topology.latency_ms,
                                               0, topology.clusters), topology.cpu, topology.mem)
    if config.train.params_file and not os.path.exists(config.train.params_file):
      raise ValueError(f"train.params_file: no file {config.train.params_file!r}")
  except (TypeError, ValueError) as error:
    raise config_lib.ConfigError(f"config: {error}") from None


def topology_spec(config, train: bool = False) -> cluster.TopologySpec:
  values = config.topology.to_dict()
  values["latency_ms"] = tuple(values["latency_ms"])
  values["cluster_links"] = tuple(tuple(p) for p in values["cluster_links"]) or None
  if train and config.train.racks_per_zone:
    values["racks_per_zone"] = config.train.racks_per_zone
  return cluster.TopologySpec(**values)


def workload_spec(config, train: bool = False) -> cluster.WorkloadSpec:
  values = {k: tuple(v) if isinstance(v, (list, tuple)) else v
            for k, v in config.workload.to_dict().items()}
  if train and config.train.apps:
    values["instances"] = values["instances"] * config.train.apps // values["apps"]
    values["apps"] = config.train.apps
  return cluster.WorkloadSpec(**values)


def agent_config(config) -> agent_lib.AgentConfig:
  return agent_lib.AgentConfig(**config.agent.to_dict())


def make_problem(config, seed: int, train: bool = False):
  """(problem, random starting placement, load trace (rounds, A)) of one seed."""
  topology, workload = topology_spec(config, train), workload_spec(config, train)
  apps = cluster.generate_apps(workload, topology.latency_ms, seed, topology.clusters)
  problem = cluster.build_problem(topology, apps, replica_slots=workload.max_replicas,
                                  peer_slots=max(1, workload.services_per_app - 1))
  start = baselines.random_schedule(problem, config.slots_per_host, seed)
  rounds = config.train.rounds if train else config.eval.rounds
  if config.scenario == "static":
    loads = jnp.ones((rounds, workload.apps), jnp.float32)
  else:
    spec = cluster.LoadSpec(**{**config.load.to_dict(), "steps": rounds})
    loads = cluster.load_trace(spec, workload.apps, jax.random.key(seed))
  return problem, start, loads


def train_agents(config, run_ctx, weights):
  """PPO updates; every `train.validate_every` updates (and before the first) the policy is
  scored on `train.validation_seeds` held-out training-distribution problems (seeds
  train.seed - 1, train.seed - 2, ...; never the evaluation seeds 0, 1, ...), and the best
  scoring parameters are the ones returned (model selection on a validation set).
  Returns (nets, params, curve, validation [(update, cost)], selected update)."""
  agent = agent_config(config)
  hosts = topology_spec(config, train=True).num_hosts
  nets, params = agent_lib.init_params(agent, hosts, config.seed)
  if config.train.params_file:
    params = load_params(config.train.params_file, params)
  init, update = agent_lib.make_train(agent, nets, weights)
  update = jax.jit(update)
  state = init(params, jax.random.key(config.seed))
  iterations = config.train.iterations
  pool = [make_problem(config, config.train.seed + i, train=True)
          for i in range(config.train.pool if iterations else 0)]
  held_out = [make_problem(config, config.train.seed - 1 - i, train=True)
              for i in range(config.train.validation_seeds if iterations else 0)]
  validate = None
  if held_out:
    batch = [agent_lib.stack([b[j] for b in held_out]) for j in range(3)]
    static = config.scenario == "static"

    @jax.jit
    def validate(params):
      _, steps, _ = jax.vmap(functools.partial(
          agent_lib.rollout, agent, nets, params, weights))(
              *batch, jax.random.split(jax.random.key(config.seed + 1), len(held_out)))
      return jnp.mean(steps.cost[:, -1] if static else steps.cost)

  rng = np.random.default_rng(config.seed)
  curve, validation = [], []
  best = (np.inf, 0, state.params)
  for it in run_ctx.progress(range(iterations + 1 if iterations else 0),
                             total=iterations + 1 if iterations else 0,
                             description="training agents"):
    if it % config.train.validate_every == 0 or it == iterations:
      cost = float(validate(state.params))
      validation.append((it, cost))
      run_ctx.log(it, validation_cost=cost)
      if cost < best[0]:
        best = (cost, it, state.params)
    if it == iterations:
      break
    pick = rng.choice(config.train.pool, config.train.envs, replace=False)
    batch = [pool[i] for i in pick]
    state, metrics = update(state, *(agent_lib.stack([b[j] for b in batch]) for j in range(3)))
    metrics = {k: float(v) for k, v in metrics.items()}
    curve.append((it, metrics["mean_cost"], metrics["final_cost"]))
    run_ctx.log(it, **metrics)
  return nets, best[2], curve, validation, best[1]


def load_params(path, template):
  """Parameters kept by tree_io.save_tree_npz, checked leaf by leaf against `template`."""
  try:
    return tree_io.load_tree_npz(path, template)
  except ValueError as error:
    raise config_lib.ConfigError(
        f"config key 'train.params_file': {error} (agent.hidden, agent.sharing and the host "
        "count must match)") from None


def evaluate_static(problem, placement, loads, weights) -> dict[str, Any]:
  """A fixed placement over the trace: per-round terms, summed / averaged."""
  terms = jax.vmap(lambda load: cluster.terms(weights, cluster.observe(problem, placement,
                                                                       load)))(loads)
  return _summarize(terms, migrations=0)


def _summarize(terms: cluster.Terms, migrations) -> dict[str, Any]:
  return {"violations": int(np.sum(terms.violations)),
          "active_hosts": float(np.mean(terms.active_hosts)),
          "network": float(np.mean(terms.network)),
          "overload": float(np.mean(terms.overload)),
          "final_cost": float(terms.cost[-1]), "migrations": int(migrations)}


def _summarize_rollouts(terms: cluster.Terms, migrations) -> dict[str, Any]:
  """Rollouts stacked on the leading axis: each's summary, averaged; one: as `_summarize`."""
  rows = [_summarize(jax.tree.map(lambda x, i=i: x[i], terms), migrations[i])
          for i in range(len(migrations))]
  if len(rows) == 1:
    return rows[0]
  mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
  return {**mean, "final_costs": [r["final_cost"] for r in rows]}


def run(config, run_ctx) -> dict[str, Any]:
  weights = cluster.Weights(**config.weights.to_dict())
  agent = agent_config(config)
  start = time.perf_counter()
  nets, params, curve, validation, selected = train_agents(config, run_ctx, weights)
  train_seconds = time.perf_counter() - start
  if run_ctx.workdir is not None:
    tree_io.save_tree_npz(run_ctx.workdir / "agents.npz", params)

  warmup = config.eval.warmup_rounds

  _, untrained = agent_lib.init_params(agent, topology_spec(config, True).num_hosts, config.seed)

  @jax.jit
  def play(params, problem, placement, loads, key):
    played = jnp.concatenate([jnp.repeat(loads[:1], warmup, axis=0), loads])
    split = played.shape[0] - config.eval.settle_rounds
    final, steps, _ = agent_lib.rollout(agent, nets, params, weights, problem, placement,
                                        played[:split], key, greedy=config.eval.greedy)
    if config.eval.settle_rounds:
      final, settled, _ = agent_lib.rollout(agent, nets, params, weights, problem, final,
                                            played[split:], key, greedy=True)
      steps = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), steps, settled)
    after = jax.vmap(lambda inv, load: cluster.terms(weights, cluster.observe(
        problem, cluster.Placement(inv), load)))(
            jnp.concatenate([steps.inventory[1:], final.inventory[None]])[warmup:], loads)
    return after, steps.migrations[warmup:].sum()

  @jax.jit
  def play_rollouts(params, problem, placement, loads, key):
    # the first rollout's key is the seed's own (a run with one rollout is unchanged)
    keys = jnp.stack([key] + [jax.random.fold_in(key, r)
                              for r in range(1, config.eval.rollouts)])
    return jax.vmap(play, in_axes=(None, None, None, None, 0))(params, problem, placement,
                                                                loads, keys)

  per_seed = []
  for seed in run_ctx.progress(range(config.eval.seeds), total=config.eval.seeds,
                               description="evaluating"):
    problem, placement, loads = make_problem(config, seed)
    row: dict[str, Any] = {"seed": seed}
    t0 = time.perf_counter()
    terms, migrations = play_rollouts(params, problem, placement, loads,
                                      jax.random.key(10_000 + seed))
    row["agents"] = _summarize_rollouts(*jax.device_get((terms, migrations)))
    row["agents"]["seconds"] = time.perf_counter() - t0
    for method in config.eval.methods:
      if method == "prior":
        terms, migrations = play_rollouts(untrained, problem, placement, loads,
                                          jax.random.key(10_000 + seed))
        row[method] = _summarize_rollouts(*jax.device_get((terms, migrations)))
      if method in ("least_allocated", "most_allocated"):
        row[method] = evaluate_static(problem, baselines.kube_schedule(
            problem, method, config.slots_per_host, seed), loads, weights)
      elif method == "random":
        row[method] = evaluate_static(problem, placement, loads, weights)
      elif method == "milp":
        t0 = time.perf_counter()
        optimum, report = baselines.milp_optimum(problem, weights, config.slots_per_host,
                                                 config.eval.milp_time_limit_s)
        row[method] = {**evaluate_static(problem, optimum, loads, weights),
                       "optimal": report["optimal"], "mip_gap": report["mip_gap"],
                       "seconds": time.perf_counter() - t0}
        row["agents_over_milp"] = row["agents"]["final_cost"] / row["milp"]["final_cost"]
    run_ctx.log(seed, **{f"{m}_violations": row[m]["violations"] for m in config.eval.methods},
                **({"agents_over_milp": row["agents_over_milp"]} if "milp" in row else {}))
    per_seed.append(row)

  methods = [m for m in METHODS if m in config.eval.methods]
  mean = {m: {k: float(np.mean([r[m][k] for r in per_seed]))
              for k in ("violations", "active_hosts", "network", "overload", "final_cost",
                        "migrations")} for m in methods}
  summary: dict[str, Any] = {
      "scenario": config.scenario, "hosts": topology_spec(config).num_hosts,
      "instances": config.workload.instances, "apps": config.workload.apps,
      "train_hosts": topology_spec(config, True).num_hosts,
      "params": agent_lib.params_count(params), "train_seconds": round(train_seconds, 1),
      "train_curve": curve, "validation": validation, "selected_update": selected,
      "mean": mean, "per_seed": per_seed,
      "seeds": list(range(config.eval.seeds)),
  }
  kube = [m for m in ("least_allocated", "most_allocated") if m in methods]
  if "milp" in methods:
    ratios = [r["agents_over_milp"] for r in per_seed]
    summary["agents_over_milp"] = {"mean": float(np.mean(ratios)), "max": float(np.max(ratios)),
                                   "min": float(np.min(ratios))}
    summary["milp_all_optimal"] = all(r["milp"]["optimal"] for r in per_seed)
    optimum = mean["milp"]["final_cost"]
    summary["headline"] = {
        "metric": "cost of the agents' placement (mean of seeds)",
        "value": mean["agents"]["final_cost"], "baseline": "MILP optimum",
        "baseline_value": mean["milp"]["final_cost"],
        "note": f"{summary['hosts']} hosts, {config.eval.seeds} seeds; cost / optimum: "
                + ", ".join(f"{m.replace('_', ' ')} {mean[m]['final_cost'] / optimum:.2f}"
                            for m in methods if m != "milp" and m in mean)
                + " (the goal, agents <= 1.10 x, is the 8-host setting's: papers/placement.md)"}
  if kube:
    better = min(kube, key=lambda m: (mean[m]["violations"], mean[m]["active_hosts"]))
    summary["better_kube"] = better
    violations = mean["agents"]["violations"]
    summary["violations_ratio"] = (mean[better]["violations"] / violations if violations
                                   else float("inf"))
    if "milp" not in methods:
      summary["headline"] = {
          "metric": "SLO violations (app-rounds, mean of seeds)", "value": violations,
          "baseline": better.replace("_", " "), "baseline_value": mean[better]["violations"],
          "note": f"{summary['hosts']} hosts; active hosts {mean['agents']['active_hosts']:.1f} "
                  f"vs {mean[better]['active_hosts']:.1f}"}
  plot(run_ctx, config, summary)
  return summary


def plot(run_ctx, config, summary) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
  if summary["train_curve"]:
    its, mean_cost, final_cost = zip(*summary["train_curve"])
    left.plot(its, mean_cost, label="training: mean over rounds")
    left.plot(its, final_cost, label="training: last round")
    its, cost = zip(*summary["validation"])
    left.plot(its, cost, marker="o", label="validation (selects the params)")
    left.axvline(summary["selected_update"], color="gray", ls=":", lw=1)
    left.legend(fontsize=7)
  left.set(xlabel="PPO update", ylabel="cost (training batch)",
           title=f"training on {summary['train_hosts']} hosts")
  methods = list(summary["mean"])
  key = "final_cost" if config.scenario == "static" else "violations"
  right.bar(methods, [summary["mean"][m][key] for m in methods])
  right.set(ylabel=key.replace("_", " "), title=f"{config.scenario}, {summary['hosts']} hosts, "
            f"{config.eval.seeds} seeds")
  right.tick_params(axis="x", rotation=20)
  figure.tight_layout()
  run_ctx.save_figure("placement", figure)
  plt.close(figure)


def paper_tables(*results) -> dict[str, str]:
  """Per kept run: one row per method (means over the evaluation seeds)."""
  from research.common import records  # pylint: disable=import-outside-toplevel
  rows = []
  for result in results:
    s = result["summary"]
    for method, m in s["mean"].items():
      name = {"agents": f"agents (PPO update {s.get('selected_update', '?')} of "
                        f"{result['config']['train']['iterations']})" if result.get("config")
              else "agents", "prior": "prior (untrained)"}.get(method, method)
      rows.append((s["scenario"], f"{s['hosts']}", name, f"{m['violations']:.2f}",
                   f"{m['active_hosts']:.2f}", f"{m['network']:.3f}", f"{m['overload']:.3f}",
                   f"{m['final_cost']:.3f}", f"{m['migrations']:.1f}"))
  header = ("scenario", "hosts", "method", "SLO violations (app-rounds)", "active hosts (mean)",
            "network cost (mean)", "overload (mean)", "cost, last round", "migrations")
  tables = {"results": records.write_markdown_table(header, rows)}
  goal_rows = []
  for result in results:
    s = result["summary"]
    setting = f"{s['hosts']} hosts, {len(s['seeds'])} seeds"
    methods = [m for m in ("agents", "prior") if m in s["mean"]]
    if "agents_over_milp" in s:
      for method in methods:
        ratios = [r[method]["final_cost"] / r["milp"]["final_cost"] for r in s["per_seed"]]
        mean = float(np.mean(ratios))
        spread = f"min {min(ratios):.3f}, max {max(ratios):.3f}"
        if "final_costs" in s["per_seed"][0][method]:  # several rollouts per seed
          by_rollout = np.mean([np.asarray(r[method]["final_costs"]) / r["milp"]["final_cost"]
                                for r in s["per_seed"]], axis=0)
          spread = (f"per seed {spread}; one rollout per seed: {by_rollout.min():.3f} ... "
                    f"{by_rollout.max():.3f} over the {len(by_rollout)}")
        goal_rows.append((setting, f"{method} / MILP cost", f"{mean:.3f} ({spread})",
                          "<= 1.10 on average", "met" if mean <= 1.10 else "not met"))
    elif "better_kube" in s:
      better = s["better_kube"]
      for method in methods:
        mine, theirs = s["mean"][method], s["mean"][better]
        ratio = theirs["violations"] / mine["violations"] if mine["violations"] else float("inf")
        hosts_ok = mine["active_hosts"] <= theirs["active_hosts"]
        goal_rows.append((setting, f"{better} violations / {method}'s (active hosts {method} vs "
                          f"{better})", f"{ratio:.2f} ({mine['active_hosts']:.1f} vs "
                          f"{theirs['active_hosts']:.1f})", ">= 2 at equal or fewer hosts",
                          "met" if ratio >= 2 and hosts_ok else "not met"))
  tables["goals"] = records.write_markdown_table(("setting", "measure", "value", "goal",
                                                  "status"), goal_rows)
  return tables
