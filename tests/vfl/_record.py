"""Recording a whole in-process run of the VFL protocol: every message each party receives and
both parties' states after every batch (the leak tests read it)."""

from __future__ import annotations

import dataclasses

from research.vfl import parties
from research.vfl import session


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
