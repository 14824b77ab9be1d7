"""The messages the two parties exchange, and their wire format.

Every message is a frozen dataclass naming where it belongs in the schedule (`phase`, `round`,
`step`); array fields hold floats (numpy float32/float64), bytes (uint8: PSI points) or integers
of any size (numpy object arrays of Python ints: fixed-point values, masked sums, raw Paillier
ciphertexts); scalar fields are str or int, as declared, checked on decode. Nothing
else crosses a party boundary, and nothing is pickled: `encode` writes a JSON header plus raw
array bytes, `decode` rebuilds exactly the declared fields and refuses anything else.

Direction and content (P: passive party, holds the Paillier key; A: active party, holds labels):

  setup   P -> A  PublicKey            n of P's Paillier key
          both    PsiBlinded           own IDs blinded (psi.py round 1)
          both    PsiReblinded         the peer's blinded IDs, blinded again (round 2)
  encrypted protocol, per batch (round = epoch, step = batch index; phase "train" or "eval"):
          P -> A  EncryptedActivations [a]                      scale 1
          A -> P  MaskedProducts       [a W' + eps]             scale 2, re-randomized
          P -> A  RevealedProducts     a W' + eps + a e_acc     scale 2 (ints)
     (train only)
          A -> P  MaskedWeightGradient [a^T d + delta]          scale 2, re-randomized
          P -> A  NoisyWeightGradient  a^T d + delta + rho/lr   scale 2 (ints), and [e_acc]
          A -> P  EncryptedInputGradient [d (W' + e_acc)^T]     scale 2, re-randomized
  packed (`he.packing`: K fixed-point values per Paillier plaintext, `he.Slots`): the same
  messages with fewer ciphertexts; EncryptedActivations becomes
          P -> A  PackedActivations    [a] packed over K samples, and over d_a per sample (train)
  and MaskedProducts, MaskedWeightGradient, the [e_acc] of NoisyWeightGradient and
  EncryptedInputGradient carry packed ciphertexts (shapes below).
  plaintext split protocol (the comparison without encryption):
          P -> A  ClearActivations     a                        float32
          A -> P  ClearInputGradient   d W_p^T                  float32 (train only)
"""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any, ClassVar

import numpy as np

MAGIC = b"MWVFL1"
PHASES = ("setup", "train", "eval")


class WireError(ValueError):
  """A payload that is not a well-formed message of a known kind."""


@dataclasses.dataclass(frozen=True)
class Message:
  phase: str
  round: int
  step: int
  KIND: ClassVar[str] = ""

  def __post_init__(self):
    if self.phase not in PHASES:
      raise WireError(f"{self.KIND}.phase={self.phase!r}: expected one of {PHASES}")

  @property
  def where(self) -> tuple[str, int, int]:
    return (self.phase, self.round, self.step)


@dataclasses.dataclass(frozen=True)
class PublicKey(Message):
  n: np.ndarray  # shape (1,), object: the modulus
  KIND: ClassVar[str] = "public_key"


@dataclasses.dataclass(frozen=True)
class PsiBlinded(Message):
  points: np.ndarray  # (m, 32) uint8
  KIND: ClassVar[str] = "psi_blinded"


@dataclasses.dataclass(frozen=True)
class PsiReblinded(Message):
  points: np.ndarray  # (m, 32) uint8, in the order received
  KIND: ClassVar[str] = "psi_reblinded"


@dataclasses.dataclass(frozen=True)
class EncryptedActivations(Message):
  batch_digest: str        # sha256 prefix of the batch's aligned IDs, in order
  key_id: str
  ciphertexts: np.ndarray  # (B, d_a) object: raw ciphertext ints
  KIND: ClassVar[str] = "encrypted_activations"


@dataclasses.dataclass(frozen=True)
class PackedActivations(Message):
  batch_digest: str
  key_id: str
  by_group: np.ndarray   # (G, d_a): slot k of row g holds a[g K + k, i]; G = ceil(B / K)
  # (ceil(B / S),): S = K // d_a samples per entry, slot s d_a + i of entry g holds
  # a[g S + s, i] (train); (0,) in eval (not needed)
  by_sample: np.ndarray
  KIND: ClassVar[str] = "packed_activations"


@dataclasses.dataclass(frozen=True)
class MaskedProducts(Message):
  key_id: str
  ciphertexts: np.ndarray  # (B, h); packed: (G, h), slot k of row g for sample g K + k
  KIND: ClassVar[str] = "masked_products"


@dataclasses.dataclass(frozen=True)
class RevealedProducts(Message):
  values: np.ndarray  # (B, h) object ints, scale 2
  KIND: ClassVar[str] = "revealed_products"


@dataclasses.dataclass(frozen=True)
class MaskedWeightGradient(Message):
  key_id: str
  # (d_a, h); packed: (S, h), slot group s of entry (s, j) holds column j of the sum over the
  # samples in slot group s (the other groups: masked cross terms)
  ciphertexts: np.ndarray
  KIND: ClassVar[str] = "masked_weight_gradient"


@dataclasses.dataclass(frozen=True)
class NoisyWeightGradient(Message):
  key_id: str
  values: np.ndarray           # (d_a, h) object ints, scale 2
  # (d_a, h) raw ciphertext ints of e_acc, scale 1; packed: (S, h), column j in slot group s
  accumulated_noise: np.ndarray
  KIND: ClassVar[str] = "noisy_weight_gradient"


@dataclasses.dataclass(frozen=True)
class EncryptedInputGradient(Message):
  key_id: str
  ciphertexts: np.ndarray  # (B, d_a); packed: (ceil(B / S),), as PackedActivations.by_sample
  KIND: ClassVar[str] = "encrypted_input_gradient"


@dataclasses.dataclass(frozen=True)
class ClearActivations(Message):
  batch_digest: str
  values: np.ndarray  # (B, d_a) float32
  KIND: ClassVar[str] = "clear_activations"


@dataclasses.dataclass(frozen=True)
class ClearInputGradient(Message):
  values: np.ndarray  # (B, d_a) float32
  KIND: ClassVar[str] = "clear_input_gradient"


KINDS: dict[str, type[Message]] = {cls.KIND: cls for cls in (
    PublicKey, PsiBlinded, PsiReblinded, EncryptedActivations, PackedActivations, MaskedProducts,
    RevealedProducts,
    MaskedWeightGradient, NoisyWeightGradient, EncryptedInputGradient, ClearActivations,
    ClearInputGradient)}


# --- wire format ---------------------------------------------------------------------------------


def _int_array_bytes(array: np.ndarray) -> tuple[dict[str, Any], bytes]:
  flat = [int(v) for v in array.reshape(-1)]
  width = max((v.bit_length() // 8 + 1 for v in flat), default=1)  # + sign
  blob = b"".join(v.to_bytes(width, "big", signed=True) for v in flat)
  return {"type": "int", "shape": list(array.shape), "width": width}, blob


def encode(message: Message) -> bytes:
  """The message as bytes: MAGIC, header length, JSON header, array payloads."""
  header: dict[str, Any] = {"kind": message.KIND, "fields": {}}
  blobs: list[bytes] = []
  offset = 0
  for field in dataclasses.fields(message):
    value = getattr(message, field.name)
    if isinstance(value, np.ndarray):
      if value.dtype == object:
        spec, blob = _int_array_bytes(value)
      else:
        blob = np.ascontiguousarray(value).tobytes()
        spec = {"type": "array", "dtype": value.dtype.str, "shape": list(value.shape)}
      spec.update(offset=offset, length=len(blob))
      offset += len(blob)
      blobs.append(blob)
      header["fields"][field.name] = spec
    elif isinstance(value, (bool, int, float, str)):
      header["fields"][field.name] = {"type": "scalar", "value": value}
    else:
      raise WireError(f"{message.KIND}.{field.name}: cannot encode {type(value).__name__}")
  head = json.dumps(header, separators=(",", ":")).encode()
  return MAGIC + struct.pack(">I", len(head)) + head + b"".join(blobs)


_RAW_DTYPES = ("<f4", "<f8", "|u1")  # float32 / float64 values, uint8 PSI points
_SCALARS = {"str": str, "int": int}     # the scalar fields' annotations


def decode(payload: bytes) -> Message:
  """Rebuilds a message; refuses unknown kinds, missing or extra fields and malformed arrays."""
  if not payload.startswith(MAGIC) or len(payload) < len(MAGIC) + 4:
    raise WireError("payload does not start with the meshwork VFL magic bytes")
  (head_len,) = struct.unpack(">I", payload[len(MAGIC):len(MAGIC) + 4])
  start = len(MAGIC) + 4
  try:
    header = json.loads(payload[start:start + head_len])
  except ValueError as error:
    raise WireError(f"header is not JSON: {error}") from None
  body = memoryview(payload)[start + head_len:]
  cls = KINDS.get(header.get("kind"))
  if cls is None:
    raise WireError(f"kind={header.get('kind')!r}: expected one of {sorted(KINDS)}")
  annotations = {f.name: f.type for f in dataclasses.fields(cls)}
  names = list(annotations)
  given = header.get("fields", {})
  if sorted(given) != sorted(names):
    raise WireError(f"{cls.KIND}: fields {sorted(given)} do not match {sorted(names)}")
  values = {}
  for name in names:
    try:
      values[name] = _decode_field(cls, name, annotations[name], given[name], body)
    except (KeyError, TypeError, ValueError) as error:
      if isinstance(error, WireError):
        raise
      raise WireError(f"{cls.KIND}.{name}: malformed field spec {given[name]!r} ({error!r})") \
          from None
  return cls(**values)


def _decode_field(cls, name: str, annotation: str, spec: dict, body: memoryview) -> Any:
  if not isinstance(spec, dict):
    raise WireError(f"{cls.KIND}.{name}: field spec {spec!r} is not an object")
  if annotation in _SCALARS:
    kind = _SCALARS[annotation]
    value = spec.get("value") if spec["type"] == "scalar" else None
    if type(value) is not kind:  # noqa: E721 (exact: a bool is not an int here)
      raise WireError(f"{cls.KIND}.{name}: expected a scalar of type {annotation}, got {spec!r}")
    return value
  if spec["type"] == "scalar":
    raise WireError(f"{cls.KIND}.{name}: expected an array, got the scalar {spec['value']!r}")
  shape = tuple(int(s) for s in spec["shape"])
  blob = bytes(body[spec["offset"]:spec["offset"] + spec["length"]])
  count = int(np.prod(shape))
  if spec["type"] == "int":
    width = int(spec["width"])
    if width < 1 or len(blob) != width * count:
      raise WireError(f"{cls.KIND}.{name}: {len(blob)} bytes for {count} ints of {width}")
    return np.array([int.from_bytes(blob[i:i + width], "big", signed=True)
                     for i in range(0, len(blob), width)], dtype=object).reshape(shape)
  if spec["type"] == "array" and spec["dtype"] in _RAW_DTYPES:
    dtype = np.dtype(spec["dtype"])
    if len(blob) != dtype.itemsize * count:
      raise WireError(f"{cls.KIND}.{name}: {len(blob)} bytes for {count} values of "
                      f"{dtype.itemsize} bytes (shape {shape})")
    return np.frombuffer(blob, dtype=dtype).reshape(shape).copy()
  raise WireError(f"{cls.KIND}.{name}: unsupported array spec {spec}")
