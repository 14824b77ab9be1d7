"""Padding the neighbour table (the benchmark's equal-work column) changes no decision."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.placement import agent as agent_lib
from research.placement import baselines
from research.placement import cluster


def small_problem():
  topology = cluster.TopologySpec(racks_per_zone=2, hosts_per_rack=4)
  workload = cluster.WorkloadSpec(apps=3, services_per_app=3, instances=20)
  apps = cluster.generate_apps(workload, topology.latency_ms, 0, topology.clusters)
  problem = cluster.build_problem(topology, apps, replica_slots=workload.max_replicas)
  return problem, baselines.random_schedule(problem, 8, 0)


def test_padded_neighbour_slots_play_the_same_greedy_rounds():
  problem, placement = small_problem()
  padded = cluster.with_neighbour_slots(problem, problem.neighbours.shape[1] + 5)
  assert padded.neighbours.shape == (8, problem.neighbours.shape[1] + 5)
  assert np.all(np.asarray(padded.neighbours[:, problem.neighbours.shape[1]:]) == -1)
  config = agent_lib.AgentConfig()
  nets, params = agent_lib.init_params(config, problem.num_hosts, 0)
  weights, loads = cluster.Weights(), jnp.ones((6, problem.num_apps))
  outcomes = [agent_lib.rollout(config, nets, params, weights, p, placement, loads,
                                jax.random.key(0), greedy=True) for p in (problem, padded)]
  (final, steps, _), (final_padded, steps_padded, _) = outcomes
  np.testing.assert_array_equal(final.inventory, final_padded.inventory)
  np.testing.assert_allclose(steps.cost, steps_padded.cost, rtol=1e-6)
  assert int(jnp.sum(steps.migrations)) > 0  # the rounds did move instances

def test_fewer_slots_than_the_degree_are_refused():
  problem, _ = small_problem()
  with pytest.raises(cluster.SpecError, match="neighbour slots: got 2, expected >="):
    cluster.with_neighbour_slots(problem, 2)
