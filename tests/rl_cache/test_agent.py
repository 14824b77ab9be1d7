import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.rl_cache import agent

SMALL = agent.AgentConfig(hidden_sizes=(16,), envs_per_actor=4, rollout_length=64,
                          batch_size=32, n_step=1)
# One compiled rollout shared by the tests (compiling dominates their time on 2 cores).
ROLLOUT = jax.jit(functools.partial(agent.rollout, SMALL))


@pytest.mark.parametrize("field,value", [
    ("env_name", "NoSuchEnv-v0"), ("hidden_sizes", (64, 0)), ("hidden_sizes", [64]),
    ("gamma", 1.5), ("learning_rate", 0.0), ("batch_size", 0), ("target_tau", 0.0),
    ("epsilon_end", -0.1), ("n_step", 65), ("max_grad_norm", -1.0),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
  with pytest.raises(ValueError, match=f"AgentConfig.{field}="):
    dataclasses.replace(SMALL, **{field: value})


def test_epsilon_decays_linearly_then_stays_at_end():
  config = dataclasses.replace(SMALL, epsilon_start=1.0, epsilon_end=0.1,
                               epsilon_decay_steps=1000)
  np.testing.assert_allclose(
      [agent.epsilon_at(config, s) for s in (0, 250, 500, 1000, 10_000)],
      [1.0, 0.775, 0.55, 0.1, 0.1], rtol=1e-6)


def test_rollout_trajectory_has_fixed_shapes_and_dtypes():
  config = SMALL
  params = agent.init_learner(config, jax.random.key(0)).params
  actor = agent.init_actor(config, jax.random.key(1))
  actor, traj, (returns, finished) = ROLLOUT(params, actor, 0.5)
  t, e = config.rollout_length, config.envs_per_actor
  chex.assert_shape([traj.obs, traj.next_obs], (t, e, 4))
  chex.assert_shape([traj.action, traj.reward, traj.terminated, traj.truncated, returns,
                     finished], (t, e))
  chex.assert_type([traj.obs, traj.next_obs, traj.reward, returns], jnp.float32)
  chex.assert_type(traj.action, jnp.int32)
  chex.assert_type([traj.terminated, traj.truncated, finished], bool)
  assert int(actor.env_steps) == t * e
  # The same compiled rollout serves every later actor step (same shapes, no retrace).
  _, traj2, _ = ROLLOUT(params, actor, 0.5)
  chex.assert_trees_all_equal_shapes_and_dtypes(traj, traj2)


def test_rollout_next_obs_is_the_final_obs_not_the_reset_obs():
  params = agent.init_learner(SMALL, jax.random.key(0)).params
  actor = agent.init_actor(SMALL, jax.random.key(2))
  # Random actions: CartPole episodes of ~20 steps, so several ends in 64 steps.
  _, traj, (returns, finished) = ROLLOUT(params, actor, 1.0)
  done = np.asarray(traj.terminated | traj.truncated)
  assert done.sum() >= 4
  np.testing.assert_array_equal(finished, done)
  obs, next_obs = np.asarray(traj.obs), np.asarray(traj.next_obs)
  # Within an episode the next obs is the following step's obs; across an end it is not.
  same = np.all(next_obs[:-1] == obs[1:], axis=-1)
  np.testing.assert_array_equal(same, ~done[:-1])
  # A terminated CartPole state is outside the bounds (|x| > 2.4 or |theta| > 12 degrees).
  final = next_obs[np.asarray(traj.terminated)]
  assert np.all((np.abs(final[:, 0]) > 2.4) | (np.abs(final[:, 2]) > 12 * 2 * np.pi / 360))
  # Each finished episode's return is its length (reward 1 per step); episodes run >= 8 steps.
  assert np.all(np.asarray(returns)[done] >= 8)


def hand_made_trajectory():
  """T = 3 steps, E = 2 envs. Env 0: terminates at t = 1. Env 1: truncated at t = 0."""
  obs = jnp.arange(3 * 2 * 4, dtype=jnp.float32).reshape(3, 2, 4) / 10
  next_obs = obs + 100.0  # distinguishable from any obs
  return agent.Trajectory(
      obs=obs, action=jnp.array([[0, 1], [1, 0], [0, 0]], jnp.int32),
      reward=jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
      terminated=jnp.array([[False, False], [True, False], [False, False]]),
      truncated=jnp.array([[False, True], [False, False], [False, False]]),
      next_obs=next_obs)


def test_one_step_transitions_zero_the_bootstrap_only_on_termination():
  config = dataclasses.replace(SMALL, gamma=0.9, n_step=1)
  traj = hand_made_trajectory()
  tr = agent.transitions_from_trajectory(config, traj)
  # Flattened (t, e) row-major: rows are (0,0) (0,1) (1,0) (1,1) (2,0) (2,1).
  np.testing.assert_allclose(tr.reward, [1, 2, 3, 4, 5, 6])
  np.testing.assert_allclose(tr.discount, [0.9, 0.9, 0.0, 0.9, 0.9, 0.9], rtol=1e-6)
  np.testing.assert_array_equal(tr.next_obs, traj.next_obs.reshape(6, 4))
  np.testing.assert_array_equal(tr.obs, traj.obs.reshape(6, 4))
  np.testing.assert_array_equal(tr.action, [0, 1, 1, 0, 0, 0])


def test_n_step_transitions_stop_at_episode_ends_and_trajectory_end():
  config = dataclasses.replace(SMALL, gamma=0.9, n_step=2)
  traj = hand_made_trajectory()
  tr = agent.transitions_from_trajectory(config, traj)
  g = 0.9
  # (0,0): r0 + g r1, then terminated at t=1 -> discount 0, next obs of t=1.
  # (0,1): truncated at t=0 -> one step, bootstrap g from the final obs of t=0.
  # (1,0): terminated -> r, 0.  (1,1): r1 + g r2, g^2, next obs of t=2.
  # (2,*): last step of the trajectory -> one step, g.
  np.testing.assert_allclose(tr.reward, [1 + g * 3, 2, 3, 4 + g * 6, 5, 6], rtol=1e-6)
  np.testing.assert_allclose(tr.discount, [0.0, g, 0.0, g * g, g, g], rtol=1e-6)
  nxt = traj.next_obs
  np.testing.assert_array_equal(
      tr.next_obs, jnp.stack([nxt[1, 0], nxt[0, 1], nxt[1, 0], nxt[2, 1], nxt[2, 0], nxt[2, 1]]))


@pytest.mark.parametrize("double_dqn", [False, True])
def test_td_target_matches_hand_computation(double_dqn):
  config = dataclasses.replace(SMALL, gamma=0.9, double_dqn=double_dqn)
  online = agent.init_learner(config, jax.random.key(0)).params
  target = agent.init_learner(config, jax.random.key(1)).params
  tr = agent.transitions_from_trajectory(config, hand_made_trajectory())
  q_next_online = np.asarray(agent.q_values(config, online, tr.next_obs))
  q_next_target = np.asarray(agent.q_values(config, target, tr.next_obs))
  chooser = q_next_online if double_dqn else q_next_target
  bootstrap = q_next_target[np.arange(6), chooser.argmax(-1)]
  expected = np.array([1, 2, 3, 4, 5, 6]) + np.array([0.9, 0.9, 0, 0.9, 0.9, 0.9]) * bootstrap
  np.testing.assert_allclose(agent.td_target(config, online, target, tr), expected, rtol=1e-5)
  # The terminated row's target is its reward alone.
  assert float(agent.td_target(config, online, target, tr)[2]) == 3.0


def test_learner_update_decreases_td_loss_on_a_fixed_batch():
  config = dataclasses.replace(SMALL, learning_rate=3e-3, target_update_period=10_000)
  state = agent.init_learner(config, jax.random.key(0))
  _, traj, _ = ROLLOUT(state.params, agent.init_actor(SMALL, jax.random.key(1)), 1.0)
  batch = agent.transitions_from_trajectory(config, traj)
  loss = lambda s: float(agent.td_loss(config, s.params, s.target_params, batch)[0])
  update = jax.jit(functools.partial(agent.learner_update, config))
  before = loss(state)
  for _ in range(50):
    state, metrics = update(state, batch)
  assert int(state.step) == 50
  assert loss(state) < 0.5 * before
  assert set(metrics) >= {"loss", "q_mean", "grad_norm"}


def test_target_update_is_a_tau_step_every_period_learner_steps():
  config = dataclasses.replace(SMALL, target_update_period=2, target_tau=0.25)
  state = agent.init_learner(config, jax.random.key(0))
  batch = agent.transitions_from_trajectory(config, hand_made_trajectory())
  update = jax.jit(functools.partial(agent.learner_update, config))
  target0 = state.target_params
  state, _ = update(state, batch)  # step 1: not due
  chex.assert_trees_all_equal(state.target_params, target0)
  state, _ = update(state, batch)  # step 2: due
  expected = jax.tree.map(lambda p, t: 0.25 * p + 0.75 * t, state.params, target0)
  chex.assert_trees_all_close(state.target_params, expected, rtol=1e-6)
  hard = dataclasses.replace(config, target_tau=1.0)
  chex.assert_trees_all_equal(agent.update_target(hard, state.params, target0, jnp.array(4)),
                              state.params)


def test_evaluate_always_left_gives_short_episodes():
  config = SMALL
  params = agent.init_learner(config, jax.random.key(0)).params
  always_left = lambda obs: jnp.zeros(obs.shape[:1], jnp.int32)
  mean_return = float(jax.jit(functools.partial(
      agent.evaluate, config, episodes=100, policy=always_left))(params, jax.random.key(0)))
  assert 5 < mean_return < 50


def test_fifo_replay_overwrites_oldest_first():
  config = SMALL
  replay = agent.init_replay(config, capacity=5)
  make = lambda start, n: agent.Transition(
      obs=jnp.zeros((n, 4)), action=jnp.arange(start, start + n, dtype=jnp.int32),
      reward=jnp.zeros(n), discount=jnp.zeros(n), next_obs=jnp.zeros((n, 4)))
  replay = agent.replay_add(replay, make(0, 3))
  assert int(replay.size) == 3
  replay = agent.replay_add(replay, make(3, 4))
  assert int(replay.size) == 5
  np.testing.assert_array_equal(replay.data.action, [5, 6, 2, 3, 4])
  sample = agent.replay_sample(replay, jax.random.key(0), 64)
  assert set(np.asarray(sample.action).tolist()) <= {2, 3, 4, 5, 6}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_train_in_process_solves_cartpole_with_8_actors(seed):
  config = agent.AgentConfig()
  result = agent.train_in_process(config, num_actors=8,
                                  total_env_steps=agent.SOLVE_BUDGET_ENV_STEPS,
                                  key=jax.random.key(seed))
  assert result.solved, result.eval_curve
  assert result.env_steps <= agent.SOLVE_BUDGET_ENV_STEPS
  # The stopping evaluation picked these params, so re-check them on fresh episodes (a slightly
  # lower bar: a policy at ~480 can dip just under 475 on another 100 episodes).
  mean_return = float(jax.jit(functools.partial(agent.evaluate, config, episodes=100))(
      result.params, jax.random.key(seed + 1000)))
  assert mean_return >= 450, mean_return
