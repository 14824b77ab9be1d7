"""Byte transports between the two VFL parties: in memory (one process) or gRPC, optionally mTLS.

The protocol code encodes its typed messages to bytes; a transport only moves bytes, one message
at a time and in order, and counts them (bytes and messages, each direction) so experiments can
report communication cost. Counters count payload bytes only, not framing or TLS overhead.

  in_memory_pair()  two ends joined by thread-safe queues: tests and single-process runs.
  GrpcTransport     each party runs a small gRPC server with one generic unary method
                    (/meshwork.vfl.Party/Deliver, bytes in, empty bytes out; no protoc needed)
                    and a client channel to its peer's server. `send` returns once the peer's
                    server has queued the message, so one sender's messages arrive in order.
  make_certificates a throwaway CA plus one key and certificate per party, for mutual TLS: each
                    server requires a client certificate signed by the CA, each client checks
                    the server's. A party holding a certificate from another CA, or none, is
                    refused during the handshake.

What it guarantees: in-order delivery of whole messages, each at most once, while both ends are
up (a send that fails, e.g. past its deadline, may still have been delivered; nothing is retried,
the session stops with the error); over TLS, confidentiality and integrity on the wire and
authentication of both ends by the shared CA. What it does not: persistence or retries across a
restart of either party, or any protection of the payload from the peer itself (that is the
protocol's job).
"""

from __future__ import annotations

import abc
import dataclasses
import datetime
import ipaddress
import os
import queue
import threading
from concurrent import futures
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from research.common import records

SERVICE = "meshwork.vfl.Party"
METHOD = f"/{SERVICE}/Deliver"
MAX_MESSAGE_BYTES = 1 << 30     # gRPC's send/receive limit both ways (its default receive is 4 MiB)
_CLOSED = object()              # queued by close(): wakes a blocked recv


class Transport(abc.ABC):
  """One end of a two-party byte channel: send, recv (in order), close, and counters."""

  def __init__(self, name: str, peer: str):
    self.name = name
    self.peer = peer
    self.bytes_sent = 0
    self.bytes_received = 0
    self.messages_sent = 0
    self.messages_received = 0
    self._inbox: queue.Queue = queue.Queue()
    self._lock = threading.Lock()
    self._closed = False

  def send(self, payload: bytes) -> None:
    """Delivers one message to the peer (blocks until the peer's end has queued it)."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
      raise TypeError(f"{self.name}: payload of type {type(payload).__name__}; expected bytes")
    if self._closed:
      raise ConnectionError(f"{self.name}: send on a closed transport (peer {self.peer})")
    payload = bytes(payload)
    self._deliver(payload)
    with self._lock:
      self.bytes_sent += len(payload)
      self.messages_sent += 1

  def recv(self, timeout: float | None = None) -> bytes:
    """The next message from the peer; TimeoutError after `timeout` seconds (None: wait)."""
    try:
      payload = self._inbox.get(timeout=timeout)
    except queue.Empty:
      raise TimeoutError(f"{self.name}: no message from peer {self.peer} within "
                         f"timeout={timeout} s") from None
    if payload is _CLOSED:
      self._inbox.put(_CLOSED)   # every later recv fails the same way
      raise ConnectionError(f"{self.name}: channel to peer {self.peer} closed")
    with self._lock:
      self.bytes_received += len(payload)
      self.messages_received += 1
    return payload

  def close(self) -> None:
    """Releases the channel; a recv blocked on this end raises ConnectionError (in memory,
    the peer's recv too, once it has read what was sent before)."""
    if not self._closed:
      self._closed = True
      self._shutdown()
      self._inbox.put(_CLOSED)

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  @abc.abstractmethod
  def _deliver(self, payload: bytes) -> None:
    """Hands one payload to the peer's inbox."""

  def _shutdown(self) -> None:
    """Releases what the subclass holds."""


class _QueueEnd(Transport):
  """One end of `in_memory_pair`: sending puts into the other end's inbox."""

  def __init__(self, name: str, peer: str):
    super().__init__(name, peer)
    self._other: _QueueEnd | None = None

  def _deliver(self, payload: bytes) -> None:
    assert self._other is not None
    if self._other._closed:
      raise ConnectionError(f"{self.name}: peer {self.peer} closed its end")
    self._other._inbox.put(payload)

  def _shutdown(self) -> None:
    if self._other is not None:
      self._other._inbox.put(_CLOSED)   # the peer's recv fails once it has drained its inbox


def in_memory_pair(names: tuple[str, str] = ("active", "passive")) -> tuple[Transport, Transport]:
  """Two connected ends in one process (thread safe): what one sends, the other receives."""
  a, b = _QueueEnd(names[0], names[1]), _QueueEnd(names[1], names[0])
  a._other, b._other = b, a
  return a, b


@dataclasses.dataclass(frozen=True)
class TlsFiles:
  """PEM files for mutual TLS: the CA that signs both parties, and this party's cert and key."""
  ca_cert: Path
  cert: Path
  key: Path

  def read(self) -> tuple[bytes, bytes, bytes]:
    """(ca_cert, cert, key) bytes; FileNotFoundError names the missing file."""
    return tuple(Path(p).read_bytes() for p in (self.ca_cert, self.cert, self.key))


class GrpcTransport(Transport):
  """A party's gRPC end: a server receiving the peer's messages, a channel sending to the peer.

  listen: host:port to bind (port 0: any free port; `address` is what was bound).
  tls: this party's TlsFiles for mutual TLS; None: plaintext (loopback tests only).
  timeout: seconds a send may take, including waiting for the peer's server to come up.
  Over TLS, connect to the peer as "localhost:PORT" or "127.0.0.1:PORT" (the names
  make_certificates puts in each certificate), or pass `server_name` to connect().
  """

  def __init__(self, listen: str = "127.0.0.1:0", tls: TlsFiles | None = None,
               name: str = "party", timeout: float = 60.0, workers: int = 4):
    if not timeout > 0:
      raise ValueError(f"timeout={timeout!r}; expected a positive number of seconds")
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit():
      raise ValueError(f"listen={listen!r}; expected host:port (port 0 picks a free one)")
    super().__init__(name, peer="(not connected)")
    self.tls = tls
    self.timeout = float(timeout)
    self._options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                               options=self._options)
    handler = grpc.unary_unary_rpc_method_handler(self._on_deliver)  # identity (bytes) codecs
    self._server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"Deliver": handler}),))
    if tls is None:
      bound = self._server.add_insecure_port(listen)
    else:
      ca, cert, key = tls.read()
      creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                          require_client_auth=True)
      bound = self._server.add_secure_port(listen, creds)
    if not bound:
      raise OSError(f"{name}: could not bind listen={listen!r}")
    self.address = f"{host}:{bound}"
    self._server.start()
    self._channel: grpc.Channel | None = None
    self._call = None

  def connect(self, peer_address: str, server_name: str | None = None) -> None:
    """Opens the channel to the peer's server (which may start later: sends wait for it)."""
    if self._channel is not None:
      raise RuntimeError(f"{self.name}: already connected to {self.peer}")
    options = list(self._options)
    if self.tls is None:
      channel = grpc.insecure_channel(peer_address, options=options)
    else:
      ca, cert, key = self.tls.read()
      if server_name is not None:
        options.append(("grpc.ssl_target_name_override", server_name))
      creds = grpc.ssl_channel_credentials(ca, key, cert)
      channel = grpc.secure_channel(peer_address, creds, options=options)
    self._channel = channel
    self._call = channel.unary_unary(METHOD)  # identity (bytes) codecs
    self.peer = peer_address

  def _on_deliver(self, payload: bytes, context) -> bytes:
    del context
    self._inbox.put(payload)
    return b""

  def _deliver(self, payload: bytes) -> None:
    if self._call is None:
      raise RuntimeError(f"{self.name}: send before connect(peer_address)")
    try:
      self._call(payload, timeout=self.timeout, wait_for_ready=True)
    except grpc.RpcError as err:
      raise ConnectionError(f"{self.name}: sending {len(payload)} bytes to peer {self.peer} "
                            f"failed within timeout={self.timeout} s: {err.code().name}: "
                            f"{err.details()}") from err

  def _shutdown(self) -> None:
    if self._channel is not None:
      self._channel.close()
    self._server.stop(grace=None).wait()


def make_certificates(directory: str | os.PathLike, names: tuple[str, ...] = ("active",
                      "passive"), days: int = 30) -> dict[str, TlsFiles]:
  """A fresh CA and one key + certificate per party, written as PEM files under `directory`.

  Certificates are valid from an hour ago for `days` days, for the names "localhost" and
  127.0.0.1, and for both server and client authentication. Keys are ECDSA P-256, written
  with mode 0600; the CA's key is not written (no party can sign more certificates).
  Files: ca.pem, <name>.pem, <name>.key.
  """
  if not names or len(set(names)) != len(names):
    raise ValueError(f"names={names!r}; expected distinct party names")
  for n in names:
    if not n or n == "ca" or not n.replace("-", "").replace("_", "").isalnum():
      raise ValueError(f"names: {n!r}; expected letters, digits, '-' or '_' (not 'ca')")
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  now = datetime.datetime.now(datetime.timezone.utc)
  start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days)
  ca_key = ec.generate_private_key(ec.SECP256R1())
  ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshwork vfl test CA")])
  ca_cert = (_builder(ca_name, ca_name, ca_key.public_key(), start, end)
             .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
             .add_extension(_key_usage(cert_sign=True), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                            critical=False)
             .sign(ca_key, hashes.SHA256()))
  ca_path = directory / "ca.pem"
  records.atomic_write_bytes(ca_path, ca_cert.public_bytes(serialization.Encoding.PEM),
                             mode=0o644)
  out = {}
  for n in names:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, n)])
    cert = (_builder(subject, ca_name, key.public_key(), start, end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = TlsFiles(ca_cert=ca_path, cert=directory / f"{n}.pem", key=directory / f"{n}.key")
    records.atomic_write_bytes(files.key, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), mode=0o600)
    records.atomic_write_bytes(files.cert, cert.public_bytes(serialization.Encoding.PEM),
                               mode=0o644)
    out[n] = files
  return out


def _builder(subject: x509.Name, issuer: x509.Name, public_key, start: datetime.datetime,
             end: datetime.datetime) -> x509.CertificateBuilder:
  return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
          .public_key(public_key).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end))


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
  return x509.KeyUsage(digital_signature=not cert_sign, content_commitment=False,
                       key_encipherment=False, data_encipherment=False,
                       key_agreement=not cert_sign, key_cert_sign=cert_sign,
                       crl_sign=cert_sign, encipher_only=False, decipher_only=False)
