"""The two parties (acceptance tests): the encrypted protocol trains exactly like the plaintext
split and centralized training, neither party receives what it must not see, and bad input is
refused before any state changes."""

from __future__ import annotations

import collections
import dataclasses
import fractions

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.vfl import he
from research.vfl import messages as msg
from research.vfl import model as model_lib
from research.vfl import parties
from tests.vfl._drive import (ENGINE, Begun, Recording, answer_each_twice, begin, decrypt,
                              record, run)

# Float32 forward/backward differs from the exact fixed-point path by a few float32 ulps
# (|params| ~ 1, so ~1e-7); after 1-3 steps of Adam / SGD that stays well under 1e-5.
ATOL = 1e-5


def assert_tree_close(a, b, atol=ATOL, rtol=0.0):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def dense_part(params: dict) -> dict:
  return {k: v for k, v in params.items() if k != "w_passive"}


# --- exactness ------------------------------------------------------------------------------------


def test_one_encrypted_step_equals_the_plaintext_split_and_masks_change_nothing(
    world, jit, quiet_start, same):
  unmasked = world.protocol(noise_scale=0.0, mask_bits=0)
  masked = world.protocol(noise_scale=0.0, mask_bits=128)
  passive0, active0 = run(unmasked, *quiet_start, jit, 1)[:2]
  passive128, active128 = run(masked, *quiet_start, jit, 1)[:2]
  plain_passive, plain_active = run(unmasked, *world.states(unmasked, key_bits=None), jit, 1)[:2]

  assert active0.cursor == plain_active.cursor == 1 and len(active0.losses) == 1
  assert_tree_close(passive0.params, plain_passive.params)
  assert_tree_close(active0.params, dense_part(plain_active.params))
  np.testing.assert_allclose(parties.effective_w_passive(unmasked, passive0, active0),
                             plain_active.params["w_passive"], rtol=0, atol=ATOL)
  np.testing.assert_allclose(active0.losses[0][2], plain_active.losses[0][2], rtol=1e-6)
  # The step really moved W_p (else the comparison above would be vacuous).
  assert not np.allclose(plain_active.params["w_passive"], world.init.w_passive, atol=1e-4)
  # Masks are removed exactly: every bit of both states is the same with and without them.
  assert all(a == b for a, b in zip(active0.w_share.reshape(-1), active128.w_share.reshape(-1)))
  same(passive0, passive128)
  same(active0, active128)


def test_noise_cancels_in_w_p_but_hides_it_from_the_active_party(world, jit, noisy_start):
  protocol = world.protocol(train_batches=3, noise_scale=0.1)
  w_p0 = parties.effective_w_passive(protocol, *noisy_start)
  passive, active = run(protocol, *noisy_start, jit, 3)[:2]
  plain_init = world.init._replace(w_passive=w_p0)
  plain_passive, plain_active = run(protocol, *world.states(protocol, key_bits=None,
                                                            init=plain_init), jit, 3)[:2]

  w_p = parties.effective_w_passive(protocol, passive, active)
  # Per step one rounding of 2**-32 per share, plus float32 differences as above.
  np.testing.assert_allclose(w_p, plain_active.params["w_passive"], rtol=0, atol=ATOL)
  assert_tree_close(passive.params, plain_passive.params)
  assert_tree_close(active.params, dense_part(plain_active.params))
  assert [l[:2] for l in active.losses] == [(1, 0), (1, 1), (1, 2)]
  np.testing.assert_allclose([l[2] for l in active.losses], [l[2] for l in plain_active.losses],
                             rtol=1e-4)
  # The active party's share W' is W_p blurred by the accumulated noise (std ~0.2 per entry).
  w_share = protocol.codec.decode(active.w_share)
  assert not np.allclose(w_share, w_p, atol=0.02)
  np.testing.assert_allclose(w_p - w_share, protocol.codec.decode(passive.e_acc), rtol=0,
                             atol=1e-6)  # float32 of W_p
  # e_acc grew by one rho per step (it is not the initial noise any more).
  assert not np.array_equal(passive.e_acc, noisy_start[0].e_acc)


@pytest.mark.slow  # default: the same equality end to end (tests/experiments/test_vfl.py)
def test_plaintext_split_equals_centralized_training(world, jit):
  protocol = world.protocol(train_batches=2)
  passive, active = run(protocol, *world.states(protocol, key_bits=None), jit, 2)[:2]

  opt = world.optimizers
  init = world.init
  params = {"passive_bottom": init.passive_bottom, "active": init.active,
            "w_passive": jnp.asarray(init.w_passive)}
  # Adam is elementwise, so one state per part equals one over the whole tree.
  states = {"passive_bottom": opt.dense.init(init.passive_bottom),
            "active": opt.dense.init(init.active),
            "w_passive": opt.interaction.init(params["w_passive"])}
  step = jax.jit(lambda p, xp, xa, y: model_lib.centralized_step(world.network, p, xp, xa, y))
  losses = []
  for batch in protocol.schedule[:2]:
    assert batch.phase == "train"
    rows = list(batch.rows)
    loss, _, grads = step(params, world.x_passive[rows], world.x_active[rows],
                          world.labels[rows])
    losses.append(float(loss))
    for part, optimizer in (("passive_bottom", opt.dense), ("active", opt.dense),
                            ("w_passive", opt.interaction)):
      params[part], states[part] = model_lib.apply_updates(optimizer, params[part], states[part],
                                                           grads[part])

  assert_tree_close(passive.params, params["passive_bottom"], atol=1e-5, rtol=1e-5)
  assert_tree_close(dense_part(active.params), params["active"], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(active.params["w_passive"], params["w_passive"], rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose([l[2] for l in active.losses], losses, rtol=1e-5)


# --- what each party receives ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def recording(world, jit, noisy_start) -> Recording:
  """2 train batches and 1 eval batch of the encrypted protocol, masks and noise on."""
  protocol = world.protocol(train_batches=2, noise_scale=0.1, mask_bits=128)
  assert [b.phase for b in protocol.schedule] == ["train", "train", "eval"]
  return record(protocol, noisy_start, jit)


def all_ints(message: msg.Message, scalars: bool = True) -> list[int]:
  """Every integer a message carries: its int arrays' entries, and (`scalars`) round, step."""
  out = []
  for field in dataclasses.fields(message):
    value = getattr(message, field.name)
    if isinstance(value, np.ndarray) and value.dtype == object:
      out += [int(v) for v in value.reshape(-1)]
    elif isinstance(value, int) and scalars:
      out.append(value)
  return out


def test_each_party_receives_only_its_kinds(recording):
  kinds = collections.Counter((r, m.KIND) for r, m in recording.received)
  assert kinds == {
      ("active", "public_key"): 1,
      ("active", "encrypted_activations"): 3, ("passive", "masked_products"): 3,
      ("active", "revealed_products"): 3,
      ("passive", "masked_weight_gradient"): 2, ("active", "noisy_weight_gradient"): 2,
      ("passive", "encrypted_input_gradient"): 2}
  # The passive party only ever receives ciphertexts under its own key: no labels, losses,
  # logits or clear values.
  for receiver, message in recording.received:
    names = {f.name for f in dataclasses.fields(message)}
    if receiver == "passive":
      assert names == {"phase", "round", "step", "key_id", "ciphertexts"}
    assert not names & {"labels", "loss", "losses", "logits"}


def test_the_passive_party_sees_products_and_gradients_only_under_masks(recording):
  private_key = recording.start[0].private_key
  codec = recording.protocol.codec
  lr = recording.protocol.optimizers.interaction_lr
  for message in recording.of("passive", "masked_products"):
    k = recording.batch_index(message)
    a = decrypt(private_key, recording.of("active", "encrypted_activations")[k].ciphertexts)
    eps = decrypt(private_key, message.ciphertexts) - a.dot(recording.active_states[k].w_share)
    # What it decrypts is a W' plus a fresh mask of up to 128 bits, never a W' itself.
    assert all((1 << 64) < e < (1 << 128) for e in eps.reshape(-1)), k
  for message in recording.of("passive", "masked_weight_gradient"):
    k = recording.batch_index(message)
    before, after = recording.active_states[k], recording.active_states[k + 1]
    rho = recording.passive_states[k + 1].e_acc - recording.passive_states[k].e_acc
    # W' moved by lr (a^T d + rho / lr) / 2**32, so a^T d at scale 2 is about this (error
    # ~2**32 / lr per entry, from W''s rounding):
    a_t_d = (before.w_share - after.w_share - rho) * fractions.Fraction(1 << codec.frac_bits) / \
        fractions.Fraction(lr)
    delta = decrypt(private_key, message.ciphertexts) - a_t_d
    assert all((1 << 64) < d < (1 << 128) + (1 << 40) for d in delta.reshape(-1)), k


def test_the_active_party_never_holds_a_its_features_e_acc_or_w_p(world, recording):
  private_key = recording.start[0].private_key
  public_key = private_key.public_key
  codec = recording.protocol.codec
  lr = recording.protocol.optimizers.interaction_lr
  activations = recording.of("active", "encrypted_activations")
  a_ints = [decrypt(private_key, m.ciphertexts) for m in activations]
  secrets = set()
  for a in a_ints:
    secrets |= set(a.reshape(-1))
  secrets |= set(codec.encode(world.x_passive, "x").reshape(-1))
  for k in range(3):
    secrets |= set(recording.passive_states[k].e_acc.reshape(-1))

  for receiver, message in recording.received:
    if receiver != "active":
      continue
    for field in dataclasses.fields(message):
      value = getattr(message, field.name)
      if isinstance(value, np.ndarray):
        assert value.dtype == object, f"{message.KIND}.{field.name}: clear floats"
    assert not set(all_ints(message, scalars=False)) & secrets, message.KIND

  for message in recording.of("active", "revealed_products"):
    k = recording.batch_index(message)
    a = a_ints[k]
    w_p = recording.active_states[k].w_share + recording.passive_states[k].e_acc
    eps = message.values - a.dot(w_p)  # the active party's own mask: nothing else is added
    assert all((1 << 64) < e < (1 << 128) for e in eps.reshape(-1))

  for message in recording.of("active", "noisy_weight_gradient"):
    k = recording.batch_index(message)
    e_acc = recording.passive_states[k].e_acc
    # [e_acc]: ciphertexts (in (n, n^2)) that decrypt to e_acc, never e_acc's own integers.
    assert all(public_key.n < c < public_key.nsquare for c in message.accumulated_noise.reshape(-1))
    assert not np.any(message.accumulated_noise == e_acc)
    np.testing.assert_array_equal(decrypt(private_key, message.accumulated_noise), e_acc)
    # The weight gradient it gets is blurred by rho / lr, nonzero in every entry.
    masked = decrypt(private_key, recording.of("passive", "masked_weight_gradient")[k].ciphertexts)
    rho = recording.passive_states[k + 1].e_acc - e_acc
    blur = message.values - masked
    np.testing.assert_array_equal(
        blur, he.scale_round(rho, fractions.Fraction(1 << codec.frac_bits) /
                             fractions.Fraction(lr)))
    assert np.all(blur != 0)


def test_the_secret_key_never_appears_in_a_message(recording):
  private_key = recording.start[0].private_key
  forbidden = {private_key.p, private_key.q, private_key.p - 1, private_key.q - 1,
               (private_key.p - 1) * (private_key.q - 1)}
  for _, message in recording.received:
    assert not set(all_ints(message)) & forbidden, message.KIND
  # n itself is public, and sent once.
  (key_message,) = recording.of("active", "public_key")
  assert key_message.n[0] == private_key.public_key.n


# --- driving the parties by hand ------------------------------------------------------------------


@pytest.fixture(scope="module")
def begun(world, jit, noisy_start) -> Begun:
  return begin(world.protocol(noise_scale=0.1), jit, *noisy_start)


def test_every_ciphertext_the_active_party_returns_is_re_randomized(world, jit, quiet_start):
  # Without masks and noise, the only thing that can make two answers to the same message differ
  # is the fresh encryption of zero each ciphertext is multiplied by.
  b = begin(world.protocol(noise_scale=0.0, mask_bits=0), jit, *quiet_start)
  products, _, _ = answer_each_twice(b, jit)
  # Not the plain product of [a] and W' either.
  a_cipher = he.from_ciphertext_ints(b.passive.public_key, b.activations.ciphertexts, "a")
  plain_product = he.ciphertext_ints(ENGINE.matmul(a_cipher, b.active.w_share))
  assert not np.any(products.ciphertexts == plain_product)


def test_refuses_a_message_for_another_step_or_round(begun, jit, refused):
  b = begun
  handle_active = lambda m: lambda: parties.active_handle(b.protocol, jit, ENGINE, b.active, m)
  for wrong in (dataclasses.replace(b.activations, step=1),
                dataclasses.replace(b.activations, round=2),
                dataclasses.replace(b.activations, phase="eval")):
    refused(handle_active(wrong), [b.active, b.passive], parties.ProtocolError,
            r"active: encrypted_activations is for \(phase, round, step\) = .*, expected "
            r"\('train', 1, 0\)")
  active, (products,) = parties.active_handle(b.protocol, jit, ENGINE, b.active, b.activations)
  for wrong in (dataclasses.replace(products, step=1), dataclasses.replace(products, round=0)):
    refused(lambda: parties.passive_handle(b.protocol, jit, ENGINE, b.passive, wrong),
            [b.passive, active], parties.ProtocolError,
            r"passive: masked_products is for .* expected \('train', 1, 0\)")
  # A message out of order (the input gradient while products are expected).
  early = msg.EncryptedInputGradient(*products.where, products.key_id, products.ciphertexts)
  refused(lambda: parties.passive_handle(b.protocol, jit, ENGINE, b.passive, early),
          [b.passive, active], parties.ProtocolError,
          "passive: got encrypted_input_gradient, expected masked_products")


def test_refuses_ciphertexts_under_another_key(begun, jit, refused, other_keypair):
  b = begun
  other_public, _ = other_keypair
  a_ints = b.passive.a_ints
  foreign = dataclasses.replace(
      b.activations, key_id=he.key_id(other_public),
      ciphertexts=he.ciphertext_ints(ENGINE.encrypt(other_public, a_ints)))
  refused(lambda: parties.active_handle(b.protocol, jit, ENGINE, b.active, foreign),
          [b.active, b.passive], parties.ProtocolError,
          f"encrypted activations: ciphertexts under key {he.key_id(other_public)}, expected the "
          f"passive party's key {he.key_id(b.passive.public_key)}")
  active, (products,) = parties.active_handle(b.protocol, jit, ENGINE, b.active, b.activations)
  relabelled = dataclasses.replace(products, key_id=he.key_id(other_public))
  refused(lambda: parties.passive_handle(b.protocol, jit, ENGINE, b.passive, relabelled),
          [b.passive, active], parties.ProtocolError, "masked products: ciphertexts under key")
  # Integers that cannot be ciphertexts of this key at all.
  zero = b.activations.ciphertexts.copy()
  zero[0, 0] = 0
  refused(lambda: parties.active_handle(b.protocol, jit, ENGINE, b.active,
                                              dataclasses.replace(b.activations, ciphertexts=zero)),
          [b.active, b.passive], ValueError, "encrypted activations: a ciphertext is not")


def test_refuses_a_batch_of_the_wrong_size(begun, jit, refused):
  b = begun
  short = dataclasses.replace(b.activations, ciphertexts=b.activations.ciphertexts[:-1])
  refused(lambda: parties.active_handle(b.protocol, jit, ENGINE, b.active, short),
          [b.active, b.passive], parties.ProtocolError,
          r"encrypted_activations batch: shape \(7, 4\), expected \(8, 4\)")
  active, (products,) = parties.active_handle(b.protocol, jit, ENGINE, b.active, b.activations)
  narrow = dataclasses.replace(products, ciphertexts=products.ciphertexts[:, :3])
  refused(lambda: parties.passive_handle(b.protocol, jit, ENGINE, b.passive, narrow),
          [b.passive, active], parties.ProtocolError,
          r"masked products: shape \(8, 3\), expected \(8, 4\)")


def test_refuses_misaligned_ids(begun, jit, refused):
  b = begun
  reordered = dataclasses.replace(b.active, ids=tuple(reversed(b.active.ids)))
  refused(lambda: parties.active_handle(b.protocol, jit, ENGINE, reordered, b.activations),
          [reordered, b.passive], parties.ProtocolError,
          r"active: batch \('train', 1, 0\) holds other sample IDs .*misaligned")
  other_digest = dataclasses.replace(b.activations, batch_digest="0" * 16)
  refused(lambda: parties.active_handle(b.protocol, jit, ENGINE, b.active, other_digest),
          [b.active, b.passive], parties.ProtocolError, "misaligned")


def test_refuses_a_message_of_the_other_mode(begun, jit, refused):
  b = begun
  clear = msg.ClearActivations(*b.activations.where, b.activations.batch_digest,
                               np.zeros((8, 4), np.float32))
  refused(lambda: parties.active_handle(b.protocol, jit, ENGINE, b.active, clear),
          [b.active, b.passive], parties.ProtocolError, "clear_activations")


def test_the_passive_party_refuses_a_forged_ciphertext_that_would_reveal_its_key(
    world, jit, quiet_start, refused):
  protocol = world.protocol(noise_scale=0.0)
  b = begin(protocol, jit, *quiet_start)
  n = b.passive.public_key.n
  forged = msg.MaskedProducts(*b.activations.where, he.key_id(b.passive.public_key),
                              np.full((8, 4), n, dtype=object))
  refused(lambda: parties.passive_handle(protocol, jit, ENGINE, b.passive, forged),
          [b.passive, b.active], ValueError, "masked products: a ciphertext")


def test_refuses_a_fixed_point_overflow_before_sending(world, jit, noisy_start, refused):
  protocol = world.protocol(noise_scale=0.1)
  passive, active = noisy_start
  loud = dataclasses.replace(passive, x=passive.x * np.float32(1e9))
  refused(lambda: parties.passive_begin(protocol, jit, ENGINE, loud), [loud, active],
          he.FixedPointOverflow, r"^passive bottom output a: \|value\| up to .* exceeds")
  # A codec too narrow for the initial weights is refused when the states are built.
  with pytest.raises(he.FixedPointOverflow, match="initial"):
    world.states(world.protocol(codec=he.FixedPoint(max_abs=1e-3)), key_bits=1024)


def test_a_key_too_small_for_the_ranges_is_refused_at_setup(world, jit, noisy_start, refused):
  protocol = world.protocol(noise_scale=0.1, mask_bits=1100)
  passive, active = noisy_start
  (key_message,) = parties.passive_setup(passive)
  refused(lambda: parties.active_handle(protocol, jit, ENGINE, active, key_message),
          [active, passive], he.FixedPointOverflow, "key of 1024 bits .* mask_bits=1100")


def test_cannot_begin_a_batch_after_the_schedule_ended(world, jit, noisy_start, refused):
  protocol = world.protocol(noise_scale=0.1)
  done = dataclasses.replace(noisy_start[0], cursor=len(protocol.schedule))
  refused(lambda: parties.passive_begin(protocol, jit, ENGINE, done), [done],
          parties.ProtocolError, "schedule")
