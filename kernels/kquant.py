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

Each public function takes `impl="pallas" | "reference" | "auto"` and `interpret=None` (True on
CPU), both resolved by kernels/_common.py as in every kernel file here; the references come last.

Backends: one kernel body each, built per Pallas target (kernels/_common.py: per_target): Triton
on GPU (`ENCODE_BLOCKS` / `DECODE_BLOCKS`, power-of-two rows, per-row ranges as vectors) and
Mosaic on TPU (`TPU_ENCODE_BLOCKS` / `TPU_DECODE_BLOCKS`: rows a multiple of 32, as TPU tiles
uint8 blocks (32, 128); per-row ranges as (rows, 1) columns; the aggregation weights in scalar
memory). The tests export both entries for `platforms=["cuda"]` and `["tpu"]` without either
device (the Triton / Mosaic custom call is in the lowered module) and run both targets' blocks in
the interpreter, bit-equal to the references. Measured on GPU (papers/kquant.md); on TPU lowered
only, never run here. CPU: the interpreter, or `impl="reference"`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from kernels._common import per_target, resolve_interpret, select_impl
from kernels._shapes import next_power_of_two, pad_to, round_up

SUPPORTED_BITS = (1, 2, 4, 8)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_GOLDEN = 0x9E3779B9


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  rows: int  # bucket rows per program (Triton: a power of two; TPU: a multiple of 32)


# GPU (Triton): picked by a block-size sweep on an H200 whose numbers were not kept (sweep again
# before changing them); what these sizes measure is the kept papers/results/bench_kquant.gpu.json
# (`python -m experiments.bench_kquant --sizes 4194304,33554432 --clients 64 --paper` on a GPU).
ENCODE_BLOCKS = BlockSizes(rows=32)
DECODE_BLOCKS = BlockSizes(rows=8)
# TPU (Mosaic): from the tiling rule, not measured (no TPU here): the uint8 packed blocks tile
# as (32, 128), so rows are a multiple of 32; buckets and packed rows are whole-array widths.
TPU_ENCODE_BLOCKS = BlockSizes(rows=256)
TPU_DECODE_BLOCKS = BlockSizes(rows=64)
_TPU_ROW_MULTIPLE = 32


def _blocks_for(target: str, block_sizes: BlockSizes | None, gpu: BlockSizes,
                tpu: BlockSizes) -> BlockSizes:
  """The block sizes a call uses on `target`: the given ones (checked against its rule) or its
  defaults."""
  if block_sizes is None:
    return gpu if target == "gpu" else tpu
  rows = block_sizes.rows
  if target == "gpu" and (rows < 1 or rows & (rows - 1)):
    raise ValueError(f"block_sizes.rows={rows}: expected a power of two on GPU (Triton)")
  if target == "tpu" and (rows < 1 or rows % _TPU_ROW_MULTIPLE):
    raise ValueError(f"block_sizes.rows={rows}: expected a multiple of {_TPU_ROW_MULTIPLE} on "
                     "TPU (Mosaic tiles uint8 blocks as (32, 128))")
  return block_sizes


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


def _compiler_params(target: str):
  if target == "tpu":  # row blocks are independent: "parallel" lets Mosaic split the grid
    return pltpu.CompilerParams(dimension_semantics=("parallel",))
  # Mosaic GPU is the default Pallas GPU lowering on Hopper; these kernels use the Triton one.
  return pltriton.CompilerParams(num_warps=4, num_stages=1)


def _row_vector(target: str, a: jax.Array) -> jax.Array:
  """A per-row operand as the target's kernels read it: (rows,) for Triton, (rows, 1) on TPU
  (a 1-D block would have to be a multiple of 128 there)."""
  return a if target == "gpu" else a[:, None]


def _row_spec(target: str, block_rows: int) -> pl.BlockSpec:
  if target == "gpu":
    return pl.BlockSpec((block_rows,), lambda r: (r,))
  return pl.BlockSpec((block_rows, 1), lambda r: (r, 0))


def _column(ref) -> jax.Array:
  """A per-row block as a (block_rows, 1) column, from either layout of `_row_vector`."""
  value = ref[...]
  return value[:, None] if value.ndim == 1 else value


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
  lo, hi, seed = _column(lo_ref), _column(hi_ref), _column(seed_ref)
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
                                             "block_sizes", "target"))
def encode(x: jax.Array, lo: jax.Array, hi: jax.Array, *, k: int, bits: int,
           stochastic: bool = False, seed: jax.Array | None = None,
           uniforms: jax.Array | None = None, impl: str = "pallas",
           interpret: bool | None = None, block_sizes: BlockSizes | None = None,
           target: str | None = None) -> jax.Array:
  """Quantizes bucketed x (rows, bucket_size) to K levels in [lo, hi] and bit-packs to uint8.

  Args:
    x: float32 (rows, bucket_size); bucket_size a multiple of 8 // bits.
    lo, hi: float32 (rows,), the range of each bucket, lo < hi.
    k, bits: levels and bits per index, 2 <= K <= 2**bits, bits in {1, 2, 4, 8}.
    stochastic: stochastic rounding (needs `uniforms` or `seed`) instead of nearest.
    seed: uint32 scalar for the in-kernel counter hash (used when `uniforms` is None).
    uniforms: float32 like x, U[0, 1), supplied randomness.
    impl: "pallas", "reference" or "auto" (kernels/_common.py: select_impl).
    block_sizes: rows per program; None: ENCODE_BLOCKS on GPU, TPU_ENCODE_BLOCKS on TPU. Given
      with `target` None they must suit both targets (a power of two >= 32), since the call is
      built for both and lowered for one.
    target: "gpu" or "tpu" fixes the Pallas target (e.g. to interpret the TPU blocks); None:
      the platform the call is lowered for (kernels/_common.py: per_target).
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
  if select_impl(impl) == "reference":
    return encode_reference(x, lo, hi, k=k, bits=bits, stochastic=stochastic, seeds=seeds,
                            uniforms=uniforms if supplied else None)
  interpret = resolve_interpret(interpret)
  width = packed_width(bucket_size, bits)

  def build(target: str):
    block_rows = _blocks_for(target, block_sizes, ENCODE_BLOCKS, TPU_ENCODE_BLOCKS).rows
    padded = round_up(rows, block_rows)

    def call(x, lo, hi, seeds, *maybe_uniforms):
      # Padded rows get lo = 0, hi = 1, so no division by zero is ever evaluated.
      operands = [pad_to(x, {0: padded}), pad_to(lo, {0: padded}),
                  pad_to(hi, {0: padded}).at[rows:].set(1.0), pad_to(seeds, {0: padded})]
      operands[1:] = [_row_vector(target, a) for a in operands[1:]]
      in_specs = [pl.BlockSpec((block_rows, bucket_size), lambda r: (r, 0)),
                  *(_row_spec(target, block_rows) for _ in range(3))]
      for u in maybe_uniforms:
        operands.append(pad_to(u.astype(jnp.float32), {0: padded}))
        in_specs.append(pl.BlockSpec((block_rows, bucket_size), lambda r: (r, 0)))
      out = pl.pallas_call(
          functools.partial(_encode_kernel, k=k, bits=bits, stochastic=stochastic,
                            supplied_uniforms=supplied),
          out_shape=jax.ShapeDtypeStruct((padded, width), jnp.uint8),
          grid=(padded // block_rows,), in_specs=in_specs,
          out_specs=pl.BlockSpec((block_rows, width), lambda r: (r, 0)),
          interpret=interpret, compiler_params=_compiler_params(target), name="kquant_encode",
      )(*operands)
      return out[:rows]

    return call

  operands = (x, lo, hi, seeds) + ((uniforms,) if supplied else ())
  return per_target(build, *operands, interpret=interpret, target=target)


# ---------------------------------------------------------------------------------------------
# Fused decode + weighted sum over clients (the coordinator's side).

def _decode_sum_kernel(packed_ref, weight_ref, base_ref, lo_ref, hi_ref, o_ref, *, k: int,
                       bits: int, num_clients: int):
  block_rows, bucket_size = o_ref.shape
  per, width = 8 // bits, bucket_size // (8 // bits)
  mask = jnp.uint32(2 ** bits - 1)
  lo, hi = _column(lo_ref), _column(hi_ref)
  step = (hi - lo) / jnp.float32(k - 1)

  def add_client(c, sums):
    weight = weight_ref[c]
    byte = packed_ref[c].astype(jnp.uint32)
    return tuple(s + weight * ((byte >> jnp.uint32(i * bits)) & mask).astype(jnp.float32)
                 for i, s in enumerate(sums))

  zeros = tuple(jnp.zeros((block_rows, width), jnp.float32) for _ in range(per))
  sums = jax.lax.fori_loop(0, num_clients, add_client, zeros)
  base = _column(base_ref)
  for i in range(per):
    o_ref[:, pl.ds(i * width, width)] = base + step * sums[i]


@functools.partial(jax.jit, static_argnames=("k", "bits", "impl", "interpret", "block_sizes",
                                             "target"))
def decode_sum(packed: jax.Array, weights: jax.Array, lo: jax.Array, hi: jax.Array, *, k: int,
               bits: int, impl: str = "pallas", interpret: bool | None = None,
               block_sizes: BlockSizes | None = None, target: str | None = None) -> jax.Array:
  """sum_c weights[c] * decode(packed[c]): the coordinator's aggregate, in one pass.

  Args:
    packed: uint8 (clients, rows, bucket_size * bits // 8), every client's encoded update.
    weights: float32 (clients,), aggregation weights (e.g. shard sizes / total; 0 drops a client).
    lo, hi: float32 (rows,), the range the coordinator sent this round.
    impl, target: as in `encode`; block_sizes: None: DECODE_BLOCKS on GPU, TPU_DECODE_BLOCKS on
      TPU.
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
  if select_impl(impl) == "reference":
    return decode_sum_reference(packed, weights, lo, hi, k=k, bits=bits)
  interpret = resolve_interpret(interpret)
  base = _decode_base(weights, lo)

  def build(target: str):
    block_rows = _blocks_for(target, block_sizes, DECODE_BLOCKS, TPU_DECODE_BLOCKS).rows
    padded_rows = round_up(rows, block_rows)
    # Triton blocks are powers of two; on TPU the client axis is a leading (untiled) one.
    padded_clients = next_power_of_two(clients) if target == "gpu" else clients
    if target == "gpu":
      weight_spec = pl.BlockSpec((padded_clients,), lambda r: (0,))
    else:  # scalars read one at a time in the client loop: scalar memory
      weight_spec = pl.BlockSpec(memory_space=pltpu.SMEM)

    def call(packed, weights, base, lo, hi):
      packed = pad_to(packed, {0: padded_clients, 1: padded_rows})
      weights = pad_to(weights, {0: padded_clients})  # weight 0: adds exactly 0
      base, lo = pad_to(base, {0: padded_rows}), pad_to(lo, {0: padded_rows})
      hi = pad_to(hi, {0: padded_rows}).at[rows:].set(1.0)
      out = pl.pallas_call(
          functools.partial(_decode_sum_kernel, k=k, bits=bits, num_clients=clients),
          out_shape=jax.ShapeDtypeStruct((padded_rows, bucket_size), jnp.float32),
          grid=(padded_rows // block_rows,),
          in_specs=[pl.BlockSpec((padded_clients, block_rows, width), lambda r: (0, r, 0)),
                    weight_spec, *(_row_spec(target, block_rows) for _ in range(3))],
          out_specs=pl.BlockSpec((block_rows, bucket_size), lambda r: (r, 0)),
          interpret=interpret, compiler_params=_compiler_params(target),
          name="kquant_decode_sum",
      )(packed, weights, *(_row_vector(target, a) for a in (base, lo, hi)))
      return out[:rows]

    return call

  return per_target(build, packed, weights, base, lo, hi, interpret=interpret, target=target)


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
