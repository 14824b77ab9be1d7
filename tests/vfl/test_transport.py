"""Transports move whole messages in order and count them; mutual TLS refuses strangers."""

from __future__ import annotations

import stat
import threading
import time

import pytest

from research.vfl import transport


@pytest.fixture
def grpc_pair():
  """Two connected plaintext GrpcTransports on loopback."""
  a = transport.GrpcTransport(name="active", timeout=10)
  b = transport.GrpcTransport(name="passive", timeout=10)
  a.connect(b.address)
  b.connect(a.address)
  yield a, b
  a.close()
  b.close()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
  return transport.make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory):
  return transport.make_certificates(tmp_path_factory.mktemp("tls_other"))


def exchange(a: transport.Transport, b: transport.Transport) -> None:
  """Several messages both ways, interleaved; checks order, content and counters."""
  to_b = [b"", b"one", bytes(range(256)) * 40, b"three"]
  to_a = [b"x" * n for n in (1, 1000, 7)]
  for m in to_b:
    a.send(m)
  for m in to_a:
    b.send(m)
  assert [b.recv(timeout=5) for _ in to_b] == to_b
  assert [a.recv(timeout=5) for _ in to_a] == to_a
  assert (a.bytes_sent, a.messages_sent) == (sum(map(len, to_b)), len(to_b))
  assert (b.bytes_received, b.messages_received) == (sum(map(len, to_b)), len(to_b))
  assert (b.bytes_sent, b.messages_sent) == (sum(map(len, to_a)), len(to_a))
  assert (a.bytes_received, a.messages_received) == (sum(map(len, to_a)), len(to_a))


def test_in_memory_round_trip_and_counters():
  a, b = transport.in_memory_pair()
  exchange(a, b)
  a.send(bytearray(b"bytes-like"))
  assert b.recv() == b"bytes-like"
  with pytest.raises(TypeError, match="payload of type str; expected bytes"):
    a.send("text")


def test_in_memory_threads_and_close():
  a, b = transport.in_memory_pair()
  got = []
  reader = threading.Thread(target=lambda: got.extend(b.recv(timeout=5) for _ in range(100)))
  reader.start()
  for i in range(100):
    a.send(i.to_bytes(2, "big"))
  reader.join()
  assert got == [i.to_bytes(2, "big") for i in range(100)]
  a.send(b"last")
  a.close()
  assert b.recv(timeout=1) == b"last"
  with pytest.raises(ConnectionError, match="closed"):
    b.recv(timeout=1)
  with pytest.raises(ConnectionError):
    b.send(b"to a closed end")


def test_recv_timeout():
  a, _ = transport.in_memory_pair()
  with pytest.raises(TimeoutError, match=r"active: no message from peer passive within "
                     r"timeout=0.05 s"):
    a.recv(timeout=0.05)


def test_grpc_in_order_both_ways(grpc_pair):
  a, b = grpc_pair
  assert a.address.startswith("127.0.0.1:") and not a.address.endswith(":0")
  exchange(a, b)


def test_grpc_recv_timeout(grpc_pair):
  a, b = grpc_pair
  t0 = time.monotonic()
  with pytest.raises(TimeoutError, match=rf"passive: no message from peer {a.address}"):
    b.recv(timeout=0.2)
  assert time.monotonic() - t0 < 2


def test_grpc_large_payload(grpc_pair):
  a, b = grpc_pair
  payload = bytes(range(256)) * (20_000_000 // 256)
  a.send(payload)
  assert b.recv(timeout=10) == payload
  assert a.bytes_sent == b.bytes_received == len(payload)


def test_grpc_send_before_connect():
  t = transport.GrpcTransport(name="lonely")
  try:
    with pytest.raises(RuntimeError, match="lonely: send before connect"):
      t.send(b"x")
  finally:
    t.close()


def test_grpc_bad_arguments():
  with pytest.raises(ValueError, match=r"listen='nowhere'; expected host:port"):
    transport.GrpcTransport(listen="nowhere")
  with pytest.raises(ValueError, match=r"timeout=0; expected a positive"):
    transport.GrpcTransport(timeout=0)


def test_make_certificates_files(certs):
  assert set(certs) == {"active", "passive"}
  for files in certs.values():
    assert files.ca_cert.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert files.cert.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert files.key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
  assert not list(certs["active"].ca_cert.parent.glob("*.tmp"))
  with pytest.raises(ValueError, match="names"):
    transport.make_certificates(certs["active"].ca_cert.parent, names=("a", "a"))


def test_mutual_tls(certs):
  a = transport.GrpcTransport(tls=certs["active"], name="active", timeout=10)
  b = transport.GrpcTransport(tls=certs["passive"], name="passive", timeout=10)
  try:
    a.connect(b.address.replace("127.0.0.1", "localhost"))   # certificate names both
    b.connect(a.address)
    exchange(a, b)
  finally:
    a.close()
    b.close()


def test_tls_refuses_client_of_another_ca(certs, other_certs):
  server = transport.GrpcTransport(tls=certs["passive"], name="passive")
  # Trusts the server's CA but presents a certificate signed by another CA.
  stranger = transport.TlsFiles(ca_cert=certs["active"].ca_cert,
                                cert=other_certs["active"].cert, key=other_certs["active"].key)
  client = transport.GrpcTransport(tls=stranger, name="stranger", timeout=1.0)
  try:
    client.connect(server.address)
    with pytest.raises(ConnectionError, match=r"stranger: sending 2 bytes to peer"):
      client.send(b"hi")
    with pytest.raises(TimeoutError):
      server.recv(timeout=0.1)
    assert client.messages_sent == 0
  finally:
    client.close()
    server.close()


def test_tls_refuses_plaintext_client(certs):
  server = transport.GrpcTransport(tls=certs["passive"], name="passive")
  client = transport.GrpcTransport(name="plain", timeout=1.0)
  try:
    client.connect(server.address)
    with pytest.raises(ConnectionError, match="plain: sending"):
      client.send(b"hi")
    with pytest.raises(TimeoutError):
      server.recv(timeout=0.1)
  finally:
    client.close()
    server.close()
