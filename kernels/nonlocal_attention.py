"""Non-local attention across resolutions: queries at one resolution, keys/values at another.

    out[b, i] = sum_j softmax_j(scale * q[b, i] . k[b, j]) v[b, j]

with q (B, N, C), k (B, M, C), v (B, M, D): the embedded-Gaussian non-local operation of Wang et
al. (CVPR'18) when q, k, v are theta(x), phi(x), g(x). In the two-stage CNN the queries are the
N full-resolution positions and the keys/values the M = N / s^2 positions of the downscaled
image, so the cost is O(N * M * C) instead of O(N^2 * C).

`nonlocal_attention` is a flash-style Pallas kernel: one program per (batch, block of queries)
walks the keys/values in blocks with an online softmax (running max and sum), so the N x M score
matrix never exists; O(N) extra memory (the output and the per-query log-sum-exp). Lengths that
are not block multiples are padded and the padded keys masked; channels are padded to a power of
two (Triton's block rule) with zeros, which change no dot product. The gradient (`custom_vjp`) is
a blockwise recompute in plain jnp over the same key/value blocks, from the saved log-sum-exp:
memory O(N * block_k), never N x M.

`nonlocal_attention(..., impl="reference")` is `attention_reference` (last in this file), the
plain-jnp definition the tests compare against; `interpret` defaults to True on CPU
(kernels/_common.py, as in kernels/kquant.py); for GPU the kernel lowers through Triton
(`jax.export(..., platforms=["cuda"])` in the tests proves it without a GPU).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels._common import check_impl, resolve_interpret
from kernels._shapes import next_power_of_two, pad_to, round_up

MASKED = -1e30  # finite: exp(MASKED - m) is 0 without inf - inf


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Query and key/value block lengths (powers of two for Triton, at least 16 for its dots)."""
  block_q: int = 64
  block_k: int = 64

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      value = getattr(self, name)
      if value < 16 or value & (value - 1):
        raise ValueError(f"BlockSizes.{name}={value}: expected a power of two >= 16")


def _check(q, k, v) -> None:
  if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
    raise ValueError(f"q, k, v: got shapes {q.shape}, {k.shape}, {v.shape}; expected (B, N, C), "
                     "(B, M, C), (B, M, D)")
  if k.shape[:2] != v.shape[:2] or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
    raise ValueError(f"q, k, v: got shapes {q.shape}, {k.shape}, {v.shape}; expected (B, N, C), "
                     "(B, M, C), (B, M, D) with equal B, C and M")
  if k.shape[1] == 0 or q.shape[1] == 0:
    raise ValueError(f"q, k: got lengths N={q.shape[1]}, M={k.shape[1]}; expected >= 1")


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale: float, block_k: int,
                    kv_len: int):
  q = q_ref[...].astype(jnp.float32) * scale          # (block_q, C)
  block_q = q.shape[0]
  num_blocks = k_ref.shape[0] // block_k

  def body(j, carry):
    acc, m, l = carry
    start = j * block_k
    k = k_ref[pl.ds(start, block_k), :].astype(jnp.float32)
    v = v_ref[pl.ds(start, block_k), :].astype(jnp.float32)
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)   # (block_q, block_k)
    position = start + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    s = jnp.where(position < kv_len, s, MASKED)
    m_new = jnp.maximum(m, s.max(axis=1))
    correction = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    l = correction * l + p.sum(axis=1)
    acc = correction[:, None] * acc + jax.lax.dot_general(
        p, v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return acc, m_new, l

  init = (jnp.zeros((block_q, v_ref.shape[1]), jnp.float32),
          jnp.full((block_q,), MASKED, jnp.float32), jnp.zeros((block_q,), jnp.float32))
  acc, m, l = jax.lax.fori_loop(0, num_blocks, body, init)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _forward(q, k, v, scale, blocks, interpret):
  """Padded kernel call: returns (out (B, N, D), lse (B, N)) for the unpadded lengths."""
  b, n, c = q.shape
  m, d = k.shape[1], v.shape[2]
  n_pad, m_pad = round_up(n, blocks.block_q), round_up(m, blocks.block_k)
  c_pad, d_pad = next_power_of_two(max(c, 16)), next_power_of_two(max(d, 16))
  qp = pad_to(q, {1: n_pad, 2: c_pad})
  kp = pad_to(k, {1: m_pad, 2: c_pad})
  vp = pad_to(v, {1: m_pad, 2: d_pad})
  out, lse = pl.pallas_call(
      functools.partial(_forward_kernel, scale=scale, block_k=blocks.block_k, kv_len=m),
      out_shape=(jax.ShapeDtypeStruct((b, n_pad, d_pad), q.dtype),
                 jax.ShapeDtypeStruct((b, n_pad), jnp.float32)),
      grid=(b, n_pad // blocks.block_q),
      in_specs=[pl.BlockSpec((pl.squeezed, blocks.block_q, c_pad), lambda i, j: (i, j, 0)),
                pl.BlockSpec((pl.squeezed, m_pad, c_pad), lambda i, j: (i, 0, 0)),
                pl.BlockSpec((pl.squeezed, m_pad, d_pad), lambda i, j: (i, 0, 0))],
      out_specs=(pl.BlockSpec((pl.squeezed, blocks.block_q, d_pad), lambda i, j: (i, j, 0)),
                 pl.BlockSpec((pl.squeezed, blocks.block_q), lambda i, j: (i, j))),
      interpret=interpret, compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
      name="nonlocal_attention_fwd",
  )(qp, kp, vp)
  return out[:, :n, :d], lse[:, :n]


def _backward(q, k, v, out, lse, d_out, scale, block_k):
  """Blockwise recompute over key/value blocks: O(N * block_k) live memory, never N x M."""
  m = k.shape[1]
  m_pad = round_up(m, block_k)
  f32 = lambda a: a.astype(jnp.float32)
  q32, d_out32 = f32(q), f32(d_out)
  delta = jnp.sum(d_out32 * f32(out), axis=-1)                       # (B, N)
  kb = f32(pad_to(k, {1: m_pad})).reshape(k.shape[0], -1, block_k, k.shape[2]).swapaxes(0, 1)
  vb = f32(pad_to(v, {1: m_pad})).reshape(v.shape[0], -1, block_k, v.shape[2]).swapaxes(0, 1)
  hp = jax.lax.Precision.HIGHEST

  def step(d_q, block):
    j, k_j, v_j = block
    s = jnp.einsum("bnc,bkc->bnk", q32, k_j, precision=hp) * scale
    valid = (j * block_k + jnp.arange(block_k)) < m
    p = jnp.where(valid, jnp.exp(s - lse[..., None]), 0.0)          # (B, N, block_k)
    d_v = jnp.einsum("bnk,bnd->bkd", p, d_out32, precision=hp)
    d_p = jnp.einsum("bnd,bkd->bnk", d_out32, v_j, precision=hp)
    d_s = p * (d_p - delta[..., None]) * scale
    d_q = d_q + jnp.einsum("bnk,bkc->bnc", d_s, k_j, precision=hp)
    d_k = jnp.einsum("bnk,bnc->bkc", d_s, q32, precision=hp)
    return d_q, (d_k, d_v)

  d_q, (d_k, d_v) = jax.lax.scan(step, jnp.zeros_like(q32),
                                 (jnp.arange(kb.shape[0]), kb, vb))
  unblock = lambda a: a.swapaxes(0, 1).reshape(a.shape[1], -1, a.shape[3])[:, :m]
  return d_q.astype(q.dtype), unblock(d_k).astype(k.dtype), unblock(d_v).astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _attention(q, k, v, scale, blocks, interpret):
  return _forward(q, k, v, scale, blocks, interpret)[0]


def _attention_fwd(q, k, v, scale, blocks, interpret):
  out, lse = _forward(q, k, v, scale, blocks, interpret)
  return out, (q, k, v, out, lse)


def _attention_bwd(scale, blocks, interpret, residuals, d_out):
  del interpret
  q, k, v, out, lse = residuals
  return _backward(q, k, v, out, lse, d_out, scale, blocks.block_k)


_attention.defvjp(_attention_fwd, _attention_bwd)


def nonlocal_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float | None = None, *,
                       impl: str = "pallas", blocks: BlockSizes = BlockSizes(),
                       interpret: bool | None = None) -> jax.Array:
  """softmax(scale * q k^T) v without the N x M matrix; see the module docstring.

  Args:
    q: (B, N, C) queries; k: (B, M, C) keys; v: (B, M, D) values (float32 or bfloat16).
    scale: logit scale, default C ** -0.5.
    impl: "pallas" (the kernel) or "reference" (`attention_reference`: the same function, with
      the N x M scores).
    blocks: query / key-value block lengths (pallas).
    interpret: run the Pallas interpreter (default: on CPU).
  Returns:
    (B, N, D) in q's dtype.
  """
  _check(q, k, v)
  scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
  if check_impl(impl) == "reference":
    return attention_reference(q, k, v, scale)
  return _attention(q, k, v, scale, blocks, resolve_interpret(interpret))


# ---------------------------------------------------------------------------------------------
# Plain-jnp reference.

def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, scale: float | None = None
                        ) -> jax.Array:
  """softmax(scale * q k^T) v, materializing the (B, N, M) scores. float32 math."""
  _check(q, k, v)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  scores = jnp.einsum("bnc,bmc->bnm", q.astype(jnp.float32), k.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST) * scale
  weights = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bnm,bmd->bnd", weights, v.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  return out.astype(q.dtype)
