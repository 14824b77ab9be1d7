"""Bundles: what one party writes, the other reads only if it is whole, untouched and meant for it."""

import json

import pytest

from research.fhe import transport


def _write(tmp_path, **kwargs):
  files = {"x_00001.bin": b"\x01\x02\x03", "evaluation_keys.bin": b"k" * 1000}
  meta = {"package_id": "abc", "shapes": {"x": [1, 8, 4]}}
  return transport.write_bundle(tmp_path / "upload", "upload", files, meta, **kwargs)


def test_round_trip_returns_files_meta_and_hashes(tmp_path):
  directory = _write(tmp_path)
  bundle = transport.read_bundle(directory, "upload", expect={"package_id": "abc"})
  assert bundle.read("x_00001.bin") == b"\x01\x02\x03"
  assert bundle.files["evaluation_keys.bin"]["sha256"] == transport.sha256(b"k" * 1000)
  assert bundle.meta["shapes"] == {"x": [1, 8, 4]}
  assert bundle.total_bytes == 1003
  assert sorted(p.name for p in tmp_path.iterdir()) == ["upload"]  # no staging left behind


def test_a_flipped_byte_is_rejected_naming_the_file(tmp_path):
  directory = _write(tmp_path)
  path = directory / "x_00001.bin"
  path.write_bytes(b"\x01\x02\x04")
  with pytest.raises(transport.MessageError, match=r"x_00001\.bin.*sha256.*tampered"):
    transport.read_bundle(directory, "upload")


def test_a_truncated_file_is_rejected_by_size(tmp_path):
  directory = _write(tmp_path)
  (directory / "evaluation_keys.bin").write_bytes(b"k" * 999)
  with pytest.raises(transport.MessageError, match=r"evaluation_keys\.bin.*999 bytes.*1000"):
    transport.read_bundle(directory, "upload")


def test_missing_index_means_half_written(tmp_path):
  directory = _write(tmp_path)
  (directory / transport.INDEX).unlink()
  with pytest.raises(transport.MessageError, match="half-written"):
    transport.read_bundle(directory, "upload")


def test_wrong_kind_format_and_expected_field_are_named(tmp_path):
  directory = _write(tmp_path)
  with pytest.raises(transport.MessageError, match=r"kind='upload', expected a 'model'"):
    transport.read_bundle(directory, "model")
  with pytest.raises(transport.MessageError, match=r"'package_id' is 'abc', expected 'xyz'"):
    transport.read_bundle(directory, "upload", expect={"package_id": "xyz"})
  with pytest.raises(transport.MessageError, match=r"no field 'key_id'"):
    transport.read_bundle(directory, "upload", expect={"key_id": "k"})
  index = json.loads((directory / transport.INDEX).read_text())
  index["format"] = "meshwork.fhe/0"
  (directory / transport.INDEX).write_text(json.dumps(index))
  with pytest.raises(transport.MessageError, match=r"format='meshwork.fhe/0'"):
    transport.read_bundle(directory, "upload")


def test_undeclared_and_missing_files_are_rejected(tmp_path):
  directory = _write(tmp_path)
  (directory / "secret.key").write_bytes(b"s")
  with pytest.raises(transport.MessageError, match=r"undeclared files \['secret.key'\]"):
    transport.read_bundle(directory, "upload")
  (directory / "secret.key").unlink()
  (directory / "x_00001.bin").unlink()
  with pytest.raises(transport.MessageError, match=r"declared file 'x_00001.bin' is missing"):
    transport.read_bundle(directory, "upload")


def test_existing_bundle_is_kept_unless_overwrite_and_a_failed_write_leaves_nothing(tmp_path):
  directory = _write(tmp_path)
  with pytest.raises(FileExistsError, match="overwrite"):
    _write(tmp_path)
  with pytest.raises(FileNotFoundError):  # a payload that cannot be copied, mid-write
    transport.write_bundle(tmp_path / "upload", "upload",
                           {"a.bin": b"a", "b.bin": tmp_path / "nope"}, {}, overwrite=True)
  assert transport.read_bundle(directory, "upload").meta["package_id"] == "abc"  # old one intact
  assert sorted(p.name for p in tmp_path.iterdir()) == ["upload"]
  _write(tmp_path, overwrite=True)
  with pytest.raises(ValueError, match="not allowed"):
    transport.write_bundle(tmp_path / "b", "upload", {"../x": b""}, {})
