"""Packed Paillier plaintexts (`he.packing`): slots round-trip exactly through encryption, sums and
signed products; the packed protocol ends on the unpacked protocol's states bit for bit with
fewer ciphertexts; it keeps the unpacked protocol's leak properties, re-randomizes what it
returns, and refuses bad input without changing either party's state."""

from __future__ import annotations

import dataclasses
import fractions
import secrets

import numpy as np
import pytest

from research.vfl import he
from research.vfl import messages as msg
from research.vfl import parties
from tests.vfl._drive import (ENGINE, Recording, answer_each_twice, begin, decrypt, record,
                              run)



def packed(protocol: parties.Protocol) -> parties.Protocol:
  return dataclasses.replace(protocol, packing=True)


# --- slots -------------------------------------------------------------------------------------


def test_signed_slots_round_trip_through_encryption_sums_and_products(keypair):
  public_key, private_key = keypair
  slots = he.slots_for(public_key, he.FixedPoint(), terms=86, mask_bits=128)
  assert slots.width == 130 and slots.count == (public_key.max_int.bit_length() - 1) // 130
  half = 1 << (slots.width - 1)
  # Extreme slots: every value at +-(2**(w-1) - 1) and a random mix, 3 packed integers.
  values = np.array([[(half - 1) * (-1) ** k for k in range(slots.count)],
                     [-(half - 1)] * slots.count,
                     [secrets.randbelow(2 * half - 1) - (half - 1) for _ in range(slots.count)]],
                    dtype=object)
  cipher = ENGINE.encrypt(public_key, he.pack(values, slots))
  np.testing.assert_array_equal(he.unpack(decrypt(private_key, he.ciphertext_ints(cipher)),
                                          slots, slots.count, "t"), values)
  # A sum of ciphertexts times signed integers is the same sum of the slots' values.
  small = np.array([[5, -7, 0, 3], [-2, 0, 11, -1]], dtype=object)
  scalars = np.array([-123456789, 987654321], dtype=object)
  combined = ENGINE.encrypt(public_key, he.pack(small, slots)).dot(scalars)
  np.testing.assert_array_equal(
      he.unpack(private_key.decrypt(combined), slots, 4, "t"), scalars.dot(small))


def test_unpack_refuses_a_value_beyond_its_slots_and_pack_more_values_than_slots(keypair):
  slots = he.slots_for(keypair[0], he.FixedPoint(), terms=86, mask_bits=128)
  one_slot_too_many = he.pack(np.array([1, -2, 3], dtype=object), slots)
  with pytest.raises(he.FixedPointOverflow, match="^masked products: a packed value overflowed"):
    he.unpack(np.array([one_slot_too_many], dtype=object), slots, 2, "masked products")
  # A slot that outgrew its width carries into the next one: what is left after the expected
  # slots is never silently dropped.
  overflowing = np.array([(1 << (slots.width * slots.count)) - 1], dtype=object)
  with pytest.raises(he.FixedPointOverflow):
    he.unpack(overflowing, slots, slots.count - 1, "t")
  with pytest.raises(ValueError, match=f"the key holds {slots.count} slots"):
    he.pack(np.zeros((2, slots.count + 1), dtype=object), slots)


# --- the packed protocol -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def noisy_start_2048(world):
  """As noisy_start, under a 2048-bit key: 15 slots of 130 bits, 3 samples per plaintext in the
  backward sums (so their cross-sample slot groups are exercised with full masks)."""
  return world.states(world.protocol(noise_scale=0.1), key_bits=2048)


# Integers per batch (ciphertexts and revealed values), B = 8 rows, d_a = h = 4, 3 train batches
# and the eval batch. Unpacked, per train batch: [a] 32, [aW'+eps] 32, revealed 32, [a^T d] 16,
# noisy gradient 16 + [e_acc] 16, [d W_p^T] 32; eval: 32 + 32 + 32.
UNPACKED_INTS = 3 * 176 + 96


@pytest.mark.parametrize("mask_bits, slots, per_plaintext, packed_ints", [
    # 7 slots, G = 2 groups of samples, S = 1 sample per backward plaintext: [a] 2 x 4 + 8,
    # [aW'+eps] 2 x 4, revealed 32, [a^T d] 1 x 4, noisy 16 + [e_acc] 1 x 4, [d W_p^T] 8;
    # eval: 8 + 8 + 32.
    (128, 7, 1, 3 * 88 + 48),
    # 10 slots of 100 bits: G = 1, S = 2: [a] 4 + 4, [aW'+eps] 4, revealed 32, [a^T d] 2 x 4,
    # noisy 16 + [e_acc] 2 x 4, [d W_p^T] 4; eval: 4 + 4 + 32.
    (64, 10, 2, 3 * 80 + 40)])
def test_the_packed_protocol_ends_on_the_unpacked_states_bit_for_bit(
    world, jit, noisy_start, same, mask_bits, slots, per_plaintext, packed_ints):
  protocol = world.protocol(train_batches=3, noise_scale=0.1, mask_bits=mask_bits)
  counted = {}

  def count(label):
    def observe(receiver, message, size):
      for field in dataclasses.fields(message):
        value = getattr(message, field.name)
        if isinstance(value, np.ndarray) and value.dtype == object and message.KIND != "public_key":
          counted[label] = counted.get(label, 0) + value.size
    return observe

  plain_passive, plain_active, plain_traffic = run(protocol, *noisy_start, jit, None,
                                                   observe=count("unpacked"))
  passive, active, traffic = run(packed(protocol), *noisy_start, jit, None,
                                 observe=count("packed"))
  assert len(active.losses) == 3 and len(active.eval_logits) == 1
  same(passive, plain_passive)
  same(active, plain_active)
  layout = parties.packing_slots(protocol, noisy_start[0].public_key)
  assert (layout.count, parties.samples_per_plaintext(layout, 4)) == (slots, per_plaintext)
  assert counted["unpacked"] == UNPACKED_INTS
  assert counted["packed"] == packed_ints
  assert sum(traffic.bytes.values()) < sum(plain_traffic.bytes.values()) / 2


def test_three_samples_per_plaintext_under_a_2048_bit_key_end_on_the_same_states(
    world, jit, noisy_start_2048, same):
  protocol = world.protocol(train_batches=2, noise_scale=0.1, mask_bits=128)
  layout = parties.packing_slots(protocol, noisy_start_2048[0].public_key)
  assert (layout.count, parties.samples_per_plaintext(layout, 4)) == (15, 3)
  plain_passive, plain_active, _ = run(protocol, *noisy_start_2048, jit, None)
  passive, active, _ = run(packed(protocol), *noisy_start_2048, jit, None)
  same(passive, plain_passive)
  same(active, plain_active)


@pytest.fixture(scope="module", params=["noisy_start", "noisy_start_2048"])
def packed_recording(request, world, jit) -> Recording:
  """2 train batches and 1 eval batch of the packed protocol, masks and noise on; 1 (1024-bit
  key) and 3 (2048-bit key) samples per plaintext in the backward sums."""
  return record(packed(world.protocol(train_batches=2, noise_scale=0.1, mask_bits=128)),
                request.getfixturevalue(request.param), jit)


def test_packed_the_passive_party_sees_products_and_gradients_only_under_masks(packed_recording):
  r = packed_recording
  protocol, passive_states, active_states = r.protocol, r.passive_states, r.active_states
  private_key = passive_states[0].private_key
  slots = parties.packing_slots(protocol, private_key.public_key)
  d_a = protocol.spec.passive_out
  per = parties.samples_per_plaintext(slots, d_a)
  lr, codec = protocol.optimizers.interaction_lr, protocol.codec
  of, index = r.of, r.batch_index
  for message in of("passive", "masked_products"):
    k = index(message)
    rows = len(protocol.schedule[k].rows)
    (activations,) = [m for m in of("active", "packed_activations") if m.where == message.where]
    a = he.unpack(decrypt(private_key, activations.by_group), slots, slots.count, "a")
    a = a.transpose(0, 2, 1).reshape(-1, a.shape[1])[:rows]
    products = he.unpack(decrypt(private_key, message.ciphertexts), slots, slots.count, "p")
    products = products.transpose(0, 2, 1).reshape(-1, products.shape[1])
    eps = products[:rows] - a.dot(active_states[k].w_share)
    assert all((1 << 64) < e < (1 << 128) for e in eps.reshape(-1)), k
    assert not np.any(products[rows:])  # the padding slots hold nothing
  for message in of("passive", "masked_weight_gradient"):
    k = index(message)
    before, after = active_states[k], active_states[k + 1]
    rho = passive_states[k + 1].e_acc - passive_states[k].e_acc
    a_t_d = (before.w_share - after.w_share - rho) * fractions.Fraction(1 << codec.frac_bits) / \
        fractions.Fraction(lr)
    groups = he.unpack(decrypt(private_key, message.ciphertexts), slots, per * d_a, "g")
    assert groups.shape == (per, 4, per * d_a)
    wanted = sum(groups[s, :, s * d_a:(s + 1) * d_a] for s in range(per)).T
    delta = wanted - a_t_d  # the sum of the per groups' masks
    assert all((1 << 64) < d < per * (1 << 128) + (1 << 40) for d in delta.reshape(-1)), k
    # The other groups hold sums across samples of other slot groups (|x| < 2**100 here): they
    # are masked too, never returned, and never seen bare.
    cross = [groups[s, :, t * d_a:(t + 1) * d_a] for s in range(per) for t in range(per) if s != t]
    assert all(v > (1 << 100) for c in cross for v in c.reshape(-1)), k


def test_packed_the_active_party_never_holds_a_its_features_or_e_acc(world, packed_recording):
  protocol, received, passive_states = (packed_recording.protocol, packed_recording.received,
                                        packed_recording.passive_states)
  private_key = passive_states[0].private_key
  public_key = private_key.public_key
  slots = parties.packing_slots(protocol, public_key)
  codec = protocol.codec
  secrets_ = set(codec.encode(world.x_passive, "x").reshape(-1))
  for message in [m for r, m in received if r == "active" and m.KIND == "packed_activations"]:
    clear = decrypt(private_key, np.concatenate([message.by_group.reshape(-1), message.by_sample]))
    secrets_ |= set(clear)  # packed a, as the plaintexts of what it receives
    secrets_ |= {v for packed_ in clear for v in he.unpack(np.array([packed_], dtype=object),
                                                           slots, slots.count, "a")[0]}
  per = parties.samples_per_plaintext(slots, protocol.spec.passive_out)
  for state in passive_states:
    secrets_ |= set(state.e_acc.reshape(-1))
  for message in [m for r, m in received if r == "active" and m.KIND == "noisy_weight_gradient"]:
    secrets_ |= set(decrypt(private_key, message.accumulated_noise).reshape(-1))  # packed e_acc
  secrets_.discard(0)  # padding slots
  for receiver, message in received:
    if receiver != "active":
      continue
    ints = []
    for field in dataclasses.fields(message):
      value = getattr(message, field.name)
      if isinstance(value, np.ndarray):
        assert value.dtype == object, f"{message.KIND}.{field.name}: clear floats"
        ints += [int(v) for v in value.reshape(-1)]
    assert not set(ints) & secrets_, message.KIND
    if message.KIND == "noisy_weight_gradient":
      k = [b.where for b in protocol.schedule].index(message.where)
      assert message.accumulated_noise.shape == (per, 4)
      assert all(public_key.n < c < public_key.nsquare
                 for c in message.accumulated_noise.reshape(-1))
      # Entry (s, j) holds column j of e_acc in sample slot group s, zeros elsewhere.
      groups = he.unpack(decrypt(private_key, message.accumulated_noise), slots, per * 4, "e")
      for s in range(per):
        np.testing.assert_array_equal(groups[s, :, 4 * s:4 * s + 4].T, passive_states[k].e_acc)
        assert not np.any(np.delete(groups[s], np.s_[4 * s:4 * s + 4], axis=1))


def test_packed_every_ciphertext_the_active_party_returns_is_re_randomized(world, jit,
                                                                           quiet_start):
  b = begin(packed(world.protocol(noise_scale=0.0, mask_bits=0)), jit, *quiet_start)
  assert b.activations.KIND == "packed_activations"
  answer_each_twice(b, jit)


# --- bad input -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packed_begun(world, jit, noisy_start):
  b = begin(packed(world.protocol(noise_scale=0.1)), jit, *noisy_start)
  assert b.activations.by_group.shape == (2, 4) and b.activations.by_sample.shape == (8,)
  return b.protocol, b.passive, b.active, b.activations


def test_packed_refuses_wrong_shapes_modes_ids_and_keys(packed_begun, jit, refused,
                                                          other_keypair):
  protocol, passive, active, activations = packed_begun
  to_active = lambda m: lambda: parties.active_handle(protocol, jit, ENGINE, active, m)
  for wrong, match in (
      (dataclasses.replace(activations, by_group=activations.by_group[:1]),
       r"packed_activations by_group: shape \(1, 4\), expected \(2, 4\)"),
      (dataclasses.replace(activations, by_sample=activations.by_sample[:7]),
       r"packed_activations by_sample: shape \(7,\), expected \(8,\)"),
      (dataclasses.replace(activations, batch_digest="0" * 16), "misaligned"),
      (dataclasses.replace(activations, key_id=he.key_id(other_keypair[0])),
       "packed activations: ciphertexts under key"),
      (msg.EncryptedActivations(*activations.where, activations.batch_digest,
                                activations.key_id, np.zeros((8, 4), dtype=object)),
       "got encrypted_activations, but he.packing is on")):
    refused(to_active(wrong), [active, passive], parties.ProtocolError, match)
  # The unpacked protocol refuses a packed message.
  refused(lambda: parties.active_handle(dataclasses.replace(protocol, packing=False), jit, ENGINE,
                                        active, activations),
          [active, passive], parties.ProtocolError, "but he.packing is off")
  active_next, (products,) = parties.active_handle(protocol, jit, ENGINE, active, activations)
  unpacked_shape = dataclasses.replace(products, ciphertexts=np.tile(products.ciphertexts, (4, 1)))
  refused(lambda: parties.passive_handle(protocol, jit, ENGINE, passive, unpacked_shape),
          [passive, active_next], parties.ProtocolError,
          r"masked products: shape \(8, 4\), expected \(2, 4\)")


def test_packed_refuses_a_slot_overflow_and_a_key_with_too_few_slots(
    world, packed_begun, jit, refused, noisy_start):
  protocol, passive, active, activations = packed_begun
  # A forged answer whose plaintext spills beyond the 7 slots: refused on decryption.
  spill = np.full((2, 4), 1 << (130 * 7 + 5), dtype=object)
  forged = msg.MaskedProducts(*activations.where, activations.key_id,
                              he.ciphertext_ints(ENGINE.encrypt(passive.public_key, spill)))
  refused(lambda: parties.passive_handle(protocol, jit, ENGINE, passive, forged),
          [passive, active], he.FixedPointOverflow, "masked products: a packed value overflowed")
  # Masks so wide that only 3 slots fit, fewer than d_a = 4 per sample: refused at setup,
  # naming the key.
  wide = packed(world.protocol(noise_scale=0.1, mask_bits=300))
  (key_message,) = parties.passive_setup(noisy_start[0])
  refused(lambda: parties.active_handle(wide, jit, ENGINE, noisy_start[1], key_message),
          [noisy_start[1]], he.FixedPointOverflow, r"he.packing: a 1024-bit key holds 3 slot")
