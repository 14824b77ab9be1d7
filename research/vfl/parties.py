"""The two parties as state machines: `handle(state, message) -> (state, outbox)`.

Encrypted interaction layer (a re-derivation of FATE 1.x Hetero-NN's interactive layer; no code
copied). The passive party P owns the Paillier key pair and e_acc (d_a x h); the active party A
owns W' (d_a x h); the true passive-side interaction weight is W_p = W' + e_acc and neither party
ever holds it. Per batch, with P's bottom output a (B x d_a) and [.] for encryption under P's key:

  forward   P: [a]                          -> A
            A: [a W' + eps]   (eps: A's one-time mask)        -> P
            P: a W' + eps + a e_acc          -> A
            A: z_p = (that) - eps = a (W' + e_acc) = a W_p
  backward  A: from the top loss, d = dL/dz_p; [a^T d + delta]  -> P
            P: a^T d + delta + rho / lr, and [e_acc] (before adding rho)  -> A;  e_acc += rho
            A: [d (W' + e_acc)^T] = d [W_p]^T  -> P;   W' -= lr (a^T d + rho / lr)
            P: decrypts d W_p^T = dL/da, back-propagates through its bottom model.

After the step W' + e_acc = W_p - lr a^T d: plain SGD on W_p, whatever rho was (exactly, up to
one fixed-point rounding per share). A sees only ciphertexts under P's key, masked sums and
gradients blurred by rho; P sees only values masked by eps / delta and its own gradient dL/da.
All integers are at the fixed-point scales of `he.FixedPoint`; masks are removed exactly, so
results do not depend on their values. Every ciphertext A returns to P is re-randomized first.

Bad input (a message for another step, a ciphertext under another key, a batch of the wrong size
or with other IDs, a fixed-point overflow) raises `ProtocolError` (or `he.FixedPointOverflow`)
before any state is replaced: states are immutable, a handler returns a new one.

Packed (`Protocol.packing`, the experiments' default): the same protocol with K fixed-point
values per Paillier plaintext (`he.Slots`: as many slots of the widest sum as the key holds).
P sends [a] twice packed: over K samples per (group, column), for [a] W' (the same W' for every
sample), and S = K // d_a samples' d_a values per plaintext (slot group s for sample g S + s),
for the backward sums, whose multipliers d[b, j] differ between samples: A multiplies the
plaintexts by d[g S + s, j] once per slot group s, and keeps group s of that sum; [e_acc] travels
as S x h ciphertexts, column j in slot group s. A's answers are then (G, h), (S, h) and
(ceil(B / S),) ciphertexts instead of (B, h), (d_a, h) and (B, d_a); each kept slot carries what
the unpacked ciphertext carried, every other slot is masked too, so both parties end on the
same states bit for bit.

The plaintext split protocol (`Plain*`) is the same network with a and d W_p^T crossing in the
clear and W_p held by the active party: the comparison without encryption.
"""

from __future__ import annotations

import dataclasses
import fractions
import hashlib
from typing import Any, Callable, Sequence

import jax
import numpy as np

from research.vfl import he
from research.vfl import messages as msg
from research.vfl import model as model_lib


class ProtocolError(ValueError):
  """A message that does not fit the receiving party's state."""


# --- the shared schedule -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Batch:
  phase: str            # "train" or "eval"
  round: int            # epoch, from 1
  step: int             # batch index within the phase of that round
  rows: tuple[int, ...]  # indices into the aligned samples

  @property
  def where(self) -> tuple[str, int, int]:
    return (self.phase, self.round, self.step)


def split_rows(num_aligned: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Train and test rows of the aligned samples; both parties compute the same from the seed."""
  if not 0 < test_fraction < 1:
    raise ValueError(f"test_fraction={test_fraction}: expected 0 < value < 1")
  order = np.random.default_rng([seed, 7]).permutation(num_aligned)
  num_test = max(1, int(round(test_fraction * num_aligned)))
  return np.sort(order[num_test:]), np.sort(order[:num_test])


def schedule(train_rows: np.ndarray, test_rows: np.ndarray, *, epochs: int, batch_size: int,
             seed: int, eval_every: int = 1, max_train_batches: int = 0,
             max_eval_batches: int = 0) -> tuple[Batch, ...]:
  """Every batch of a run, in order: each round's shuffled train batches, then (every
  `eval_every` rounds and after the last) the test batches. `max_train_batches` /
  `max_eval_batches` > 0 cut each round's train / test batches (benchmarks)."""
  batches: list[Batch] = []
  for round_ in range(1, epochs + 1):
    order = np.random.default_rng([seed, round_]).permutation(train_rows)
    starts = list(range(0, len(order), batch_size))
    if max_train_batches > 0:
      starts = starts[:max_train_batches]
    batches += [Batch("train", round_, i, tuple(int(r) for r in order[s:s + batch_size]))
                for i, s in enumerate(starts)]
    if round_ % eval_every == 0 or round_ == epochs:
      starts = list(range(0, len(test_rows), batch_size))
      if max_eval_batches > 0:
        starts = starts[:max_eval_batches]
      batches += [Batch("eval", round_, i, tuple(int(r) for r in test_rows[s:s + batch_size]))
                  for i, s in enumerate(starts)]
  return tuple(batches)


def batch_digest(ids: Sequence[Any], rows: Sequence[int]) -> str:
  """What both parties can compare to know they hold the same samples in the same order."""
  text = "\x1f".join(repr(ids[r]) for r in rows)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- static settings of a session ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Protocol:
  """What both parties agree on before training (not secret, not state)."""
  spec: model_lib.NetworkSpec
  network: model_lib.Network
  optimizers: model_lib.Optimizers
  schedule: tuple[Batch, ...]
  codec: he.FixedPoint = he.FixedPoint()
  mask_bits: int = 128      # one-time masks eps, delta: uniform in [0, 2**mask_bits)
  noise_scale: float = 0.1  # std of each rho entry (weight units); 0 turns the noise off
  packing: bool = False     # K fixed-point values per Paillier plaintext (`he.Slots`)

  def jitted(self) -> "Jitted":
    net = self.network
    return Jitted(
        bottom_passive=jax.jit(net.bottom_passive),
        passive_grads=jax.jit(lambda p, x, g: model_lib.passive_grads(net, p, x, g)),
        active_step=jax.jit(lambda p, z, x, y: model_lib.active_step(net, p, z, x, y)),
        active_logits=jax.jit(lambda p, z, x: model_lib.active_logits(net, p, z, x)),
        plain_active_step=jax.jit(
            lambda p, w, a, x, y: model_lib.plain_active_step(net, p, w, a, x, y)),
        dense_update=jax.jit(lambda p, s, g: model_lib.apply_updates(self.optimizers.dense, p, s,
                                                                    g)),
        interaction_update=jax.jit(lambda p, s, g: model_lib.apply_updates(
            self.optimizers.interaction, p, s, g)))


@dataclasses.dataclass(frozen=True)
class Jitted:
  bottom_passive: Callable
  passive_grads: Callable
  active_step: Callable
  active_logits: Callable
  plain_active_step: Callable
  dense_update: Callable
  interaction_update: Callable


# --- party states --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PassiveState:
  ids: tuple                # aligned sample IDs
  x: np.ndarray             # (num_aligned, passive_features) float32
  params: Any               # bottom model
  opt_state: Any
  private_key: he.PrivateKey | None
  public_key: he.PublicKey | None
  e_acc: np.ndarray | None  # (d_a, h) ints, scale 1: the accumulated noise, this party's share
  noise_seed: int           # private: rho for (round, step) comes from it
  cursor: int = 0           # index of the batch in progress in the schedule
  expect: str = "begin"     # the next event
  a_ints: np.ndarray | None = None  # this batch's encoded bottom output (scale 1)


@dataclasses.dataclass(frozen=True)
class ActiveState:
  ids: tuple
  x: np.ndarray             # (num_aligned, active_features) float32
  labels: np.ndarray        # (num_aligned,) int
  params: dict              # bottom, w_own, bias, top
  opt_state: Any
  public_key: he.PublicKey | None  # the passive party's
  w_share: np.ndarray | None  # (d_a, h) ints, scale 1: W', this party's share of W_p
  cursor: int = 0
  expect: str = "public_key"
  # this batch's secrets: [a], the masks eps / delta, d at scale 1
  a_cipher: np.ndarray | None = None
  mask: np.ndarray | None = None
  d_ints: np.ndarray | None = None
  # what the active party keeps as results: (round, step, loss) and (round, rows, logits)
  losses: tuple = ()
  eval_logits: tuple = ()


def initial_passive(protocol: Protocol, init: model_lib.InitialState, *, ids, x,
                    key_bits: int | None, noise_seed: int) -> PassiveState:
  """The passive party's starting state. Encrypted (key_bits set): it generates its Paillier
  key pair and draws its share e_acc_0 ~ N(0, noise_scale^2) from its private seed."""
  dense = protocol.optimizers.dense
  state = PassiveState(tuple(ids), np.asarray(x, np.float32), init.passive_bottom,
                       dense.init(init.passive_bottom), None, None, None, noise_seed)
  if key_bits is None:
    return state
  public_key, private_key = he.generate_keypair(key_bits)
  check_key(protocol, public_key)
  return dataclasses.replace(state, private_key=private_key, public_key=public_key,
                             e_acc=initial_e_acc(protocol, init, noise_seed))


def initial_active(protocol: Protocol, init: model_lib.InitialState, *, ids, x, labels,
                   encrypted: bool) -> ActiveState:
  """The active party's starting state. Encrypted: its share W'_0 is the network's initial W_p
  draw and it waits for the passive party's public key; the true initial weight W'_0 + e_acc_0
  is known to neither party (`effective_w_passive` forms it for observers). Plaintext: it holds
  init.w_passive as W_p in the clear."""
  dense = protocol.optimizers.dense
  x, labels = np.asarray(x, np.float32), np.asarray(labels)
  if not encrypted:
    params = dict(init.active, w_passive=jax.numpy.asarray(init.w_passive))
    return ActiveState(tuple(ids), x, labels, params,
                       {"dense": dense.init(init.active),
                        "interaction": protocol.optimizers.interaction.init(params["w_passive"])},
                       None, None, expect="begin")
  return ActiveState(tuple(ids), x, labels, dict(init.active), dense.init(init.active), None,
                     initial_share(protocol, init))


def initial_states(protocol: Protocol, init: model_lib.InitialState, *, passive_ids, passive_x,
                   active_ids, active_x, labels, key_bits: int | None,
                   noise_seed: int) -> tuple[PassiveState, ActiveState]:
  """Both parties' starting states (`initial_passive`, `initial_active`); key_bits None: the
  plaintext split protocol."""
  return (initial_passive(protocol, init, ids=passive_ids, x=passive_x, key_bits=key_bits,
                          noise_seed=noise_seed),
          initial_active(protocol, init, ids=active_ids, x=active_x, labels=labels,
                         encrypted=key_bits is not None))


def initial_share(protocol: Protocol, init: model_lib.InitialState) -> np.ndarray:
  """W'_0, the active party's share (scale 1): the network's initial W_p draw."""
  return protocol.codec.encode(np.asarray(init.w_passive, np.float64), "initial share W'")


def initial_e_acc(protocol: Protocol, init: model_lib.InitialState, noise_seed: int) -> np.ndarray:
  """e_acc_0, the passive party's share (scale 1): N(0, noise_scale^2) from its private seed."""
  return protocol.codec.encode(_noise(noise_seed, 0, 0, init.w_passive.shape,
                                      protocol.noise_scale), "initial noise e_acc")


def initial_w_passive(protocol: Protocol, init: model_lib.InitialState,
                      noise_seed: int) -> np.ndarray:
  """W'_0 + e_acc_0, the true initial W_p that neither party holds (for observers: the
  experiment starts its plaintext comparisons from it)."""
  return protocol.codec.decode(initial_share(protocol, init) +
                               initial_e_acc(protocol, init, noise_seed)).astype(np.float32)


def _noise(seed: int, round_: int, step: int, shape, scale: float) -> np.ndarray:
  if scale == 0:
    return np.zeros(shape)
  return np.random.default_rng([seed, round_, step]).normal(0.0, scale, size=shape)


def interaction_terms(protocol: Protocol) -> int:
  """The most scale-2 products in one sum of the protocol: a W' + a e_acc (2 d_a products),
  a^T d (B products) plus rho / lr (up to 1 / lr products' worth), d W_p^T (h products)."""
  batch_rows = max(len(b.rows) for b in protocol.schedule)
  return (2 * protocol.spec.passive_out + batch_rows + protocol.spec.interaction_out +
          int(np.ceil(1 / protocol.optimizers.interaction_lr)))


def check_key(protocol: Protocol, public_key: he.PublicKey) -> None:
  """The key holds every sum of the protocol and, packed, at least two slots and a sample's d_a
  values per plaintext; else `he.FixedPointOverflow` naming what to change."""
  he.check_capacity(public_key, protocol.codec, interaction_terms(protocol), protocol.mask_bits)
  if protocol.packing:
    slots = packing_slots(protocol, public_key)
    if slots.count < max(2, protocol.spec.passive_out):
      raise he.FixedPointOverflow(
          f"he.packing: a {public_key.n.bit_length()}-bit key holds {slots.count} slot(s) of "
          f"{slots.width} bits, packing needs at least max(2, d_a = {protocol.spec.passive_out});"
          " use a larger key, smaller ranges or he.packing=False")


def packing_slots(protocol: Protocol, public_key: he.PublicKey) -> he.Slots:
  return he.slots_for(public_key, protocol.codec, interaction_terms(protocol), protocol.mask_bits)


def _pack_by_group(ints: np.ndarray, slots: he.Slots) -> np.ndarray:
  """(B, m) -> (G, m): slot k of row g holds row g K + k (the last group padded with zeros)."""
  padded = _padded_rows(ints, slots.count)
  return he.pack(padded.reshape(-1, slots.count, ints.shape[1]).transpose(0, 2, 1), slots)


def _unpack_by_group(ints: np.ndarray, slots: he.Slots, rows: int, field: str) -> np.ndarray:
  """The inverse of `_pack_by_group`: (G, m) -> (B, m)."""
  groups, cols = ints.shape
  values = he.unpack(ints, slots, slots.count, field)  # (G, m, K)
  return values.transpose(0, 2, 1).reshape(groups * slots.count, cols)[:rows]


def samples_per_plaintext(slots: he.Slots, d_a: int) -> int:
  """S: how many samples' d_a values share a plaintext in the backward sums."""
  return slots.count // d_a


def _weight_cipher_shape(slots: he.Slots | None, d_a: int, h: int) -> tuple[int, int]:
  """The ciphertexts of a (d_a, h) weight-sized value ([a^T d + delta], [e_acc]): (d_a, h)
  unpacked, (S, h) packed (column j in slot group s of entry (s, j))."""
  return (samples_per_plaintext(slots, d_a), h) if slots else (d_a, h)


def _padded_rows(ints: np.ndarray, multiple: int) -> np.ndarray:
  rows = ints.shape[0]
  padded = np.zeros((-(-rows // multiple) * multiple,) + ints.shape[1:], dtype=object)
  padded[:rows] = ints
  return padded


def _pack_samples(ints: np.ndarray, slots: he.Slots) -> np.ndarray:
  """(B, d_a) -> (ceil(B / S),): slots s d_a .. s d_a + d_a - 1 of entry g hold row g S + s."""
  d_a = ints.shape[1]
  per = samples_per_plaintext(slots, d_a)
  return he.pack(_padded_rows(ints, per).reshape(-1, per * d_a), slots)


def _unpack_samples(ints: np.ndarray, slots: he.Slots, rows: int, d_a: int,
                    field: str) -> np.ndarray:
  """The inverse of `_pack_samples`: (ceil(B / S),) -> (B, d_a)."""
  per = samples_per_plaintext(slots, d_a)
  return he.unpack(ints, slots, per * d_a, field).reshape(-1, d_a)[:rows]


def _pack_columns_per_sample_slot(matrix: np.ndarray, slots: he.Slots) -> np.ndarray:
  """(d_a, h) -> (S, h): entry (s, j) holds column j in sample slot group s, zeros elsewhere
  (multiplied by d[g S + s, j] and summed, it gives sample g S + s's row in group s)."""
  d_a, h = matrix.shape
  per = samples_per_plaintext(slots, d_a)
  values = np.zeros((per, h, per * d_a), dtype=object)
  for s in range(per):
    values[s, :, s * d_a:(s + 1) * d_a] = matrix.T
  return he.pack(values, slots)


def _own_groups(values: np.ndarray, d_a: int) -> np.ndarray:
  """(S, h, S d_a) slot values -> (h, d_a): the sum over s of entry s's own slot group s."""
  return sum(values[s, :, s * d_a:(s + 1) * d_a] for s in range(values.shape[0]))


def effective_w_passive(protocol: Protocol, passive: PassiveState, active: ActiveState):
  """W' + e_acc: the true W_p, which only an observer holding both states can form (tests, and
  the experiment, to start the plaintext comparisons from the same weights)."""
  return protocol.codec.decode(active.w_share + passive.e_acc).astype(np.float32)


# --- the passive party -----------------------------------------------------------------------------


def _check(condition: bool, text: str) -> None:
  if not condition:
    raise ProtocolError(text)


def _check_where(state, message: msg.Message, protocol: Protocol, who: str) -> Batch:
  _check(state.cursor < len(protocol.schedule),
         f"{who}: got {message.KIND} at {message.where} after the schedule ended")
  batch = protocol.schedule[state.cursor]
  _check(message.where == batch.where,
         f"{who}: {message.KIND} is for (phase, round, step) = {message.where}, expected "
         f"{batch.where}")
  return batch


def _check_expect(state, message: msg.Message, who: str, expected: str) -> None:
  _check(state.expect == expected, f"{who}: got {message.KIND}, expected {state.expect}")


def _check_shape(array: np.ndarray, shape: tuple, field: str) -> None:
  _check(array.shape == shape, f"{field}: shape {array.shape}, expected {shape}")


def _check_key(key_id: str, public_key: he.PublicKey, field: str) -> None:
  _check(key_id == he.key_id(public_key),
         f"{field}: ciphertexts under key {key_id}, expected the passive party's key "
         f"{he.key_id(public_key)}")


def passive_setup(state: PassiveState) -> list[msg.Message]:
  return [msg.PublicKey("setup", 0, 0, np.array([state.public_key.n], dtype=object))]


def passive_begin(protocol: Protocol, jit: Jitted, engine: he.Engine,
                  state: PassiveState) -> tuple[PassiveState, list[msg.Message]]:
  """Starts the next batch of the schedule: encrypts (or, in plaintext mode, sends) a."""
  _check(state.expect == "begin", f"passive: cannot begin a batch while expecting {state.expect}")
  _check(state.cursor < len(protocol.schedule),
         f"passive: the schedule's {len(protocol.schedule)} batches are done; nothing to begin")
  batch = protocol.schedule[state.cursor]
  a = np.asarray(jit.bottom_passive(state.params, state.x[list(batch.rows)]), np.float64)
  digest = batch_digest(state.ids, batch.rows)
  if state.public_key is None:
    return (dataclasses.replace(state, expect="clear_input_gradient" if batch.phase == "train"
                                else "begin", cursor=state.cursor + (batch.phase == "eval")),
            [msg.ClearActivations(*batch.where, digest, a.astype(np.float32))])
  a_ints = protocol.codec.encode(a, "passive bottom output a")
  key = he.key_id(state.public_key)
  new = dataclasses.replace(state, expect="masked_products", a_ints=a_ints)
  if not protocol.packing:
    cipher = he.ciphertext_ints(engine.encrypt(state.public_key, a_ints))
    return new, [msg.EncryptedActivations(*batch.where, digest, key, cipher)]
  # Packed: over K samples for [a] W' (W' is the same for every sample), and S samples' d_a
  # values per plaintext for the backward sums, whose multipliers d[b, j] differ per sample.
  slots = packing_slots(protocol, state.public_key)
  by_group = _pack_by_group(a_ints, slots)
  by_sample = (_pack_samples(a_ints, slots) if batch.phase == "train"
               else np.zeros(0, dtype=object))
  cipher = he.ciphertext_ints(engine.encrypt(state.public_key,
                                             np.concatenate([by_group.reshape(-1), by_sample])))
  return new, [msg.PackedActivations(*batch.where, digest, key,
                                     cipher[:by_group.size].reshape(by_group.shape),
                                     cipher[by_group.size:])]


def _receive_ciphertexts(protocol: Protocol, state: PassiveState, message: msg.Message,
                         expected: str, field: str) -> tuple[Batch, he.Slots | None]:
  """The passive party's checks before it decrypts anything: the expected kind, the schedule's
  batch, its own key; and the slot layout when packed."""
  _check_expect(state, message, "passive", expected)
  batch = _check_where(state, message, protocol, "passive")
  _check_key(message.key_id, state.public_key, field)
  return batch, packing_slots(protocol, state.public_key) if protocol.packing else None


def passive_handle(protocol: Protocol, jit: Jitted, engine: he.Engine, state: PassiveState,
                   message: msg.Message) -> tuple[PassiveState, list[msg.Message]]:
  who = "passive"
  if isinstance(message, msg.ClearInputGradient):
    _check_expect(state, message, who, "clear_input_gradient")
    batch = _check_where(state, message, protocol, who)
    _check_shape(message.values, (len(batch.rows), protocol.spec.passive_out), "clear input gradient")
    return _passive_backward(protocol, jit, state, batch, message.values.astype(np.float32)), []
  _check(state.public_key is not None, f"{who}: got {message.KIND} in plaintext mode")
  if isinstance(message, msg.MaskedProducts):
    batch, slots = _receive_ciphertexts(protocol, state, message, "masked_products",
                                        "masked products")
    rows, h = len(batch.rows), state.e_acc.shape[1]
    _check_shape(message.ciphertexts, (-(-rows // slots.count), h) if slots else (rows, h),
                 "masked products")
    cipher = he.from_ciphertext_ints(state.public_key, message.ciphertexts, "masked products")
    products = engine.decrypt(state.private_key, cipher)
    if slots:
      products = _unpack_by_group(products, slots, rows, "masked products")
    revealed = products + state.a_ints.dot(state.e_acc)
    train = batch.phase == "train"
    new = dataclasses.replace(state, expect="masked_weight_gradient" if train else "begin",
                              cursor=state.cursor + (not train),
                              a_ints=state.a_ints if train else None)
    return new, [msg.RevealedProducts(*batch.where, revealed)]
  if isinstance(message, msg.MaskedWeightGradient):
    batch, slots = _receive_ciphertexts(protocol, state, message, "masked_weight_gradient",
                                        "masked weight gradient")
    d_a, h = state.e_acc.shape
    _check_shape(message.ciphertexts, _weight_cipher_shape(slots, d_a, h),
                 "masked weight gradient")
    cipher = he.from_ciphertext_ints(state.public_key, message.ciphertexts, "masked weight gradient")
    codec = protocol.codec
    rho = codec.encode(_noise(state.noise_seed, batch.round, batch.step + 1, state.e_acc.shape,
                              protocol.noise_scale), "noise rho")
    # rho / lr at scale 2: the active party's update lr * (.) / 2**frac_bits then moves W' by rho.
    rho_over_lr = he.scale_round(rho, fractions.Fraction(1 << codec.frac_bits) /
                                 fractions.Fraction(protocol.optimizers.interaction_lr))
    gradient = engine.decrypt(state.private_key, cipher)
    if slots:  # entry (s, j): column j of sample slot group s's share of a^T d + delta
      groups = he.unpack(gradient, slots, samples_per_plaintext(slots, d_a) * d_a,
                         "masked weight gradient")
      gradient = _own_groups(groups, d_a).T
    noisy = gradient + rho_over_lr
    e_plain = _pack_columns_per_sample_slot(state.e_acc, slots) if slots else state.e_acc
    e_cipher = he.ciphertext_ints(engine.encrypt(state.public_key, e_plain))
    new = dataclasses.replace(state, expect="encrypted_input_gradient", e_acc=state.e_acc + rho)
    return new, [msg.NoisyWeightGradient(*batch.where, he.key_id(state.public_key), noisy,
                                         e_cipher)]
  if isinstance(message, msg.EncryptedInputGradient):
    batch, slots = _receive_ciphertexts(protocol, state, message, "encrypted_input_gradient",
                                        "encrypted input gradient")
    rows, d_a = state.a_ints.shape
    _check_shape(message.ciphertexts,
                 (-(-rows // samples_per_plaintext(slots, d_a)),) if slots else (rows, d_a),
                 "encrypted input gradient")
    cipher = he.from_ciphertext_ints(state.public_key, message.ciphertexts,
                                     "encrypted input gradient")
    grad_ints = engine.decrypt(state.private_key, cipher)
    if slots:
      grad_ints = _unpack_samples(grad_ints, slots, rows, d_a, "encrypted input gradient")
    grad_a = protocol.codec.decode(grad_ints, scale=2)
    return _passive_backward(protocol, jit, state, batch, grad_a.astype(np.float32)), []
  raise ProtocolError(f"{who}: got {message.KIND}, expected {state.expect}")


def _passive_backward(protocol: Protocol, jit: Jitted, state: PassiveState, batch: Batch,
                      grad_a: np.ndarray) -> PassiveState:
  grads = jit.passive_grads(state.params, state.x[list(batch.rows)], grad_a)
  params, opt_state = jit.dense_update(state.params, state.opt_state, grads)
  return dataclasses.replace(state, params=params, opt_state=opt_state, expect="begin",
                             cursor=state.cursor + 1, a_ints=None)


# --- the active party ------------------------------------------------------------------------------


def active_handle(protocol: Protocol, jit: Jitted, engine: he.Engine, state: ActiveState,
                  message: msg.Message) -> tuple[ActiveState, list[msg.Message]]:
  who = "active"
  if isinstance(message, msg.PublicKey):
    _check_expect(state, message, who, "public_key")
    _check_shape(message.n, (1,), "public key n")
    n = message.n[0]
    _check(isinstance(n, int) and n.bit_length() >= 512, "public key n: expected >= 512 bits")
    public_key = he.PublicKey(n)
    check_key(protocol, public_key)
    return dataclasses.replace(state, public_key=public_key, expect="begin"), []
  if isinstance(message, msg.ClearActivations):
    _check(state.w_share is None, f"{who}: got {message.KIND} in encrypted mode")
    _check_expect(state, message, who, "begin")
    batch = _check_batch(protocol, state, message, message.values, who)
    return _plain_active(jit, state, batch, message.values.astype(np.float32))
  _check(state.public_key is not None, f"{who}: got {message.KIND} before the public key")
  if isinstance(message, msg.PackedActivations):
    _check(protocol.packing, f"{who}: got {message.KIND}, but he.packing is off")
    _check_expect(state, message, who, "begin")
    batch = _check_where(state, message, protocol, who)
    _check_digest(state, message, batch, who)
    slots = packing_slots(protocol, state.public_key)
    rows, h = len(batch.rows), state.w_share.shape[1]
    _check_shape(message.by_group, (-(-rows // slots.count), protocol.spec.passive_out),
                 f"{message.KIND} by_group")
    per = samples_per_plaintext(slots, protocol.spec.passive_out)
    _check_shape(message.by_sample, (-(-rows // per) if batch.phase == "train" else 0,),
                 f"{message.KIND} by_sample")
    _check_key(message.key_id, state.public_key, "packed activations")
    by_group = he.from_ciphertext_ints(state.public_key, message.by_group, "packed activations")
    by_sample = he.from_ciphertext_ints(state.public_key, message.by_sample, "packed activations")
    mask = he.random_masks((rows, h), protocol.mask_bits)
    masked = engine.obfuscate(he.add_plain(engine.matmul(by_group, state.w_share),
                                           _pack_by_group(mask, slots)))
    return (dataclasses.replace(state, expect="revealed_products", a_cipher=by_sample, mask=mask),
            [msg.MaskedProducts(*batch.where, he.key_id(state.public_key),
                                he.ciphertext_ints(masked))])
  if isinstance(message, msg.EncryptedActivations):
    _check(not protocol.packing, f"{who}: got {message.KIND}, but he.packing is on")
    _check_expect(state, message, who, "begin")
    batch = _check_batch(protocol, state, message, message.ciphertexts, who)
    _check_key(message.key_id, state.public_key, "encrypted activations")
    a_cipher = he.from_ciphertext_ints(state.public_key, message.ciphertexts,
                                       "encrypted activations")
    mask = he.random_masks((len(batch.rows), state.w_share.shape[1]), protocol.mask_bits)
    masked = engine.obfuscate(he.add_plain(engine.matmul(a_cipher, state.w_share), mask))
    return (dataclasses.replace(state, expect="revealed_products", a_cipher=a_cipher, mask=mask),
            [msg.MaskedProducts(*batch.where, he.key_id(state.public_key),
                                he.ciphertext_ints(masked))])
  if isinstance(message, msg.RevealedProducts):
    _check_expect(state, message, who, "revealed_products")
    batch = _check_where(state, message, protocol, who)
    _check_shape(message.values, state.mask.shape, "revealed products")
    z_passive = protocol.codec.decode(message.values - state.mask, scale=2).astype(np.float32)
    rows = list(batch.rows)
    if batch.phase == "eval":
      logits = np.asarray(jit.active_logits(state.params, z_passive, state.x[rows]))
      return dataclasses.replace(state, expect="begin", cursor=state.cursor + 1, a_cipher=None,
                                 mask=None, eval_logits=state.eval_logits +
                                 ((batch.round, batch.rows, logits),)), []
    loss, _, grads, d = jit.active_step(state.params, z_passive, state.x[rows],
                                        state.labels[rows])
    d_ints = protocol.codec.encode(np.asarray(d, np.float64), "interaction gradient d")
    if protocol.packing:
      # Entry g of [a] holds samples g S .. g S + S - 1. For each sample slot group s and
      # column j: sum_g d[g S + s, j] [entry g] holds column j of the sum over those samples of
      # a_b^T d_b in group s (the other groups hold cross terms: masked, and never returned).
      slots = packing_slots(protocol, state.public_key)
      d_a, h = state.w_share.shape
      per = samples_per_plaintext(slots, d_a)
      d_groups = _padded_rows(d_ints, per).reshape(-1, per, h)  # (G_S, S, h)
      grad_cipher = engine.matvec(d_groups.transpose(1, 2, 0).reshape(per * h, -1),
                                  state.a_cipher).reshape(per, h)
      every_slot = he.random_masks((per, h, per * d_a), protocol.mask_bits)
      mask = _own_groups(every_slot, d_a).T  # (d_a, h): what the kept groups carry
      masked = engine.obfuscate(he.add_plain(grad_cipher, he.pack(every_slot, slots)))
    else:
      mask = he.random_masks(state.w_share.shape, protocol.mask_bits)
      # [a]^T d = (d^T [a])^T: (d_a, h) sums over the batch.
      grad_cipher = engine.matmul_left(d_ints.T, state.a_cipher).T
      masked = engine.obfuscate(he.add_plain(grad_cipher, mask))
    params, opt_state = jit.dense_update(state.params, state.opt_state, grads)
    new = dataclasses.replace(state, params=params, opt_state=opt_state,
                              expect="noisy_weight_gradient", mask=mask, d_ints=d_ints,
                              losses=state.losses + ((batch.round, batch.step, float(loss)),))
    return new, [msg.MaskedWeightGradient(*batch.where, he.key_id(state.public_key),
                                          he.ciphertext_ints(masked))]
  if isinstance(message, msg.NoisyWeightGradient):
    _check_expect(state, message, who, "noisy_weight_gradient")
    batch = _check_where(state, message, protocol, who)
    _check_key(message.key_id, state.public_key, "noisy weight gradient")
    _check_shape(message.values, state.w_share.shape, "noisy weight gradient")
    d_a, h = state.w_share.shape
    slots = packing_slots(protocol, state.public_key) if protocol.packing else None
    _check_shape(message.accumulated_noise, _weight_cipher_shape(slots, d_a, h),
                 "encrypted e_acc")
    e_cipher = he.from_ciphertext_ints(state.public_key, message.accumulated_noise,
                                       "encrypted e_acc")
    if slots:
      # Entry (s, j): [column j of W' + e_acc in sample slot group s]; for samples
      # g S .. g S + S - 1, sum_(s, j) d[g S + s, j] (that) = [their rows of dL/da]: (G_S,).
      w_cipher = he.add_plain(e_cipher, _pack_columns_per_sample_slot(state.w_share, slots))
      per = samples_per_plaintext(slots, d_a)
      d_rows = _padded_rows(state.d_ints, per).reshape(-1, per * h)
      grad_a = engine.obfuscate(engine.matvec(d_rows, w_cipher.reshape(-1)))
    else:
      # d [W' + e_acc]^T: (B, h) x (h, d_a), sums over h; W' added to [e_acc] in the clear.
      w_cipher = he.add_plain(e_cipher, state.w_share)
      grad_a = engine.obfuscate(engine.matmul_left(state.d_ints, w_cipher.T))
    step = he.scale_round(message.values - state.mask,
                          fractions.Fraction(protocol.optimizers.interaction_lr),
                          shift=protocol.codec.frac_bits)
    new = dataclasses.replace(state, w_share=state.w_share - step, expect="begin",
                              cursor=state.cursor + 1, a_cipher=None, mask=None, d_ints=None)
    return new, [msg.EncryptedInputGradient(*batch.where, he.key_id(state.public_key),
                                            he.ciphertext_ints(grad_a))]
  raise ProtocolError(f"{who}: got {message.KIND}, expected {state.expect}")


def _check_batch(protocol: Protocol, state: ActiveState, message, array: np.ndarray,
                 who: str) -> Batch:
  batch = _check_where(state, message, protocol, who)
  _check_digest(state, message, batch, who)
  _check_shape(array, (len(batch.rows), protocol.spec.passive_out), f"{message.KIND} batch")
  return batch


def _check_digest(state: ActiveState, message, batch: Batch, who: str) -> None:
  _check(message.batch_digest == batch_digest(state.ids, batch.rows),
         f"{who}: batch {batch.where} holds other sample IDs than this party's aligned IDs "
         "(misaligned IDs)")


def _plain_active(jit: Jitted, state: ActiveState, batch: Batch, a: np.ndarray):
  rows = list(batch.rows)
  params = state.params
  if batch.phase == "eval":
    z_passive = a @ np.asarray(params["w_passive"])
    logits = np.asarray(jit.active_logits(params, z_passive, state.x[rows]))
    return dataclasses.replace(state, cursor=state.cursor + 1, eval_logits=state.eval_logits +
                               ((batch.round, batch.rows, logits),)), []
  dense = {k: v for k, v in params.items() if k != "w_passive"}
  loss, _, grads, grad_w, grad_a = jit.plain_active_step(dense, params["w_passive"], a,
                                                         state.x[rows], state.labels[rows])
  dense, dense_state = jit.dense_update(dense, state.opt_state["dense"], grads)
  w_passive, w_state = jit.interaction_update(params["w_passive"],
                                              state.opt_state["interaction"], grad_w)
  new = dataclasses.replace(state, params=dict(dense, w_passive=w_passive),
                            opt_state={"dense": dense_state, "interaction": w_state},
                            cursor=state.cursor + 1,
                            losses=state.losses + ((batch.round, batch.step, float(loss)),))
  return new, [msg.ClearInputGradient(*batch.where, np.asarray(grad_a, np.float32))]
