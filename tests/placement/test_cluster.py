"""The simulator: bad input refused at load, the objective against a plain-numpy reference."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.placement import baselines
from research.placement import cluster

TOPOLOGY = cluster.TopologySpec(clusters=2, zones_per_cluster=2, racks_per_zone=2,
                                hosts_per_rack=2)


def _app(**service_overrides):
  services = (cluster.ServiceSpec("web", 1.0, 2.0, 1.0, 2.0, replicas=2),
              cluster.ServiceSpec("db", 0.5, 4.0, 0.5, 3.0))
  services = (dataclasses.replace(services[0], **service_overrides),) + services[1:]
  return cluster.AppSpec("shop", 20.0, services, (("web", "db", 1.5),))


def test_an_instance_larger_than_every_host_is_refused_naming_it():
  with pytest.raises(cluster.SpecError, match=r"app 'shop' service 'web'.*larger than any host"):
    cluster.build_problem(TOPOLOGY, [_app(cpu_request=9.0)])


@pytest.mark.parametrize("field", ["cpu_request", "mem_request", "cpu_usage", "base_ms"])
def test_a_negative_demand_is_refused_naming_the_field(field):
  with pytest.raises(cluster.SpecError, match=rf"service 'web': {field} = -1.0 is negative"):
    cluster.build_problem(TOPOLOGY, [_app(**{field: -1.0})])


def test_a_call_to_an_unknown_service_is_refused_naming_it():
  app = dataclasses.replace(_app(), calls=(("web", "cache", 1.0),))
  with pytest.raises(cluster.SpecError, match=r"app 'shop' calls: unknown service 'cache'"):
    cluster.build_problem(TOPOLOGY, [app])


def test_a_disconnected_topology_is_refused_naming_the_unreachable_clusters():
  spec = dataclasses.replace(TOPOLOGY, clusters=3, cluster_links=((0, 1),))
  with pytest.raises(cluster.SpecError, match=r"disconnected: clusters \[2\]"):
    cluster.build_topology(spec)
  cluster.build_topology(dataclasses.replace(spec, cluster_links=((0, 1), (1, 2))))


@pytest.mark.parametrize("rack_links", cluster.RACK_LINKS)
def test_neighbour_graph_is_symmetric_without_self_or_duplicate_links(rack_links):
  spec = dataclasses.replace(TOPOLOGY, hosts_per_rack=5, rack_links=rack_links)
  built = cluster.build_topology(spec)
  n, rack = np.asarray(built["neighbours"]), np.asarray(built["host_rack"])
  for h, row in enumerate(n):
    peers = row[row >= 0].tolist()
    assert h not in peers and len(peers) == len(set(peers))
    for p in peers:
      assert h in n[p].tolist()
    in_rack = sorted(p for p in peers if rack[p] == rack[h])
    position = h % 5
    expected = ([g for g in range(h - position, h - position + 5) if g != h]
                if rack_links == "clique" else
                sorted({h - position + (position + 1) % 5, h - position + (position - 1) % 5}))
    assert in_rack == expected


def test_an_unknown_rack_link_kind_is_refused_naming_the_field():
  with pytest.raises(cluster.SpecError, match=r"topology.rack_links: got 'mesh'"):
    cluster.build_topology(dataclasses.replace(TOPOLOGY, rack_links="mesh"))


def test_latency_is_the_lowest_shared_level():
  p = cluster.build_problem(TOPOLOGY, [_app()])
  lat = p.level_latency
  # hosts: cluster (2) x zone (2) x rack (2) x position (2)
  for b, level in [(0, 0), (1, 1), (2, 2), (4, 3), (8, 4)]:
    assert float(cluster.host_latency(p, jnp.asarray(0), jnp.asarray(b))) == float(lat[level])


def _reference_terms(problem, weights, owner: dict, load):
  """The objective straight from the model's definition, in numpy loops."""
  num_r = problem.max_replica_slots
  svc_of = lambda i: i // num_r
  replicas = np.zeros(problem.num_services, int)
  for i in owner:
    replicas[svc_of(i)] += 1
  use = np.zeros(problem.num_hosts)
  for i, h in owner.items():
    s = svc_of(i)
    use[h] += float(problem.svc_cpu_usage[s]) * load[int(problem.svc_app[s])] / replicas[s]
  rho = use / np.asarray(problem.host_cpu)
  lat = lambda a, b: float(cluster.host_latency(problem, jnp.asarray(a), jnp.asarray(b)))
  app_ms = np.zeros(problem.num_apps)
  for s in range(problem.num_services):
    hosts = [h for i, h in owner.items() if svc_of(i) == s]
    q = np.mean([1 / max(1 - rho[h], cluster.EPS) for h in hosts])
    app_ms[int(problem.svc_app[s])] += float(problem.svc_base_ms[s]) * q
  network = 0.0
  for c in range(len(problem.call_src)):
    a, b = int(problem.call_src[c]), int(problem.call_dst[c])
    ha = [h for i, h in owner.items() if svc_of(i) == a]
    hb = [h for i, h in owner.items() if svc_of(i) == b]
    mean = np.mean([lat(x, y) for x in ha for y in hb])
    app = int(problem.svc_app[a])
    app_ms[app] += float(problem.call_rate[c]) * mean
    network += float(problem.call_rate[c]) * load[app] * mean
  active = len(set(owner.values()))
  violations = int(np.sum(app_ms > np.asarray(problem.app_slo_ms)))
  overload = float(np.sum(np.maximum(rho - weights.rho_max, 0)))
  return dict(active_hosts=active, network=network, violations=violations, overload=overload,
              cost=weights.host * active + weights.network * network + weights.slo * violations
              + weights.overload * overload, app_ms=app_ms)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_objective_terms_match_the_plain_reference(seed):
  workload = cluster.WorkloadSpec(apps=2, services_per_app=3, instances=10)
  problem = cluster.build_problem(TOPOLOGY, cluster.generate_apps(workload, TOPOLOGY.latency_ms,
                                                                  seed))
  placement = baselines.random_schedule(problem, slots=4, seed=seed)
  load = np.asarray([0.7, 1.9])
  weights = cluster.Weights()
  obs = jax.jit(cluster.observe)(problem, placement, jnp.asarray(load))
  got = cluster.terms(weights, obs)
  owner = {i: int(h) for i, h in enumerate(np.asarray(obs.owner)) if h >= 0}
  want = _reference_terms(problem, weights, owner, load)
  np.testing.assert_allclose(np.asarray(obs.app_latency_ms), want["app_ms"], rtol=1e-5)
  for name in ("active_hosts", "network", "violations", "overload", "cost"):
    np.testing.assert_allclose(float(getattr(got, name)), want[name], rtol=1e-5, atol=1e-6)
  # the per-host split adds up to the total: what makes the agents' local rewards exact
  np.testing.assert_allclose(float(cluster.host_costs(problem, weights, obs).sum()),
                             want["cost"], rtol=1e-5)


def test_load_trace_is_seeded_bounded_and_has_bursts():
  spec = cluster.LoadSpec(steps=200, burst_rate=0.05)
  a = cluster.load_trace(spec, 4, jax.random.key(3))
  b = cluster.load_trace(spec, 4, jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert a.shape == (200, 4) and float(a.min()) >= 0.1
  diurnal_max = 1 + spec.amplitude
  assert float(a.max()) > diurnal_max  # some burst lifted the load above the diurnal curve
  flat = cluster.load_trace(dataclasses.replace(spec, amplitude=0.0, burst_rate=0.0), 4,
                            jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(flat), 1.0)


def test_generated_workloads_have_the_requested_instances_and_fit_the_checks():
  for seed in range(5):
    apps = cluster.generate_apps(cluster.WorkloadSpec(), TOPOLOGY.latency_ms, seed)
    assert sum(s.replicas for a in apps for s in a.services) == 20
    cluster.check_apps(apps, TOPOLOGY.cpu, TOPOLOGY.mem)
