"""Both Pallas kernels lower for GPU (Triton) and TPU (Mosaic), checked without either device by
exporting every public entry for one platform at a time, over shapes that are and are not block
multiples; and the blocks the TPU build uses, run in the interpreter, equal the references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import _common
from kernels import kquant as kq
from kernels import nonlocal_attention as na

# The custom call each Pallas compiler leaves in the lowered module.
CUSTOM_CALL = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}


def export(fn, platform, *specs):
  """The lowered module text of `jax.jit(fn)` for one platform (export refuses custom calls it
  does not know to be stable; these two are Pallas's)."""
  disabled = [jax.export.DisabledSafetyCheck.custom_call(CUSTOM_CALL[platform])]
  return jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=disabled)(
      *specs).mlir_module()


def spec(shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


slow = pytest.mark.slow
# Default: 4 bits (the experiments' setting); the other bit widths are slow cases.
BITS = [pytest.param(b, marks=() if b == 4 else slow) for b in kq.SUPPORTED_BITS]

# (rows, bucket_size): rows a block multiple on neither target, one row, many rows.
KQUANT_SHAPES = [(40, 256), (1, 64), (257, 1024)]


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("bits", BITS)
def test_kquant_encode_and_decode_lower_for_each_platform(platform, bits):
  for (rows, bucket_size), mode in zip(KQUANT_SHAPES, ["hash", "nearest", "uniforms"]):
    encode = functools.partial(kq.encode, k=2 ** bits, bits=bits, stochastic=mode != "nearest",
                               impl="pallas", interpret=False)
    specs = [spec((rows, bucket_size)), spec((rows,)), spec((rows,))]
    if mode == "uniforms":
      module = export(lambda x, lo, hi, u: encode(x, lo, hi, uniforms=u), platform, *specs,
                      spec((rows, bucket_size)))
    else:
      module = export(lambda x, lo, hi, s: encode(x, lo, hi, seed=s), platform, *specs,
                      spec((), jnp.uint32))
    assert CUSTOM_CALL[platform] in module, (rows, bucket_size, mode)
  for clients, (rows, bucket_size) in zip([1, 3, 100], KQUANT_SHAPES):
    decode = functools.partial(kq.decode_sum, k=2 ** bits, bits=bits, impl="pallas",
                               interpret=False)
    module = export(decode, platform, spec((clients, rows, bucket_size * bits // 8), jnp.uint8),
                    spec((clients,)), spec((rows,)), spec((rows,)))
    assert CUSTOM_CALL[platform] in module, (clients, rows, bucket_size)
    assert CUSTOM_CALL["tpu" if platform == "cuda" else "cuda"] not in module


# (B, N, M, C, D): the shape, ragged lengths with odd channels, one key, a long N.
NONLOCAL_SHAPES = [(1, 1024, 256, 64, 64), (2, 1000, 77, 24, 40), (3, 17, 1, 4, 4),
                   (1, 4096, 256, 64, 64)]


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=slow)])
def test_nonlocal_forward_and_gradient_lower_for_each_platform(platform, dtype):
  forward = lambda q, k, v: na.nonlocal_attention(q, k, v, interpret=False)
  grad = jax.grad(lambda q, k, v: jnp.sum(forward(q, k, v).astype(jnp.float32)),
                  argnums=(0, 1, 2))
  for b, n, m, c, d in NONLOCAL_SHAPES:
    specs = [spec((b, n, c), dtype), spec((b, m, c), dtype), spec((b, m, d), dtype)]
    for fn in (forward, grad):
      assert CUSTOM_CALL[platform] in export(fn, platform, *specs), (b, n, m, c, d)


def test_block_sizes_that_break_a_targets_rule_are_refused_by_name():
  x, lo, hi = jnp.zeros((40, 64)), jnp.zeros(40), jnp.ones(40)
  with pytest.raises(ValueError, match=r"block_sizes.rows=16: expected a multiple of 32 on TPU"):
    kq.encode(x, lo, hi, k=4, bits=2, target="tpu", block_sizes=kq.BlockSizes(rows=16))
  with pytest.raises(ValueError, match=r"block_sizes.rows=24: expected a power of two on GPU"):
    kq.encode(x, lo, hi, k=4, bits=2, target="gpu", block_sizes=kq.BlockSizes(rows=24))
  with pytest.raises(ValueError, match=r"target='mosaic': expected 'gpu' \(Triton\) or 'tpu'"):
    kq.encode(x, lo, hi, k=4, bits=2, target="mosaic")


def test_auto_picks_the_kernel_where_a_pallas_compiler_exists():
  assert _common.select_impl("auto") == ("reference" if jax.default_backend() == "cpu"
                                         else "pallas")
  assert _common.select_impl("pallas") == "pallas"
  x, lo, hi = jax.random.normal(jax.random.key(0), (5, 64)), jnp.full(5, -2.0), jnp.full(5, 2.0)
  np.testing.assert_array_equal(kq.encode(x, lo, hi, k=16, bits=4, impl="auto"),
                                kq.encode(x, lo, hi, k=16, bits=4, impl="reference"))


# -- the TPU build's blocks in the interpreter ------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
def test_kquant_tpu_blocks_equal_the_reference_bit_for_bit(bits):
  rows, bucket_size, clients = 70, 128, 3  # 3 blocks of 32 rows, the last one padded
  x = jax.random.normal(jax.random.key(bits), (rows, bucket_size)).at[0, 0].set(jnp.nan)
  lo, hi = jnp.full((rows,), -2.0).at[4].set(-0.5), jnp.full((rows,), 2.0)
  common = dict(k=2 ** bits, bits=bits, stochastic=True, seed=jnp.uint32(7))
  packed = kq.encode(x, lo, hi, impl="pallas", target="tpu", block_sizes=kq.BlockSizes(32),
                     **common)
  np.testing.assert_array_equal(packed, kq.encode(x, lo, hi, impl="reference", **common))
  many = jax.random.randint(jax.random.key(1), (clients, rows, bucket_size * bits // 8), 0,
                            256).astype(jnp.uint8)
  weights = jnp.array([0.2, 0.3, 0.5])
  got = kq.decode_sum(many, weights, lo, hi, k=2 ** bits, bits=bits, impl="pallas",
                      target="tpu", block_sizes=kq.BlockSizes(32))
  np.testing.assert_array_equal(
      got, kq.decode_sum(many, weights, lo, hi, k=2 ** bits, bits=bits, impl="reference"))


@slow  # default: the same TPU build at 32-row blocks (test_kquant_tpu_blocks_equal_...[4])
def test_kquant_tpu_default_blocks_equal_the_reference():
  rows = 300  # 2 blocks of TPU_ENCODE_BLOCKS.rows = 256, 5 of TPU_DECODE_BLOCKS.rows = 64
  x = jax.random.normal(jax.random.key(3), (rows, 64))
  lo, hi = jnp.full((rows,), -2.0), jnp.full((rows,), 2.0)
  packed = kq.encode(x, lo, hi, k=16, bits=4, target="tpu")
  np.testing.assert_array_equal(packed, kq.encode(x, lo, hi, k=16, bits=4, impl="reference"))
  got = kq.decode_sum(packed[None], jnp.ones(1), lo, hi, k=16, bits=4, target="tpu")
  np.testing.assert_array_equal(
      got, kq.decode_sum(packed[None], jnp.ones(1), lo, hi, k=16, bits=4, impl="reference"))


@pytest.mark.parametrize("b, n, m, c, d, blocks", [
    pytest.param(1, 40, 37, 5, 3, na.BlockSizes(16, 16), marks=slow),  # 3 x 3 ragged blocks
    (1, 130, 20, 8, 8, None),  # TPU_BLOCKS: 2 query blocks (the 2nd ragged), 1 ragged key block
])
def test_nonlocal_tpu_blocks_match_the_reference(b, n, m, c, d, blocks):
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(keys[0], (b, n, c)), jax.random.normal(keys[1], (b, m, c)),
             jax.random.normal(keys[2], (b, m, d)))
  w = jax.random.normal(keys[3], (b, n, d))
  kernel = lambda q, k, v: na.nonlocal_attention(q, k, v, blocks=blocks, target="tpu")
  np.testing.assert_allclose(jax.jit(kernel)(q, k, v), na.attention_reference(q, k, v),
                             atol=1e-5, rtol=1e-5)
  loss = lambda fn: (lambda *a: jnp.sum(fn(*a) * w))
  got = jax.jit(jax.grad(loss(kernel), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(loss(na.attention_reference), argnums=(0, 1, 2))(q, k, v)
  for name, g, r in zip("qkv", got, want):
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")
