"""The split network and its clear-text math, as pure jax functions.

    passive party:  a = bottom_p(x_p)                                  (B, d_a)
    active party:   b = bottom_a(x_a)                                  (B, d_b)
    interaction:    z = a W_p + b W_a + c,  h = relu(z)                (B, h)
    top (active):   logit = top(h),  loss = mean sigmoid cross-entropy with the labels

W_p is the interaction weight on the passive party's output. In the encrypted protocol it exists
only as a sum of two shares, W_p = W' + e_acc (W' held by the active party, e_acc by the passive
one); everything that touches it goes through `research.vfl.parties`. Everything else is here:
forward functions, gradients by `jax.value_and_grad` / `jax.vjp`, and the optimizers. The
interaction weight W_p is trained with plain SGD (`optax.sgd`): the protocol's noise trick (the
passive party adds rho / lr to the gradient and rho to e_acc) cancels only for an update that is
linear in the gradient. Bottoms, W_a, c and the top use Adam.

Three ways to train the same network, all built from these functions and sharing one initial
state (`init`): the encrypted split protocol, the plaintext split protocol (a and d W_p^T cross
in the clear), and centralized training on all features.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.fedavg import model as mlp_lib

Params = Any


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
  passive_features: int
  active_features: int
  bottom_hidden: int = 16
  passive_out: int = 4       # d_a: what the passive party encrypts per sample
  active_out: int = 4        # d_b
  interaction_out: int = 4   # h
  top_hidden: int = 8

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"network.{field.name}={value!r}: expected a positive int")


class Network(NamedTuple):
  """The pure functions of one network spec (static; closes over nnx graph definitions)."""
  bottom_passive: Callable[[Params, jax.Array], jax.Array]
  bottom_active: Callable[[Params, jax.Array], jax.Array]
  top: Callable[[Params, jax.Array], jax.Array]


class InitialState(NamedTuple):
  passive_bottom: Params
  active: dict          # bottom, w_own, bias, top
  w_passive: np.ndarray  # (d_a, h) float32: the initial W_p


def build(spec: NetworkSpec, seed: int) -> tuple[Network, InitialState]:
  keys = jax.random.split(jax.random.key(seed), 2)
  bottom_p, params_p = mlp_lib.mlp((spec.passive_features, spec.bottom_hidden, spec.passive_out),
                                   seed=seed * 4 + 1)
  bottom_a, params_a = mlp_lib.mlp((spec.active_features, spec.bottom_hidden, spec.active_out),
                                   seed=seed * 4 + 2)
  top, params_top = mlp_lib.mlp((spec.interaction_out, spec.top_hidden, 1), seed=seed * 4 + 3)
  fan_in = spec.passive_out + spec.active_out
  init = jax.nn.initializers.lecun_normal()
  w_passive = np.asarray(init(keys[0], (spec.passive_out, spec.interaction_out)) *
                         np.sqrt(spec.passive_out / fan_in), dtype=np.float32)
  w_own = init(keys[1], (spec.active_out, spec.interaction_out)) * np.sqrt(spec.active_out / fan_in)
  active = {"bottom": params_a, "w_own": w_own,
            "bias": jnp.zeros((spec.interaction_out,), jnp.float32), "top": params_top}
  return Network(bottom_p, bottom_a, top), InitialState(params_p, active, w_passive)


def draw_w_passive(spec: NetworkSpec, rng: np.random.Generator) -> np.ndarray:
  """An initial W_p from `build`'s distribution (LeCun normal: a normal truncated to two
  standard deviations, rescaled to variance 1 / fan_in, times sqrt(passive_out / fan_in)),
  drawn from a numpy generator: what the active party uses for its private share W'_0 when the
  generator's seed is a secret of more bits than a jax key holds (32)."""
  shape = (spec.passive_out, spec.interaction_out)
  z = rng.standard_normal(shape)
  outside = np.abs(z) > 2
  while outside.any():  # truncation by redrawing the entries outside [-2, 2]
    z[outside] = rng.standard_normal(int(outside.sum()))
    outside = np.abs(z) > 2
  # 0.8796...: the standard deviation of a unit normal truncated to [-2, 2] (jax's constant)
  std = np.sqrt(1.0 / spec.passive_out) / .87962566103423978
  fan_in = spec.passive_out + spec.active_out
  return (z * std * np.sqrt(spec.passive_out / fan_in)).astype(np.float32)


# --- the active party's side: everything after the passive term z_p = a W_p ------------------


def active_logits(net: Network, active: dict, z_passive: jax.Array, x_active: jax.Array):
  b = net.bottom_active(active["bottom"], x_active)
  hidden = jax.nn.relu(z_passive + b @ active["w_own"] + active["bias"])
  return net.top(active["top"], hidden)[:, 0]


def loss_from_logits(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype)).mean()


def active_step(net: Network, active: dict, z_passive, x_active, labels):
  """(loss, logits), d loss / d active params, d = d loss / d z_passive."""
  def loss_fn(active, z_passive):
    logits = active_logits(net, active, z_passive, x_active)
    return loss_from_logits(logits, labels), logits
  (loss, logits), (grads, d) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
      active, z_passive)
  return loss, logits, grads, d


def plain_active_step(net: Network, active: dict, w_passive, a, x_active, labels):
  """The plaintext split protocol's active step: also d loss / d W_p and d loss / d a."""
  def loss_fn(active, w_passive, a):
    logits = active_logits(net, active, a @ w_passive, x_active)
    return loss_from_logits(logits, labels), logits
  (loss, logits), (grads, grad_w, grad_a) = jax.value_and_grad(
      loss_fn, argnums=(0, 1, 2), has_aux=True)(active, w_passive, a)
  return loss, logits, grads, grad_w, grad_a


def passive_grads(net: Network, params, x_passive, grad_a):
  """d loss / d bottom_p params, from the gradient w.r.t. its output (a vjp)."""
  _, vjp = jax.vjp(lambda p: net.bottom_passive(p, x_passive), params)
  return vjp(grad_a)[0]


def centralized_step(net: Network, params: dict, x_passive, x_active, labels):
  """Centralized training of the same network: params = {passive_bottom, active, w_passive}."""
  def loss_fn(params):
    a = net.bottom_passive(params["passive_bottom"], x_passive)
    logits = active_logits(net, params["active"], a @ params["w_passive"], x_active)
    return loss_from_logits(logits, labels), logits
  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, logits, grads


def centralized_logits(net: Network, params: dict, x_passive, x_active):
  a = net.bottom_passive(params["passive_bottom"], x_passive)
  return active_logits(net, params["active"], a @ params["w_passive"], x_active)


# --- optimizers ----------------------------------------------------------------------------------


class Optimizers(NamedTuple):
  dense: optax.GradientTransformation        # bottoms, W_a, c, top
  interaction: optax.GradientTransformation  # W_p: plain SGD (see the module docstring)
  interaction_lr: float


def optimizers(learning_rate: float, interaction_learning_rate: float) -> Optimizers:
  return Optimizers(optax.adam(learning_rate), optax.sgd(interaction_learning_rate),
                    interaction_learning_rate)


def apply_updates(optimizer: optax.GradientTransformation, params, opt_state, grads):
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state
