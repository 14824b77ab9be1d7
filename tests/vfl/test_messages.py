"""Wire format: every kind round-trips exactly; anything malformed is refused with WireError."""

from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np
import pytest

from research.vfl import messages as msg

HUGE = [-(1 << 2100) - 12345, (1 << 2047) + 1, 0, -1, 1, 255, -128, -129, 1 << 64]


def ints(shape, start=0):
  flat = [HUGE[(start + i) % len(HUGE)] * (i + 1) for i in range(int(np.prod(shape)))]
  return np.array(flat, dtype=object).reshape(shape)


def floats(shape, dtype=np.float32):
  return np.random.default_rng(0).normal(size=shape).astype(dtype)


def points(m):
  return np.random.default_rng(1).integers(0, 256, size=(m, 32), dtype=np.uint8)


# One example per kind, with the array contents its field carries in the protocol.
SAMPLES = {
    "public_key": lambda: msg.PublicKey("setup", 0, 0, np.array([(1 << 1023) + 7], dtype=object)),
    "psi_blinded": lambda: msg.PsiBlinded("setup", 0, 0, points(5)),
    "psi_reblinded": lambda: msg.PsiReblinded("setup", 0, 1, points(3)),
    "encrypted_activations": lambda: msg.EncryptedActivations(
        "train", 1, 2, "0123456789abcdef", "fedcba9876543210", ints((3, 4))),
    "packed_activations": lambda: msg.PackedActivations(
        "eval", 1, 0, "0123456789abcdef", "fedcba9876543210", ints((2, 4), 3),
        ints((0,), 4)),
    "masked_products": lambda: msg.MaskedProducts("eval", 2, 0, "k", ints((3, 4), 1)),
    "revealed_products": lambda: msg.RevealedProducts("train", 1, 0, ints((2, 4), 2)),
    "masked_weight_gradient": lambda: msg.MaskedWeightGradient("train", 3, 7, "k", ints((4, 4))),
    "noisy_weight_gradient": lambda: msg.NoisyWeightGradient("train", 1, 0, "k", ints((4, 4), 3),
                                                             ints((4, 4), 5)),
    "encrypted_input_gradient": lambda: msg.EncryptedInputGradient("train", 1, 0, "k",
                                                                   ints((3, 4), 4)),
    "clear_activations": lambda: msg.ClearActivations("train", 1, 0, "digest", floats((3, 4))),
    "clear_input_gradient": lambda: msg.ClearInputGradient("train", 1, 0,
                                                           floats((3, 4), np.float64)),
}


def assert_messages_equal(a: msg.Message, b: msg.Message) -> None:
  assert type(a) is type(b)
  for field in dataclasses.fields(a):
    x, y = getattr(a, field.name), getattr(b, field.name)
    if isinstance(x, np.ndarray):
      assert isinstance(y, np.ndarray) and (x.dtype, x.shape) == (y.dtype, y.shape), field.name
      if x.dtype == object:
        assert all(type(v) is int for v in y.reshape(-1)), field.name
      assert np.array_equal(x, y), field.name
    else:
      assert type(x) is type(y) and x == y, field.name


def test_every_kind_has_a_sample():
  assert set(SAMPLES) == set(msg.KINDS)


@pytest.mark.parametrize("kind", sorted(msg.KINDS))
def test_round_trip_is_exact(kind):
  message = SAMPLES[kind]()
  assert message.KIND == kind
  payload = msg.encode(message)
  assert payload.startswith(msg.MAGIC)
  assert_messages_equal(msg.decode(payload), message)


def test_round_trip_of_empty_and_one_element_int_arrays():
  for values in (np.zeros((0, 4), dtype=object), np.array([[-(1 << 4000)]], dtype=object)):
    message = msg.RevealedProducts("eval", 1, 0, values)
    assert_messages_equal(msg.decode(msg.encode(message)), message)


def test_nothing_is_pickled():
  # A JSON header of scalars and int-array specs, then nothing but the declared blobs.
  header, body = split(msg.encode(SAMPLES["noisy_weight_gradient"]()))
  assert {spec["type"] for spec in header["fields"].values()} == {"scalar", "int"}
  assert sum(spec.get("length", 0) for spec in header["fields"].values()) == len(body)


# --- refusals -------------------------------------------------------------------------------------


def split(payload: bytes) -> tuple[dict, bytes]:
  (length,) = struct.unpack(">I", payload[len(msg.MAGIC):len(msg.MAGIC) + 4])
  start = len(msg.MAGIC) + 4
  return json.loads(payload[start:start + length]), payload[start + length:]


def join(header: dict, body: bytes) -> bytes:
  head = json.dumps(header).encode()
  return msg.MAGIC + struct.pack(">I", len(head)) + head + body


def edited(kind: str, edit) -> bytes:
  header, body = split(msg.encode(SAMPLES[kind]()))
  result = edit(header, body)
  return join(header, result if isinstance(result, bytes) else body)


def test_refuses_wrong_magic_and_short_payloads():
  payload = msg.encode(SAMPLES["masked_products"]())
  for bad in (b"XXXXXX" + payload[6:], b"", msg.MAGIC, msg.MAGIC + b"\x00"):
    with pytest.raises(msg.WireError, match="magic"):
      msg.decode(bad)


def test_refuses_a_header_that_is_not_json():
  with pytest.raises(msg.WireError, match="header is not JSON"):
    msg.decode(msg.MAGIC + struct.pack(">I", 5) + b"{nope")


def test_refuses_an_unknown_kind():
  payload = edited("masked_products", lambda h, b: h.update(kind="pickled_object"))
  with pytest.raises(msg.WireError, match="kind='pickled_object': expected one of"):
    msg.decode(payload)


def test_refuses_missing_and_extra_fields():
  missing = edited("masked_products", lambda h, b: h["fields"].pop("key_id"))
  with pytest.raises(msg.WireError, match="masked_products: fields .* do not match"):
    msg.decode(missing)
  extra = edited("masked_products", lambda h, b: h["fields"].update(
      labels={"type": "scalar", "value": 1}))
  with pytest.raises(msg.WireError, match="masked_products: fields .* do not match"):
    msg.decode(extra)


def test_refuses_a_truncated_int_blob():
  payload = msg.encode(SAMPLES["encrypted_activations"]())
  with pytest.raises(msg.WireError, match=r"encrypted_activations.ciphertexts: \d+ bytes for 12 "
                                          r"ints of \d+"):
    msg.decode(payload[:-1])
  zero_width = edited("revealed_products",
                      lambda h, b: h["fields"]["values"].update(width=0, length=0))
  with pytest.raises(msg.WireError, match="revealed_products.values"):
    msg.decode(zero_width)


def test_refuses_a_float_array_of_the_wrong_length():
  # Drop one whole float32 value: the count no longer matches the declared shape.
  payload = edited("clear_activations",
                   lambda h, b: h["fields"]["values"].update(length=h["fields"]["values"]
                                                             ["length"] - 4))
  with pytest.raises(msg.WireError, match=r"clear_activations.values: 44 bytes for 12 values of 4 bytes"):
    msg.decode(payload)


def test_refuses_a_float_blob_cut_mid_value():
  payload = msg.encode(SAMPLES["clear_activations"]())
  with pytest.raises(msg.WireError, match="clear_activations.values"):
    msg.decode(payload[:-1])


@pytest.mark.parametrize("spec", ["not a dict", {"type": "int", "width": 1, "offset": 0,
                                                 "length": 0}])
def test_refuses_a_malformed_field_spec(spec):
  def edit(header, body):
    header["fields"]["values"] = spec
  with pytest.raises(msg.WireError, match="revealed_products.values"):
    msg.decode(edited("revealed_products", edit))


@pytest.mark.parametrize("spec", [
    {"type": "array", "dtype": "<i8"},   # integers must come as arbitrary-size "int" arrays
    {"type": "array", "dtype": "|O"},    # object dtype: what a pickle would need
    {"type": "array", "dtype": ">f4"},   # big-endian float
    {"type": "pickle"},
])
def test_refuses_unsupported_array_specs(spec):
  def edit(header, body):
    header["fields"]["values"].update(spec)
  payload = edited("clear_input_gradient", edit)
  with pytest.raises(msg.WireError, match="clear_input_gradient.values: unsupported array spec"):
    msg.decode(payload)


@pytest.mark.parametrize("field, spec, expected", [
    ("ciphertexts", {"type": "scalar", "value": 7}, "expected an array"),
    ("round", {"type": "scalar", "value": "1"}, "expected a scalar of type int"),
    ("round", {"type": "scalar", "value": True}, "expected a scalar of type int"),
    ("key_id", {"type": "scalar", "value": 3}, "expected a scalar of type str"),
    ("key_id", {"type": "int", "shape": [1], "width": 1, "offset": 0, "length": 1},
     "expected a scalar of type str"),
])
def test_refuses_a_field_of_another_type_than_declared(field, spec, expected):
  def edit(header, body):
    header["fields"][field] = spec
  with pytest.raises(msg.WireError, match=f"masked_products.{field}: {expected}"):
    msg.decode(edited("masked_products", edit))


def test_refuses_an_unknown_phase():
  payload = edited("masked_products", lambda h, b: h["fields"]["phase"].update(value="attack"))
  with pytest.raises(msg.WireError, match="masked_products.phase='attack'"):
    msg.decode(payload)


def test_encode_refuses_fields_it_cannot_write():
  message = msg.MaskedProducts("train", 1, 0, "k", ints((1, 1)))
  with pytest.raises(msg.WireError, match="masked_products.key_id: cannot encode bytes"):
    msg.encode(dataclasses.replace(message, key_id=b"raw"))
