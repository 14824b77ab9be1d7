"""Baselines: kube-scheduler strategies, and the MILP optimum against brute force."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.placement import baselines
from research.placement import cluster


def _problem(seed, topology, instances):
  workload = cluster.WorkloadSpec(apps=2, services_per_app=2, instances=instances,
                                  max_replicas=2)
  return cluster.build_problem(topology, cluster.generate_apps(workload, topology.latency_ms,
                                                               seed))


def _cost(problem, weights, placement):
  return cluster.terms(weights, cluster.observe(problem, placement,
                                                jnp.ones(problem.num_apps)))


def test_least_allocated_spreads_and_most_allocated_packs():
  topology = cluster.TopologySpec(racks_per_zone=2, hosts_per_rack=4)
  for seed in range(3):
    problem = _problem(seed, topology, 6)
    spread = _cost(problem, cluster.Weights(), baselines.kube_schedule(
        problem, "least_allocated", 8, seed))
    packed = _cost(problem, cluster.Weights(), baselines.kube_schedule(
        problem, "most_allocated", 8, seed))
    assert int(spread.active_hosts) == 6  # 6 instances on 8 empty hosts: one each
    assert int(packed.active_hosts) < int(spread.active_hosts)


def test_schedulers_refuse_a_workload_larger_than_the_cluster():
  topology = cluster.TopologySpec(racks_per_zone=1, hosts_per_rack=2)
  problem = _problem(0, topology, 8)
  with pytest.raises(cluster.SpecError, match="unschedulable"):
    baselines.kube_schedule(problem, "most_allocated", 2, 0)  # 2 hosts x 2 pod slots < 8
  with pytest.raises(ValueError, match="strategy 'best_fit'"):
    baselines.kube_schedule(problem, "best_fit", 8, 0)


@pytest.mark.parametrize("seed", [0, 1])
def test_milp_optimum_equals_brute_force_over_every_placement(seed):
  """4 hosts (2 racks), 5 instances: all 4^5 placements scored with cluster.terms."""
  topology = cluster.TopologySpec(racks_per_zone=2, hosts_per_rack=2, cpu=3.0, mem=16.0)
  problem = _problem(seed, topology, 5)
  weights = cluster.Weights(rho_max=0.4)  # tight, so that overload and capacity both bind
  slots = 3
  ids = baselines.running_instances(problem)
  inventories = []
  for hosts in itertools.product(range(problem.num_hosts), repeat=len(ids)):
    if max(np.bincount(hosts)) <= slots:
      placement = baselines.to_placement(problem, dict(zip(ids.tolist(), hosts)), slots)
      inventories.append(np.asarray(placement.inventory))

  @jax.jit
  @jax.vmap
  def linear_cost(inventory):  # the MILP's objective (every term but SLO), inf if infeasible
    obs = cluster.observe(problem, cluster.Placement(inventory), jnp.ones(problem.num_apps))
    t = cluster.terms(weights, obs)
    fits = (jnp.all(obs.host_cpu_request <= problem.host_cpu + 1e-6) &
            jnp.all(obs.host_mem_request <= problem.host_mem + 1e-6))
    return jnp.where(fits, t.cost - weights.slo * t.violations, jnp.inf)

  best = float(jnp.min(linear_cost(jnp.asarray(np.stack(inventories)))))
  placement, report = baselines.milp_optimum(problem, weights, slots)
  assert report["optimal"]
  np.testing.assert_allclose(report["objective"], best, rtol=1e-5)
  got = _cost(problem, weights, placement)
  np.testing.assert_allclose(float(got.cost - weights.slo * got.violations), best, rtol=1e-5)
