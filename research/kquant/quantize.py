"""Update compressors under one interface: K-quant and the baselines it is compared with.

A compressor works on one client's update held as buckets, float32 (rows, bucket_size) (see
buckets.py), and on the coordinator's per-round `RangeSpec`:

  encode(v, spec, key) -> message            client side, one client
  decode(message, spec) -> v_hat             one client's reconstruction (error feedback, tests)
  aggregate(messages, weights, spec) -> sum  coordinator side: sum_c weights[c] * decode(msg_c)
  uplink_bits                                exact bits one client sends per round

K-quant (this system): the coordinator sends K and a range [lo, hi] per bucket (or per tensor);
a client sends only bin indices, ceil(log2 K) bits each, bit-packed (kernels/kquant.py); the
coordinator decodes and aggregates in one fused pass. Baselines, each with its own scale sent as
one float32 per bucket: float32 (no compression), QSGD (Alistarh et al. 2017; s levels of
|v| / ||v||_2 with stochastic rounding, 1 sign bit + ceil(log2(s + 1)) bits), TernGrad (Wen et al.
2017; {-1, 0, 1} x max|v|, 2 bits) and signSGD with majority vote (Bernstein et al. 2019; 1 bit,
the coordinator takes the weighted majority sign and scales it by the mean client scale).
`for_pytrees` wraps any of them for params pytrees, with optional error feedback (Karimireddy
et al. 2019); the round (rounds.py) runs its clients through it.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kernels import kquant as kq
from research.kquant import buckets as buckets_lib
from research.kquant.buckets import BucketLayout

Message = Any


class RangeSpec(NamedTuple):
  """What the coordinator sends with the model each round: a range per bucket row."""
  lo: jax.Array  # shape=(rows,), dtype=float32
  hi: jax.Array  # shape=(rows,), dtype=float32


class Compressor(NamedTuple):
  name: str
  encode: Callable[[jax.Array, RangeSpec, jax.Array], Message]
  decode: Callable[[Message, RangeSpec], jax.Array]
  aggregate: Callable[[Message, jax.Array, RangeSpec], jax.Array]
  uplink_bits: int
  uses_range: bool = False


def check_range(lo, hi) -> None:
  """Refuses a range with lo >= hi (or non-finite ends), naming the first bad bucket."""
  lo, hi = np.asarray(lo), np.asarray(hi)
  bad = np.flatnonzero(~(np.isfinite(lo) & np.isfinite(hi) & (lo < hi)))
  if bad.size:
    i = int(bad[0])
    raise ValueError(f"range for bucket {i}: lo={float(lo.flat[i])!r}, "
                     f"hi={float(hi.flat[i])!r}; expected "
                     "finite lo < hi")


def _weighted_sum(decoded: jax.Array, weights: jax.Array) -> jax.Array:
  return jnp.tensordot(weights, decoded, axes=1)


def _check_messages(packed: jax.Array, layout: BucketLayout, bits: int) -> None:
  expected = (layout.num_rows, kq.packed_width(layout.bucket_size, bits))
  if packed.dtype != jnp.uint8 or packed.shape[-2:] != expected:
    raise ValueError(
        f"client message: got {packed.dtype}{list(packed.shape[-2:])}, expected "
        f"uint8{list(expected)} ({layout.num_rows} buckets of {layout.bucket_size} indices at "
        f"bits={bits}); wrong length or bit width")


def kquant(layout: BucketLayout, *, k: int, bits: int | None = None, stochastic: bool = True,
           impl: str = "auto") -> Compressor:
  """K levels in the coordinator's range; indices bit-packed at `bits` (default ceil(log2 K)).
  `impl`: the kernels' (kernels/_common.py: "auto" is the Pallas kernel on GPU / TPU and the
  jnp reference on CPU)."""
  bits = bits if bits is not None else next(b for b in kq.SUPPORTED_BITS if 2 ** b >= k)
  kq.check_quantizer(k, bits)

  def encode(v, spec, key):
    if not isinstance(spec.lo, jax.core.Tracer):  # a concrete range message: check it
      check_range(spec.lo, spec.hi)
    seed = jax.random.bits(key, dtype=jnp.uint32)
    return kq.encode(v, spec.lo, spec.hi, k=k, bits=bits, stochastic=stochastic, seed=seed,
                     impl=impl)

  def decode(packed, spec):
    _check_messages(packed, layout, bits)
    return kq.dequantize_reference(packed, spec.lo, spec.hi, k=k, bits=bits)

  def aggregate(packed, weights, spec):
    _check_messages(packed, layout, bits)
    return kq.decode_sum(packed, weights, spec.lo, spec.hi, k=k, bits=bits, impl=impl)

  return Compressor(f"kquant(K={k})", encode, decode, aggregate,
                    uplink_bits=layout.num_rows * layout.bucket_size * bits, uses_range=True)


def float32(layout: BucketLayout) -> Compressor:
  """No compression: the FedAvg baseline."""
  return Compressor("float32", lambda v, spec, key: v, lambda v, spec: v,
                    lambda v, weights, spec: _weighted_sum(v, weights),
                    uplink_bits=32 * layout.num_params)


def qsgd(layout: BucketLayout, *, levels: int) -> Compressor:
  """QSGD with `levels` (s) levels per bucket; unbiased."""
  if levels < 1:
    raise ValueError(f"QSGD levels={levels!r}: expected an int >= 1")

  def encode(v, spec, key):
    norm = jnp.linalg.norm(v, axis=1)
    scaled = jnp.abs(v) / jnp.where(norm > 0, norm, 1.0)[:, None] * levels
    level = jnp.floor(scaled + jax.random.uniform(key, v.shape))
    return norm, (jnp.sign(v) * level).astype(jnp.int16)

  def decode(message, spec):
    norm, signed_level = message
    return norm[:, None] * signed_level.astype(jnp.float32) / levels

  bits_per_entry = 1 + math.ceil(math.log2(levels + 1))
  return Compressor(f"qsgd(s={levels})", encode, decode,
                    lambda m, w, spec: _weighted_sum(jax.vmap(decode, (0, None))(m, spec), w),
                    uplink_bits=layout.num_params * bits_per_entry + 32 * layout.num_rows)


def terngrad(layout: BucketLayout) -> Compressor:
  """TernGrad: s * sign(v) * Bernoulli(|v| / s), s = max|v| per bucket; unbiased."""
  def encode(v, spec, key):
    scale = jnp.max(jnp.abs(v), axis=1)
    keep = jax.random.uniform(key, v.shape) < jnp.abs(v) / jnp.where(scale > 0, scale,
                                                                       1.0)[:, None]
    return scale, (jnp.sign(v) * keep).astype(jnp.int8)

  def decode(message, spec):
    scale, ternary = message
    return scale[:, None] * ternary.astype(jnp.float32)

  return Compressor("terngrad", encode, decode,
                    lambda m, w, spec: _weighted_sum(jax.vmap(decode, (0, None))(m, spec), w),
                    uplink_bits=2 * layout.num_params + 32 * layout.num_rows)


def sign_majority(layout: BucketLayout) -> Compressor:
  """signSGD with majority vote: 1 bit per entry plus the bucket's mean |v|."""
  def encode(v, spec, key):
    return jnp.mean(jnp.abs(v), axis=1), jnp.sign(v).astype(jnp.int8)

  def decode(message, spec):
    scale, sign = message
    return scale[:, None] * sign.astype(jnp.float32)

  def aggregate(message, weights, spec):
    scale, sign = message
    vote = jnp.sign(jnp.tensordot(weights, sign.astype(jnp.float32), axes=1))
    return jnp.tensordot(weights, scale, axes=1)[:, None] * vote

  return Compressor("sign_majority", encode, decode, aggregate,
                    uplink_bits=layout.num_params + 32 * layout.num_rows)


def by_name(name: str, layout: BucketLayout, *, k: int = 16, qsgd_levels: int = 4,
            stochastic: bool = True, impl: str = "auto") -> Compressor:
  """Builds a compressor from a config name: float32 | kquant | qsgd | terngrad | sign."""
  if name == "kquant":
    return kquant(layout, k=k, stochastic=stochastic, impl=impl)
  if name == "float32":
    return float32(layout)
  if name == "qsgd":
    return qsgd(layout, levels=qsgd_levels)
  if name == "terngrad":
    return terngrad(layout)
  if name == "sign":
    return sign_majority(layout)
  raise ValueError(f"compressor {name!r}: expected one of float32, kquant, qsgd, terngrad, sign")


class CompressorState(NamedTuple):
  """A client's state across rounds."""
  error: jax.Array  # shape=(rows, bucket_size), dtype=float32: error-feedback residual


class ClientUpdate(NamedTuple):
  """A client's update as buckets with its carried residual added: what it reports a range from
  (client_minmax) and then encodes."""
  v: jax.Array       # shape=(rows, bucket_size), dtype=float32: update (+ residual); non-finite -> 0
  finite: jax.Array  # shape=(rows, bucket_size), dtype=bool: where the update was finite


class TreeCompressor(NamedTuple):
  """A compressor over params pytrees, optax style: state in, state out. A client, each round:

    state = tc.init(params)                          # once
    prepared = tc.prepare(update, state)             # update as buckets, residual added
    message, state = tc.encode(prepared, spec, key)  # spec may come from prepared.v's min/max
    update_hat = tc.decode(message, spec)            # coordinator, one client

  Two client steps, not one, because the client_minmax range policy asks every client for the
  min/max of its prepared update before the coordinator sends the range it encodes in.
  """
  init: Callable[[Any], CompressorState]
  prepare: Callable[[Any, CompressorState], ClientUpdate]
  encode: Callable[[ClientUpdate, RangeSpec, jax.Array], tuple[Message, CompressorState]]
  decode: Callable[[Message, RangeSpec], Any]


def zero_state(layout: BucketLayout, num_clients: int | None = None) -> CompressorState:
  """The state before the first round: a zero residual (one client's, or `num_clients` stacked)."""
  shape = (layout.num_rows, layout.bucket_size)
  return CompressorState(jnp.zeros(shape if num_clients is None else (num_clients, *shape),
                                   jnp.float32))


def for_pytrees(compressor: Compressor, layout: BucketLayout, *,
                error_feedback: bool = False) -> TreeCompressor:
  """Wraps a bucket compressor for pytrees, with optional error feedback (Karimireddy et al.
  2019): the residual v - decode(encode(v)) is added to the next round's update; it is zero where
  the update was non-finite. Without error feedback the state stays zero."""

  def init(params):
    del params
    return zero_state(layout)

  def prepare(update, state):
    v = buckets_lib.to_buckets(update, layout)
    finite = jnp.isfinite(v)
    return ClientUpdate(jnp.where(finite, v, 0.0) + (state.error if error_feedback else 0.0),
                        finite)

  def encode(prepared, spec, key):
    message = compressor.encode(prepared.v, spec, key)
    if error_feedback:
      error = jnp.where(prepared.finite, prepared.v - compressor.decode(message, spec), 0.0)
    else:
      error = jnp.zeros_like(prepared.v)
    return message, CompressorState(error)

  def decode(message, spec):
    return buckets_lib.from_buckets(compressor.decode(message, spec), layout)

  return TreeCompressor(init, prepare, encode, decode)
