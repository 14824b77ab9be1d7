"""Additive homomorphic encryption for the interaction layer: fixed-point codec and Paillier arrays.

Paillier (python-paillier, `phe`, with gmpy2) encrypts integers modulo n; sums of ciphertexts
and ciphertext-times-integer products decrypt to the same sums and products of the plaintexts,
as long as every intermediate value stays in phe's signed range |v| < n / 3 (`max_int`).

Fixed point. A real x is carried as the integer round(x * 2**frac_bits) ("scale 1"); the product
of two scale-1 integers is at scale 2 (2**(2 * frac_bits)) and is decoded by dividing by that.
Every real that enters the codec must satisfy |x| <= max_abs, else `FixedPointOverflow` is raised
before anything is encrypted or sent. With |x|, |w| <= max_abs, a sum of `terms` products plus an
additive mask below 2**mask_bits stays under

    terms * (max_abs * 2**frac_bits)**2 + 2**mask_bits,

which `check_capacity` compares with the key's `max_int` once, when a session starts; a decrypted
value in phe's overflow zone is reported as `FixedPointOverflow` too. For the defaults and the
paper setting the bound is 130 bits (papers/results/vfl_capacity_bits.txt, with its command).

Array operations work on numpy object arrays of Python ints / `phe.EncryptedNumber`, outside jit
(Paillier is big-integer arithmetic). The expensive ones (encryption, decryption, re-randomizing,
ciphertext-times-matrix) accept an optional `concurrent.futures` executor and split the work into
row chunks across its processes; nothing else about them changes.

Re-randomizing (`obfuscate`): a ciphertext computed from another party's ciphertexts carries
that party's encryption randomness raised to the multipliers used; before such a ciphertext goes
back to the key owner it is multiplied by a fresh encryption of zero (phe's `obfuscate`), so the
key owner learns the plaintext and nothing about the multipliers.
"""

from __future__ import annotations

import dataclasses
import fractions
import hashlib
import secrets
from concurrent.futures import Executor
from typing import Callable, Sequence

import gmpy2
import numpy as np
from phe import paillier

PublicKey = paillier.PaillierPublicKey
PrivateKey = paillier.PaillierPrivateKey
EncryptedNumber = paillier.EncryptedNumber


class FixedPointOverflow(ValueError):
  """A value does not fit the fixed-point range, or a decrypted value overflowed."""


@dataclasses.dataclass(frozen=True)
class FixedPoint:
  """The codec: reals <-> integers at scale 2**frac_bits (see the module docstring)."""
  frac_bits: int = 32
  max_abs: float = 2.0 ** 15

  def __post_init__(self):
    if not 8 <= self.frac_bits <= 64:
      raise ValueError(f"frac_bits={self.frac_bits}: expected 8..64")
    if not self.max_abs > 0:
      raise ValueError(f"max_abs={self.max_abs}: expected > 0")

  def encode(self, x, field: str) -> np.ndarray:
    """round(x * 2**frac_bits) as an object array of ints; refuses non-finite or |x| > max_abs."""
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
      raise FixedPointOverflow(f"{field}: non-finite values cannot be encoded")
    largest = float(np.max(np.abs(x))) if x.size else 0.0
    if largest > self.max_abs:
      raise FixedPointOverflow(f"{field}: |value| up to {largest:.4g} exceeds the fixed-point "
                               f"range max_abs={self.max_abs:.4g} (frac_bits={self.frac_bits})")
    scaled = np.round(np.ldexp(x, self.frac_bits))
    # float64 holds these exactly: |x| * 2**frac_bits < 2**(15 + 64) is rounded to an integer
    # float first, so int() is exact.
    return np.vectorize(int, otypes=[object])(scaled) if x.size else scaled.astype(object)

  def decode(self, ints, scale: int = 1) -> np.ndarray:
    """ints / 2**(scale * frac_bits) as float64 (exact division, then one rounding)."""
    ints = np.asarray(ints, dtype=object)
    shift = scale * self.frac_bits
    return np.vectorize(lambda v: float(fractions.Fraction(int(v), 1 << shift)),
                        otypes=[np.float64])(ints) if ints.size else np.zeros(ints.shape)

  def capacity_bits(self, terms: int, mask_bits: int) -> int:
    """Bits needed by a sum of `terms` scale-2 products plus a mask below 2**mask_bits."""
    one = int(self.max_abs * 2 ** self.frac_bits)
    return (terms * one * one + (1 << mask_bits)).bit_length() + 1  # + 1: the sign


@dataclasses.dataclass(frozen=True)
class Slots:
  """Packing: `count` signed values of `width` bits in one plaintext, v_0 + v_1 2**w + ...

  Paillier adds and scales whole plaintexts, so a sum of packed ciphertexts times integers is
  the packed sum of the slots' values times those integers: one encryption, product, re-
  randomization and decryption carries `count` values. Signed slots need no offsets: while every
  slot stays in |v| < 2**(width - 1) (the bound `check_capacity` proves for every sum of the
  protocol) the packed integer has |P| < 2**(width * count - 1), inside phe's signed range, and
  `unpack` recovers the slots as the balanced base-2**width digits of P, exactly."""
  width: int
  count: int


def slots_for(public_key: PublicKey, codec: FixedPoint, terms: int, mask_bits: int) -> Slots:
  """As many slots of the protocol's largest sum (`capacity_bits`) as the key's signed range
  holds."""
  width = codec.capacity_bits(terms, mask_bits)
  return Slots(width, (public_key.max_int.bit_length() - 1) // width)


def pack(ints: np.ndarray, slots: Slots) -> np.ndarray:
  """Packs the last axis (length <= slots.count) into one integer: (..., k) -> (...)."""
  ints = np.asarray(ints, dtype=object)
  if ints.shape[-1] > slots.count:
    raise ValueError(f"pack: {ints.shape[-1]} values along the last axis, the key holds "
                     f"{slots.count} slots of {slots.width} bits")
  weights = np.array([1 << (slots.width * k) for k in range(ints.shape[-1])], dtype=object)
  return (ints * weights).sum(axis=-1) if ints.shape[-1] else np.zeros(ints.shape[:-1], object)


def unpack(ints: np.ndarray, slots: Slots, k: int, field: str) -> np.ndarray:
  """The first k slots of each packed integer: (...) -> (..., k); refuses a packed value with
  anything beyond them (a slot that overflowed its width shows up there)."""
  base, half = 1 << slots.width, 1 << (slots.width - 1)

  def digits(value: int) -> list[int]:
    out = []
    for _ in range(k):
      digit = (value + half) % base - half  # balanced digit in [-2**(w-1), 2**(w-1))
      out.append(digit)
      value = (value - digit) >> slots.width
    if value:
      raise FixedPointOverflow(f"{field}: a packed value overflowed its {slots.width}-bit slots")
    return out

  flat = [digits(int(v)) for v in np.asarray(ints, dtype=object).reshape(-1)]
  return np.array(flat, dtype=object).reshape(np.shape(ints) + (k,))


def check_capacity(public_key: PublicKey, codec: FixedPoint, terms: int, mask_bits: int) -> None:
  needed = codec.capacity_bits(terms, mask_bits)
  available = public_key.max_int.bit_length()
  if needed > available:
    raise FixedPointOverflow(
        f"key of {public_key.n.bit_length()} bits holds signed values of {available} bits; the "
        f"protocol needs {needed} (terms={terms}, frac_bits={codec.frac_bits}, "
        f"max_abs={codec.max_abs:.4g}, mask_bits={mask_bits}): use a larger key or smaller ranges")


def key_id(public_key: PublicKey) -> str:
  """A short fingerprint of a public key: messages carry it, receivers compare it."""
  return hashlib.sha256(public_key.n.to_bytes((public_key.n.bit_length() + 7) // 8, "big")
                        ).hexdigest()[:16]


def random_masks(shape: Sequence[int], bits: int) -> np.ndarray:
  """Uniform integers in [0, 2**bits) from the OS's CSPRNG (masks are removed exactly, so they
  never influence results and need no seed)."""
  flat = [secrets.randbits(bits) if bits > 0 else 0 for _ in range(int(np.prod(shape)))]
  return np.array(flat, dtype=object).reshape(shape)


# --- array operations (object arrays), optionally split over an executor's processes ----------


def _encrypt_rows(public_key: PublicKey, rows: np.ndarray) -> np.ndarray:
  return np.vectorize(public_key.encrypt, otypes=[object])(rows)


def _decrypt_rows(private_key: PrivateKey, rows: np.ndarray) -> np.ndarray:
  def one(c: EncryptedNumber) -> int:
    try:
      return private_key.decrypt(c)
    except OverflowError as error:
      raise FixedPointOverflow(f"decrypted value overflowed the key's range ({error})") from None
  return np.vectorize(one, otypes=[object])(rows)


def _obfuscate_rows(rows: np.ndarray) -> np.ndarray:
  def one(c: EncryptedNumber) -> EncryptedNumber:
    fresh = EncryptedNumber(c.public_key, c.ciphertext(be_secure=False), c.exponent)
    fresh.obfuscate()
    return fresh
  return np.vectorize(one, otypes=[object])(rows)


def _matmul_rows(matrix: np.ndarray, rows: np.ndarray) -> np.ndarray:
  return rows.dot(matrix)


def _matvec_rows(ciphertexts: np.ndarray, rows: np.ndarray) -> np.ndarray:
  return rows.dot(ciphertexts)


def _chunks(n: int, pieces: int) -> list[slice]:
  bounds = np.linspace(0, n, min(pieces, n) + 1).astype(int) if n else [0, 0]
  return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _by_rows(function: Callable, array: np.ndarray, pool: Executor | None,
             workers: int, *args) -> np.ndarray:
  """function(*args, rows) over row chunks of `array`, in the pool's processes when given."""
  if pool is None or workers <= 1 or array.shape[0] < 2:
    return function(*args, array)
  parts = [array[s] for s in _chunks(array.shape[0], workers)]
  return np.concatenate(list(pool.map(function, *[[a] * len(parts) for a in args], parts)))


@dataclasses.dataclass(frozen=True)
class Engine:
  """Where the Paillier work runs: this process, or `workers` processes of `pool`."""
  pool: Executor | None = None
  workers: int = 1

  def encrypt(self, public_key: PublicKey, ints: np.ndarray) -> np.ndarray:
    return _by_rows(_encrypt_rows, np.asarray(ints, dtype=object), self.pool, self.workers,
                    public_key)

  def decrypt(self, private_key: PrivateKey, ciphertexts: np.ndarray) -> np.ndarray:
    return _by_rows(_decrypt_rows, ciphertexts, self.pool, self.workers, private_key)

  def obfuscate(self, ciphertexts: np.ndarray) -> np.ndarray:
    return _by_rows(_obfuscate_rows, ciphertexts, self.pool, self.workers)

  def matmul(self, ciphertexts: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """[x] @ M for ciphertexts [x] (rows x k) and integers M (k x m)."""
    return _by_rows(_matmul_rows, ciphertexts, self.pool, self.workers,
                    np.asarray(matrix, dtype=object))

  def matvec(self, matrix: np.ndarray, ciphertexts: np.ndarray) -> np.ndarray:
    """M @ [x] for integers M (m x k) and a vector of ciphertexts [x] (k,): (m,), split over the
    rows of M (packed sums: one ciphertext row, many integer rows)."""
    return _by_rows(_matvec_rows, np.asarray(matrix, dtype=object), self.pool, self.workers,
                    ciphertexts)

  def matmul_left(self, matrix: np.ndarray, ciphertexts: np.ndarray) -> np.ndarray:
    """M @ [x] for integers M (m x k) and ciphertexts [x] (k x p), e.g. [a]^T d as (d^T [a])^T."""
    # (M @ [x])^T = [x]^T @ M^T: rows of [x]^T are independent.
    return self.matmul(np.ascontiguousarray(ciphertexts.T), np.asarray(matrix, dtype=object).T).T


def add_plain(ciphertexts: np.ndarray, ints: np.ndarray) -> np.ndarray:
  """[x] + y for integers y (cheap: no new randomness)."""
  return ciphertexts + np.asarray(ints, dtype=object)


def generate_keypair(bits: int) -> tuple[PublicKey, PrivateKey]:
  if bits < 512 or bits % 8:
    raise ValueError(f"key_bits={bits}: expected a multiple of 8, at least 512")
  return paillier.generate_paillier_keypair(n_length=bits)


def ciphertext_ints(ciphertexts: np.ndarray) -> np.ndarray:
  """The raw ciphertext integers (no re-randomizing: that is `Engine.obfuscate`'s job)."""
  return np.vectorize(lambda c: c.ciphertext(be_secure=False), otypes=[object])(ciphertexts)


def from_ciphertext_ints(public_key: PublicKey, ints: np.ndarray, field: str) -> np.ndarray:
  """EncryptedNumbers under `public_key` from raw integers; refuses values outside Z*_{n^2}."""
  nsquare, n = public_key.nsquare, public_key.n
  flat = list(np.asarray(ints, dtype=object).reshape(-1))
  # Z*_{n^2}: 0 < v < n^2 and gcd(v, n) == 1. A multiple of p or q is not a ciphertext, and
  # decrypting one can reveal the factors of n (c = n decrypts to (p + q)^-1 mod n).
  if any(not isinstance(v, int) or not 0 < v < nsquare or gmpy2.gcd(v, n) != 1 for v in flat):
    raise ValueError(f"{field}: a ciphertext is not an element of Z*_(n^2) of the expected key "
                     "(an integer in (0, n^2) coprime to n)")
  return np.array([EncryptedNumber(public_key, v, 0) for v in flat],
                  dtype=object).reshape(np.shape(ints))


def scale_round(ints: np.ndarray, factor: fractions.Fraction | float, shift: int = 0) -> np.ndarray:
  """round(v * factor / 2**shift) for integers v, in exact rational arithmetic."""
  factor = fractions.Fraction(factor) / (1 << shift)
  return np.vectorize(lambda v: round(int(v) * factor), otypes=[object])(
      np.asarray(ints, dtype=object))
