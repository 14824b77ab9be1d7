"""Driving the VFL parties in process for tests: a whole run recorded (every message each party
receives and both states after every batch: the leak tests read it), both parties at the start
of a batch, and one batch with every answer of the active party given twice."""

from __future__ import annotations

import dataclasses

import numpy as np

from research.vfl import he
from research.vfl import messages as msg
from research.vfl import parties
from research.vfl import session

ENGINE = he.Engine()


def run(protocol, passive, active, jit, batches, **kwargs):
  return session.run_in_process(protocol, passive, active, jit=jit, batches=batches, **kwargs)


@dataclasses.dataclass
class Recording:
  protocol: parties.Protocol
  start: tuple
  received: list           # (receiver, message), in order
  passive_states: list     # before batch k: index k (k = 0 .. number of batches)
  active_states: list

  def of(self, receiver: str, kind: str) -> list:
    return [m for r, m in self.received if r == receiver and m.KIND == kind]

  def batch_index(self, message) -> int:
    return [b.where for b in self.protocol.schedule].index(message.where)


def record(protocol: parties.Protocol, start: tuple, jit: parties.Jitted) -> Recording:
  """Runs the whole schedule in process from `start`, recording every message each party
  receives and both states after every batch."""
  out = Recording(protocol, start, [], [start[0]], [start[1]])

  def after_batch(batch, passive, active):
    out.passive_states.append(passive)
    out.active_states.append(active)

  session.run_in_process(protocol, *start, jit=jit, batches=None,
                         observe=lambda receiver, message, size: out.received.append(
                             (receiver, message)), after_batch=after_batch)
  return out


def decrypt(private_key, ints: np.ndarray) -> np.ndarray:
  return ENGINE.decrypt(private_key, he.from_ciphertext_ints(private_key.public_key, ints, "t"))


@dataclasses.dataclass
class Begun:
  """Both parties at the start of train batch 0: the active one has the public key, the passive
  one has just sent [a]."""
  protocol: parties.Protocol
  passive: parties.PassiveState
  active: parties.ActiveState
  activations: msg.Message  # EncryptedActivations, or PackedActivations when packed


def begin(protocol, jit, passive, active) -> Begun:
  (key_message,) = parties.passive_setup(passive)
  active, outbox = parties.active_handle(protocol, jit, ENGINE, active, key_message)
  assert outbox == [] and active.expect == "begin"
  passive, (activations,) = parties.passive_begin(protocol, jit, ENGINE, passive)
  return Begun(protocol, passive, active, activations)


def answer_each_twice(b: Begun, jit) -> list[msg.Message]:
  """Drives batch 0 to its end from `b`, the active party answering each of its three messages
  twice from the same state: the two answers must differ in every ciphertext and decrypt to the
  same values (each is re-randomized). Returns the first answers, in order."""
  private_key = b.passive.private_key

  def twice(state, message):
    (first_state, (first,)), (_, (second,)) = [
        parties.active_handle(b.protocol, jit, ENGINE, state, message) for _ in range(2)]
    assert not np.any(first.ciphertexts == second.ciphertexts), first.KIND
    np.testing.assert_array_equal(decrypt(private_key, first.ciphertexts),
                                  decrypt(private_key, second.ciphertexts))
    return first_state, first

  active, products = twice(b.active, b.activations)
  passive, (revealed,) = parties.passive_handle(b.protocol, jit, ENGINE, b.passive, products)
  active, gradient = twice(active, revealed)
  passive, (noisy,) = parties.passive_handle(b.protocol, jit, ENGINE, passive, gradient)
  active, input_gradient = twice(active, noisy)
  passive, outbox = parties.passive_handle(b.protocol, jit, ENGINE, passive, input_gradient)
  assert outbox == [] and passive.cursor == active.cursor == 1
  return [products, gradient, input_gradient]
