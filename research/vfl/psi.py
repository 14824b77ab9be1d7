"""Private set intersection (PSI) of two parties' ID lists: ECDH blinding with X25519.

Two parties hold differently ordered, partially overlapping lists of IDs (ints or strings) and
must agree on the rows they share without sending raw IDs. Blinding is scalar multiplication on
Curve25519, which commutes: X25519(a, X25519(b, u)) == X25519(b, X25519(a, u)), both being the
x-coordinate of clamp(a) * clamp(b) * P(u). The protocol is symmetric; each party runs

  start    hash each own ID to a curve point u = H(id), blind it with its secret key a (a*u),
           send the blinded list in a private random order (round 1);
  reblind  multiply every point of the peer's round-1 list by a and return it in the order
           received (round 2): the peer's IDs, double-blinded (a*b*u);
  finish   map the peer's round-2 answer (its own IDs, double-blinded) back to its IDs through the
           private order, double-blind the peer's round-1 list, keep the own IDs whose
           double-blinded value the peer also holds, ordered by that value (bytes). The value is
           the same at both parties, so both get the intersection in the same order (row i of one
           party is row i of the other) without exchanging IDs.

Hashing. H(id) = the first try-and-increment SHA-256 of (domain prefix, counter, canonical id)
that is the x-coordinate of a point on the curve proper (not its twist). Canonical ids are typed:
b"int:" + decimal digits for ints (numpy ints included; bools refused), b"str:" + UTF-8 for
strings, so 7 and "7" are different IDs. Keeping points off the twist matters: a blinded point on
the twist would reveal one bit (curve or twist) of the hash of an ID the peer may guess.

What it leaks: to each party, the peer's set size (the length of its lists) and which of its own
IDs are in the intersection (hence the intersection itself); nothing else about the peer's IDs,
under the decisional Diffie-Hellman assumption on Curve25519 with SHA-256 modelled as a random
oracle (the common order is a function of the double-blinded values, which are pseudorandom).
Security holds for semi-honest parties only: a party that deviates (sends points it did not
derive from its IDs, answers round 2 with other points) can learn more or corrupt the result.
Inherent to any PSI: a party that lists guesses of the peer's IDs (small ints, phone numbers)
learns which of them the peer holds.

Everything here is a pure function of its arguments; the secret key and the private order live
in an immutable `PsiState` that never leaves the party.
"""

from __future__ import annotations

import dataclasses
import hashlib
import numbers
import random
import secrets
from collections.abc import Hashable, Sequence
from typing import Any

import gmpy2
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

DOMAIN = b"meshwork.vfl.psi/1\0"
POINT_BYTES = 32
_P = 2**255 - 19          # the field of Curve25519
_A = 486662               # its Montgomery coefficient: v^2 = u^3 + A u^2 + u
_MAX_TRIES = 256          # try-and-increment; each try lands on the curve with probability 1/2


@dataclasses.dataclass(frozen=True)
class PsiState:
  """One party's private PSI state; it never leaves the party."""
  ids: tuple[Hashable, ...]            # the party's IDs, as given
  key: bytes = dataclasses.field(repr=False)  # 32-byte X25519 private key (the blinding scalar)
  order: tuple[int, ...] = dataclasses.field(repr=False)  # round-1 slot j holds ids[order[j]]


def canonical_id(x: Any) -> bytes:
  """The typed byte encoding of one ID: ints and strings never collide (7 != "7")."""
  if isinstance(x, bool) or not isinstance(x, (numbers.Integral, str)):
    raise TypeError(f"ids: an ID of type {type(x).__name__} ({x!r}); expected int or str")
  if isinstance(x, str):
    return b"str:" + x.encode("utf-8")
  return b"int:" + str(int(x)).encode("ascii")


def hash_to_point(x: Any) -> bytes:
  """H(id): a 32-byte little-endian x-coordinate of a point on Curve25519 (not the twist)."""
  data = canonical_id(x)
  for counter in range(_MAX_TRIES):
    digest = hashlib.sha256(DOMAIN + counter.to_bytes(1, "little") + data).digest()
    u = int.from_bytes(digest, "little") & ((1 << 255) - 1)
    if u < _P and gmpy2.legendre((u * u * u + _A * u * u + u) % _P, _P) == 1:
      return u.to_bytes(POINT_BYTES, "little")
  raise RuntimeError(f"ids: no curve point for {x!r} in {_MAX_TRIES} tries")  # p ~ 2^-256


def blind(key: bytes, points: Sequence[bytes], *, field: str = "points") -> list[bytes]:
  """X25519(key, u) for every point u (scalar multiplication; it commutes across keys)."""
  private = _private_key(key)
  out = []
  for i, u in enumerate(points):
    _check_point(u, f"{field}[{i}]")
    try:
      out.append(private.exchange(X25519PublicKey.from_public_bytes(bytes(u))))
    except ValueError as err:  # a low-order point gives the all-zero shared value
      raise ValueError(f"{field}[{i}]: {bytes(u).hex()} is a low-order point; expected a "
                       "blinded ID") from err
  return out


def start(ids: Sequence[Any], *, key_bytes: bytes | None = None,
          seed: int | None = None) -> tuple[PsiState, list[bytes]]:
  """Round 1: this party's state and its blinded IDs, in a private random order, to send.

  key_bytes: the 32-byte private key (tests); None draws a fresh one. seed: seeds the shuffle
  (tests, reproducible experiments); None draws it from the OS (what a real party must do).
  """
  ids = tuple(ids)
  _check_ids(ids)
  if key_bytes is None:
    key_bytes = X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
        serialization.NoEncryption())
  _private_key(key_bytes)
  rng = secrets.SystemRandom() if seed is None else random.Random(seed)
  order = list(range(len(ids)))
  rng.shuffle(order)
  state = PsiState(ids=ids, key=bytes(key_bytes), order=tuple(order))
  return state, blind(state.key, [hash_to_point(ids[i]) for i in order])


def reblind(state: PsiState, peer_round1: Sequence[bytes]) -> list[bytes]:
  """Round 2: the peer's round-1 list blinded again with this party's key, order kept."""
  _check_list(peer_round1, "peer_round1")
  return blind(state.key, peer_round1, field="peer_round1")


def finish(state: PsiState, own_reblinded: Sequence[bytes], peer_round1: Sequence[bytes], *,
           peer_double: Sequence[bytes] | None = None) -> list:
  """The intersection: this party's IDs the peer also holds, in the order both parties share.

  own_reblinded: the peer's round-2 answer to this party's round-1 list.
  peer_round1: the peer's round-1 list; this party double-blinds it.
  peer_double: optional, what `reblind(state, peer_round1)` returned (this party's own round-2
    message), to skip recomputing it; it must be exactly that list.
  """
  _check_list(own_reblinded, "own_reblinded", expected=len(state.ids))
  _check_list(peer_round1, "peer_round1")
  if peer_double is None:
    peer_double = reblind(state, peer_round1)
  else:
    _check_list(peer_double, "peer_double", expected=len(peer_round1))
  common = set(bytes(p) for p in peer_double)
  matched = sorted((bytes(d), state.order[j]) for j, d in enumerate(own_reblinded)
                   if bytes(d) in common)
  return [state.ids[i] for _, i in matched]


def intersect_locally(ids_a: Sequence[Any], ids_b: Sequence[Any],
                      seed: int | None = None) -> tuple[list, list]:
  """Both parties in one process (tests, single-process experiments): (aligned_a, aligned_b).

  The two lists hold the same IDs in the same order. A seed makes keys and shuffles
  reproducible (never for real parties: seeded keys are guessable); None draws them fresh.
  """
  rng = None if seed is None else random.Random(seed)
  keys = (None, None) if rng is None else (rng.randbytes(32), rng.randbytes(32))
  seeds = (None, None) if rng is None else (rng.getrandbits(64), rng.getrandbits(64))
  state_a, round1_a = start(ids_a, key_bytes=keys[0], seed=seeds[0])
  state_b, round1_b = start(ids_b, key_bytes=keys[1], seed=seeds[1])
  round2_a = reblind(state_a, round1_b)   # a -> b: b's IDs, double-blinded
  round2_b = reblind(state_b, round1_a)   # b -> a: a's IDs, double-blinded
  aligned_a = finish(state_a, round2_b, round1_b, peer_double=round2_a)
  aligned_b = finish(state_b, round2_a, round1_a, peer_double=round2_b)
  return aligned_a, aligned_b


def _private_key(key: bytes) -> X25519PrivateKey:
  if not isinstance(key, (bytes, bytearray)) or len(key) != 32:
    got = f"{len(key)} bytes" if isinstance(key, (bytes, bytearray)) else type(key).__name__
    raise ValueError(f"key_bytes: {got}; expected 32 bytes (an X25519 private key)")
  return X25519PrivateKey.from_private_bytes(bytes(key))


def _check_ids(ids: tuple) -> None:
  if not ids:
    raise ValueError("ids: an empty list; expected at least one ID")
  seen: dict[bytes, Any] = {}
  for x in ids:
    c = canonical_id(x)
    if c in seen:
      raise ValueError(f"ids: duplicate ID {x!r} (same as {seen[c]!r}); expected distinct IDs")
    seen[c] = x


def _check_list(points: Sequence[bytes], field: str, expected: int | None = None) -> None:
  if isinstance(points, (bytes, bytearray, str)):
    raise TypeError(f"{field}: a single {type(points).__name__}; expected a list of points")
  if not len(points):
    raise ValueError(f"{field}: an empty list; expected at least one point")
  if expected is not None and len(points) != expected:
    raise ValueError(f"{field}: {len(points)} points; expected {expected}, as many as were sent")


def _check_point(u: Any, field: str) -> None:
  if not isinstance(u, (bytes, bytearray, memoryview)) or len(u) != POINT_BYTES:
    got = f"{len(u)} bytes" if isinstance(u, (bytes, bytearray, memoryview)) else \
        type(u).__name__
    raise ValueError(f"{field}: {got}; expected a {POINT_BYTES}-byte X25519 point")
