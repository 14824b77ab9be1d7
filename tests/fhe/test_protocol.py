"""What each party writes, checks and refuses, with a toy cipher in place of concrete's keys.

The real round trip (tests/fhe/test_roundtrip.py, marked slow) generates concrete key sets and
runs encrypted iterations. Here the same package, client and server code runs with `ToyClient`
standing in for concrete-ml's `FHEModelClient`: its "ciphertexts" are the values XORed with a pad
drawn from a secret key kept in the client's state folder (neither secure nor homomorphic, so
the test plays the server's training step itself). What is pinned: the upload holds ids, shapes
and what the FHE client returned, nothing of the client's state or clear rows; the server
accepts only an upload that fits its package; the client decrypts only a model made for its
package under its key id, and refuses packages built with other versions.
"""

import json
import os

import numpy as np
import pytest

from research.common import data as data_lib
from research.fhe import client as client_lib
from research.fhe import package as package_lib
from research.fhe import server as server_lib
from research.fhe import train
from research.fhe import transport

FEATURES, ITERATIONS, SEED = 3, 2, 0


class ToyClient:
  """The four calls of `FHEModelClient` the client makes, over a toy cipher (see the module)."""

  def __init__(self, key_dir):
    key_dir.mkdir(parents=True, exist_ok=True)
    secret = key_dir / "secretKey_toy.bin"
    if not secret.exists():
      secret.write_bytes(os.urandom(32))
    self.secret = secret.read_bytes()

  def get_serialized_evaluation_keys(self) -> bytes:
    return transport.sha256(b"evaluation:" + self.secret).encode() * 8

  def _pad(self, size: int) -> np.ndarray:
    rng = np.random.default_rng(int.from_bytes(self.secret[:8], "little"))
    return np.frombuffer(rng.bytes(size), dtype=np.uint8)

  def seal(self, value) -> bytes:
    data = np.frombuffer(np.asarray(value, dtype=np.float64).tobytes(), dtype=np.uint8)
    return (data ^ self._pad(len(data))).tobytes()

  def open(self, data: bytes) -> np.ndarray:
    clear = np.frombuffer(data, dtype=np.uint8) ^ self._pad(len(data))
    return np.frombuffer(clear.tobytes(), dtype=np.float64)

  def quantize_encrypt_serialize(self, *values):
    return tuple(None if v is None else self.seal(v) for v in values)

  def deserialize_decrypt_dequantize(self, weights: bytes, bias: bytes):
    return self.open(weights), self.open(bias)


@pytest.fixture
def parties(tmp_path, monkeypatch):
  monkeypatch.setattr(client_lib, "_fhe_client",
                      lambda package, state: ToyClient(state / "keys"))
  split = data_lib.breast_cancer(standardize=False)
  np.savez(tmp_path / "train.npz", x=split.x_train, y=split.y_train)
  np.savez(tmp_path / "test.npz", x=split.x_test, y=split.y_test)
  (tmp_path / "client.zip").write_bytes(b"client zip")
  (tmp_path / "server.zip").write_bytes(b"server zip")
  manifest = package_lib.write_packages(tmp_path / "packages", train.TrainerSpec(FEATURES),
                                        tmp_path / "client.zip", tmp_path / "server.zip")
  report = client_lib.encrypt(tmp_path / "packages" / "client", tmp_path / "state",
                              tmp_path / "train.npz", tmp_path / "upload", ITERATIONS, SEED)
  return {"root": tmp_path, "split": split, "manifest": manifest, "encrypt": report,
          "client_package": tmp_path / "packages" / "client",
          "server_package": tmp_path / "packages" / "server"}


def _payloads(directory):
  return [p.read_bytes() for p in directory.rglob("*") if p.is_file()]


def test_the_upload_holds_ciphertexts_and_ids_only_and_fits_the_server_package(parties):
  root = parties["root"]
  upload = server_lib.read_upload(root / "upload",
                                  package_lib.read_package(parties["server_package"], "server"))
  assert upload.meta == {"package_id": parties["manifest"]["package_id"],
                         "key_id": parties["encrypt"]["key_id"], "batches": ITERATIONS,
                         "shapes": train.TrainerSpec(FEATURES).shapes()}
  assert upload.meta["key_id"] == transport.sha256(upload.read("evaluation_keys.bin"))
  assert {p.name for p in (root / "upload").iterdir()} == set(upload.files) | {"bundle.json"}

  # The state stays with the client: its secret key, preprocessing and seed appear nowhere in
  # the upload, nor do clear rows (raw or as the client scaled them).
  state = client_lib.read_state(root / "state")
  assert state["key_id"] == upload.meta["key_id"] and state["seed"] == SEED
  preprocessing = train.Preprocessing.from_json(state["preprocessing"])
  assert list(preprocessing.features) == parties["encrypt"]["features"]
  secret = (root / "state" / "keys" / "secretKey_toy.bin").read_bytes()
  x = parties["split"].x_train
  scaled = preprocessing.apply(x)
  needles = [secret] + [r.tobytes() for r in x[:40]] + [r.tobytes() for r in scaled[:40]]
  needles += [json.dumps(state["preprocessing"]["low"]).encode()]
  uploaded = _payloads(root / "upload")
  assert not [n for n in needles if any(n in data for data in uploaded)]
  assert any(r.tobytes() in (root / "train.npz").read_bytes() for r in x[:40])  # probe works


def test_a_refused_or_failed_upload_leaves_the_client_state_as_it_was(parties, monkeypatch):
  root = parties["root"]
  state_file = root / "state" / client_lib.STATE_FILE
  state_before = state_file.read_bytes()
  upload_before = (root / "upload" / "bundle.json").read_bytes()
  args = (parties["client_package"], root / "state", root / "train.npz", root / "upload",
          ITERATIONS + 1, SEED + 1)

  # The upload cannot be written (after keys and encryption): the state still describes the
  # upload that was written before, not the one that failed.
  def failing_write(*_, **__):
    raise OSError("disk full")
  with monkeypatch.context() as patch:
    patch.setattr(transport, "write_bundle", failing_write)
    with pytest.raises(OSError, match="disk full"):
      client_lib.encrypt(*args, overwrite=True)
  assert state_file.read_bytes() == state_before

  # `out` exists and no overwrite: refused before any key is generated or loaded, from the API
  # and from the command line (exit 2), for this state folder and for a fresh one.
  def no_keys(package, state):
    raise AssertionError(f"keys generated under {state} for an upload that is refused")
  monkeypatch.setattr(client_lib, "_fhe_client", no_keys)
  with pytest.raises(FileExistsError, match="upload' exists; pass overwrite=True"):
    client_lib.encrypt(*args)
  with pytest.raises(FileExistsError, match="upload' exists"):
    client_lib.encrypt(args[0], root / "new_state", *args[2:])
  assert client_lib.main(["encrypt", "--package", str(args[0]), "--state", str(root / "state"),
                          "--data", str(args[2]), "--iterations", "3", "--out",
                          str(root / "upload")]) == 2
  assert state_file.read_bytes() == state_before and not (root / "new_state").exists()
  assert (root / "upload" / "bundle.json").read_bytes() == upload_before


def _rewrite(directory, out, *, meta=None, files=None, drop=()):
  """A copy of a bundle with some meta fields or payload files replaced (hashes rewritten)."""
  bundle = transport.read_bundle(directory, json.loads((directory / "bundle.json").read_text())
                                 ["kind"])
  payload = {name: bundle.read(name) for name in bundle.files if name not in drop}
  payload.update(files or {})
  return transport.write_bundle(out, bundle.kind, payload, {**bundle.meta, **(meta or {})})


def _flip_byte(path):
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0xFF
  path.write_bytes(bytes(data))


def test_the_server_refuses_uploads_that_do_not_fit_its_package(parties, tmp_path):
  root = parties["root"]
  package = package_lib.read_package(parties["server_package"], "server")
  cases = {
      "'package_id'": dict(meta={"package_id": "0" * 32}),
      "'shapes'": dict(meta={"shapes": train.TrainerSpec(FEATURES + 1).shapes()}),
      r"do not fit batches=3": dict(meta={"batches": 3}),
      r"batches=0": dict(meta={"batches": 0}),
      r"\['y_00002.bin'\] do not fit": dict(drop=("y_00002.bin",)),
      "key_id is not the hash": dict(files={"evaluation_keys.bin": b"other keys"}),
  }
  for i, (match, change) in enumerate(cases.items()):
    bad = _rewrite(root / "upload", tmp_path / f"bad{i}", **change)
    with pytest.raises(transport.MessageError, match=match):
      server_lib.read_upload(bad, package)

  tampered = tmp_path / "tampered"
  _rewrite(root / "upload", tampered)
  _flip_byte(tampered / "x_00002.bin")
  with pytest.raises(transport.MessageError, match=r"x_00002\.bin.*tampered"):
    server_lib.read_upload(tampered, package)

  # An existing model folder is refused first, before the package is even read (so before any
  # encrypted iteration), and left as it was.
  (tmp_path / "model").mkdir()
  with pytest.raises(FileExistsError, match="model' exists; pass overwrite=True"):
    server_lib.train_encrypted(tmp_path / "no_package", root / "upload", tmp_path / "model")
  assert not any((tmp_path / "model").iterdir())


def _model(parties, out, kept, key_dir=None, drop_meta=(), **meta):
  """The server's answer, as `server.train_encrypted` writes it, with weights the test chose:
  `kept` maps an iteration to its (weights, bias); `meta` overrides fields, `drop_meta` drops."""
  toy = ToyClient(key_dir or parties["root"] / "state" / "keys")
  files = {}
  for t, (weights, bias) in kept.items():
    files[f"weights_{t:05d}.bin"], files[f"bias_{t:05d}.bin"] = toy.seal(weights), toy.seal(bias)
  meta = {"package_id": parties["manifest"]["package_id"], "key_id": parties["encrypt"]["key_id"],
          "upload_id": "u", "iterations": max(kept), "snapshots": sorted(kept), **meta}
  return transport.write_bundle(out, "model", files,
                                {k: v for k, v in meta.items() if k not in drop_meta})


def test_the_client_decrypts_only_its_own_model(parties, tmp_path):
  root = parties["root"]
  rng = np.random.default_rng(0)
  snapshots = {t: (rng.uniform(-1, 1, FEATURES), rng.uniform(-1, 1, 1)) for t in (1, 2)}
  model = _model(parties, tmp_path / "model", snapshots)
  report = client_lib.decrypt(parties["client_package"], root / "state", model,
                              tmp_path / "model.npz", evaluate=root / "test.npz")
  arrays = np.load(tmp_path / "model.npz")
  np.testing.assert_array_equal(arrays["snapshot_weights"], [snapshots[1][0], snapshots[2][0]])
  np.testing.assert_array_equal(arrays["weights"], snapshots[2][0])
  assert arrays["bias"] == snapshots[2][1][0] and arrays["snapshot_iterations"].tolist() == [1, 2]
  assert arrays["features"].tolist() == parties["encrypt"]["features"]
  assert [p["iteration"] for p in report["curve"]] == [1, 2]
  assert report["test"] == report["curve"][-1] and 0 <= report["test"]["accuracy"] <= 1

  # Another client's keys: the model is refused before anything is decrypted or written.
  client_lib.encrypt(parties["client_package"], tmp_path / "other_state", root / "train.npz",
                     tmp_path / "other_upload", 1, SEED)
  with pytest.raises(transport.MessageError, match="key id .*cannot be decrypted with these keys"):
    client_lib.decrypt(parties["client_package"], tmp_path / "other_state", model,
                       tmp_path / "x.npz")
  foreign = _model(parties, tmp_path / "foreign", snapshots, package_id="0" * 32)
  with pytest.raises(transport.MessageError, match="'package_id'"):
    client_lib.decrypt(parties["client_package"], root / "state", foreign, tmp_path / "y.npz")
  _flip_byte(model / "weights_00002.bin")
  with pytest.raises(transport.MessageError, match=r"weights_00002\.bin"):
    client_lib.decrypt(parties["client_package"], root / "state", model, tmp_path / "z.npz")
  assert not any((tmp_path / n).exists() for n in ("x.npz", "y.npz", "z.npz"))


def test_the_client_refuses_a_model_whose_snapshots_do_not_name_its_ciphertexts(parties,
                                                                               tmp_path):
  root = parties["root"]
  rng = np.random.default_rng(1)
  snapshots = {t: (rng.uniform(-1, 1, FEATURES), rng.uniform(-1, 1, 1)) for t in (1, 2)}
  cases = {
      r"'snapshots' is None": dict(drop_meta=("snapshots",)),
      r"'snapshots' is \[\]": dict(snapshots=[]),
      r"'snapshots' is \[2, 1\]": dict(snapshots=[2, 1]),
      r"'snapshots' is \[1, 1, 2\]": dict(snapshots=[1, 1, 2]),
      r"'snapshots' is \['1', '2'\]": dict(snapshots=["1", "2"]),
      r"'snapshots' is \[1\], expected .* ending at 2": dict(snapshots=[1]),
      r"'snapshots' names .*\['weights_00003.bin', 'bias_00003.bin'\]": dict(snapshots=[1, 2, 3],
                                                                          iterations=3),
      r"'iterations' is None": dict(drop_meta=("iterations",)),
      r"'iterations' is 0": dict(iterations=0),
  }
  for i, (match, change) in enumerate(cases.items()):
    model = _model(parties, tmp_path / f"model{i}", snapshots, **change)
    with pytest.raises(transport.MessageError, match=match):
      client_lib.decrypt(parties["client_package"], root / "state", model, tmp_path / "x.npz")
  # From the command line: the error line and exit 2, not a traceback.
  assert client_lib.main(["decrypt", "--package", str(parties["client_package"]), "--state",
                          str(root / "state"), "--model", str(tmp_path / "model0"), "--out",
                          str(tmp_path / "x.npz")]) == 2
  assert not (tmp_path / "x.npz").exists()


def test_packages_refuse_other_versions_swapped_zips_and_the_other_side(parties, tmp_path):
  client_package = parties["client_package"]
  assert package_lib.read_package(client_package, "client").meta == parties["manifest"]
  versions = dict(parties["manifest"]["versions"], concrete_ml="1.8.0")
  relabelled = _rewrite(client_package, tmp_path / "old", meta={"versions": versions})
  with pytest.raises(transport.MessageError, match="built with .*1.8.0.*rebuild"):
    package_lib.read_package(relabelled, "client")
  swapped = _rewrite(client_package, tmp_path / "swapped", files={"client.zip": b"other zip"})
  with pytest.raises(transport.MessageError, match="not the zip the manifest names"):
    package_lib.read_package(swapped, "client")
  with pytest.raises(transport.MessageError, match="expected a 'server-package'"):
    package_lib.read_package(client_package, "server")
  with pytest.raises(ValueError, match="run `encrypt` with this state folder first"):
    client_lib.read_state(tmp_path / "nothing")
