"""The agents: local features, masked decisions, shared / per-host parameters, a PPO update."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.placement import agent as agent_lib
from research.placement import baselines
from research.placement import cluster
from research.placement import exchange

TOPOLOGY = cluster.TopologySpec(racks_per_zone=2, hosts_per_rack=3)
WEIGHTS = cluster.Weights()
_observe = jax.jit(cluster.observe)


def _env(seed):
  workload = cluster.WorkloadSpec(apps=2, services_per_app=3, instances=10)
  problem = cluster.build_problem(TOPOLOGY, cluster.generate_apps(
      workload, TOPOLOGY.latency_ms, seed), replica_slots=4, peer_slots=2)
  return problem, baselines.random_schedule(problem, 6, seed), jnp.ones((6, 2))


def test_features_have_the_documented_shapes_and_deltas_match_the_simulator():
  problem, placement, loads = _env(0)
  obs = _observe(problem, placement, loads[0])
  space = exchange.actions_of(problem, placement)
  x = jax.jit(agent_lib.action_features, static_argnums=4)(problem, placement, obs, loads[0],
                                                          WEIGHTS)
  chex.assert_shape(x, (problem.num_hosts, space.size, agent_lib.NUM_OFFER_FEATURES))
  # the network change an offer's features announce is what the move does to the total
  inv = np.asarray(placement.inventory)
  h, m = map(int, np.argwhere(inv >= 0)[0])
  k = 0
  d = int(problem.neighbours[h, k])
  moved = inv.copy()
  free = int(np.flatnonzero(moved[d] < 0)[0])
  moved[d, free], moved[h, m] = moved[h, m], -1
  after = cluster.terms(WEIGHTS, _observe(problem, cluster.Placement(jnp.asarray(moved)),
                                          loads[0]))
  before = cluster.terms(WEIGHTS, obs)
  row = x[h, 1 + m * space.neighbours + k]
  np.testing.assert_allclose(float(row[agent_lib.OFFER_DELTA]),
                             WEIGHTS.network * float(after.network - before.network), rtol=1e-4,
                             atol=1e-6)


@pytest.mark.parametrize("sharing", ["shared", "per_agent"])
def test_sampled_actions_respect_the_mask_and_per_agent_params_have_a_host_axis(sharing):
  problem, placement, loads = _env(1)
  config = agent_lib.AgentConfig(sharing=sharing, allow_scale=True, hidden=16)
  nets, params = agent_lib.init_params(config, problem.num_hosts, 0)
  if sharing == "per_agent":
    leaf = params.actor["mlp"]["layers"][0]["kernel"].get_value()
    assert leaf.shape[0] == problem.num_hosts
  obs = cluster.observe(problem, placement, loads[0])
  mask = np.asarray(exchange.action_mask(problem, placement, obs, True))
  outputs = jax.jit(lambda params, key: agent_lib.policy_outputs(
      config, nets, params, problem, placement, loads[0], WEIGHTS, key=key))
  for seed in range(5):
    decisions, logp, entropy, value, _ = outputs(params, jax.random.key(seed))
    action = np.asarray(decisions.action)
    assert mask[np.arange(problem.num_hosts), action].all()
    chex.assert_shape((logp, entropy, value), (problem.num_hosts,))
    assert np.all(np.asarray(logp) <= 0)


def test_initial_policy_is_the_local_search_prior():
  """The MLP's last layer starts at zero: the scores are minus the prior scales times the local
  cost changes (network, overload, hosts; latency at its own relative weight)."""
  problem, placement, loads = _env(2)
  config = agent_lib.AgentConfig(hidden=16, prior_scale=3.0, prior_latency=0.5)
  nets, params = agent_lib.init_params(config, problem.num_hosts, 0)
  obs = _observe(problem, placement, loads[0])
  x = jax.jit(agent_lib.action_features, static_argnums=4)(problem, placement, obs, loads[0],
                                                          WEIGHTS)
  logits = agent_lib._logits(config, nets.actor, params.actor, x, agent_lib.OFFER_DELTA)  # pylint: disable=protected-access
  delta = np.asarray(x[..., agent_lib.OFFER_DELTA:agent_lib.OFFER_DELTA + 4])
  want = -3.0 * (delta[..., :3].sum(-1) + 0.5 * delta[..., 3])
  np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_ppo_update_keeps_shapes_and_moves_the_parameters():
  envs = [_env(s) for s in range(4)]
  config = agent_lib.AgentConfig(hidden=16, minibatches=2, epochs=1, reward="difference")
  nets, params = agent_lib.init_params(config, TOPOLOGY.num_hosts, 0)
  init, update = agent_lib.make_train(config, nets, WEIGHTS)
  state = init(params, jax.random.key(0))
  batch = [agent_lib.stack([e[j] for e in envs]) for j in range(3)]
  new, metrics = jax.jit(update)(state, *batch)
  chex.assert_trees_all_equal_shapes(new.params, params)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new.params, params)
  assert max(jax.tree.leaves(moved)) > 0
  assert all(np.isfinite(float(v)) for v in metrics.values())
