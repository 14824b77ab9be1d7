"""Actor/learner DQN on CartPole through a hierarchical parameter cache and a replay service.

`num_actors` actors each step `envs_per_actor` gymnax CartPole environments with the params of
the version their leaf cache holds (research/rl_cache/agent.py); each rollout (T x E steps) is
one item of the replay table (research/rl_cache/replay.py); the learner samples items, takes
one random transition of each, updates, and publishes a new version to the cache tree's root
every `publish_every` updates (research/rl_cache/cache.py: learner -> root -> ... -> leaves ->
actors). Evaluation: the learner's greedy policy on `eval_episodes` episodes every `eval_every`
env steps; the run stops when the mean return reaches `solve_return`.

Backends (`backend`): "in_process" (the services' pure state in this process; deterministic)
and "ray" (cache nodes and the replay table as Ray actors, blobs through Ray's object store;
research/rl_cache/ray_backend.py). In this version the RL actors step in the driver process on
both backends.

  python -m experiments.run configs/rl_cache/cartpole.py
  python -m experiments.run configs/rl_cache/cartpole.py --set backend=ray
"""

from __future__ import annotations

import dataclasses
import functools
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
BACKENDS = ("in_process", "ray")


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
  if config.backend == "ray":
    import ray  # pylint: disable=import-outside-toplevel
    from research.rl_cache import ray_backend  # pylint: disable=import-outside-toplevel
    if not ray.is_initialized():  # a local Ray instance; on a cluster `ray start` made one
      ray.init(include_dashboard=False, log_to_driver=False)
    return (ray_backend.RayParameterService(topology, param_spec),
            ray_backend.RayReplayService(table_config, spec))
  return (backends.InProcessParameterService(topology, param_spec),
          backends.InProcessReplayService(table_config, spec))


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


def run(config, run_ctx) -> dict[str, Any]:
  agent = agent_config(config)
  key = jax.random.key(config.seed)
  learner_key, actors_key, eval_key = jax.random.split(key, 3)
  learner = agent_lib.init_learner(agent, learner_key)
  actors = [agent_lib.init_actor(agent, k) for k in jax.random.split(actors_key, config.num_actors)]
  rollout = jax.jit(functools.partial(agent_lib.rollout, agent))
  learn = jax.jit(functools.partial(_learn_step, agent))
  evaluate = jax.jit(functools.partial(agent_lib.evaluate, agent, episodes=config.eval_episodes))

  topology = cache.Topology(config.cache.depth, config.cache.fanout, config.num_actors)
  param_spec = cache.ParamSpec.from_params(learner.params)
  _, example, _ = rollout(learner.params, actors[0], 1.0)
  spec = item_spec(example)
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
  params_service, replay_service = make_services(config, topology, param_spec, table_config, spec)

  eval_key, k = jax.random.split(eval_key)
  untrained_return = float(evaluate(learner.params, k))
  version = 0
  params_service.publish(learner.params, version)
  env_steps, updates, next_eval = 0, 0, config.eval_every
  curve, staleness, episode_returns = [], [], []
  solved_at = None
  start = time.perf_counter()
  try:
    while env_steps < config.total_env_steps:
      epsilon = float(agent_lib.epsilon_at(agent, env_steps))
      for i in range(config.num_actors):
        actor_version, params = params_service.read(i)
        staleness.append(version - actor_version)
        actors[i], trajectory, (returns, finished) = rollout(params, actors[i], epsilon)
        episode_returns += list(np.asarray(returns)[np.asarray(finished)])
        item = {k: np.asarray(v) for k, v in trajectory._asdict().items()}
        while not replay_service.insert(item):  # the limiter holds the actors back
          before = updates
          learner, version, updates = _update(config, agent, learn, learner, replay_service,
                                              params_service, version, updates)
          if updates == before:
            raise RuntimeError("the replay table's rate limiter refuses both inserts and "
                               f"samples: {replay_service.accounting()} (check error_buffer)")
        env_steps += agent.env_steps_per_rollout
      for _ in range(updates_per_iteration if env_steps >= config.learning_starts else 0):
        learner, version, updates = _update(config, agent, learn, learner, replay_service,
                                            params_service, version, updates)
      if env_steps >= next_eval:
        next_eval += config.eval_every
        eval_key, k = jax.random.split(eval_key)
        mean_return = float(evaluate(learner.params, k))
        curve.append((env_steps, mean_return))
        run_ctx.log(env_steps, eval_return=mean_return, version=version, updates=updates,
                    train_return=float(np.mean(episode_returns[-50:])) if episode_returns
                    else 0.0)
        if mean_return >= config.solve_return:
          solved_at = env_steps
          break
    seconds = time.perf_counter() - start
    egress = params_service.egress_bytes()
    accounting = replay_service.accounting()
  finally:
    params_service.close()
    replay_service.close()
  blob_bytes = param_spec.nbytes
  final = curve[-1][1] if curve else 0.0
  plot(run_ctx, config, curve)
  return {
      "services": config.backend, "solved": solved_at is not None, "solved_at_env_steps": solved_at,
      "env_steps": env_steps, "updates": updates, "versions": version + 1,
      "eval_curve": curve, "final_eval_return": final,
      "mean_staleness_versions": float(np.mean(staleness)) if staleness else 0.0,
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


def _update(config, agent, learn, learner, replay_service, params_service, version, updates):
  """One learner update when the table lets it sample, and a new version every publish_every."""
  batch = replay_service.sample(agent.batch_size // config.transitions_per_item,
                               seed=config.seed * 1_000_003 + updates)
  if batch is None:
    return learner, version, updates
  learner, _ = learn(learner, batch, jax.random.fold_in(jax.random.key(config.seed + 7), updates))
  updates += 1
  if updates % config.publish_every == 0:
    version += 1
    params_service.publish(learner.params, version)
  return learner, version, updates


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
