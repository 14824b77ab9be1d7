"""K-quant range quantizer kernels: encode + bit-pack, and fused decode + weighted client sum.

Data layout (the wire format). An update is held as buckets: a float32 array `x` of shape
(rows, bucket_size), each row one bucket with its own range [lo, hi] (per-tensor ranges repeat
one range over a tensor's rows). With `bits` in {1, 2, 4, 8} and `per = 8 // bits` indices per
byte, row r packs into `bucket_size // per` bytes, planar within the row: byte j holds the
indices of elements j + i * (bucket_size // per) for i = 0..per-1, element i at bits
[i * bits, (i + 1) * bits). Planar packing keeps every load and store in the kernels a contiguous
slice (no in-kernel reshapes), which is what the Triton lowering wants.

Quantization (Suresh et al., ICML'17, with K levels between lo and hi):
  t = (clip(x, lo, hi) - lo) * (K - 1) / (hi - lo)
  nearest:     q = floor(t + 1/2)            (ties round up)
  stochastic:  q = floor(t + u), u ~ U[0, 1)  (unbiased: E[q] = t)
  decode:      x' = lo + q * (hi - lo) / (K - 1)
Non-finite inputs (NaN, +-Inf) are encoded as if they were 0 (clipped into the range); callers
count them separately (see research/kquant/quantize.py for the protocol rule).

Randomness for stochastic rounding: Pallas on GPU has no PRNG primitive, so either uniforms are
passed in, or they come from a counter hash (murmur3's 32-bit finalizer) of a per-row seed and
the column index, computed identically in the kernel and in the reference.

Each public function takes `impl="pallas" | "reference"` and `interpret=None` (True on CPU), both
resolved by kernels/_common.py as in every kernel file here; the references come last.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels._common import check_impl, resolve_interpret
from kernels._shapes import next_power_of_two, pad_to, round_up

SUPPORTED_BITS = (1, 2, 4, 8)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_GOLDEN = 0x9E3779B9


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  rows: int  # bucket rows per program; a power of two for the Triton lowering


# Picked by a block-size sweep on an H200 whose numbers were not kept (sweep again before changing
# them); what these sizes measure is the kept papers/results/bench_kquant.gpu.json
# (`python -m experiments.bench_kquant --sizes 4194304,33554432 --clients 64 --paper` on a GPU).
ENCODE_BLOCKS = BlockSizes(rows=32)
DECODE_BLOCKS = BlockSizes(rows=8)


def check_quantizer(k: int, bits: int) -> None:
  if bits not in SUPPORTED_BITS:
    raise ValueError(f"bits={bits!r}: expected one of {SUPPORTED_BITS}")
  if not isinstance(k, (int, np.integer)) or k < 2:
    raise ValueError(f"K={k!r}: expected an int >= 2")
  if k > 2 ** bits:
    raise ValueError(f"K={k} needs more than bits={bits} (2**bits={2 ** bits} levels); "
                     f"expected K <= 2**bits")


def packed_width(bucket_size: int, bits: int) -> int:
  return bucket_size * bits // 8


def _check_bucket_size(bucket_size: int, bits: int) -> None:
  per = 8 // bits
  if bucket_size % per or bucket_size < per:
    raise ValueError(f"bucket_size={bucket_size} must be a positive multiple of {per} "
                     f"(indices per byte at bits={bits})")


def _compiler_params():
  # Mosaic GPU is the default Pallas GPU lowering on Hopper; these kernels use the Triton one.
  return pltriton.CompilerParams(num_warps=4, num_stages=1)


# ---------------------------------------------------------------------------------------------
# Shared math: the kernel bodies and the reference both call these on equal-shaped blocks, so
# they perform the same float operations in the same order.

def fmix32(h: jax.Array) -> jax.Array:
  """murmur3's 32-bit finalizer: a bijective, well-mixed hash of uint32 values."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def row_seeds(seed: jax.Array, rows: int) -> jax.Array:
  """Per-row uint32 seeds from one uint32 seed."""
  return fmix32(jnp.asarray(seed, jnp.uint32) + jnp.arange(rows, dtype=jnp.uint32) *
                jnp.uint32(_GOLDEN))


def hash_uniform(row_seed: jax.Array, column: jax.Array) -> jax.Array:
  """U[0, 1) float32 with 24 random bits from (row seed, column index)."""
  h = fmix32(row_seed + column * jnp.uint32(_GOLDEN))
  return (h >> 8).astype(jnp.float32) * jnp.float32(2.0 ** -24)


def _quantize(x, lo, hi, u, k):
  finite = jnp.abs(x) <= _FLOAT32_MAX  # False for NaN and +-Inf
  x = jnp.where(finite, x, jnp.float32(0.0))
  scale = jnp.float32(k - 1) / (hi - lo)
  t = (jnp.minimum(jnp.maximum(x, lo), hi) - lo) * scale
  q = jnp.floor(t + u)
  return jnp.minimum(jnp.maximum(q, 0.0), jnp.float32(k - 1)).astype(jnp.uint32)


# ---------------------------------------------------------------------------------------------
# Encode.

def _encode_kernel(x_ref, lo_ref, hi_ref, seed_ref, *rest, k: int, bits: int, stochastic: bool,
                   supplied_uniforms: bool):
  if supplied_uniforms:
    u_ref, o_ref = rest
  else:
    (o_ref,) = rest
  block_rows, width = o_ref.shape
  lo = lo_ref[...][:, None]
  hi = hi_ref[...][:, None]
  seed = seed_ref[...][:, None]
  packed = jnp.zeros((block_rows, width), jnp.uint32)
  for i in range(8 // bits):
    x = x_ref[:, pl.ds(i * width, width)]
    if not stochastic:
      u = jnp.float32(0.5)
    elif supplied_uniforms:
      u = u_ref[:, pl.ds(i * width, width)]
    else:
      column = jax.lax.broadcasted_iota(jnp.uint32, (block_rows, width), 1) + jnp.uint32(
          i * width)
      u = hash_uniform(seed, column)
    packed = packed | (_quantize(x, lo, hi, u, k) << jnp.uint32(i * bits))
  o_ref[...] = packed.astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames=("k", "bits", "stochastic", "impl", "interpret",
                                             "block_sizes"))
def encode(x: jax.Array, lo: jax.Array, hi: jax.Array, *, k: int, bits: int,
           stochastic: bool = False, seed: jax.Array | None = None,
           uniforms: jax.Array | None = None, impl: str = "pallas",
           interpret: bool | None = None, block_sizes: BlockSizes = ENCODE_BLOCKS) -> jax.Array:
  """Quantizes bucketed x (rows, bucket_size) to K levels in [lo, hi] and bit-packs to uint8.

  Args:
    x: float32 (rows, bucket_size); bucket_size a multiple of 8 // bits.
    lo, hi: float32 (rows,), the range of each bucket, lo < hi.
    k, bits: levels and bits per index, 2 <= K <= 2**bits, bits in {1, 2, 4, 8}.
    stochastic: stochastic rounding (needs `uniforms` or `seed`) instead of nearest.
    seed: uint32 scalar for the in-kernel counter hash (used when `uniforms` is None).
    uniforms: float32 like x, U[0, 1), supplied randomness.
  Returns:
    uint8 (rows, bucket_size * bits // 8) in the planar layout of the module docstring.
  """
  check_quantizer(k, bits)
  if x.ndim != 2 or x.dtype != jnp.float32:
    raise ValueError(f"x: got {x.dtype}{list(x.shape)}, expected float32[rows, bucket_size]")
  rows, bucket_size = x.shape
  _check_bucket_size(bucket_size, bits)
  for name, value in (("lo", lo), ("hi", hi)):
    if value.shape != (rows,):
      raise ValueError(f"{name}: got shape {value.shape}, expected ({rows},)")
  if stochastic and uniforms is None and seed is None:
    raise ValueError("stochastic encode needs `uniforms` or `seed`")
  if uniforms is not None and uniforms.shape != x.shape:
    raise ValueError(f"uniforms: got shape {uniforms.shape}, expected {x.shape}")
  lo, hi = lo.astype(jnp.float32), hi.astype(jnp.float32)
  seeds = row_seeds(jnp.uint32(0) if seed is None else seed, rows)
  supplied = stochastic and uniforms is not None
  if check_impl(impl) == "reference":
    return encode_reference(x, lo, hi, k=k, bits=bits, stochastic=stochastic, seeds=seeds,
                            uniforms=uniforms if supplied else None)
  interpret = resolve_interpret(interpret)
  block_rows = block_sizes.rows
  padded = round_up(rows, block_rows)
  width = packed_width(bucket_size, bits)
  # Padded rows get lo = 0, hi = 1, so no division by zero is ever evaluated.
  operands = [pad_to(x, {0: padded}), pad_to(lo, {0: padded}),
              pad_to(hi, {0: padded}).at[rows:].set(1.0), pad_to(seeds, {0: padded})]
  in_specs = [pl.BlockSpec((block_rows, bucket_size), lambda r: (r, 0)),
              pl.BlockSpec((block_rows,), lambda r: (r,)),
              pl.BlockSpec((block_rows,), lambda r: (r,)),
              pl.BlockSpec((block_rows,), lambda r: (r,))]
  if supplied:
    operands.append(pad_to(uniforms.astype(jnp.float32), {0: padded}))
    in_specs.append(pl.BlockSpec((block_rows, bucket_size), lambda r: (r, 0)))
  out = pl.pallas_call(
      functools.partial(_encode_kernel, k=k, bits=bits, stochastic=stochastic,
                        supplied_uniforms=supplied),
      out_shape=jax.ShapeDtypeStruct((padded, width), jnp.uint8),
      grid=(padded // block_rows,), in_specs=in_specs,
      out_specs=pl.BlockSpec((block_rows, width), lambda r: (r, 0)),
      interpret=interpret, compiler_params=_compiler_params(), name="kquant_encode",
  )(*operands)
  return out[:rows]


# ---------------------------------------------------------------------------------------------
# Fused decode + weighted sum over clients (the coordinator's side).

def _decode_sum_kernel(packed_ref, weight_ref, base_ref, lo_ref, hi_ref, o_ref, *, k: int,
                       bits: int, num_clients: int):
  block_rows, bucket_size = o_ref.shape
  per, width = 8 // bits, bucket_size // (8 // bits)
  mask = jnp.uint32(2 ** bits - 1)
  lo = lo_ref[...][:, None]
  hi = hi_ref[...][:, None]
  step = (hi - lo) / jnp.float32(k - 1)

  def add_client(c, sums):
    weight = weight_ref[c]
    byte = packed_ref[c].astype(jnp.uint32)
    return tuple(s + weight * ((byte >> jnp.uint32(i * bits)) & mask).astype(jnp.float32)
                 for i, s in enumerate(sums))

  zeros = tuple(jnp.zeros((block_rows, width), jnp.float32) for _ in range(per))
  sums = jax.lax.fori_loop(0, num_clients, add_client, zeros)
  base = base_ref[...][:, None]
  for i in range(per):
    o_ref[:, pl.ds(i * width, width)] = base + step * sums[i]


@functools.partial(jax.jit, static_argnames=("k", "bits", "impl", "interpret", "block_sizes"))
def decode_sum(packed: jax.Array, weights: jax.Array, lo: jax.Array, hi: jax.Array, *, k: int,
               bits: int, impl: str = "pallas", interpret: bool | None = None,
               block_sizes: BlockSizes = DECODE_BLOCKS) -> jax.Array:
  """sum_c weights[c] * decode(packed[c]): the coordinator's aggregate, in one pass.

  Args:
    packed: uint8 (clients, rows, bucket_size * bits // 8), every client's encoded update.
    weights: float32 (clients,), aggregation weights (e.g. shard sizes / total; 0 drops a client).
    lo, hi: float32 (rows,), the range the coordinator sent this round.
  Returns:
    float32 (rows, bucket_size).
  """
  check_quantizer(k, bits)
  if packed.ndim != 3 or packed.dtype != jnp.uint8:
    raise ValueError(f"packed: got {packed.dtype}{list(packed.shape)}, expected "
                     "uint8[clients, rows, packed_width]")
  clients, rows, width = packed.shape
  if weights.shape != (clients,):
    raise ValueError(f"weights: got shape {weights.shape}, expected ({clients},)")
  for name, value in (("lo", lo), ("hi", hi)):
    if value.shape != (rows,):
      raise ValueError(f"{name}: got shape {value.shape}, expected ({rows},)")
  bucket_size = width * 8 // bits
  weights, lo, hi = (a.astype(jnp.float32) for a in (weights, lo, hi))
  if check_impl(impl) == "reference":
    return decode_sum_reference(packed, weights, lo, hi, k=k, bits=bits)
  interpret = resolve_interpret(interpret)
  base = _decode_base(weights, lo)
  block_rows = block_sizes.rows
  padded_rows = round_up(rows, block_rows)
  padded_clients = next_power_of_two(clients)  # for Triton blocks
  packed = pad_to(packed, {0: padded_clients, 1: padded_rows})
  weights = pad_to(weights, {0: padded_clients})  # weight 0: adds exactly 0
  base, lo = pad_to(base, {0: padded_rows}), pad_to(lo, {0: padded_rows})
  hi = pad_to(hi, {0: padded_rows}).at[rows:].set(1.0)
  out = pl.pallas_call(
      functools.partial(_decode_sum_kernel, k=k, bits=bits, num_clients=clients),
      out_shape=jax.ShapeDtypeStruct((padded_rows, bucket_size), jnp.float32),
      grid=(padded_rows // block_rows,),
      in_specs=[pl.BlockSpec((padded_clients, block_rows, width), lambda r: (0, r, 0)),
                pl.BlockSpec((padded_clients,), lambda r: (0,)),
                pl.BlockSpec((block_rows,), lambda r: (r,)),
                pl.BlockSpec((block_rows,), lambda r: (r,)),
                pl.BlockSpec((block_rows,), lambda r: (r,))],
      out_specs=pl.BlockSpec((block_rows, bucket_size), lambda r: (r, 0)),
      interpret=interpret, compiler_params=_compiler_params(), name="kquant_decode_sum",
  )(packed, weights, base, lo, hi)
  return out[:rows]


# ---------------------------------------------------------------------------------------------
# Plain-jnp references (and the unpacking helpers the compressor's tests use).

def pack_reference(q: jax.Array, bits: int) -> jax.Array:
  """uint32/int indices (rows, bucket_size) < 2**bits -> uint8 (rows, bucket_size*bits//8)."""
  rows, bucket_size = q.shape
  per = 8 // bits
  planes = q.astype(jnp.uint32).reshape(rows, per, bucket_size // per)
  shifts = (jnp.arange(per, dtype=jnp.uint32) * jnp.uint32(bits))[None, :, None]
  return jnp.bitwise_or.reduce(planes << shifts, axis=1).astype(jnp.uint8)


def unpack_reference(packed: jax.Array, bits: int) -> jax.Array:
  """The inverse of `pack_reference`: uint8 (..., width) -> uint32 (..., width * 8 // bits)."""
  per = 8 // bits
  shifts = jnp.arange(per, dtype=jnp.uint32) * jnp.uint32(bits)
  planes = (packed.astype(jnp.uint32)[..., None, :] >> shifts[:, None]) & jnp.uint32(
      2 ** bits - 1)
  return planes.reshape(*packed.shape[:-1], per * packed.shape[-1])


def encode_reference(x, lo, hi, *, k, bits, stochastic, seeds, uniforms=None):
  rows, bucket_size = x.shape
  if not stochastic:
    u = jnp.float32(0.5)
  elif uniforms is not None:
    u = uniforms.astype(jnp.float32)
  else:
    column = jax.lax.broadcasted_iota(jnp.uint32, (rows, bucket_size), 1)
    u = hash_uniform(seeds[:, None], column)
  return pack_reference(_quantize(x, lo[:, None], hi[:, None], u, k), bits)


def _decode_base(weights, lo):
  """lo * sum(weights): the part of the weighted sum every index shares (computed once, in jnp,
  for the kernel and the reference alike)."""
  return lo * jnp.sum(weights)


def decode_sum_reference(packed, weights, lo, hi, *, k, bits):
  step = (hi - lo)[:, None] / jnp.float32(k - 1)
  # Clients are summed one after another, in the kernel's order, so the sums agree bit for bit.
  sums = jax.lax.fori_loop(
      0, packed.shape[0],
      lambda c, s: s + weights[c] * unpack_reference(packed[c], bits).astype(jnp.float32),
      jnp.zeros((packed.shape[1], packed.shape[2] * 8 // bits), jnp.float32))
  return _decode_base(weights, lo)[:, None] + step * sums


def dequantize_reference(packed, lo, hi, *, k, bits):
  """One client's decode: lo + q * (hi - lo) / (K - 1)."""
  step = (hi - lo)[:, None] / jnp.float32(k - 1)
  return lo[:, None] + step * unpack_reference(packed, bits).astype(jnp.float32)
