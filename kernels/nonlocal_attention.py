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
(kernels/_common.py, as in kernels/kquant.py).

Backends: one kernel body, built per Pallas target (kernels/_common.py: per_target): Triton on
GPU (64 x 64 blocks, running max and sum as vectors) and Mosaic on TPU (`TPU_BLOCKS`, 128 x 128;
running max and sum as (block_q, 1) columns and the log-sum-exp as (B, N, 1), since TPU tiles
the last two dimensions of every block); the gradient's recompute is plain jnp on both. The
tests export the forward and the gradient for `platforms=["cuda"]` and `["tpu"]` without either
device (the Triton / Mosaic custom call is in the lowered module) and run both targets' blocks
in the interpreter against the reference. Measured on GPU (papers/nonlocal_cnn.md); on TPU
lowered only, never run here. CPU: the interpreter, or `impl="reference"`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from kernels._common import per_target, resolve_interpret, select_impl
from kernels._shapes import next_power_of_two, pad_to, round_up

MASKED = -1e30  # finite: exp(MASKED - m) is 0 without inf - inf


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Query and key/value block lengths: powers of two >= 16 (Triton's rule, and its dots' least
  size), which also meets TPU's (multiples of 8 in the sublane dimension)."""
  block_q: int = 64
  block_k: int = 64

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      value = getattr(self, name)
      if value < 16 or value & (value - 1):
        raise ValueError(f"BlockSizes.{name}={value}: expected a power of two >= 16")


# TPU (Mosaic): 128 x 128 blocks fill its matrix unit; from the hardware's shape, not measured
# (no TPU here). `BlockSizes()` (64 x 64) is the GPU default.
TPU_BLOCKS = BlockSizes(block_q=128, block_k=128)


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
  # The running max and sum are (block_q,) vectors for Triton and (block_q, 1) columns on TPU
  # (its vector layouts are 2-D); the log-sum-exp output has the same form (`_forward`).
  column_stats = lse_ref.ndim == 2
  q = q_ref[...].astype(jnp.float32) * scale          # (block_q, C)
  block_q = q.shape[0]
  num_blocks = k_ref.shape[0] // block_k
  stat = (lambda a: a) if column_stats else (lambda a: a[:, None])

  def body(j, carry):
    acc, m, l = carry
    start = pl.multiple_of(j * block_k, block_k)
    k = k_ref[pl.ds(start, block_k), :].astype(jnp.float32)
    v = v_ref[pl.ds(start, block_k), :].astype(jnp.float32)
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)   # (block_q, block_k)
    position = start + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    s = jnp.where(position < kv_len, s, MASKED)
    m_new = jnp.maximum(m, s.max(axis=1, keepdims=column_stats))
    correction = jnp.exp(m - m_new)
    p = jnp.exp(s - stat(m_new))
    l = correction * l + p.sum(axis=1, keepdims=column_stats)
    acc = stat(correction) * acc + jax.lax.dot_general(
        p, v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return acc, m_new, l

  stats_shape = (block_q, 1) if column_stats else (block_q,)
  init = (jnp.zeros((block_q, v_ref.shape[1]), jnp.float32),
          jnp.full(stats_shape, MASKED, jnp.float32), jnp.zeros(stats_shape, jnp.float32))
  acc, m, l = jax.lax.fori_loop(0, num_blocks, body, init)
  o_ref[...] = (acc / stat(l)).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _compiler_params(target: str):
  if target == "tpu":  # every (batch, query block) program is independent
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
  return pltriton.CompilerParams(num_warps=4, num_stages=2)


def _forward(q, k, v, scale, blocks, interpret, target):
  """Padded kernel call: returns (out (B, N, D), lse (B, N)) for the unpadded lengths, on the
  Pallas target the call lowers for (kernels/_common.py: per_target). `blocks` None: the
  target's default (`BlockSizes()` on GPU, `TPU_BLOCKS` on TPU)."""
  b, n, c = q.shape
  m, d = k.shape[1], v.shape[2]

  def build(target: str):
    bl = blocks if blocks is not None else (BlockSizes() if target == "gpu" else TPU_BLOCKS)
    n_pad, m_pad = round_up(n, bl.block_q), round_up(m, bl.block_k)
    c_pad, d_pad = next_power_of_two(max(c, 16)), next_power_of_two(max(d, 16))
    if target == "gpu":  # lse (B, N): one row of block_q per program
      lse_shape, lse_spec = (b, n_pad), pl.BlockSpec((pl.squeezed, bl.block_q), lambda i, j: (i, j))
    else:  # lse (B, N, 1): a (block_q, 1) column, as TPU tiles the last two dimensions
      lse_shape = (b, n_pad, 1)
      lse_spec = pl.BlockSpec((pl.squeezed, bl.block_q, 1), lambda i, j: (i, j, 0))

    def call(q, k, v):
      qp = pad_to(q, {1: n_pad, 2: c_pad})
      kp = pad_to(k, {1: m_pad, 2: c_pad})
      vp = pad_to(v, {1: m_pad, 2: d_pad})
      out, lse = pl.pallas_call(
          functools.partial(_forward_kernel, scale=scale, block_k=bl.block_k, kv_len=m),
          out_shape=(jax.ShapeDtypeStruct((b, n_pad, d_pad), q.dtype),
                     jax.ShapeDtypeStruct(lse_shape, jnp.float32)),
          grid=(b, n_pad // bl.block_q),
          in_specs=[pl.BlockSpec((pl.squeezed, bl.block_q, c_pad), lambda i, j: (i, j, 0)),
                    pl.BlockSpec((pl.squeezed, m_pad, c_pad), lambda i, j: (i, 0, 0)),
                    pl.BlockSpec((pl.squeezed, m_pad, d_pad), lambda i, j: (i, 0, 0))],
          out_specs=(pl.BlockSpec((pl.squeezed, bl.block_q, d_pad), lambda i, j: (i, j, 0)),
                     lse_spec),
          interpret=interpret, compiler_params=_compiler_params(target),
          name="nonlocal_attention_fwd",
      )(qp, kp, vp)
      return out[:, :n, :d], lse.reshape(b, n_pad)[:, :n]

    return call

  return per_target(build, q, k, v, interpret=interpret, target=target)


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _attention(q, k, v, scale, blocks, interpret, target):
  return _forward(q, k, v, scale, blocks, interpret, target)[0]


def _attention_fwd(q, k, v, scale, blocks, interpret, target):
  out, lse = _forward(q, k, v, scale, blocks, interpret, target)
  return out, (q, k, v, out, lse)


def _attention_bwd(scale, blocks, interpret, target, residuals, d_out):
  del interpret, target
  q, k, v, out, lse = residuals
  # The recompute's key blocks need not match the kernel's (any length gives the same sums).
  block_k = (blocks if blocks is not None else BlockSizes()).block_k
  return _backward(q, k, v, out, lse, d_out, scale, block_k)


_attention.defvjp(_attention_fwd, _attention_bwd)


def nonlocal_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float | None = None, *,
                       impl: str = "pallas", blocks: BlockSizes | None = None,
                       interpret: bool | None = None, target: str | None = None) -> jax.Array:
  """softmax(scale * q k^T) v without the N x M matrix; see the module docstring.

  Args:
    q: (B, N, C) queries; k: (B, M, C) keys; v: (B, M, D) values (float32 or bfloat16).
    scale: logit scale, default C ** -0.5.
    impl: "pallas" (the kernel), "reference" (`attention_reference`: the same function, with
      the N x M scores) or "auto" (kernels/_common.py: select_impl, by backend).
    blocks: query / key-value block lengths (pallas); None: 64 x 64 on GPU, `TPU_BLOCKS` on TPU.
    interpret: run the Pallas interpreter (default: on CPU).
    target: "gpu" (Triton) or "tpu" (Mosaic) fixes the Pallas target (e.g. to interpret the TPU
      blocks); None: the platform the call is lowered for.
  Returns:
    (B, N, D) in q's dtype.
  """
  _check(q, k, v)
  scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
  if select_impl(impl) == "reference":
    return attention_reference(q, k, v, scale)
  return _attention(q, k, v, scale, blocks, resolve_interpret(interpret), target)


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
