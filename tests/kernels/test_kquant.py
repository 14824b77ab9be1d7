"""kernels/kquant.py: the Pallas kernels (interpret mode here) against the plain-jnp reference.

Each kernel is checked bit for bit at every bits value, at K below 2**bits, with each randomness
source and with client counts that are and are not a power of two; not at every combination,
since each distinct static setting is one interpret-mode compilation (a second or two on CPU).
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import kquant as kq


def random_update(rows, bucket_size, seed=0, scale=1.0):
  return scale * jax.random.normal(jax.random.key(seed), (rows, bucket_size), jnp.float32)


def ranges(rows, lo=-2.0, hi=2.0):
  return jnp.full((rows,), lo, jnp.float32), jnp.full((rows,), hi, jnp.float32)


# Every bits value at K = 2**bits, K below it at 4 bits, and each randomness source once.
ENCODE_CASES = ([(bits, 2 ** bits, "hash") for bits in kq.SUPPORTED_BITS] +
                [(4, 2, "hash"), (4, 15, "hash"), (8, 255, "nearest"), (2, 3, "uniforms")])


@pytest.mark.parametrize("bits, k, mode", ENCODE_CASES)
def test_encode_pallas_equals_reference_bit_for_bit(bits, k, mode):
  rows, bucket_size = 13, 64  # 13 rows: not a multiple of the block (padded)
  x = random_update(rows, bucket_size, seed=bits)
  x = x.at[0, 0].set(jnp.nan).at[1, 1].set(jnp.inf).at[2, 2].set(-jnp.inf).at[3, 3].set(9.0)
  lo, hi = ranges(rows)
  lo = lo.at[4].set(-0.5)  # a row with its own range
  kwargs = dict(k=k, bits=bits, stochastic=mode != "nearest", seed=jnp.uint32(11),
                uniforms=jax.random.uniform(jax.random.key(5), x.shape) if mode == "uniforms"
                else None)
  pallas = kq.encode(x, lo, hi, impl="pallas", **kwargs)
  reference = kq.encode(x, lo, hi, impl="reference", **kwargs)
  assert pallas.dtype == jnp.uint8 and pallas.shape == (rows, bucket_size * bits // 8)
  np.testing.assert_array_equal(pallas, reference)


# 3 and 5 clients: padded to a power of two for the kernel; 1: no padding.
DECODE_CASES = ([(bits, 2 ** bits, 3) for bits in kq.SUPPORTED_BITS] +
                [(4, 2, 3), (2, 3, 3), (8, 255, 1), pytest.param(1, 2, 5, marks=pytest.mark.slow)])


@pytest.mark.parametrize("bits, k, clients", DECODE_CASES)
def test_decode_sum_pallas_equals_reference_bit_for_bit(bits, k, clients):
  rows, width = 11, 64 * bits // 8
  packed = jax.random.randint(jax.random.key(clients), (clients, rows, width), 0, 256
                              ).astype(jnp.uint8)
  if k < 2 ** bits:  # indices must stay below K
    unpacked = jnp.minimum(kq.unpack_reference(packed, bits), k - 1)
    packed = jax.vmap(lambda q: kq.pack_reference(q, bits))(unpacked)
  weights = jax.random.uniform(jax.random.key(9), (clients,))
  lo, hi = ranges(rows, -0.3, 0.7)
  pallas = kq.decode_sum(packed, weights, lo, hi, k=k, bits=bits, impl="pallas")
  reference = kq.decode_sum(packed, weights, lo, hi, k=k, bits=bits, impl="reference")
  np.testing.assert_array_equal(pallas, reference)
  # And it is the weighted sum of per-client decodes.
  per_client = jax.vmap(lambda p: kq.dequantize_reference(p, lo, hi, k=k, bits=bits))(packed)
  np.testing.assert_allclose(pallas, jnp.tensordot(weights, per_client, axes=1), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("bits", kq.SUPPORTED_BITS)
def test_pack_unpack_round_trip(bits):
  for rows, bucket_size in [(1, 8), (3, 24), (9, 128), (17, 40)]:
    q = jax.random.randint(jax.random.key(rows), (rows, bucket_size), 0, 2 ** bits)
    packed = kq.pack_reference(q, bits)
    assert packed.shape == (rows, bucket_size * bits // 8)
    np.testing.assert_array_equal(kq.unpack_reference(packed, bits), q)
  # The kernel packs the same layout: encoding exact grid points gives back their indices
  # (17 rows: not a multiple of the block).
  k = 2 ** bits
  lo, hi = ranges(rows, 0.0, float(k - 1))
  encoded = kq.encode(q.astype(jnp.float32), lo, hi, k=k, bits=bits, impl="pallas")
  np.testing.assert_array_equal(encoded, packed)


@pytest.mark.parametrize("bits, k", [(2, 3), (4, 16), (8, 200)])
def test_nearest_encode_is_nearest_bin(bits, k):
  x = np.asarray(random_update(8, 256, seed=3, scale=1.5))
  lo, hi = -1.0, 2.0
  packed = kq.encode(jnp.asarray(x), *ranges(8, lo, hi), k=k, bits=bits, impl="pallas")
  step = (hi - lo) / (k - 1)
  grid = lo + step * np.arange(k)
  expected = np.argmin(np.abs(np.clip(x, lo, hi)[..., None] - grid), axis=-1)
  got = np.asarray(kq.unpack_reference(packed, bits))
  distance_gap = np.abs(np.clip(x, lo, hi) - grid[got]) - np.abs(np.clip(x, lo, hi) -
                                                                  grid[expected])
  assert np.all(distance_gap <= 1e-6 * step)  # equal, or an exact tie broken upward
  assert np.mean(got == expected) > 0.999


def test_non_finite_values_encode_as_zero():
  x = jnp.array([[jnp.nan, jnp.inf, -jnp.inf, 0.0, 1.0, -1.0, 0.5, -0.5]], jnp.float32)
  packed = kq.encode(x, *ranges(1, -1.0, 1.0), k=3, bits=2, impl="pallas")
  np.testing.assert_array_equal(kq.unpack_reference(packed, 2), [[1, 1, 1, 1, 2, 0, 2, 1]])


def test_stochastic_encode_is_unbiased_and_within_the_variance_bound():
  draws, k, lo, hi = 4000, 4, -1.0, 1.0
  x = random_update(2, 64, seed=1, scale=0.6)
  step = (hi - lo) / (k - 1)
  encode = jax.jit(jax.vmap(lambda seed: kq.dequantize_reference(
      kq.encode(x, *ranges(2, lo, hi), k=k, bits=2, stochastic=True, seed=seed,
                impl="reference"), *ranges(2, lo, hi), k=k, bits=2)))
  decoded = np.asarray(encode(jnp.arange(draws, dtype=jnp.uint32)))
  target = np.clip(np.asarray(x), lo, hi)
  # Unbiased: each coordinate's mean is within 5 standard errors (sd <= step / 2).
  np.testing.assert_array_less(np.abs(decoded.mean(0) - target), 5 * step / 2 / np.sqrt(draws))
  # Variance: frac * (1 - frac) * step^2 per coordinate, never above step^2 / 4.
  frac = (target - lo) / step - np.floor((target - lo) / step)
  variance = decoded.var(0)
  np.testing.assert_allclose(variance, frac * (1 - frac) * step ** 2, atol=0.1 * step ** 2 / 4)
  assert variance.max() <= 1.1 * step ** 2 / 4


def test_hash_uniforms_are_uniform_and_seed_dependent():
  u = kq.hash_uniform(kq.row_seeds(jnp.uint32(3), 64)[:, None],
                      jnp.arange(1024, dtype=jnp.uint32)[None, :])
  assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
  assert abs(float(u.mean()) - 0.5) < 0.01
  counts = np.histogram(np.asarray(u), bins=16, range=(0, 1))[0]
  assert counts.min() > 0.9 * counts.mean()
  other = kq.hash_uniform(kq.row_seeds(jnp.uint32(4), 64)[:, None],
                          jnp.arange(1024, dtype=jnp.uint32)[None, :])
  assert float(jnp.mean(u == other)) < 0.01


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=1, bits=2), "K=1: expected an int >= 2"),
    (dict(k=5, bits=2), "K=5 needs more than bits=2"),
    (dict(k=4, bits=3), "bits=3: expected one of"),
])
def test_bad_quantizer_parameters(kwargs, match):
  with pytest.raises(ValueError, match=match):
    kq.encode(random_update(2, 8), *ranges(2), **kwargs)
  with pytest.raises(ValueError, match=match):
    kq.decode_sum(jnp.zeros((1, 2, 2), jnp.uint8), jnp.ones(1), *ranges(2), **kwargs)


def test_bad_shapes_are_named():
  x = random_update(2, 12)
  with pytest.raises(ValueError, match="bucket_size=12 must be a positive multiple of 8"):
    kq.encode(x, *ranges(2), k=2, bits=1)
  with pytest.raises(ValueError, match=r"lo: got shape \(3,\), expected \(2,\)"):
    kq.encode(x, jnp.zeros(3), jnp.ones(2), k=4, bits=2)
  with pytest.raises(ValueError, match="expected float32"):
    kq.encode(x.astype(jnp.bfloat16), *ranges(2), k=4, bits=2)
  with pytest.raises(ValueError, match="needs `uniforms` or `seed`"):
    kq.encode(x, *ranges(2), k=4, bits=2, stochastic=True)
  with pytest.raises(ValueError, match=r"weights: got shape \(2,\), expected \(1,\)"):
    kq.decode_sum(jnp.zeros((1, 2, 2), jnp.uint8), jnp.ones(2), *ranges(2), k=2, bits=2)
  with pytest.raises(ValueError, match="impl='triton': expected 'auto', 'pallas' or 'reference'"):
    kq.encode(random_update(2, 8), *ranges(2), k=4, bits=2, impl="triton")
  with pytest.raises(ValueError, match="impl='triton': expected 'auto', 'pallas' or 'reference'"):
    kq.decode_sum(jnp.zeros((1, 2, 2), jnp.uint8), jnp.ones(1), *ranges(2), k=4, bits=2,
                  impl="triton")
