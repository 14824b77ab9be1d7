"""The exchange protocol's invariants, under random decisions, orders and failures."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.placement import baselines
from research.placement import cluster
from research.placement import exchange

TOPOLOGY = cluster.TopologySpec(clusters=2, zones_per_cluster=1, racks_per_zone=2,
                                hosts_per_rack=3, cpu=4.0, mem=8.0)
SLOTS = 5


def _problem(seed):
  workload = cluster.WorkloadSpec(apps=3, services_per_app=3, instances=18,
                                  cpu_per_replica=(0.3, 1.2), mem_per_replica=(0.5, 2.0))
  return cluster.build_problem(TOPOLOGY, cluster.generate_apps(workload, TOPOLOGY.latency_ms,
                                                               seed),
                               replica_slots=4, peer_slots=2)  # one shape: one compilation


@functools.partial(jax.jit, static_argnames=("allow_scale", "max_accepts"))
def _random_round(problem, placement, key, fail_rate, allow_scale, max_accepts=0):
  """Random legal actions, random accept wishes and inbox orders, random failures."""
  obs = cluster.observe(problem, placement, jnp.ones(problem.num_apps))
  mask = exchange.action_mask(problem, placement, obs, allow_scale)
  k = jax.random.split(key, 5)
  action = jax.random.categorical(k[0], jnp.where(mask, 0.0, -jnp.inf))
  shape = problem.neighbours.shape
  decisions = exchange.Decisions(action, jax.random.bernoulli(k[1], 0.7, shape),
                                 jax.random.normal(k[2], shape))
  alive_offer = jax.random.uniform(k[3], (problem.num_hosts,)) >= fail_rate
  alive_commit = alive_offer & (jax.random.uniform(k[4], (problem.num_hosts,)) >= fail_rate)
  return exchange.step(problem, placement, obs, decisions, alive_offer, alive_commit,
                       max_accepts)


_step = jax.jit(exchange.step, static_argnames="max_accepts")
_observe = jax.jit(cluster.observe)


def _held(placement):
  inv = np.asarray(placement.inventory)
  return inv[inv >= 0]


def _check_capacity(problem, placement):
  obs = _observe(problem, placement, jnp.ones(problem.num_apps))
  assert np.all(np.asarray(obs.host_cpu_request) <= np.asarray(problem.host_cpu) + 1e-5)
  assert np.all(np.asarray(obs.host_mem_request) <= np.asarray(problem.host_mem) + 1e-5)


@pytest.mark.parametrize("seed, max_accepts", [(0, 0), (1, 0), (2, 1)])
@pytest.mark.parametrize("fail_rate", [0.0, 0.3])
def test_random_exchanges_keep_capacity_and_exactly_one_owner_per_instance(seed, fail_rate,
                                                                          max_accepts):
  problem = _problem(seed)
  placement = baselines.random_schedule(problem, SLOTS, seed)
  start = np.sort(_held(placement))
  key = jax.random.key(seed)
  moved = 0
  for _ in range(25):
    key, k = jax.random.split(key)
    placement, outcome = _random_round(problem, placement, k, fail_rate, allow_scale=False,
                                       max_accepts=max_accepts)
    if max_accepts:  # no receiver took more than the cap
      target = np.asarray(outcome.target)[np.asarray(outcome.accepted)]
      assert np.bincount(target, minlength=problem.num_hosts).max(initial=0) <= max_accepts
    held = _held(placement)
    assert len(held) == len(set(held.tolist())), "an instance is held by two agents"
    np.testing.assert_array_equal(np.sort(held), start)  # none lost, none created
    _check_capacity(problem, placement)
    moved += int(np.sum(outcome.committed))
  assert moved > 15  # the random agents did exchange


def test_an_agent_failing_mid_exchange_loses_no_instance():
  problem = _problem(0)
  placement = baselines.random_schedule(problem, SLOTS, 0)
  key = jax.random.key(7)
  aborted = 0
  for _ in range(30):
    key, k1, k2 = jax.random.split(key, 3)
    obs = _observe(problem, placement, jnp.ones(problem.num_apps))
    mask = jax.jit(exchange.action_mask, static_argnums=3)(problem, placement, obs, False)
    mask = mask.at[:, 0].set(~jnp.any(mask[:, 1:], axis=1))  # everyone offers if it can
    action = jax.random.categorical(k1, jnp.where(mask, 0.0, -jnp.inf))
    shape = problem.neighbours.shape
    decisions = exchange.Decisions(action, jnp.ones(shape, bool), jnp.zeros(shape))
    # every agent takes part in the offers; half of them die before the commit
    alive_commit = jax.random.bernoulli(k2, 0.5, (problem.num_hosts,))
    new, outcome = _step(problem, placement, obs, decisions,
                         jnp.ones(problem.num_hosts, bool), alive_commit)
    before = {int(i): h for h, row in enumerate(np.asarray(placement.inventory))
              for i in row if i >= 0}
    after = {int(i): h for h, row in enumerate(np.asarray(new.inventory)) for i in row if i >= 0}
    assert sorted(before) == sorted(after)
    offered, target, inst = (np.asarray(x) for x in exchange.offered_instance(
        problem, placement, action))
    for h in np.flatnonzero(np.asarray(outcome.accepted)):
      i, t = int(inst[h]), int(target[h])
      both_alive = bool(alive_commit[h]) and bool(alive_commit[t])
      assert after[i] == (t if both_alive else h)  # committed or aborted, never half
      aborted += not both_alive
    placement = new
  assert aborted > 5


def _two_offers_to_host_0(cpu_request):
  """Hosts 1 and 2 each offer their one instance (`cpu_request` cores) to host 0 (2 cores,
  empty). Returns step(max_accepts, preferred) -> (committed, instances host 0 holds), where
  host 0 ranks the offer of host `preferred` first; and the replica slot count."""
  topology = cluster.TopologySpec(racks_per_zone=1, hosts_per_rack=3, cpu=2.0, mem=8.0)
  svc = lambda n: cluster.ServiceSpec(n, cpu_request, 1.0, 1.0, 1.0)
  app = cluster.AppSpec("a", 100.0, (svc("x"), svc("y"), svc("z")), (("x", "y", 1.0),))
  problem = cluster.build_problem(topology, [app])
  num_r = problem.max_replica_slots
  placement = baselines.to_placement(problem, {num_r: 1, 2 * num_r: 2}, slots=4)
  obs = cluster.observe(problem, placement, jnp.ones(1))
  nbr = np.asarray(problem.neighbours)
  offer_to_0 = lambda h: 1 + int(np.flatnonzero(nbr[h] == 0)[0])  # slot 0 of sender h
  action = jnp.asarray([0, offer_to_0(1), offer_to_0(2)])
  shape, alive = problem.neighbours.shape, jnp.ones(3, bool)

  def step(max_accepts, preferred):
    priority = np.zeros(shape, np.float32)
    priority[0, np.flatnonzero(nbr[0] == preferred)[0]] = 1.0
    decisions = exchange.Decisions(action, jnp.ones(shape, bool), jnp.asarray(priority))
    new, outcome = _step(problem, placement, obs, decisions, alive, alive,
                         max_accepts=max_accepts)
    held0 = sorted(int(i) for i in np.asarray(new.inventory)[0] if i >= 0)
    return np.asarray(outcome.committed), held0

  return step, num_r


def test_receiver_resolves_conflicting_offers_by_its_own_priority():
  step, num_r = _two_offers_to_host_0(1.5)  # only one fits in 2 cores
  for preferred in (1, 2):
    committed, held0 = step(0, preferred)
    np.testing.assert_array_equal(committed, [False, preferred == 1, preferred == 2])
    assert held0 == [preferred * num_r]


def test_a_receiver_accepts_at_most_max_accepts_offers_in_its_own_order():
  step, num_r = _two_offers_to_host_0(0.5)  # both fit
  for max_accepts, preferred in ((0, 1), (1, 1), (1, 2), (2, 2)):
    committed, held0 = step(max_accepts, preferred)
    expected = [False, True, True] if max_accepts != 1 else [False, preferred == 1,
                                                             preferred == 2]
    np.testing.assert_array_equal(committed, expected)
    assert held0 == sorted(h * num_r for h in (1, 2) if expected[h])


def test_scaling_stays_within_replica_bounds_and_never_duplicates_an_id():
  problem = _problem(1)
  placement = baselines.random_schedule(problem, SLOTS, 1)
  key = jax.random.key(3)
  scaled_up = scaled_down = 0
  for _ in range(40):
    key, k = jax.random.split(key)
    placement, outcome = _random_round(problem, placement, k, 0.1, allow_scale=True)
    scaled_up += int(np.sum(outcome.scaled_up))
    scaled_down += int(np.sum(outcome.scaled_down))
    held = _held(placement)
    assert len(held) == len(set(held.tolist()))
    obs = _observe(problem, placement, jnp.ones(problem.num_apps))
    replicas = np.asarray(obs.replicas)
    assert np.all(replicas >= np.asarray(problem.svc_min_replicas))
    assert np.all(replicas <= np.asarray(problem.svc_max_replicas))
    assert np.all(np.asarray(problem.svc_slot_open).ravel()[held])  # only open replica slots
    _check_capacity(problem, placement)
  assert scaled_up > 0 and scaled_down > 0, (scaled_up, scaled_down)  # the bounds were tested
