"""The agents: local observations, a policy per host, and multi-agent PPO that trains them.

Each host's agent sees only local and neighbour information: its own requests, CPU load and
instance count, the same published numbers of its neighbours, and for each instance it holds
its call partners' locations (a service mesh's view), its app's latency against the SLO and the
service's replica count. From these it scores every action of `exchange.Actions` (keep, offer
slot m to neighbour k, scale up / down) with one small network applied per candidate (the
candidate's features include what the move would change locally: network cost, overload at both
ends, hosts that turn on or off, queueing latency), and, as a receiver, scores each offer in its
inbox (accept or reject; the score also orders the inbox). Each score is the network's output
minus a learned scale times each of those cost changes: with the network's last layer at zero,
the first policy is a softmax local search (the prior), and training learns where to leave it.

Training is independent PPO with parameter sharing (IPPO / MAPPO-style decentralized actors;
`sharing="per_agent"` gives every host its own parameters instead). An agent's reward is minus
the local cost (cluster.host_costs, plus the migration cost of what it sent) after the round
(`reward="level"`: the dynamic objective, a sum over rounds) or its change in the round
("difference": the static objective, the cost where the rounds end), averaged over itself and
its neighbours (`reward_scope="neighbourhood"`, so a sender and the receiver that helps it share
the gain of an exchange) or over all hosts ("team"). A critic on the agent's local features
gives per-agent advantages (GAE). Rollouts are vmapped over environments (seeds), scanned over
rounds, and the whole update is one jitted function.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.fedavg import model as mlp_lib
from research.placement import cluster
from research.placement import exchange

SHARING = ("shared", "per_agent")
REWARDS = ("level", "difference")
REWARD_SCOPES = ("neighbourhood", "team")
NUM_OFFER_FEATURES = 32
NUM_ACCEPT_FEATURES = 28
NUM_VALUE_FEATURES = 14
OFFER_DELTA = 26  # where _move_deltas starts in an action's features
ACCEPT_DELTA = 22  # and in an offer's features, as the receiver sees it


@dataclasses.dataclass(frozen=True)
class AgentConfig:
  hidden: int = 64
  sharing: str = "shared"
  learning_rate: float = 3e-4
  discount: float = 0.95
  gae_lambda: float = 0.9
  clip: float = 0.2
  entropy: float = 0.0
  value_coef: float = 0.5
  epochs: int = 4
  minibatches: int = 2
  allow_scale: bool = False
  # offers one agent accepts per round at most (0: all that fit). Agents decide at once, so
  # several senders can pick one receiver in the same round; a cap stops them piling load on it
  max_accepts: int = 2
  # "level": minus the local cost after the round (the dynamic objective, a sum over rounds);
  # "difference": minus its change in the round (sums to the change from start to end, the
  # static objective; far less variance, as the cost level no action of this round set drops
  # out)
  reward: str = "level"
  # "neighbourhood": each agent's reward is over itself and its neighbours (scales to any
  # cluster); "team": the mean over all hosts (exact credit for the team, noisy with many)
  reward_scope: str = "neighbourhood"
  prior_scale: float = 16.0  # initial weight of -(local cost change) in the scores
  prior_learning_rate: float = 3e-2
  # the latency change's initial scale relative to the others: it keeps load spread (SLO
  # first); 0 lets the agents pack hosts as the static objective (no queueing term) wants
  prior_latency: float = 1.0

  def __post_init__(self):
    if self.reward not in REWARDS:
      raise ValueError(f"agent.reward: got {self.reward!r}, expected one of {REWARDS}")
    if self.reward_scope not in REWARD_SCOPES:
      raise ValueError(f"agent.reward_scope: got {self.reward_scope!r}, expected one of "
                       f"{REWARD_SCOPES}")
    if self.max_accepts < 0:
      raise ValueError(f"agent.max_accepts: got {self.max_accepts}, expected >= 0 (0: no cap)")
    if self.sharing not in SHARING:
      raise ValueError(f"agent.sharing: got {self.sharing!r}, expected one of {SHARING}")


# -- features -----------------------------------------------------------------------------------


def _host_stats(problem, obs, slots):
  """(H, 5): requested CPU and memory fractions, actual CPU load, instances / slots, active."""
  return jnp.stack([obs.host_cpu_request / problem.host_cpu,
                    obs.host_mem_request / problem.host_mem, obs.host_rho,
                    obs.host_count / slots, (obs.host_count > 0).astype(jnp.float32)], -1)


def _level_onehot(problem, a, b):
  """(..., 4) whether hosts a and b share a rack, only a zone, only a cluster, or nothing."""
  same_rack = problem.host_rack[a] == problem.host_rack[b]
  same_zone = problem.host_zone[a] == problem.host_zone[b]
  same_cluster = problem.host_cluster[a] == problem.host_cluster[b]
  return jnp.stack([same_rack, same_zone & ~same_rack, same_cluster & ~same_zone,
                    ~same_cluster], -1).astype(jnp.float32)


def _instance_stats(problem, obs, inst, host, weights):
  """(..., 8) an instance relative to a host: its requests and use over the host's capacity,
  its network cost there, its app's latency / SLO and violation, replicas / max, leader."""
  num_r = problem.max_replica_slots
  i = jnp.maximum(inst, 0)
  svc = i // num_r
  app = problem.svc_app[svc]
  leader = exchange.leaders(problem, obs.owner)[svc] == inst
  return jnp.stack([
      problem.svc_cpu_request[svc] / problem.host_cpu[host],
      problem.svc_mem_request[svc] / problem.host_mem[host],
      obs.inst_cpu_use[i] / problem.host_cpu[host],
      weights.network * obs.inst_network[i],
      obs.app_latency_ms[app] / problem.app_slo_ms[app],
      obs.app_violation[app].astype(jnp.float32),
      obs.replicas[svc] / problem.svc_max_replicas[svc],
      leader.astype(jnp.float32)], -1) * (inst >= 0)[..., None]


def _queue(rho):
  return 1.0 / jnp.maximum(1.0 - rho, cluster.EPS)


def _queue_weights(problem, obs):
  """(per instance (I,), per host (H,)) of base_ms / (replicas x the app's SLO): how much a
  host's queueing factor adds to the latency / SLO ratio of the apps whose instances it holds."""
  num_h = problem.num_hosts
  service = cluster.instance_service(problem.num_services, problem.max_replica_slots)
  present = obs.owner >= 0
  per = jnp.where(present, (problem.svc_base_ms / jnp.maximum(obs.replicas, 1) /
                            problem.app_slo_ms[problem.svc_app])[service], 0.0)
  return per, jax.ops.segment_sum(per, jnp.where(present, obs.owner, num_h), num_h + 1)[:num_h]


def _move_deltas(problem, obs, load, weights, inst, src, dst):
  """(..., 6) what moving `inst` from src to dst changes: network cost, overload cost, active
  hosts cost, latency cost (the queueing change of every instance on both hosts, as latency /
  SLO, times the SLO weight: a smooth stand-in for violations), and the CPU load of both ends
  after the move."""
  i = jnp.maximum(inst, 0)
  d_net = weights.network * (cluster.network_at(problem, obs.owner, obs.replicas, load, i, dst)
                             - obs.inst_network[i])
  use = obs.inst_cpu_use[i]
  rho_src, rho_dst = obs.host_rho[src], obs.host_rho[dst]
  src_after = rho_src - use / problem.host_cpu[src]
  dst_after = rho_dst + use / problem.host_cpu[dst]
  over = lambda r: jnp.maximum(r - weights.rho_max, 0.0)
  d_over = weights.overload * (over(src_after) - over(rho_src) + over(dst_after) - over(rho_dst))
  d_host = weights.host * ((obs.host_count[dst] == 0).astype(jnp.float32) -
                           (obs.host_count[src] == 1).astype(jnp.float32))
  per, host = _queue_weights(problem, obs)
  d_latency = weights.slo * ((host[src] - per[i]) * (_queue(src_after) - _queue(rho_src)) +
                             host[dst] * (_queue(dst_after) - _queue(rho_dst)) +
                             per[i] * (_queue(dst_after) - _queue(rho_src)))
  return jnp.stack([d_net, d_over, d_host, d_latency, src_after, dst_after],
                   -1) * (inst >= 0)[..., None]


def action_features(problem, placement, obs, load, weights) -> jax.Array:
  """(H, A, NUM_OFFER_FEATURES): one row per action of each agent."""
  inv = placement.inventory
  num_h, num_m = inv.shape
  nbr = problem.neighbours
  num_k = nbr.shape[1]
  hosts = jnp.arange(num_h)
  stats = _host_stats(problem, obs, num_m)  # (H, 5)
  own_inst = _instance_stats(problem, obs, inv, hosts[:, None], weights)  # (H, M, 8)
  dst = jnp.maximum(nbr, 0)[:, None, :]  # (H, 1, K)
  src = hosts[:, None, None]
  inst = jnp.broadcast_to(inv[:, :, None], (num_h, num_m, num_k))
  offer = jnp.concatenate([
      jnp.broadcast_to(jnp.asarray([0., 1., 0., 0.]), (num_h, num_m, num_k, 4)),
      jnp.broadcast_to(stats[:, None, None, :], (num_h, num_m, num_k, 5)),
      jnp.broadcast_to(stats[jnp.maximum(nbr, 0)][:, None, :, :], (num_h, num_m, num_k, 5)),
      jnp.broadcast_to(own_inst[:, :, None, :], (num_h, num_m, num_k, 8)),
      jnp.broadcast_to(_level_onehot(problem, src, dst), (num_h, num_m, num_k, 4)),
      _move_deltas(problem, obs, load, weights, inst, jnp.broadcast_to(src, inst.shape),
                   jnp.broadcast_to(dst, inst.shape)),
  ], -1).reshape(num_h, num_m * num_k, NUM_OFFER_FEATURES)
  pad = lambda kind, n, x: jnp.concatenate([
      jnp.broadcast_to(jnp.asarray(kind, jnp.float32), (num_h, n, 4)),
      jnp.broadcast_to(stats[:, None, :], (num_h, n, 5)), jnp.zeros((num_h, n, 5)), x,
      jnp.zeros((num_h, n, 10))], -1)
  keep = pad([1., 0., 0., 0.], 1, jnp.zeros((num_h, 1, 8)))
  up = pad([0., 0., 1., 0.], num_m, own_inst)
  down = pad([0., 0., 0., 1.], num_m, own_inst)
  return jnp.concatenate([keep, offer, up, down], axis=1)


def accept_features(problem, placement, obs, load, weights, offered_inst) -> jax.Array:
  """(H, K, NUM_ACCEPT_FEATURES): each receiver's view of the offer from its k-th neighbour
  (`offered_inst` (H,) is what each host offers, -1 none)."""
  num_h, num_m = placement.inventory.shape
  nbr = jnp.maximum(problem.neighbours, 0)
  hosts = jnp.broadcast_to(jnp.arange(num_h)[:, None], nbr.shape)
  stats = _host_stats(problem, obs, num_m)
  inst = offered_inst[nbr]  # (H, K)
  return jnp.concatenate([
      jnp.broadcast_to(stats[:, None, :], nbr.shape + (5,)), stats[nbr],
      _instance_stats(problem, obs, inst, hosts, weights), _level_onehot(problem, nbr, hosts),
      _move_deltas(problem, obs, load, weights, inst, nbr, hosts)], -1)


def value_features(problem, placement, obs, load) -> jax.Array:
  """(H, NUM_VALUE_FEATURES): the critic's local view."""
  inv = placement.inventory
  num_h, num_m = inv.shape
  num_r = problem.max_replica_slots
  stats = _host_stats(problem, obs, num_m)
  valid = problem.neighbours >= 0
  nbr_mean = (jnp.sum(stats[jnp.maximum(problem.neighbours, 0)] * valid[..., None], 1) /
              jnp.maximum(valid.sum(1, keepdims=True), 1))
  held = inv >= 0
  app = problem.svc_app[jnp.maximum(inv, 0) // num_r]
  per = lambda x: jnp.sum(x * held, 1) / jnp.maximum(held.sum(1), 1)
  return jnp.concatenate([
      stats, nbr_mean,
      jnp.stack([per(obs.app_latency_ms[app] / problem.app_slo_ms[app]),
                 per(obs.app_violation[app].astype(jnp.float32)),
                 per(obs.inst_cpu_use[jnp.maximum(inv, 0)] / problem.host_cpu[:, None]),
                 per(load[app])], -1)], -1)


# -- the policy ----------------------------------------------------------------------------------


class Networks(NamedTuple):
  actor: Any
  acceptor: Any
  critic: Any


def init_params(config: AgentConfig, num_hosts: int, seed: int):
  """(apply functions, params): three MLPs; with sharing="per_agent", leaves get a leading
  (num_hosts,) axis (one set per host)."""
  sizes = {"actor": (NUM_OFFER_FEATURES, config.hidden, config.hidden, 1),
           "acceptor": (NUM_ACCEPT_FEATURES, config.hidden, 1),
           "critic": (NUM_VALUE_FEATURES, config.hidden, config.hidden, 1)}
  applies, params = {}, {}
  for j, (name, s) in enumerate(sizes.items()):
    apply, p = mlp_lib.mlp(s, seed * 3 + j)
    applies[name] = apply
    if name != "critic":  # a learned scale on the move's local cost change (see _logits)
      # the last layer starts at zero, so that the first policy is the prior alone
      last = p["layers"][len(s) - 2]
      last["kernel"].set_value(jnp.zeros_like(last["kernel"].get_value()))
      p = {"mlp": p, "prior": config.prior_scale * jnp.asarray(
          [1.0, 1.0, 1.0, config.prior_latency], jnp.float32)}
    if config.sharing == "per_agent":
      p = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_hosts,) + x.shape), p)
    params[name] = p
  return Networks(**applies), Networks(**params)


def _apply(config, apply, params, x):
  """Applies one MLP to per-host inputs x (H, ..., F) -> (H, ...)."""
  if config.sharing == "per_agent":
    return jax.vmap(lambda p, xh: apply(p, xh)[..., 0])(params, x)
  return apply(params, x)[..., 0]


def _logits(config, apply, params, x, delta_at):
  """The actor's and acceptor's scores: the MLP plus a learned scale times minus the move's
  local cost changes (features delta_at .. delta_at + 3: network, overload, hosts, latency), one
  learned scale each. The prior
  starts the agents as a softmax local search on the immediate change; PPO learns where to
  leave it (e.g. emptying a host, which pays only once its last instance has gone)."""
  delta = x[..., delta_at:delta_at + 4]
  prior = params["prior"]  # (4,), or (H, 4) per agent
  if config.sharing == "per_agent":
    prior = prior.reshape((prior.shape[0],) + (1,) * (delta.ndim - 2) + (4,))
  return _apply(config, apply, params["mlp"], x) - jnp.sum(prior * delta, -1)


class Step(NamedTuple):
  """What PPO keeps of one round (per env): enough to recompute every feature."""

  inventory: jax.Array  # (H, M) before the round
  load: jax.Array  # (A,)
  action: jax.Array  # (H,)
  accept: jax.Array  # (H, K) bool
  logp: jax.Array  # (H,)
  value: jax.Array  # (H,)
  reward: jax.Array  # (H,)
  cost: jax.Array  # () total cost after the round
  migrations: jax.Array  # ()


def policy_outputs(config, nets, params, problem, placement, load, weights, action=None,
                   accept=None, key=None, greedy=False):
  """Samples (or scores given) decisions of every agent. Returns (decisions, logp (H,),
  entropy (H,), value (H,), obs)."""
  obs = cluster.observe(problem, placement, load)
  mask = exchange.action_mask(problem, placement, obs, config.allow_scale)
  logits = _logits(config, nets.actor, params.actor,
                   action_features(problem, placement, obs, load, weights), OFFER_DELTA)
  logits = jnp.where(mask, logits, -1e9)
  if action is None:
    k1, k2 = jax.random.split(key)
    action = (jnp.argmax(logits, -1) if greedy else jax.random.categorical(k1, logits))
  log_pi = jax.nn.log_softmax(logits)
  logp = jnp.take_along_axis(log_pi, action[:, None], 1)[:, 0]
  entropy = -jnp.sum(jnp.where(mask, jnp.exp(log_pi) * log_pi, 0.0), -1)
  offered, target, inst = exchange.offered_instance(problem, placement, action)
  offered_inst = jnp.where(offered, inst, -1)
  acc_logit = _logits(config, nets.acceptor, params.acceptor,
                      accept_features(problem, placement, obs, load, weights, offered_inst),
                      ACCEPT_DELTA)
  arrived = exchange.inbox(problem, offered, target)
  if accept is None:
    accept = (acc_logit > 0 if greedy else
              jax.random.bernoulli(k2, jax.nn.sigmoid(acc_logit)))
  logp_acc = jnp.where(accept, jax.nn.log_sigmoid(acc_logit), jax.nn.log_sigmoid(-acc_logit))
  p_acc = jax.nn.sigmoid(acc_logit)
  ent_acc = -(p_acc * jax.nn.log_sigmoid(acc_logit) + (1 - p_acc) * jax.nn.log_sigmoid(-acc_logit))
  logp = logp + jnp.sum(jnp.where(arrived, logp_acc, 0.0), -1)
  entropy = entropy + jnp.sum(jnp.where(arrived, ent_acc, 0.0), -1)
  value = _apply(config, nets.critic, params.critic,
                 value_features(problem, placement, obs, load))
  decisions = exchange.Decisions(action=action, accept=accept & arrived, priority=acc_logit)
  return decisions, logp, entropy, value, obs


def neighbourhood_mean(problem, x):
  """(H,) mean of x over each host and its neighbours."""
  valid = problem.neighbours >= 0
  total = x + jnp.sum(jnp.where(valid, x[jnp.maximum(problem.neighbours, 0)], 0.0), 1)
  return total / (1 + valid.sum(1))


def play_round(config, nets, params, problem, placement, load, weights, key, greedy=False,
               alive_offer=None, alive_commit=None):
  """One protocol round with the agents' decisions. Returns (placement', Step, Outcome)."""
  num_h = problem.num_hosts
  alive_offer = jnp.ones(num_h, bool) if alive_offer is None else alive_offer
  alive_commit = jnp.ones(num_h, bool) if alive_commit is None else alive_commit
  decisions, logp, _, value, obs = policy_outputs(config, nets, params, problem, placement,
                                                  load, weights, key=key, greedy=greedy)
  new, outcome = exchange.step(problem, placement, obs, decisions, alive_offer, alive_commit,
                               config.max_accepts)
  after = cluster.observe(problem, new, load)
  host_cost = (cluster.host_costs(problem, weights, after) +
               weights.migration * outcome.committed)
  if config.reward == "difference":  # what the round changed: the state's level cancels out
    host_cost = host_cost - cluster.host_costs(problem, weights, obs)
  reward = -(neighbourhood_mean(problem, host_cost) if config.reward_scope == "neighbourhood"
             else jnp.broadcast_to(jnp.mean(host_cost), host_cost.shape))
  step = Step(inventory=placement.inventory, load=load, action=decisions.action,
              accept=decisions.accept, logp=logp, value=value, reward=reward,
              cost=cluster.terms(weights, after).cost + weights.migration * jnp.sum(
                  outcome.committed), migrations=jnp.sum(outcome.committed))
  return new, step, outcome


def rollout(config, nets, params, weights, problem, placement, loads, key, greedy=False):
  """Plays len(loads) rounds; returns (final placement, Step stacked over rounds, last value)."""
  def body(placement, x):
    load, k = x
    new, step, _ = play_round(config, nets, params, problem, placement, load, weights, k, greedy)
    return new, step

  keys = jax.random.split(key, loads.shape[0])
  final, steps = jax.lax.scan(body, placement, (loads, keys))
  obs = cluster.observe(problem, final, loads[-1])
  last_value = _apply(config, nets.critic, params.critic,
                      value_features(problem, final, obs, loads[-1]))
  return final, steps, last_value


def advantages(config, steps: Step, last_value):
  """GAE over rounds (T, H)."""
  def body(carry, x):
    gae, next_value = carry
    reward, value = x
    delta = reward + config.discount * next_value - value
    gae = delta + config.discount * config.gae_lambda * gae
    return (gae, value), gae

  _, adv = jax.lax.scan(body, (jnp.zeros_like(last_value), last_value),
                        (steps.reward, steps.value), reverse=True)
  return adv, adv + steps.value


def ppo_loss(config, nets, params, weights, problem, steps: Step, adv, returns):
  """Clipped PPO loss over one env's rounds (recomputing features from the kept inventories)."""
  def one(step):
    placement = cluster.Placement(step.inventory)
    _, logp, entropy, value, _ = policy_outputs(config, nets, params, problem, placement,
                                                step.load, weights, action=step.action,
                                                accept=step.accept)
    return logp, entropy, value

  logp, entropy, value = jax.vmap(one)(steps)
  ratio = jnp.exp(logp - steps.logp)
  norm = (adv - adv.mean()) / (adv.std() + 1e-8)
  policy = -jnp.mean(jnp.minimum(ratio * norm,
                                 jnp.clip(ratio, 1 - config.clip, 1 + config.clip) * norm))
  value_loss = jnp.mean((value - returns) ** 2)
  return policy + config.value_coef * value_loss - config.entropy * jnp.mean(entropy)


class TrainState(NamedTuple):
  params: Networks
  opt_state: Any
  key: jax.Array


def make_train(config: AgentConfig, nets: Networks, weights: cluster.Weights):
  """(init, update): update(state, problems, placements, loads) -> (state, metrics) does one
  batch of rollouts (vmapped over the leading env axis) and `epochs` PPO epochs on it."""
  # The two prior scales are single numbers that must move by whole units, not the small steps
  # that suit the MLP weights: their own, larger learning rate.
  labels = lambda params: Networks(
      actor={"mlp": jax.tree.map(lambda _: "mlp", params.actor["mlp"]), "prior": "prior"},
      acceptor={"mlp": jax.tree.map(lambda _: "mlp", params.acceptor["mlp"]), "prior": "prior"},
      critic=jax.tree.map(lambda _: "mlp", params.critic))
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.multi_transform(
      {"mlp": optax.adam(config.learning_rate), "prior": optax.adam(config.prior_learning_rate)},
      labels))

  def init(params, key):
    return TrainState(params, optimizer.init(params), key)

  def update(state: TrainState, problems, placements, loads):
    num_env = loads.shape[0]
    key, k_roll, k_perm = jax.random.split(state.key, 3)
    roll = jax.vmap(functools.partial(rollout, config, nets, state.params, weights))
    _, steps, last_value = roll(problems, placements, loads, jax.random.split(k_roll, num_env))
    adv, returns = jax.vmap(functools.partial(advantages, config))(steps, last_value)

    def batch_loss(params, idx):
      pick = lambda t: jax.tree.map(lambda x: x[idx], t)
      losses = jax.vmap(functools.partial(ppo_loss, config, nets, params, weights))(
          pick(problems), pick(steps), adv[idx], returns[idx])
      return losses.mean()

    def epoch(carry, k):
      params, opt_state = carry
      perm = jax.random.permutation(k, num_env).reshape(config.minibatches, -1)

      def minibatch(carry, idx):
        params, opt_state = carry
        grads = jax.grad(batch_loss)(params, idx)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

      return jax.lax.scan(minibatch, (params, opt_state), perm)[0], None

    (params, opt_state), _ = jax.lax.scan(epoch, (state.params, state.opt_state),
                                          jax.random.split(k_perm, config.epochs))
    metrics = {"final_cost": steps.cost[:, -1].mean(), "mean_cost": steps.cost.mean(),
               "migrations": steps.migrations.sum(1).mean(), "reward": steps.reward.mean()}
    return TrainState(params, opt_state, key), metrics

  return init, update


def stack(trees):
  """One pytree with a leading axis over a list of equally shaped pytrees (envs)."""
  return jax.tree.map(lambda *x: jnp.stack(x), *trees)


def params_count(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
