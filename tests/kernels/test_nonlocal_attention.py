"""kernels/nonlocal_attention.py: the Pallas kernel (interpret mode) against the jnp reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels._common import resolve_interpret
from kernels.nonlocal_attention import BlockSizes, attention_reference, nonlocal_attention
from research.common.jaxpr import largest_intermediate

slow = pytest.mark.slow
CASES = [  # (B, N, M, C, D, block_q, block_k): ragged lengths, odd channels, N < M and N > M
    (1, 40, 37, 5, 3, 16, 16),     # default: N > M, both ragged, odd C and D, 3 x 3 blocks
    pytest.param(2, 33, 70, 5, 3, 16, 32, marks=slow),   # N < M
    pytest.param(2, 100, 37, 8, 12, 16, 16, marks=slow),
    pytest.param(1, 64, 64, 16, 16, 32, 16, marks=slow),
    pytest.param(1, 256, 16, 32, 32, 64, 16, marks=slow),
    pytest.param(3, 17, 1, 4, 4, 16, 16, marks=slow),   # one key
]


def operands(b, n, m, c, d, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(keys[0], (b, n, c)), jax.random.normal(keys[1], (b, m, c)),
          jax.random.normal(keys[2], (b, m, d)), jax.random.normal(keys[3], (b, n, d)))


@pytest.mark.parametrize("b, n, m, c, d, block_q, block_k", CASES)
def test_forward_and_gradients_match_the_reference(b, n, m, c, d, block_q, block_k):
  q, k, v, w = operands(b, n, m, c, d)
  blocks = BlockSizes(block_q, block_k)
  kernel = lambda *a: nonlocal_attention(*a, blocks=blocks)
  np.testing.assert_allclose(jax.jit(kernel)(q, k, v), jax.jit(attention_reference)(q, k, v),
                             atol=1e-5, rtol=1e-5)
  loss = lambda fn: (lambda *a: jnp.sum(fn(*a) * w))
  got = jax.jit(jax.grad(loss(kernel), argnums=(0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(loss(attention_reference), argnums=(0, 1, 2)))(q, k, v)
  assert len(got) == len(want) == 3
  for name, g, r in zip("qkv", got, want):
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


def test_scale_and_large_logits_stay_finite():
  q, k, v, _ = operands(1, 40, 24, 8, 8, seed=3)
  got = jax.jit(lambda q, k, v: nonlocal_attention(q, k, v, scale=1.0, blocks=BlockSizes(16, 16)))(
      q * 30, k * 30, v)
  np.testing.assert_allclose(got, attention_reference(q * 30, k * 30, v, scale=1.0), atol=1e-5)
  assert bool(jnp.all(jnp.isfinite(got)))


def test_never_materializes_the_n_by_m_scores():
  b, n, m, c, d = 1, 512, 256, 8, 8
  q, k, v, w = operands(b, n, m, c, d)
  blocks = BlockSizes(64, 32)
  fn = lambda q, k, v: jnp.sum(nonlocal_attention(q, k, v, blocks=blocks) * w)
  kernel = largest_intermediate(jax.make_jaxpr(jax.value_and_grad(fn, (0, 1, 2)))(q, k, v).jaxpr)
  reference = largest_intermediate(jax.make_jaxpr(
      jax.value_and_grad(lambda q, k, v: jnp.sum(attention_reference(q, k, v) * w),
                         (0, 1, 2)))(q, k, v).jaxpr)
  assert reference >= n * m  # the check sees the scores where they exist
  # Forward and backward: nothing larger than N x block_k (the backward's score block) or the
  # padded operands.
  assert kernel <= b * n * max(blocks.block_k, 16), kernel
  assert kernel < n * m // 4


@pytest.mark.parametrize("shapes, match", [
    (((2, 8, 4), (2, 5, 4), (2, 6, 4)), r"equal B, C and M"),
    (((2, 8, 4), (2, 5, 3), (2, 5, 4)), r"equal B, C and M"),
    (((8, 4), (5, 4), (5, 4)), r"expected \(B, N, C\)"),
    (((1, 8, 4), (1, 0, 4), (1, 0, 4)), r"M=0; expected >= 1"),
])
def test_bad_shapes_are_refused(shapes, match):
  q, k, v = (jnp.zeros(s) for s in shapes)
  with pytest.raises(ValueError, match=match):
    nonlocal_attention(q, k, v)


def test_impl_reference_is_the_jnp_reference_and_others_are_refused():
  q, k, v, _ = operands(1, 20, 9, 4, 4, seed=5)
  # impl="pallas" (the default) is what every other test here compares with the reference.
  assert jnp.array_equal(nonlocal_attention(q, k, v, impl="reference"),
                         attention_reference(q, k, v))
  with pytest.raises(ValueError, match=r"impl='triton': expected 'auto', 'pallas' or 'reference'"):
    nonlocal_attention(q, k, v, impl="triton")


def test_interpret_defaults_to_the_backend():
  assert resolve_interpret(None) == (jax.default_backend() == "cpu")
  assert resolve_interpret(False) is False and resolve_interpret(True) is True


def test_block_sizes_must_suit_triton():
  with pytest.raises(ValueError, match="block_q=24: expected a power of two >= 16"):
    BlockSizes(24, 16)
  with pytest.raises(ValueError, match="block_k=8"):
    BlockSizes(16, 8)
