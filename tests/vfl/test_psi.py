"""ECDH PSI: both parties get the true intersection in one shared order, and no raw ID is sent."""

from __future__ import annotations

import hashlib
import random

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from research.vfl import psi


def key(i: int) -> bytes:
  return bytes([i]) * 32


def run_protocol(ids_a, ids_b, seed=0):
  """Both parties, every message kept: (aligned_a, aligned_b, messages)."""
  state_a, r1_a = psi.start(ids_a, key_bytes=key(1), seed=seed)
  state_b, r1_b = psi.start(ids_b, key_bytes=key(2), seed=seed + 1)
  r2_a = psi.reblind(state_a, r1_b)
  r2_b = psi.reblind(state_b, r1_a)
  aligned_a = psi.finish(state_a, r2_b, r1_b)
  aligned_b = psi.finish(state_b, r2_a, r1_a)
  return aligned_a, aligned_b, [r1_a, r1_b, r2_a, r2_b]


def test_blinding_commutes():
  u = [psi.hash_to_point(i) for i in range(5)] + [psi.hash_to_point("x")]
  a, b = key(3), key(4)
  assert psi.blind(a, psi.blind(b, u)) == psi.blind(b, psi.blind(a, u))
  # The same with freshly generated keys, straight through the cryptography API.
  ka, kb = X25519PrivateKey.generate(), X25519PrivateKey.generate()
  pt = X25519PublicKey.from_public_bytes(u[0])
  ab = ka.exchange(X25519PublicKey.from_public_bytes(kb.exchange(pt)))
  ba = kb.exchange(X25519PublicKey.from_public_bytes(ka.exchange(pt)))
  assert ab == ba


@pytest.mark.parametrize("kind", ["int", "str"])
def test_same_intersection_same_order(kind):
  rng = random.Random(0)
  make = (lambda i: i) if kind == "int" else (lambda i: f"user-{i:05d}")
  ids_a = [make(i) for i in range(0, 2000)]
  ids_b = [make(i) for i in range(1200, 3000)]
  rng.shuffle(ids_a)
  rng.shuffle(ids_b)
  aligned_a, aligned_b, _ = run_protocol(ids_a, ids_b)
  assert aligned_a == aligned_b
  assert set(aligned_a) == set(ids_a) & set(ids_b)
  assert len(aligned_a) == 800
  # A private order: neither party's input order, yet identical at both.
  assert aligned_a != [x for x in ids_a if x in set(ids_b)]
  assert aligned_b != [x for x in ids_b if x in set(ids_a)]


def test_intersect_locally_matches_and_is_reproducible():
  ids_a = [5, 3, 9, 1, "7"]
  ids_b = ["9", 7, 1, 3, 11]
  a, b = psi.intersect_locally(ids_a, ids_b, seed=3)
  assert a == b and set(a) == {1, 3}      # 7 != "7", 9 != "9": typed IDs
  assert psi.intersect_locally(ids_a, ids_b, seed=3) == (a, b)
  fresh_a, fresh_b = psi.intersect_locally(ids_a, ids_b)
  assert fresh_a == fresh_b and set(fresh_a) == {1, 3}


def test_empty_intersection():
  a, b = psi.intersect_locally(list(range(50)), list(range(100, 120)), seed=1)
  assert a == b == []


def test_no_raw_id_in_messages():
  ids_a = [f"alice-{i}" for i in range(100)] + list(range(100))
  ids_b = [f"alice-{i}" for i in range(50, 150)] + list(range(50, 150))
  _, _, messages = run_protocol(ids_a, ids_b)
  wire = b"".join(b"".join(m) for m in messages)
  assert all(len(p) == 32 for m in messages for p in m)
  for x in ids_a + ids_b:
    raw = str(x).encode()
    forms = [psi.canonical_id(x), hashlib.sha256(raw).digest(),
             hashlib.sha256(psi.canonical_id(x)).digest(), psi.hash_to_point(x)]
    if isinstance(x, str):
      assert raw not in wire
    for form in forms:
      assert form not in wire


def test_round1_is_shuffled():
  ids = list(range(200))
  _, sent = psi.start(ids, key_bytes=key(1), seed=0)
  in_order = psi.blind(key(1), [psi.hash_to_point(i) for i in ids])
  assert sorted(sent) == sorted(in_order) and sent != in_order


def test_errors():
  with pytest.raises(ValueError, match=r"ids: duplicate ID 3"):
    psi.start([1, 3, 2, 3])
  with pytest.raises(ValueError, match=r"ids: an empty list"):
    psi.start([])
  with pytest.raises(TypeError, match=r"ids: an ID of type float"):
    psi.start([1, 2.5])
  with pytest.raises(ValueError, match=r"key_bytes: 5 bytes; expected 32"):
    psi.start([1], key_bytes=b"short")
  state, sent = psi.start([1, 2, 3], key_bytes=key(1), seed=0)
  with pytest.raises(ValueError, match=r"peer_round1\[1\]: 31 bytes; expected a 32-byte"):
    psi.reblind(state, [sent[0], sent[1][:31]])
  with pytest.raises(ValueError, match=r"peer_round1: an empty list"):
    psi.reblind(state, [])
  answer = psi.reblind(state, sent)
  with pytest.raises(ValueError, match=r"own_reblinded: 2 points; expected 3"):
    psi.finish(state, answer[:2], sent)
  with pytest.raises(ValueError, match=r"low-order point"):
    psi.reblind(state, [bytes(32)])
