"""Drives the two parties' state machines over a schedule: in one process (messages routed
directly, each one encoded to bytes and decoded again so the wire format is always exercised),
or as one party over a byte `Transport` (gRPC between processes).

The drivers hold no protocol logic: they call `parties.passive_begin` at the start of every
batch and pass each decoded message to its receiver's `handle`, until the schedule is done.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable

from research.vfl import he
from research.vfl import messages as msg
from research.vfl import parties

Observer = Callable[[str, msg.Message, int], None]  # (receiver, message, bytes on the wire)


@dataclasses.dataclass
class Traffic:
  """Bytes and message counts per (sender, kind)."""
  bytes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  messages: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def add(self, sender: str, message: msg.Message, size: int) -> None:
    self.bytes[(sender, message.KIND)] += size
    self.messages[(sender, message.KIND)] += 1


def run_in_process(protocol: parties.Protocol, passive: parties.PassiveState,
                   active: parties.ActiveState, *, passive_engine: he.Engine = he.Engine(),
                   active_engine: he.Engine = he.Engine(), jit: parties.Jitted | None = None,
                   observe: Observer | None = None,
                   after_batch: Callable[[parties.Batch, parties.PassiveState,
                                          parties.ActiveState], None] | None = None,
                   batches: int | None = None):
  """Runs the schedule (or its next `batches` batches) with both parties in this process.
  Returns (passive, active, traffic)."""
  jit = jit or protocol.jitted()
  traffic = Traffic()
  queue: collections.deque = collections.deque()

  def post(sender: str, outbox: list[msg.Message]) -> None:
    for message in outbox:
      payload = msg.encode(message)
      traffic.add(sender, message, len(payload))
      queue.append(("active" if sender == "passive" else "passive", msg.decode(payload),
                    len(payload)))

  def drain() -> None:
    nonlocal passive, active
    while queue:
      receiver, message, size = queue.popleft()
      if observe is not None:
        observe(receiver, message, size)
      if receiver == "active":
        active, outbox = parties.active_handle(protocol, jit, active_engine, active, message)
      else:
        passive, outbox = parties.passive_handle(protocol, jit, passive_engine, passive, message)
      post(receiver, outbox)

  if active.expect == "public_key":
    post("passive", parties.passive_setup(passive))
    drain()
  end = len(protocol.schedule) if batches is None else min(len(protocol.schedule),
                                                            passive.cursor + batches)
  while passive.cursor < end:
    batch = protocol.schedule[passive.cursor]
    passive, outbox = parties.passive_begin(protocol, jit, passive_engine, passive)
    post("passive", outbox)
    drain()
    if after_batch is not None:
      after_batch(batch, passive, active)
  return passive, active, traffic


def run_passive(protocol: parties.Protocol, state: parties.PassiveState, transport, *,
                engine: he.Engine = he.Engine(), timeout: float | None = 600.0,
                after_batch=None) -> parties.PassiveState:
  """The passive party's side over a byte transport (the peer runs `run_active`)."""
  jit = protocol.jitted()
  if state.public_key is not None:
    for message in parties.passive_setup(state):
      transport.send(msg.encode(message))
  while state.cursor < len(protocol.schedule):
    batch = protocol.schedule[state.cursor]
    state, outbox = parties.passive_begin(protocol, jit, engine, state)
    for message in outbox:
      transport.send(msg.encode(message))
    while state.expect != "begin":
      message = msg.decode(transport.recv(timeout))
      state, outbox = parties.passive_handle(protocol, jit, engine, state, message)
      for reply in outbox:
        transport.send(msg.encode(reply))
    if after_batch is not None:
      after_batch(batch, state)
  return state


def run_active(protocol: parties.Protocol, state: parties.ActiveState, transport, *,
               engine: he.Engine = he.Engine(), timeout: float | None = 600.0,
               observe: Observer | None = None, after_batch=None) -> parties.ActiveState:
  """The active party's side over a byte transport. `observe` sees every message of the
  session in both directions, as `run_in_process`'s does (receiver, message, bytes)."""
  jit = protocol.jitted()
  while state.cursor < len(protocol.schedule):
    cursor = state.cursor
    payload = transport.recv(timeout)
    message = msg.decode(payload)
    if observe is not None:
      observe("active", message, len(payload))
    state, outbox = parties.active_handle(protocol, jit, engine, state, message)
    for reply in outbox:
      data = msg.encode(reply)
      if observe is not None:
        observe("passive", reply, len(data))
      transport.send(data)
    if after_batch is not None and state.cursor > cursor:
      after_batch(protocol.schedule[cursor], state)
  return state
