"""The exchange protocol between neighbouring agents: offer, accept or reject, commit.

Every agent acts at once in a round (vectorized over hosts; each agent reads only its own
inventory, its instances' call partners and its neighbours' published load). One round:

1. Each agent picks one action (`Actions` encodes them as one index): keep; offer the instance
   in inventory slot m to neighbour k; scale the service of slot m up (a new replica on its own
   host) or down (remove that replica). Only a service's leader, the agent holding its lowest
   running instance id, may scale it, so two agents never scale one service in one round.
2. Each receiver looks at its inbox (at most one offer per neighbour), orders the offers by its
   own priority and accepts, in that order, those it wants and that fit: CPU and memory
   requests and inventory slots left after its own scale-up, and at most `max_accepts` of them
   (agents decide at once, so without a cap several senders can pile load on one receiver in
   one round). Conflicts (several senders, one receiver) are thus resolved by the receiver
   alone, with no arbiter; an instance is offered only by its holder, so it can never be
   accepted twice.
3. Commit: an accepted transfer happens only if sender and receiver are both alive at commit
   (`alive_commit`); otherwise it aborts and the instance stays with its sender. Ownership moves
   in one step (removed from the sender's inventory and added to the receiver's together), so an
   agent failing mid-exchange loses no instance and none is ever held twice.

Capacity is checked against the receiver's requests before the round (its own outgoing offer
is not counted as freed until committed), so no host's requests exceed its capacity after any
round, whatever the order the offers arrive in.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from research.placement import cluster


class Actions(NamedTuple):
  """The action space of one agent: index 0 keep; 1 + m*K + k offer slot m to neighbour k;
  1 + M*K + m scale slot m's service up; 1 + M*K + M + m scale it down."""

  slots: int  # M
  neighbours: int  # K

  @property
  def size(self) -> int:
    return 1 + self.slots * self.neighbours + 2 * self.slots

  @property
  def first_scale_up(self) -> int:
    return 1 + self.slots * self.neighbours

  @property
  def first_scale_down(self) -> int:
    return self.first_scale_up + self.slots

  def decode(self, action: jax.Array):
    """(is_offer, is_up, is_down, slot, neighbour slot) of action indices."""
    offer = (action >= 1) & (action < self.first_scale_up)
    up = (action >= self.first_scale_up) & (action < self.first_scale_down)
    down = action >= self.first_scale_down
    o = jnp.maximum(action - 1, 0)
    slot = jnp.where(offer, o // self.neighbours,
                     jnp.where(up, action - self.first_scale_up, action - self.first_scale_down))
    return offer, up, down, jnp.where(offer | up | down, slot, 0), jnp.where(
        offer, o % self.neighbours, 0)


def actions_of(problem: cluster.Problem, placement: cluster.Placement) -> Actions:
  return Actions(placement.inventory.shape[-1], problem.neighbours.shape[-1])


def leaders(problem: cluster.Problem, owner: jax.Array) -> jax.Array:
  """(S,) each service's leader instance id (its lowest running id), -1 if none runs."""
  num_s, num_r = problem.num_services, problem.max_replica_slots
  ids = jnp.where(owner >= 0, jnp.arange(num_s * num_r), num_s * num_r).reshape(num_s, num_r)
  lowest = ids.min(axis=1)
  return jnp.where(lowest < num_s * num_r, lowest, -1)


def action_mask(problem: cluster.Problem, placement: cluster.Placement, obs: cluster.Observed,
                allow_scale: bool) -> jax.Array:
  """(H, A) the actions each agent may take: offers only of an instance it holds, to a real
  neighbour whose free requests could take it; scaling only by the service's leader, within
  min/max replicas, a scale-up only where its own host has room."""
  inv = placement.inventory
  space = actions_of(problem, placement)
  num_r = problem.max_replica_slots
  held = inv >= 0
  inst = jnp.maximum(inv, 0)
  svc = inst // num_r
  cpu, mem = problem.svc_cpu_request[svc], problem.svc_mem_request[svc]  # (H, M)
  nbr = problem.neighbours
  nbr_free_cpu = (problem.host_cpu - obs.host_cpu_request)[jnp.maximum(nbr, 0)]  # (H, K)
  nbr_free_mem = (problem.host_mem - obs.host_mem_request)[jnp.maximum(nbr, 0)]
  nbr_free_slots = (space.slots - obs.host_count)[jnp.maximum(nbr, 0)]
  offer = (held[:, :, None] & (nbr >= 0)[:, None, :] & (nbr_free_slots > 0)[:, None, :] &
           (cpu[:, :, None] <= nbr_free_cpu[:, None, :] + 1e-6) &
           (mem[:, :, None] <= nbr_free_mem[:, None, :] + 1e-6))  # (H, M, K)
  leader = held & (leaders(problem, obs.owner)[svc] == inv)
  replicas = obs.replicas[svc]
  free_cpu = (problem.host_cpu - obs.host_cpu_request)[:, None]
  free_mem = (problem.host_mem - obs.host_mem_request)[:, None]
  up = (allow_scale & leader & (replicas < problem.svc_max_replicas[svc]) &
        (cpu <= free_cpu + 1e-6) & (mem <= free_mem + 1e-6) &
        (obs.host_count < space.slots)[:, None])
  down = allow_scale & leader & (replicas > problem.svc_min_replicas[svc])
  keep = jnp.ones((inv.shape[0], 1), bool)
  return jnp.concatenate([keep, offer.reshape(inv.shape[0], -1), up, down], axis=1)


class Decisions(NamedTuple):
  action: jax.Array  # (H,) i32 action index (see Actions)
  accept: jax.Array  # (H, K) bool: the receiver wants the offer from its k-th neighbour
  priority: jax.Array  # (H, K) f32: the receiver's order over its inbox (higher first)


class Outcome(NamedTuple):
  offered: jax.Array  # (H,) bool: the agent sent an offer
  target: jax.Array  # (H,) i32 receiver host (-1 if no offer)
  accepted: jax.Array  # (H,) bool: its offer was accepted
  committed: jax.Array  # (H,) bool: its instance moved
  scaled_up: jax.Array  # (H,) bool
  scaled_down: jax.Array  # (H,) bool
  inbox: jax.Array  # (H, K) bool: an offer from neighbour k reached the agent


def inbox(problem: cluster.Problem, offered: jax.Array, target: jax.Array) -> jax.Array:
  """(H, K) whether neighbour k of each host sent it an offer."""
  nbr = problem.neighbours
  sender = jnp.maximum(nbr, 0)
  hosts = jnp.arange(nbr.shape[0])[:, None]
  return (nbr >= 0) & offered[sender] & (target[sender] == hosts)


def offered_instance(problem: cluster.Problem, placement: cluster.Placement,
                     action: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(offered (H,), target host (H,), instance id (H,)) of the agents' actions."""
  space = actions_of(problem, placement)
  offer, _, _, slot, k = space.decode(action)
  hosts = jnp.arange(placement.inventory.shape[0])
  target = jnp.where(offer, problem.neighbours[hosts, k], -1)
  return offer & (target >= 0), target, placement.inventory[hosts, slot]


def step(problem: cluster.Problem, placement: cluster.Placement, obs: cluster.Observed,
         decisions: Decisions, alive_offer: jax.Array, alive_commit: jax.Array,
         max_accepts: int = 0) -> tuple[cluster.Placement, Outcome]:
  """One round of the protocol (module docstring). `obs` is `observe` of `placement`;
  `alive_offer` (H,) says who takes part (a dead agent sends and accepts nothing),
  `alive_commit` (H,) who is still alive when the accepted transfers commit; `max_accepts` > 0
  caps the offers one receiver accepts in a round (0: as many as fit). Actions outside
  `action_mask` are the caller's error: offers are still rechecked by the receiver."""
  inv = placement.inventory
  num_h, num_m = inv.shape
  num_r = problem.max_replica_slots
  space = actions_of(problem, placement)
  hosts = jnp.arange(num_h)
  _, up, down, slot, _ = space.decode(decisions.action)
  offered, target, instance = offered_instance(problem, placement, decisions.action)
  offered = offered & alive_offer & (instance >= 0)
  target = jnp.where(offered, target, -1)
  up, down = up & alive_offer & (instance >= 0), down & alive_offer & (instance >= 0)
  svc = jnp.maximum(instance, 0) // num_r

  # scale-up: the leader adds the lowest free replica slot of its service on its own host
  free_ids = (obs.owner < 0).reshape(problem.num_services, num_r) & problem.svc_slot_open
  next_id = jnp.where(free_ids.any(axis=1), jnp.arange(problem.num_services) * num_r +
                      jnp.argmax(free_ids, axis=1), -1)
  new_id = next_id[svc]
  leader = leaders(problem, obs.owner)[svc] == instance  # enforced here, not only in the mask
  up = up & leader & (obs.replicas[svc] < problem.svc_max_replicas[svc])
  down = down & leader & (obs.replicas[svc] > problem.svc_min_replicas[svc])
  up = (up & (new_id >= 0) & (obs.host_count < num_m) &
        (problem.svc_cpu_request[svc] <= problem.host_cpu - obs.host_cpu_request + 1e-6) &
        (problem.svc_mem_request[svc] <= problem.host_mem - obs.host_mem_request + 1e-6))

  # receivers: each orders its inbox by its own priority and accepts what fits
  arrived = inbox(problem, offered, target) & alive_offer[:, None]  # (H, K)
  sender = jnp.maximum(problem.neighbours, 0)
  in_inst = jnp.maximum(instance[sender], 0)  # (H, K)
  in_cpu = problem.svc_cpu_request[in_inst // num_r]
  in_mem = problem.svc_mem_request[in_inst // num_r]
  up_cpu = jnp.where(up, problem.svc_cpu_request[svc], 0.0)
  up_mem = jnp.where(up, problem.svc_mem_request[svc], 0.0)
  free_cpu = problem.host_cpu - obs.host_cpu_request - up_cpu
  free_mem = problem.host_mem - obs.host_mem_request - up_mem
  free_slots = num_m - obs.host_count - up.astype(jnp.int32)
  if max_accepts > 0:  # the cap is one more bound on what the receiver can take this round
    free_slots = jnp.minimum(free_slots, max_accepts)
  order = jnp.argsort(-jnp.where(arrived, decisions.priority, -jnp.inf), axis=1, stable=True)
  wants = arrived & decisions.accept

  def take(carry, k):
    cpu, mem, slots = carry
    j = order[:, k]
    ok = (wants[hosts, j] & (in_cpu[hosts, j] <= cpu + 1e-6) & (in_mem[hosts, j] <= mem + 1e-6)
          & (slots > 0))
    return ((cpu - jnp.where(ok, in_cpu[hosts, j], 0.0),
             mem - jnp.where(ok, in_mem[hosts, j], 0.0), slots - ok.astype(jnp.int32)),
            (j, ok))

  _, (js, oks) = jax.lax.scan(take, (free_cpu, free_mem, free_slots),
                              jnp.arange(problem.neighbours.shape[1]))
  accepted_in = jnp.zeros_like(arrived).at[hosts[None, :], js].set(oks)  # (H, K)

  # the sender learns whether its offer was accepted: find itself in the receiver's inbox
  tgt = jnp.maximum(target, 0)
  back = problem.neighbours[tgt] == hosts[:, None]  # (H, K): slot of the sender at its target
  accepted = offered & jnp.any(back & accepted_in[tgt], axis=1)

  # commit: both ends alive, or the transfer aborts and the instance stays with the sender
  committed = accepted & alive_commit & alive_commit[tgt]
  committed_in = accepted_in & alive_commit[:, None] & alive_commit[sender]
  up = up & alive_commit
  down = down & alive_commit

  # new inventories: a receiver fills its free slots, first its scale-up, then the transfers
  free_order = jnp.argsort(inv >= 0, axis=1, stable=True)  # free slots first, in order
  rank = jnp.cumsum(committed_in, axis=1) - 1 + up.astype(jnp.int32)[:, None]
  put_slot = free_order[hosts[:, None], jnp.clip(rank, 0, num_m - 1)]
  new_inv = inv.at[hosts[:, None], jnp.where(committed_in, put_slot, num_m)].set(
      in_inst, mode="drop")
  new_inv = new_inv.at[hosts, jnp.where(up, free_order[:, 0], num_m)].set(new_id, mode="drop")
  new_inv = new_inv.at[hosts, jnp.where(committed | down, slot, num_m)].set(-1, mode="drop")
  outcome = Outcome(offered=offered, target=target, accepted=accepted, committed=committed,
                    scaled_up=up, scaled_down=down, inbox=arrived)
  return cluster.Placement(new_inv), outcome
