"""Fixed-point codec and Paillier arrays: exact integer results, refusals that name the field."""

from __future__ import annotations

import concurrent.futures
import fractions
import multiprocessing

import numpy as np
import pytest

from research.vfl import he


def test_fixed_point_round_trip_within_half_a_unit():
  codec = he.FixedPoint()
  x = np.random.default_rng(0).normal(scale=100.0, size=(5, 7))
  x[0, :3] = [codec.max_abs, -codec.max_abs, 0.0]
  ints = codec.encode(x, "x")
  assert ints.dtype == object and ints.shape == x.shape
  assert all(type(v) is int for v in ints.reshape(-1))
  # Rounding to the nearest multiple of 2**-frac_bits: error at most half a unit.
  np.testing.assert_allclose(codec.decode(ints), x, rtol=0, atol=2.0 ** -codec.frac_bits / 2)
  assert ints[0, 0] == int(codec.max_abs) << codec.frac_bits


def test_fixed_point_decode_is_exact_division():
  codec = he.FixedPoint(frac_bits=16)
  np.testing.assert_array_equal(codec.decode(np.array([3, -1, 1 << 20], dtype=object)),
                                [3 / 65536, -1 / 65536, 16.0])
  assert codec.encode(np.zeros((0, 3)), "empty").shape == (0, 3)


@pytest.mark.parametrize("bad", [2.0 ** 15 * 1.001, -1e6, np.nan, np.inf, -np.inf])
def test_encode_refuses_out_of_range_naming_the_field(bad):
  codec = he.FixedPoint()
  with pytest.raises(he.FixedPointOverflow, match="^bottom output a: "):
    codec.encode(np.array([[0.5, bad]]), "bottom output a")


def test_codec_refuses_bad_settings():
  with pytest.raises(ValueError, match="frac_bits=4"):
    he.FixedPoint(frac_bits=4)
  with pytest.raises(ValueError, match="max_abs=0"):
    he.FixedPoint(max_abs=0)


def test_scale_two_products_decode_to_the_float_products():
  codec = he.FixedPoint()
  rng = np.random.default_rng(1)
  a, w = rng.normal(size=(4, 3)), rng.normal(size=(3, 2))
  product = codec.encode(a, "a").dot(codec.encode(w, "w"))
  # Each factor is off by <= 2**-33; |a|, |w| < 5 and 3 terms: well under 1e-8.
  np.testing.assert_allclose(codec.decode(product, scale=2), a @ w, rtol=0, atol=1e-8)


def random_ints(rng, shape, bound=1000):
  return np.array(rng.integers(-bound, bound, size=shape).tolist(), dtype=object)


def test_engine_equals_plain_integer_arithmetic(keypair):
  public_key, private_key = keypair
  rng = np.random.default_rng(2)
  x, m, left = random_ints(rng, (5, 3)), random_ints(rng, (3, 4)), random_ints(rng, (2, 5))
  x[0, 0], x[0, 1] = -(1 << 90), 1 << 90  # far beyond int64, both signs
  engine = he.Engine()
  cipher = engine.encrypt(public_key, x)
  assert cipher.shape == x.shape
  np.testing.assert_array_equal(engine.decrypt(private_key, cipher), x)
  np.testing.assert_array_equal(engine.decrypt(private_key, engine.matmul(cipher, m)), x.dot(m))
  np.testing.assert_array_equal(engine.decrypt(private_key, engine.matmul_left(left, cipher)),
                                left.dot(x))
  np.testing.assert_array_equal(
      engine.decrypt(private_key, he.add_plain(cipher, np.full((5, 3), 7, dtype=object))), x + 7)
  np.testing.assert_array_equal(engine.decrypt(private_key, engine.matvec(left, cipher[:, 0])),
                                left.dot(x[:, 0]))


def test_engine_in_a_process_pool_gives_the_same_results(keypair):
  public_key, private_key = keypair
  rng = np.random.default_rng(3)
  x, m, left = random_ints(rng, (4, 3)), random_ints(rng, (3, 2)), random_ints(rng, (2, 4))
  # spawn: the test process has jax's threads running, which fork would copy half-alive.
  with concurrent.futures.ProcessPoolExecutor(
      2, mp_context=multiprocessing.get_context("spawn")) as pool:
    engine = he.Engine(pool, workers=2)
    cipher = engine.encrypt(public_key, x)
    assert all(isinstance(c, he.EncryptedNumber) for c in cipher.reshape(-1))
    plain = he.Engine()
    np.testing.assert_array_equal(engine.decrypt(private_key, cipher), x)
    np.testing.assert_array_equal(engine.decrypt(private_key, engine.matmul(cipher, m)),
                                  plain.decrypt(private_key, plain.matmul(cipher, m)))
    np.testing.assert_array_equal(engine.decrypt(private_key, engine.matmul_left(left, cipher)),
                                  left.dot(x))
    np.testing.assert_array_equal(engine.decrypt(private_key, engine.matvec(left, cipher[:, 1])),
                                  left.dot(x[:, 1]))
    obfuscated = engine.obfuscate(cipher)
    np.testing.assert_array_equal(plain.decrypt(private_key, obfuscated), x)


def test_obfuscate_keeps_the_plaintext_and_changes_every_ciphertext(keypair):
  public_key, private_key = keypair
  x = random_ints(np.random.default_rng(4), (3, 4))
  engine = he.Engine()
  cipher = engine.encrypt(public_key, x)
  fresh = engine.obfuscate(cipher)
  np.testing.assert_array_equal(engine.decrypt(private_key, fresh), x)
  before, after = he.ciphertext_ints(cipher), he.ciphertext_ints(fresh)
  assert not np.any(before == after)
  # The input is left as it was (obfuscate works on copies).
  np.testing.assert_array_equal(he.ciphertext_ints(cipher), before)


def test_decrypting_an_overflowed_value_is_a_fixed_point_overflow(keypair):
  public_key, private_key = keypair
  huge = he.Engine().encrypt(public_key, np.array([public_key.max_int], dtype=object))
  doubled = huge * 2  # lands in phe's overflow zone between max_int and n - max_int
  with pytest.raises(he.FixedPointOverflow, match="overflowed"):
    he.Engine().decrypt(private_key, doubled)


def test_check_capacity_refuses_a_small_key_naming_the_bits(keypair):
  codec = he.FixedPoint()
  public_key, _ = keypair
  he.check_capacity(public_key, codec, terms=100, mask_bits=128)  # the defaults fit easily
  small, _ = he.generate_keypair(512)
  with pytest.raises(he.FixedPointOverflow,
                     match=rf"key of 512 bits holds signed values of "
                           rf"{small.max_int.bit_length()} bits; the protocol needs 602 "
                           r"\(.*mask_bits=600"):
    he.check_capacity(small, codec, terms=10, mask_bits=600)
  assert codec.capacity_bits(terms=1, mask_bits=0) == (1 << 94).bit_length() + 1


def test_generate_keypair_refuses_weak_sizes():
  with pytest.raises(ValueError, match="key_bits=256"):
    he.generate_keypair(256)


def test_ciphertext_ints_round_trip_and_refusals(keypair, other_keypair):
  public_key, private_key = keypair
  x = np.array([[5, -6]], dtype=object)
  ints = he.ciphertext_ints(he.Engine().encrypt(public_key, x))
  back = he.from_ciphertext_ints(public_key, ints, "masked products")
  np.testing.assert_array_equal(he.Engine().decrypt(private_key, back), x)
  for bad in (0, -3, public_key.nsquare, public_key.nsquare + 1, np.int64(7), 2.0):
    with pytest.raises(ValueError, match="^masked products: a ciphertext"):
      he.from_ciphertext_ints(public_key, np.array([ints[0, 0], bad], dtype=object),
                              "masked products")
  assert he.key_id(public_key) != he.key_id(other_keypair[0])
  assert he.key_id(public_key) == he.key_id(he.PublicKey(public_key.n))


def test_from_ciphertext_ints_refuses_values_sharing_a_factor_with_n(keypair):
  public_key, private_key = keypair
  for bad in (public_key.n, 3 * public_key.n, private_key.p):
    with pytest.raises(ValueError, match="^t: a ciphertext"):
      he.from_ciphertext_ints(public_key, np.array([bad], dtype=object), "t")


def test_scale_round_is_exact_rational_rounding():
  v = np.array([3 ** 200, -(3 ** 200), 7, -7, 5, 1 << 100], dtype=object)
  out = he.scale_round(v, fractions.Fraction(1, 3), shift=0)
  assert out[0] == 3 ** 199 and out[1] == -(3 ** 199)  # a float factor would be off here
  # Python's round of the exact quotient: ties to even (7/2 -> 4, -7/2 -> -4, 5/2 -> 2).
  np.testing.assert_array_equal(he.scale_round(v[2:5], 1, shift=1), [4, -4, 2])
  # A float factor is taken at its exact binary value, and the shift divides exactly.
  lr = 0.1
  got = he.scale_round(v, lr, shift=32)
  want = [round(int(x) * fractions.Fraction(lr) / (1 << 32)) for x in v]
  assert list(got) == want
  assert got[5] == round(fractions.Fraction(0.1) * (1 << 68))


def test_random_masks_range_and_zero_bits():
  masks = he.random_masks((4, 5), 128)
  assert masks.shape == (4, 5) and all(0 <= m < 1 << 128 for m in masks.reshape(-1))
  assert len(set(masks.reshape(-1))) == 20
  assert not np.any(he.random_masks((2, 2), 0))
