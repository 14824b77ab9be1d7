"""Actor/learner DQN on CartPole through a hierarchical parameter cache and a replay service.

`num_actors` actors each step `envs_per_actor` gymnax CartPole environments with the params of
the version their leaf cache holds (research/rl_cache/agent.py); each rollout (T x E steps) is
one item of the replay table (research/rl_cache/replay.py); the learner samples items, takes
one random transition of each, updates, and publishes a new version to the cache tree's root
every `publish_every` updates (research/rl_cache/cache.py: learner -> root -> ... -> leaves ->
actors). Evaluation: the learner's greedy policy on `eval_episodes` episodes every `eval_every`
env steps; the run stops when the mean return reaches `solve_return`.

Backends (`backend`, the one key that moves a run between them):
- "in_process": the services' pure state in this process and the actors stepped in turn by the
  driver, one rollout each per iteration (deterministic: the reference run and the tests);
- "processes": the services in a local manager process (research/rl_cache/process_backend.py)
  and each RL actor in a spawned process of its own (workers.ProcessActorPool);
- "ray": cache nodes and the replay table as Ray actors, blobs through Ray's object store
  (research/rl_cache/ray_backend.py), and each RL actor a Ray actor (RayActorPool).
On "processes" and "ray" the actors run on their own, one rollout per call, while the learner in
the driver samples as fast as the replay table's rate limiter lets it (the limiter holds the same
samples-per-insert ratio as the in-process loop); env steps count when a rollout is reported.

  python -m experiments.run configs/rl_cache/cartpole.py
  python -m experiments.run configs/rl_cache/cartpole.py --set backend=processes
  python -m experiments.run configs/rl_cache/cartpole.py --set backend=ray
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
from research.rl_cache import agent as agent_lib
from research.rl_cache import backends
from research.rl_cache import cache
from research.rl_cache import replay

PAPER_PAGE = "papers/rl_cache.md"
BACKENDS = ("in_process", "processes", "ray")


def config_schema() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "backend": "in_process",
      "num_actors": 8,
      "cache": {"depth": 2, "fanout": 2},      # root + 2 leaves for 8 actors
      "publish_every": 16,                     # learner updates per published version
      # DQN hyperparameters: agent.AgentConfig's fields, its defaults (the one source of them)
      "agent": dataclasses.asdict(agent_lib.AgentConfig()),
      "env_steps_per_update": 2,               # replay ratio: one update per this many env steps
      "transitions_per_item": 8,               # an update samples batch_size / this rollouts
      "learning_starts": 2_000,                # env steps before the first update
      "replay_items": 800,                     # table size in rollouts (800 x 64 = 51,200 steps)
      "total_env_steps": 200_000,
      "eval_every": 4_096,
      "eval_episodes": 100,
      "solve_return": 475.0,
  })


def validate_config(config) -> None:
  config_lib.check_choice(config, "backend", BACKENDS)
  config_lib.check_positive(config, "num_actors", "publish_every", "env_steps_per_update",
                            "replay_items", "total_env_steps", "eval_every", "eval_episodes")
  try:
    agent_config(config)
    cache.Topology(config.cache.depth, config.cache.fanout, config.num_actors)
  except ValueError as error:
    raise config_lib.ConfigError(f"config: {error}") from None
  agent = agent_config(config)
  if config.transitions_per_item < 1 or agent.batch_size % config.transitions_per_item:
    raise config_lib.ConfigError(
        f"config key 'transitions_per_item': got {config.transitions_per_item}, expected a "
        f"positive divisor of agent.batch_size = {agent.batch_size}")
  per_iteration = config.num_actors * agent.env_steps_per_rollout
  if per_iteration % config.env_steps_per_update:
    raise config_lib.ConfigError(
        f"config key 'env_steps_per_update': got {config.env_steps_per_update}, expected a "
        f"divisor of num_actors x envs_per_actor x rollout_length = {per_iteration}")


def agent_config(config) -> agent_lib.AgentConfig:
  values = config.agent.to_dict()
  values["hidden_sizes"] = tuple(values["hidden_sizes"])
  return agent_lib.AgentConfig(**values)


def item_spec(trajectory: agent_lib.Trajectory) -> replay.ItemSpec:
  return replay.ItemSpec.from_example({k: np.asarray(v) for k, v in
                                       trajectory._asdict().items()})


def make_services(config, topology, param_spec, table_config, spec):
  """(params service, replay service, close, stop event of the actor processes or None) of the
  configured backend."""
  if config.backend == "ray":
    import ray  # pylint: disable=import-outside-toplevel
    from research.rl_cache import ray_backend  # pylint: disable=import-outside-toplevel
    if not ray.is_initialized():  # a local Ray instance; on a cluster `ray start` made one
      # Logical CPUs for every RL actor (one each) and the learner, oversubscribing the cores
      # of a small machine rather than leaving actors unscheduled.
      ray.init(include_dashboard=False, log_to_driver=False,
               num_cpus=max(os.cpu_count() or 1, config.num_actors + 1))
    params = ray_backend.RayParameterService(topology, param_spec)
    table = ray_backend.RayReplayService(table_config, spec)
    return params, table, lambda: (params.close(), table.close()), None
  if config.backend == "processes":
    from research.rl_cache import process_backend  # pylint: disable=import-outside-toplevel
    services = process_backend.ProcessServices(topology, param_spec, table_config, spec)
    return services.params, services.replay, services.close, services.stop_event
  return (backends.InProcessParameterService(topology, param_spec),
          backends.InProcessReplayService(table_config, spec), lambda: None, None)


def make_actor_pool(config, agent, seeds, params_service, replay_service, stop_event):
  """The RL actors of the "processes" and "ray" backends (one process or Ray actor each)."""
  if config.backend == "ray":
    from research.rl_cache import ray_backend  # pylint: disable=import-outside-toplevel
    return ray_backend.RayActorPool(agent, seeds, params_service.leaf_reader(), replay_service)
  from research.rl_cache import workers  # pylint: disable=import-outside-toplevel
  return workers.ProcessActorPool(agent, seeds, params_service, replay_service, stop_event)


def _learn_step(config: agent_lib.AgentConfig, learner, items: dict, key):
  """One update on batch_size transitions: the same number of random ones from each sampled
  rollout (with replacement)."""
  transitions = agent_lib.transitions_from_trajectory(
      config, agent_lib.Trajectory(**items))  # (n * T * E, ...)
  n = items["action"].shape[0]
  per_item, each = transitions.action.shape[0] // n, config.batch_size // n
  pick = (jnp.repeat(jnp.arange(n) * per_item, each) +
          jax.random.randint(key, (n * each,), 0, per_item))
  return agent_lib.learner_update(config, learner, jax.tree.map(lambda x: x[pick], transitions))


@dataclasses.dataclass
class _Run:
  """The driver's side of a run: the learner, its services, and what it has seen so far."""

  config: Any
  agent: agent_lib.AgentConfig
  run_ctx: Any
  learner: Any
  learn: Any
  evaluate: Any
  params_service: Any
  replay_service: Any
  eval_key: jax.Array
  version: int = 0
  updates: int = 0
  env_steps: int = 0
  next_eval: int = 0
  solved_at: int | None = None
  curve: list = dataclasses.field(default_factory=list)
  staleness: list = dataclasses.field(default_factory=list)
  episode_returns: list = dataclasses.field(default_factory=list)

  def update(self) -> bool:
    """One learner update if the table lets it sample (False: it says wait); a new version
    every publish_every updates."""
    batch = self.replay_service.sample(self.agent.batch_size // self.config.transitions_per_item,
                                       seed=self.config.seed * 1_000_003 + self.updates)
    if batch is None:
      return False
    self.learner, _ = self.learn(self.learner, batch,
                                 jax.random.fold_in(jax.random.key(self.config.seed + 7),
                                                    self.updates))
    self.updates += 1
    if self.updates % self.config.publish_every == 0:
      self.version += 1
      self.params_service.publish(self.learner.params, self.version)
    return True

  def rollout_done(self, env_steps: int, staleness, returns) -> None:
    """A rollout's env steps, the staleness (versions behind the learner) of the params each
    of its rollouts used, and the returns of the episodes it finished."""
    self.env_steps += env_steps
    self.staleness += list(staleness)
    self.episode_returns += list(returns)

  def report_done(self, report) -> None:
    """`rollout_done` for a remote actor's `workers.WorkerReport`: staleness against the
    learner's version when the report arrives."""
    self.rollout_done(report.env_steps, [self.version - v for v in report.versions],
                      report.episode_returns)

  def evaluate_if_due(self) -> bool:
    """Evaluate the greedy policy every eval_every env steps; True once it is solved."""
    if self.env_steps < self.next_eval:
      return False
    self.next_eval += self.config.eval_every
    self.eval_key, key = jax.random.split(self.eval_key)
    mean_return = float(self.evaluate(self.learner.params, key))
    self.curve.append((self.env_steps, mean_return))
    self.run_ctx.log(self.env_steps, eval_return=mean_return, version=self.version,
                     updates=self.updates,
                     train_return=float(np.mean(self.episode_returns[-50:]))
                     if self.episode_returns else 0.0)
    if mean_return >= self.config.solve_return:
      self.solved_at = self.env_steps
    return self.solved_at is not None

  def done(self) -> bool:
    return self.solved_at is not None or self.env_steps >= self.config.total_env_steps


def _drive_actors_in_turn(run: _Run, actors: list, rollout, updates_per_iteration: int) -> None:
  """The "in_process" loop: each actor reads its leaf, rolls out and inserts, in turn; an insert
  the limiter refuses waits for learner updates; then updates_per_iteration updates."""
  config, agent = run.config, run.agent
  while not run.done():
    epsilon = float(agent_lib.epsilon_at(agent, run.env_steps))
    for i in range(config.num_actors):
      actor_version, params = run.params_service.read(i)
      staleness = run.version - actor_version
      actors[i], trajectory, (returns, finished) = rollout(params, actors[i], epsilon)
      item = {k: np.asarray(v) for k, v in trajectory._asdict().items()}
      while not run.replay_service.insert(item):  # the limiter holds the actors back
        if not run.update():
          raise RuntimeError("the replay table's rate limiter refuses both inserts and "
                             f"samples: {run.replay_service.accounting()} (check error_buffer)")
      run.rollout_done(agent.env_steps_per_rollout, [staleness],
                       np.asarray(returns)[np.asarray(finished)])
    for _ in range(updates_per_iteration if run.env_steps >= config.learning_starts else 0):
      run.update()
    run.evaluate_if_due()


def _drive_actor_pool(run: _Run, pool) -> None:
  """The "processes" / "ray" loop: every actor has one rollout in flight; the learner updates
  while the limiter lets it (at most publish_every before looking at the actors again)
  and hands each actor that reported its next rollout. At the end the rollouts in flight are
  drained, so env_steps may pass total_env_steps (or the solving evaluation) by up to one
  rollout per actor."""
  agent = run.agent
  epsilon = float(agent_lib.epsilon_at(agent, 0))
  for actor in range(run.config.num_actors):
    pool.submit(actor, 1, epsilon)
  while not run.done():
    updated = 0  # at most one version's updates between looks at the actors
    while updated < run.config.publish_every and run.update():
      updated += 1
    for actor, report in pool.wait(timeout_s=0.0 if updated else 0.05):
      run.report_done(report)
      if not run.done():
        pool.submit(actor, 1, float(agent_lib.epsilon_at(agent, run.env_steps)))
    if run.evaluate_if_due():
      break
  # Drain: the rollouts in flight finish (an insert the limiter holds waits for updates), so every
  # rollout taken is counted and inserted.
  while pool.in_flight:
    updated = run.update()
    for _, report in pool.wait(timeout_s=0.0 if updated else 0.05):
      run.report_done(report)


def run(config, run_ctx) -> dict[str, Any]:
  agent = agent_config(config)
  key = jax.random.key(config.seed)
  learner_key, actors_key, eval_key = jax.random.split(key, 3)
  learner = agent_lib.init_learner(agent, learner_key)
  actor_keys = jax.random.split(actors_key, config.num_actors)
  rollout = jax.jit(functools.partial(agent_lib.rollout, agent))
  learn = jax.jit(functools.partial(_learn_step, agent))
  evaluate = jax.jit(functools.partial(agent_lib.evaluate, agent, episodes=config.eval_episodes))

  topology = cache.Topology(config.cache.depth, config.cache.fanout, config.num_actors)
  param_spec = cache.ParamSpec.from_params(learner.params)
  example = jax.eval_shape(lambda p, s: rollout(p, s, 1.0)[1], learner.params,
                           agent_lib.init_actor(agent, actor_keys[0]))
  spec = item_spec(jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), example))
  # One update samples batch_size rollouts; one iteration inserts num_actors rollouts and makes
  # (num_actors * T * E / env_steps_per_update) updates: the ratio the limiter holds.
  updates_per_iteration = (config.num_actors * agent.env_steps_per_rollout
                           // config.env_steps_per_update)
  items_per_update = agent.batch_size // config.transitions_per_item
  samples_per_insert = items_per_update * updates_per_iteration / config.num_actors
  min_items = max(items_per_update, -(-config.learning_starts // agent.env_steps_per_rollout))
  table_config = replay.TableConfig(
      max_size=config.replay_items, selector="uniform", samples_per_insert=samples_per_insert,
      min_size_to_sample=min_items,
      error_buffer=max(samples_per_insert * (config.num_actors + 1) + items_per_update,
                       samples_per_insert * min_items))
  params_service, replay_service, close_services, stop_event = make_services(
      config, topology, param_spec, table_config, spec)
  eval_key, k = jax.random.split(eval_key)
  untrained_return = float(evaluate(learner.params, k))
  state = _Run(config=config, agent=agent, run_ctx=run_ctx, learner=learner, learn=learn,
               evaluate=evaluate, params_service=params_service,
               replay_service=replay_service, eval_key=eval_key, next_eval=config.eval_every)
  pool = None
  start = time.perf_counter()
  try:
    params_service.publish(learner.params, state.version)
    if config.backend == "in_process":
      actors = [agent_lib.init_actor(agent, k) for k in actor_keys]
      _drive_actors_in_turn(state, actors, rollout, updates_per_iteration)
    else:
      seeds = [config.seed * 10_007 + i for i in range(config.num_actors)]
      pool = make_actor_pool(config, agent, seeds, params_service, replay_service, stop_event)
      _drive_actor_pool(state, pool)
    seconds = time.perf_counter() - start
    egress = params_service.egress_bytes()
    accounting = replay_service.accounting()
  finally:
    if pool is not None:
      pool.close()
    close_services()
  blob_bytes = param_spec.nbytes
  curve, version, env_steps, solved_at = state.curve, state.version, state.env_steps, state.solved_at
  final = curve[-1][1] if curve else 0.0
  plot(run_ctx, config, curve)
  return {
      "services": config.backend, "solved": solved_at is not None, "solved_at_env_steps": solved_at,
      "env_steps": env_steps, "updates": state.updates, "versions": version + 1,
      "eval_curve": curve, "final_eval_return": final,
      "mean_staleness_versions": float(np.mean(state.staleness)) if state.staleness else 0.0,
      "learner_egress_bytes": egress.get(cache.LEARNER, 0),
      "flat_broadcast_bytes": topology.flat_egress_bytes(blob_bytes) * (version + 1),
      "blob_bytes": blob_bytes,
      "replay": accounting._asdict(), "seconds": round(seconds, 2),
      "env_steps_per_second": env_steps / seconds,
      "untrained_return": untrained_return,
      "headline": {"metric": "greedy return (100 episodes)", "value": final,
                   "baseline": "untrained policy", "baseline_value": untrained_return,
                   "note": f"{config.backend}, {config.num_actors} actors, "
                           f"{'solved' if solved_at else 'not solved'} after {env_steps:,} env "
                           f"steps"},
  }


def plot(run_ctx, config, curve) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  figure, axes = plt.subplots(figsize=(5.5, 3.4))
  if curve:
    steps, returns = zip(*curve)
    axes.plot(steps, returns, marker="o")
  axes.axhline(config.solve_return, color="gray", ls="--", lw=1, label="solved")
  axes.set(xlabel="env steps (all actors)", ylabel="greedy return (mean of episodes)",
           title=f"CartPole-v1, {config.num_actors} actors, {config.backend}")
  axes.legend()
  figure.tight_layout()
  run_ctx.save_figure("return", figure)
  plt.close(figure)


def paper_tables(*results) -> dict[str, str]:
  """The page's table from kept results: one row per run (backend)."""
  from research.common import records  # pylint: disable=import-outside-toplevel
  rows = []
  for result in results:
    s, c = result["summary"], result["config"]
    rows.append((c["backend"], str(c["num_actors"]),
                 f"{c['cache']['depth']} x {c['cache']['fanout']}",
                 f"{s['solved_at_env_steps']:,}" if s["solved"] else "not solved",
                 f"{s['final_eval_return']:.1f}", f"{s['untrained_return']:.1f}",
                 f"{s['versions']:,}", f"{s['learner_egress_bytes'] / 1e6:.2f}",
                 f"{s['flat_broadcast_bytes'] / 1e6:.2f}",
                 f"{s['mean_staleness_versions']:.2f}", f"{s['env_steps_per_second']:,.0f}"))
  header = ("backend", "actors", "cache depth x fanout", "solved at (env steps)",
            "greedy return", "untrained", "versions", "learner egress MB",
            "flat broadcast MB", "mean staleness (versions)", "env steps / s")
  return {"results": records.write_markdown_table(header, rows)}
