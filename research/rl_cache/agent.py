"""DQN (Mnih et al., 2015) on gymnax environments, split into actor and learner pure functions.

The algorithm only; processes, Ray, the parameter cache and the replay table wrap it elsewhere.

- Actor: `init_actor` / `rollout`. An actor steps `envs_per_actor` vmapped gymnax environments
  (auto-reset) for `rollout_length` steps with epsilon-greedy actions from its own, possibly
  stale, copy of the Q-network params and returns a `Trajectory` of fixed shapes (T, E, ...):
  the item a replay table stores.
- Learner: `init_learner` / `learner_update`. One Adam step on the Huber TD loss of a batch of
  `Transition`s (from `transitions_from_trajectory`), against a target network that follows the
  online network by `target <- tau * online + (1 - tau) * target` every `target_update_period`
  learner steps (tau = 1: the hard copy of the paper; period 1 and small tau: Polyak averaging).
  Double DQN (van Hasselt et al., 2016) picks the bootstrap action with the online network.
- Bootstrapping: an episode that ends by reaching the time limit (truncation) is not a terminal
  state, so its target still bootstraps from the true final observation (Pardo et al., 2018);
  only termination zeroes the bootstrap. n-step returns (Sutton & Barto, 7.1) are computed
  inside one trajectory and stop at an episode end or at the trajectory's last step.
- `train_in_process`: the reference single-process loop (several actors with stale params, a FIFO
  replay buffer in jax arrays, one learner) that the distributed backends must match.

Tuned defaults (AgentConfig() and train_in_process's defaults: 8 actors x 8 envs x 8 steps =
512 env steps per iteration, 3-step double DQN, one update of 128 per 2 env steps (256 per
iteration), hard target copy every 250 updates, actor copies refreshed once 512 updates old, so
actors act with params 0 or 256 updates old) solve CartPole-v1 (greedy mean >= 475 over 100
episodes, checked every 4,096 env steps) within the documented budget
`SOLVE_BUDGET_ENV_STEPS` = 120,000 env steps, pinned by the slow test on seeds 0 and 1. The kept
run of the experiment (papers/rl_cache.md, papers/results/rl_cache.cartpole.json) gives the
steps it took there.

Everything is `state -> state` over pytrees with explicit keys; nothing here is jitted: jit at the
call site with `config` static (it is a frozen, hashable dataclass).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, NamedTuple, Sequence

import gymnax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.fedavg import model as model_lib

Params = Any  # an nnx.State pytree of float arrays (the Q-network)

# Env steps (all actors together, evaluation episodes not counted) within which the default config
# solves CartPole-v1 with 8 actors in `train_in_process`: the documented budget (module docstring).
SOLVE_BUDGET_ENV_STEPS = 120_000


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AgentConfig:
  """Hyperparameters of the DQN actor and learner. Defaults solve CartPole-v1 (see the test)."""
  env_name: str = "CartPole-v1"
  hidden_sizes: tuple[int, ...] = (64, 64)
  gamma: float = 0.99
  learning_rate: float = 1e-3
  max_grad_norm: float | None = 10.0  # None: no clipping
  batch_size: int = 128
  target_update_period: int = 250  # learner steps between target updates
  target_tau: float = 1.0  # 1.0: hard copy; < 1: Polyak step
  double_dqn: bool = True
  epsilon_start: float = 1.0
  epsilon_end: float = 0.05
  epsilon_decay_steps: int = 10_000  # env steps (all actors together) of the linear decay
  envs_per_actor: int = 8  # E
  rollout_length: int = 8  # T, env steps per env per actor step
  n_step: int = 3

  def __post_init__(self):
    def fail(field, expected):
      raise ValueError(f"AgentConfig.{field}={getattr(self, field)!r}: expected {expected}")
    if self.env_name not in gymnax.registered_envs:
      fail("env_name", "a gymnax environment id such as 'CartPole-v1'")
    if (not isinstance(self.hidden_sizes, tuple) or not self.hidden_sizes
        or any(not isinstance(h, int) or h < 1 for h in self.hidden_sizes)):
      fail("hidden_sizes", "a non-empty tuple of positive ints")
    if not 0.0 <= self.gamma <= 1.0:
      fail("gamma", "a float in [0, 1]")
    if not self.learning_rate > 0:
      fail("learning_rate", "a positive float")
    if self.max_grad_norm is not None and not self.max_grad_norm > 0:
      fail("max_grad_norm", "None or a positive float")
    for field in ("batch_size", "target_update_period", "envs_per_actor", "rollout_length",
                  "n_step"):
      value = getattr(self, field)
      if not isinstance(value, int) or value < 1:
        fail(field, "a positive int")
    if not 0.0 < self.target_tau <= 1.0:
      fail("target_tau", "a float in (0, 1]")
    if not isinstance(self.double_dqn, bool):
      fail("double_dqn", "a bool")
    for field in ("epsilon_start", "epsilon_end"):
      if not 0.0 <= getattr(self, field) <= 1.0:
        fail(field, "a float in [0, 1]")
    if not isinstance(self.epsilon_decay_steps, int) or self.epsilon_decay_steps < 0:
      fail("epsilon_decay_steps", "a non-negative int")
    if self.n_step > self.rollout_length:
      fail("n_step", f"at most rollout_length={self.rollout_length}")

  @property
  def env_steps_per_rollout(self) -> int:
    return self.envs_per_actor * self.rollout_length


@functools.lru_cache(maxsize=None)
def make_env(env_name: str):
  """The gymnax environment and its default params (cached: both are static)."""
  return gymnax.make(env_name)


def env_spec(config: AgentConfig) -> tuple[int, int]:
  """(observation size, number of actions) of the config's environment."""
  env, env_params = make_env(config.env_name)
  obs_shape = env.observation_space(env_params).shape
  if len(obs_shape) != 1:
    raise ValueError(f"AgentConfig.env_name={config.env_name!r}: observation shape {obs_shape}, "
                     "expected a flat vector for the MLP Q-network")
  return int(obs_shape[0]), int(env.num_actions)


def q_network_sizes(config: AgentConfig) -> tuple[int, ...]:
  obs_size, num_actions = env_spec(config)
  return (obs_size, *config.hidden_sizes, num_actions)


@functools.lru_cache(maxsize=None)
def _q_apply(sizes: tuple[int, ...]) -> model_lib.ApplyFn:
  with jax.ensure_compile_time_eval():  # the throwaway params are built eagerly, even in a trace
    apply, _ = model_lib.mlp(sizes, 0)
  return apply


def q_values(config: AgentConfig, params: Params, obs: jax.Array) -> jax.Array:
  """Q(obs, .) of shape obs.shape[:-1] + (num_actions,)."""
  return _q_apply(q_network_sizes(config))(params, obs)


def epsilon_at(config: AgentConfig, env_steps) -> jax.Array:
  """Linear decay from epsilon_start to epsilon_end over epsilon_decay_steps env steps."""
  frac = jnp.clip(jnp.asarray(env_steps, jnp.float32) / max(config.epsilon_decay_steps, 1),
                  0.0, 1.0)
  return config.epsilon_start + frac * (config.epsilon_end - config.epsilon_start)


# ----------------------------------------------------------------------------------------------
# Types
# ----------------------------------------------------------------------------------------------

class Trajectory(NamedTuple):
  """One actor step: T env steps of E environments; the item the replay table stores."""
  obs: jax.Array  # (T, E, obs_size) float32
  action: jax.Array  # (T, E) int32
  reward: jax.Array  # (T, E) float32
  terminated: jax.Array  # (T, E) bool: a terminal state was reached (no bootstrap)
  truncated: jax.Array  # (T, E) bool: the time limit ended the episode (bootstrap)
  next_obs: jax.Array  # (T, E, obs_size) float32: the true next obs, before any auto-reset


class Transition(NamedTuple):
  """A (possibly n-step) transition; target = reward + discount * Q_target(next_obs, a*)."""
  obs: jax.Array  # (..., obs_size) float32
  action: jax.Array  # (...,) int32
  reward: jax.Array  # (...,) float32: discounted sum of up to n rewards
  discount: jax.Array  # (...,) float32: gamma^k, or 0 if the k-th step terminated
  next_obs: jax.Array  # (..., obs_size) float32


class ActorState(NamedTuple):
  env_state: Any  # gymnax env state, leaves with a leading (E,) axis
  obs: jax.Array  # (E, obs_size) float32
  key: jax.Array  # a jax.random key
  episode_return: jax.Array  # (E,) float32: return so far of each running episode
  env_steps: jax.Array  # () int32: env steps taken by this actor (all its envs)


class LearnerState(NamedTuple):
  params: Params
  target_params: Params
  opt_state: optax.OptState
  step: jax.Array  # () int32: learner updates done


# ----------------------------------------------------------------------------------------------
# Actor
# ----------------------------------------------------------------------------------------------

def init_actor(config: AgentConfig, key: jax.Array) -> ActorState:
  env, env_params = make_env(config.env_name)
  key, reset_key = jax.random.split(key)
  obs, env_state = jax.vmap(env.reset, in_axes=(0, None))(
      jax.random.split(reset_key, config.envs_per_actor), env_params)
  return ActorState(env_state=env_state, obs=obs.astype(jnp.float32), key=key,
                    episode_return=jnp.zeros((config.envs_per_actor,), jnp.float32),
                    env_steps=jnp.zeros((), jnp.int32))


def epsilon_greedy(config: AgentConfig, params: Params, obs: jax.Array, epsilon,
                   key: jax.Array) -> jax.Array:
  """Per row of obs: a uniform random action with probability epsilon, else argmax Q."""
  greedy = jnp.argmax(q_values(config, params, obs), axis=-1).astype(jnp.int32)
  explore_key, action_key = jax.random.split(key)
  _, num_actions = env_spec(config)
  random_action = jax.random.randint(action_key, greedy.shape, 0, num_actions, jnp.int32)
  explore = jax.random.uniform(explore_key, greedy.shape) < epsilon
  return jnp.where(explore, random_action, greedy)


def rollout(config: AgentConfig, params: Params, actor_state: ActorState, epsilon,
            ) -> tuple[ActorState, Trajectory, tuple[jax.Array, jax.Array]]:
  """T epsilon-greedy steps of the actor's E envs.

  Returns the new actor state, the trajectory, and (returns, mask), both (T, E): returns[t, e]
  is the return of the episode env e finished at step t where mask[t, e] is True.
  """
  env, env_params = make_env(config.env_name)
  step_envs = jax.vmap(env.step, in_axes=(0, 0, 0, None))

  def body(state: ActorState, _):
    key, act_key, step_key = jax.random.split(state.key, 3)
    action = epsilon_greedy(config, params, state.obs, epsilon, act_key)
    obs, env_state, reward, terminated, truncated, info = step_envs(
        jax.random.split(step_key, config.envs_per_actor), state.env_state, action, env_params)
    reward = reward.astype(jnp.float32)
    done = jnp.logical_or(terminated, truncated)
    episode_return = state.episode_return + reward
    step = Trajectory(obs=state.obs, action=action, reward=reward,
                      terminated=terminated.astype(bool), truncated=truncated.astype(bool),
                      next_obs=info["final_observation"].astype(jnp.float32))
    new_state = ActorState(env_state=env_state, obs=obs.astype(jnp.float32), key=key,
                           episode_return=jnp.where(done, 0.0, episode_return),
                           env_steps=state.env_steps + config.envs_per_actor)
    return new_state, (step, episode_return, done)

  actor_state, (trajectory, returns, finished) = jax.lax.scan(
      body, actor_state, None, length=config.rollout_length)
  return actor_state, trajectory, (returns, finished)


def transitions_from_trajectory(config: AgentConfig, trajectory: Trajectory) -> Transition:
  """n-step transitions of shape (T * E, ...) from a trajectory (any leading batch axes first).

  For step t the return sums rewards t .. t+k-1, where k <= n stops after the first episode end
  or at the trajectory's last step; discount = gamma^k * (1 - terminated at step t+k-1).
  """
  *batch, length, num_envs = trajectory.action.shape
  if batch:
    flat = jax.vmap(functools.partial(transitions_from_trajectory, config))(
        jax.tree.map(lambda x: x.reshape((-1,) + x.shape[len(batch):]), trajectory))
    return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), flat)
  gamma = config.gamma

  def shifted(x, k):  # x[t + k], zero-padded past the end
    return jnp.concatenate([x[k:], jnp.zeros((k,) + x.shape[1:], x.dtype)], axis=0)

  reward = trajectory.reward
  next_obs = trajectory.next_obs
  terminated = trajectory.terminated
  discount = jnp.full(reward.shape, gamma, jnp.float32)
  alive = ~(trajectory.terminated | trajectory.truncated)  # can the sum extend past step t+k?
  for k in range(1, config.n_step):
    valid = alive & (jnp.arange(length) < length - k)[:, None]
    reward = reward + jnp.where(valid, gamma**k * shifted(trajectory.reward, k), 0.0)
    next_obs = jnp.where(valid[..., None], shifted(trajectory.next_obs, k), next_obs)
    terminated = jnp.where(valid, shifted(trajectory.terminated, k), terminated)
    discount = jnp.where(valid, gamma**(k + 1), discount)
    alive = valid & ~shifted(trajectory.terminated | trajectory.truncated, k)
  discount = jnp.where(terminated, 0.0, discount).astype(jnp.float32)
  flat = lambda x: x.reshape((length * num_envs,) + x.shape[2:])
  return Transition(obs=flat(trajectory.obs), action=flat(trajectory.action),
                    reward=flat(reward.astype(jnp.float32)), discount=flat(discount),
                    next_obs=flat(next_obs))


# ----------------------------------------------------------------------------------------------
# Learner
# ----------------------------------------------------------------------------------------------

def make_optimizer(config: AgentConfig) -> optax.GradientTransformation:
  adam = optax.adam(config.learning_rate)
  if config.max_grad_norm is None:
    return adam
  return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adam)


def init_learner(config: AgentConfig, key: jax.Array) -> LearnerState:
  seed = int(jax.random.randint(key, (), 0, np.iinfo(np.int32).max))
  _, params = model_lib.mlp(q_network_sizes(config), seed)
  return LearnerState(params=params, target_params=jax.tree.map(jnp.copy, params),
                      opt_state=make_optimizer(config).init(params),
                      step=jnp.zeros((), jnp.int32))


def td_target(config: AgentConfig, params: Params, target_params: Params,
              batch: Transition) -> jax.Array:
  """reward + discount * Q_target(next_obs, a*), a* = argmax of Q_online (double) or Q_target."""
  next_q_target = q_values(config, target_params, batch.next_obs)
  if config.double_dqn:
    next_action = jnp.argmax(q_values(config, params, batch.next_obs), axis=-1)
  else:
    next_action = jnp.argmax(next_q_target, axis=-1)
  next_q = jnp.take_along_axis(next_q_target, next_action[..., None], axis=-1)[..., 0]
  return jax.lax.stop_gradient(batch.reward + batch.discount * next_q)


def td_loss(config: AgentConfig, params: Params, target_params: Params,
            batch: Transition) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean Huber (delta 1) TD error, as in Mnih et al. (2015)."""
  q = q_values(config, params, batch.obs)
  q_taken = jnp.take_along_axis(q, batch.action[..., None].astype(jnp.int32), axis=-1)[..., 0]
  target = td_target(config, params, target_params, batch)
  loss = optax.huber_loss(q_taken, target, delta=1.0).mean()
  return loss, {"loss": loss, "q_mean": q_taken.mean()}


def update_target(config: AgentConfig, params: Params, target_params: Params,
                  step: jax.Array) -> Params:
  """target <- tau * online + (1 - tau) * target on steps that are multiples of the period."""
  due = step % config.target_update_period == 0
  tau = config.target_tau
  return jax.tree.map(lambda p, t: jnp.where(due, tau * p + (1.0 - tau) * t, t),
                      params, target_params)


def learner_update(config: AgentConfig, state: LearnerState,
                   batch: Transition) -> tuple[LearnerState, dict[str, jax.Array]]:
  """One optimizer step on the TD loss of `batch`, then the target update rule."""
  grads, metrics = jax.grad(functools.partial(td_loss, config), has_aux=True)(
      state.params, state.target_params, batch)
  updates, opt_state = make_optimizer(config).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  step = state.step + 1
  target_params = update_target(config, params, state.target_params, step)
  metrics["grad_norm"] = optax.tree.norm(grads)
  return LearnerState(params, target_params, opt_state, step), metrics


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------

def evaluate(config: AgentConfig, params: Params, key: jax.Array, episodes: int = 100,
             policy: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
  """Mean undiscounted return of `episodes` greedy episodes (each ends at the time limit).

  `policy(obs (episodes, obs_size)) -> actions (episodes,)` replaces the greedy policy if given.
  """
  env, env_params = make_env(config.env_name)
  max_steps = int(env_params.max_steps_in_episode)
  if policy is None:
    policy = lambda obs: jnp.argmax(q_values(config, params, obs), axis=-1).astype(jnp.int32)
  reset_key, key = jax.random.split(key)
  obs, env_state = jax.vmap(env.reset, in_axes=(0, None))(
      jax.random.split(reset_key, episodes), env_params)

  def cond(carry):
    t, _, _, _, _, running = carry
    return jnp.logical_and(t < max_steps, running.any())

  def body(carry):
    t, key, obs, env_state, total, running = carry
    key, step_key = jax.random.split(key)
    obs, env_state, reward, terminated, truncated, _ = jax.vmap(
        env.step, in_axes=(0, 0, 0, None))(
            jax.random.split(step_key, episodes), env_state, policy(obs), env_params)
    total = total + jnp.where(running, reward, 0.0)
    running = running & ~(terminated | truncated)
    return t + 1, key, obs, env_state, total, running

  carry = (jnp.zeros((), jnp.int32), key, obs, env_state, jnp.zeros((episodes,), jnp.float32),
           jnp.ones((episodes,), bool))
  return jax.lax.while_loop(cond, body, carry)[4].mean()


# ----------------------------------------------------------------------------------------------
# Reference single-process loop
# ----------------------------------------------------------------------------------------------

class FifoReplay(NamedTuple):
  """A ring buffer of transitions in jax arrays; the oldest are overwritten first."""
  data: Transition  # leaves with a leading (capacity,) axis
  next_index: jax.Array  # () int32
  size: jax.Array  # () int32


def init_replay(config: AgentConfig, capacity: int) -> FifoReplay:
  obs_size, _ = env_spec(config)
  zeros = lambda *shape, dtype=jnp.float32: jnp.zeros((capacity, *shape), dtype)
  data = Transition(obs=zeros(obs_size), action=zeros(dtype=jnp.int32), reward=zeros(),
                    discount=zeros(), next_obs=zeros(obs_size))
  return FifoReplay(data, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def replay_add(replay: FifoReplay, transitions: Transition) -> FifoReplay:
  capacity = replay.data.action.shape[0]
  count = transitions.action.shape[0]
  index = (replay.next_index + jnp.arange(count)) % capacity
  data = jax.tree.map(lambda buf, x: buf.at[index].set(x), replay.data, transitions)
  return FifoReplay(data, (replay.next_index + count) % capacity,
                    jnp.minimum(replay.size + count, capacity))


def replay_sample(replay: FifoReplay, key: jax.Array, batch_size: int) -> Transition:
  index = jax.random.randint(key, (batch_size,), 0, jnp.maximum(replay.size, 1))
  return jax.tree.map(lambda buf: buf[index], replay.data)


class LoopState(NamedTuple):
  learner: LearnerState
  actors: ActorState  # leaves with a leading (num_actors,) axis
  actor_params: Params  # each actor's copy of the params, leading (num_actors,) axis
  actor_params_step: jax.Array  # (num_actors,) int32: learner step each copy was taken at
  replay: FifoReplay
  env_steps: jax.Array  # () int32, all actors together
  key: jax.Array


def _collect(config: AgentConfig, state: LoopState) -> tuple[LoopState, jax.Array, jax.Array]:
  """Every actor does one rollout with its own params copy; transitions go into the replay."""
  epsilon = epsilon_at(config, state.env_steps)
  actors, trajectory, (returns, finished) = jax.vmap(
      functools.partial(rollout, config), in_axes=(0, 0, None))(
          state.actor_params, state.actors, epsilon)
  replay = replay_add(state.replay, transitions_from_trajectory(config, trajectory))
  num_actors = state.actor_params_step.shape[0]
  env_steps = state.env_steps + num_actors * config.env_steps_per_rollout
  return state._replace(actors=actors, replay=replay, env_steps=env_steps), returns, finished


def _learn(config: AgentConfig, state: LoopState, num_updates: int,
           refresh_period: int) -> tuple[LoopState, dict[str, jax.Array]]:
  """num_updates learner steps on uniform replay samples, then refresh the stale actor copies."""
  key, *update_keys = jax.random.split(state.key, num_updates + 1)

  def body(learner, update_key):
    return learner_update(config, learner, replay_sample(state.replay, update_key,
                                                         config.batch_size))

  learner, metrics = jax.lax.scan(body, state.learner, jnp.stack(update_keys))
  # An actor refreshes its copy once it is `refresh_period` learner steps old, as a cache
  # with that staleness bound would serve it.
  refresh = learner.step - state.actor_params_step >= refresh_period
  actor_params = jax.tree.map(
      lambda a, p: jnp.where(refresh.reshape((-1,) + (1,) * p.ndim), p[None], a),
      state.actor_params, learner.params)
  actor_params_step = jnp.where(refresh, learner.step, state.actor_params_step)
  return (state._replace(learner=learner, actor_params=actor_params,
                         actor_params_step=actor_params_step, key=key),
          jax.tree.map(jnp.mean, metrics))


@dataclasses.dataclass(frozen=True)
class TrainResult:
  params: Params
  env_steps: int  # env steps used for training (evaluation episodes not counted)
  solved: bool
  eval_curve: list[tuple[int, float]]  # (env steps, mean greedy return)
  wall_s: float


def train_in_process(config: AgentConfig, num_actors: int, total_env_steps: int, key: jax.Array,
                     replay_capacity: int = 50_000, learning_starts: int = 2_000,
                     env_steps_per_update: int = 2, refresh_period: int = 512,
                     eval_every: int = 4_096, eval_episodes: int = 100,
                     solve_return: float | None = 475.0,
                     log: Callable[[int, dict], None] | None = None) -> TrainResult:
  """Reference actor/learner loop in one process.

  Each iteration every actor does one rollout (E * T env steps) with its own params copy; then,
  once the replay holds `learning_starts` transitions, the learner does one update per
  `env_steps_per_update` new env steps; after the updates, an actor's copy is refreshed if it is
  at least `refresh_period` learner steps old. Copies start staggered, so actors hold params of
  different ages; as the check runs once per iteration (num_updates learner steps), a copy acts
  while up to refresh_period + num_updates - 1 learner steps old. Every
  `eval_every` env steps the learner's params are evaluated greedily on `eval_episodes`
  episodes; training stops as soon as the mean reaches `solve_return` (None: never).
  """
  positive = dict(num_actors=num_actors, total_env_steps=total_env_steps,
                  replay_capacity=replay_capacity, env_steps_per_update=env_steps_per_update,
                  refresh_period=refresh_period, eval_every=eval_every,
                  eval_episodes=eval_episodes)
  for name, value in positive.items():
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"train_in_process {name}={value!r}: expected a positive int")
  steps_per_iteration = num_actors * config.env_steps_per_rollout
  if steps_per_iteration % env_steps_per_update:
    raise ValueError(f"train_in_process env_steps_per_update={env_steps_per_update} must divide "
                     f"the env steps per iteration num_actors * E * T = {steps_per_iteration}")
  if replay_capacity < steps_per_iteration:
    raise ValueError(f"train_in_process replay_capacity={replay_capacity} must hold one "
                     f"iteration ({steps_per_iteration} transitions)")
  num_updates = steps_per_iteration // env_steps_per_update
  start = time.perf_counter()

  learner_key, actors_key, eval_key, key = jax.random.split(key, 4)
  learner = init_learner(config, learner_key)
  stack = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (num_actors,) + x.shape), tree)
  state = LoopState(
      learner=learner,
      actors=jax.vmap(functools.partial(init_actor, config))(
          jax.random.split(actors_key, num_actors)),
      actor_params=stack(learner.params),
      actor_params_step=-(jnp.arange(num_actors, dtype=jnp.int32) * refresh_period) // num_actors,
      replay=init_replay(config, replay_capacity),
      env_steps=jnp.zeros((), jnp.int32), key=key)
  collect = jax.jit(functools.partial(_collect, config), donate_argnums=0)
  learn = jax.jit(functools.partial(_learn, config, num_updates=num_updates,
                                    refresh_period=refresh_period), donate_argnums=0)
  evaluate_fn = jax.jit(functools.partial(evaluate, config, episodes=eval_episodes))

  eval_curve: list[tuple[int, float]] = []
  solved = False
  env_steps = next_eval = 0
  while env_steps < total_env_steps and not solved:
    state, returns, finished = collect(state)
    env_steps += steps_per_iteration
    metrics = {}
    if env_steps >= learning_starts:
      state, metrics = learn(state)
    if env_steps >= next_eval or env_steps >= total_env_steps:
      next_eval += eval_every
      eval_key, k = jax.random.split(eval_key)
      mean_return = float(evaluate_fn(state.learner.params, k))
      eval_curve.append((env_steps, mean_return))
      solved = solve_return is not None and mean_return >= solve_return
      if log is not None:
        finished = np.asarray(finished)
        train_return = float(np.asarray(returns)[finished].mean()) if finished.any() else None
        log(env_steps, dict(eval_return=mean_return, train_return=train_return,
                            epsilon=float(epsilon_at(config, env_steps)),
                            **{k: float(v) for k, v in metrics.items()}))
  return TrainResult(params=state.learner.params, env_steps=env_steps, solved=solved,
                     eval_curve=eval_curve, wall_s=time.perf_counter() - start)
