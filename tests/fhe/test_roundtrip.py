"""A real encrypted round trip (execute mode), each party its own process, and what it must refuse.

Marked slow (`make test-slow`): concrete key generation and real encrypted iterations. The same
protocol checks run in the default suite with a toy cipher (tests/fhe/test_protocol.py).

Tiny config: 2 client-selected features, 2 encrypted iterations. The circuit is built with
p_error 1e-5 instead of concrete-ml's 0.01 so that a programmable bootstrap error (which makes
an executed iteration differ from its simulation by a quantization step) is rare; the decrypted
model must then equal the simulated fit of the same seed to within one weight-quantizer step.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from research.common import data as data_lib
from research.common import records
from research.fhe import package as package_lib
from research.fhe import transport

REPO = Path(__file__).resolve().parents[2]
FEATURES, ITERATIONS, SEED, P_ERROR = 2, 2, 0, 1e-5

pytestmark = pytest.mark.slow


def party(module, *args, check=True):
  """Runs one party's command line as its own process; returns (exit code, stdout, stderr)."""
  env = dict(os.environ, PYTHONPATH=str(REPO))
  done = subprocess.run([sys.executable, "-m", f"research.fhe.{module}", *map(str, args)],
                        cwd=REPO, env=env, capture_output=True, text=True, check=False)
  if check and done.returncode != 0:
    raise AssertionError(f"{module} {args} failed:\n{done.stderr[-3000:]}")
  return done.returncode, done.stdout, done.stderr


@pytest.fixture(scope="module")
def trip(tmp_path_factory):
  root = tmp_path_factory.mktemp("trip")
  split = data_lib.breast_cancer(standardize=False)
  np.savez(root / "train.npz", x=split.x_train, y=split.y_train)
  np.savez(root / "test.npz", x=split.x_test, y=split.y_test)
  paths = {k: root / k for k in ("packages", "state", "upload", "model")}
  party("package", "build", "--out", paths["packages"], "--features", FEATURES, "--p-error",
        P_ERROR)
  party("client", "encrypt", "--package", paths["packages"] / "client", "--state",
        paths["state"], "--data", root / "train.npz", "--iterations", ITERATIONS, "--seed", SEED,
        "--out", paths["upload"])
  party("server", "train", "--package", paths["packages"] / "server", "--upload",
        paths["upload"], "--out", paths["model"])
  _, out, _ = party("client", "decrypt", "--package", paths["packages"] / "client", "--state",
                    paths["state"], "--model", paths["model"], "--out", root / "model.npz",
                    "--evaluate", root / "test.npz")
  party("compare", "--train", root / "train.npz", "--test", root / "test.npz", "--features",
        FEATURES, "--iterations", ITERATIONS, "--seed", SEED, "--every", 1, "--p-error", P_ERROR,
        "--out", root / "simulated.json")
  return {"root": root, "split": split, "decrypt": json.loads(out.splitlines()[-1]),
          "simulated": json.loads((root / "simulated.json").read_text()), **paths}


def test_decrypted_model_matches_the_simulated_fit_of_the_same_seed(trip):
  model = np.load(trip["root"] / "model.npz")
  simulated = trip["simulated"]
  assert model["snapshot_iterations"].tolist() == [1, 2]
  for i, snapshot in enumerate(simulated["snapshots"]):
    decrypted = np.append(model["snapshot_weights"][i], model["snapshot_bias"][i])
    expected = np.append(snapshot["weights"], snapshot["bias"])
    np.testing.assert_allclose(decrypted, expected, rtol=0, atol=simulated["weight_step"] * 1.01)
  assert model["features"].tolist() == simulated["features"]
  # The client's test metrics come from the decrypted model, and the training moved it.
  assert trip["decrypt"]["test"]["accuracy"] > 0.75
  assert not np.array_equal(model["snapshot_weights"][0], model["snapshot_weights"][1])


def _server_inputs(trip):
  return [p for d in (trip["packages"] / "server", trip["upload"]) for p in d.rglob("*")
          if p.is_file()]


def _needles_found(needles, paths):
  found = set()
  for path in paths:
    data = path.read_bytes()
    found |= {i for i, needle in enumerate(needles) if needle in data}
  return found


def test_server_inputs_hold_no_secret_key_and_no_clear_data(trip):
  inputs = _server_inputs(trip)
  upload = transport.read_bundle(trip["upload"], "upload")
  assert set(upload.meta) == {"package_id", "key_id", "batches", "shapes"}  # no statistics
  assert {p.name for p in trip["upload"].iterdir()} == set(upload.files) | {"bundle.json"}
  state_files = [p for p in trip["state"].rglob("*") if p.is_file()]
  state_hashes = {records.sha256_file(p) for p in state_files}
  assert not state_hashes & {records.sha256_file(p) for p in inputs}

  # Pieces of the secret keys (bits stored as u64 words; 64-bit windows mixing 0s and 1s).
  secret_files = [p for p in state_files if p.name.startswith("secretKey")]
  assert secret_files
  needles = []
  for path in secret_files:
    words = np.frombuffer(path.read_bytes()[64:], dtype=np.uint64)
    for start in range(0, len(words) - 64, max(1, len(words) // 6)):
      window = words[start:start + 64]
      if set(window.tolist()) == {0, 1} and 8 <= window.sum() <= 56:
        needles.append(window.tobytes())
  assert len(needles) >= 6
  assert _needles_found(needles, secret_files) == set(range(len(needles)))  # the probe works
  assert not _needles_found(needles, inputs)

  # Clear rows, raw and as scaled by the client, in float64 and float32.
  split = trip["split"]
  model = np.load(trip["root"] / "model.npz")
  scaled = np.clip(2 * (split.x_train[:, model["features"]] - model["low"])
                   / (model["high"] - model["low"]) - 1, -1, 1)
  raw = [r.tobytes() for r in split.x_train[:40]]  # as stored in the client's table
  assert _needles_found(raw, [trip["root"] / "train.npz"]) == set(range(40))  # the probe works
  rows = list(split.x_train[:40]) + list(scaled[:40])
  needles = raw + [r.astype(dtype).tobytes() for dtype in (np.float64, np.float32) for r in rows]
  assert not _needles_found(needles, inputs)


def test_a_model_under_another_key_is_refused_and_would_decrypt_to_garbage(trip):
  other_state = trip["root"] / "other_state"
  party("client", "encrypt", "--package", trip["packages"] / "client", "--state", other_state,
        "--data", trip["root"] / "train.npz", "--iterations", 1, "--seed", SEED, "--out",
        trip["root"] / "other_upload")
  code, _, err = party("client", "decrypt", "--package", trip["packages"] / "client", "--state",
                       other_state, "--model", trip["model"], "--out",
                       trip["root"] / "x.npz", check=False)
  assert code == 2 and "key id" in err and "cannot be decrypted with these keys" in err
  assert not (trip["root"] / "x.npz").exists()

  # What the key-id check protects against: concrete decrypts under the wrong key set without
  # complaint (no error; integers of the same shapes), only into other values. Every snapshot
  # is compared, so the wrong keys matching the right values by chance is out of reach.
  from concrete.ml.deployment import FHEModelClient
  model = transport.read_bundle(trip["model"], "model")
  right = FHEModelClient(str(trip["packages"] / "client"), key_dir=str(trip["state"] / "keys"))
  wrong = FHEModelClient(str(trip["packages"] / "client"), key_dir=str(other_state / "keys"))
  decrypted = {}
  for name, client in (("right", right), ("wrong", wrong)):
    client.generate_private_and_evaluation_keys(force=False)  # loads each one's cached keys
    decrypted[name] = np.concatenate([
        np.ravel(v) for t in model.meta["snapshots"]
        for v in client.deserialize_decrypt(model.read(f"weights_{t:05d}.bin"),
                                            model.read(f"bias_{t:05d}.bin"))])
  assert decrypted["right"].shape == decrypted["wrong"].shape == (ITERATIONS * (FEATURES + 1),)
  assert decrypted["wrong"].dtype.kind == decrypted["right"].dtype.kind == "i"
  assert not np.array_equal(decrypted["right"], decrypted["wrong"])


def _copy(src, dst):
  shutil.copytree(src, dst, copy_function=os.link)  # hard links: fast, never edit in place


def _flip_byte(path):
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0xFF
  path.unlink()  # break the hard link before writing
  path.write_bytes(bytes(data))


def test_server_refuses_tampered_or_foreign_uploads(trip):
  tampered = trip["root"] / "tampered_upload"
  _copy(trip["upload"], tampered)
  _flip_byte(tampered / "x_00002.bin")
  code, _, err = party("server", "train", "--package", trip["packages"] / "server", "--upload",
                       tampered, "--out", trip["root"] / "m1", check=False)
  assert code == 2 and "x_00002.bin" in err and "tampered" in err
  assert not (trip["root"] / "m1").exists()

  other = trip["root"] / "other_packages"
  party("package", "build", "--out", other, "--features", FEATURES + 1)
  code, _, err = party("server", "train", "--package", other / "server", "--upload",
                       trip["upload"], "--out", trip["root"] / "m2", check=False)
  assert code == 2 and "'package_id'" in err
  assert not (trip["root"] / "m2").exists()


def test_client_refuses_a_tampered_model_and_foreign_packages(trip):
  tampered = trip["root"] / "tampered_model"
  _copy(trip["model"], tampered)
  _flip_byte(tampered / f"weights_{ITERATIONS:05d}.bin")
  code, _, err = party("client", "decrypt", "--package", trip["packages"] / "client", "--state",
                       trip["state"], "--model", tampered, "--out", trip["root"] / "y.npz",
                       check=False)
  assert code == 2 and "weights_00002.bin" in err
  assert not (trip["root"] / "y.npz").exists()

  relabelled = trip["root"] / "old_versions"
  _copy(trip["packages"] / "client", relabelled)
  index = json.loads((relabelled / "bundle.json").read_text())
  index["meta"]["versions"]["concrete_ml"] = "1.8.0"
  (relabelled / "bundle.json").unlink()
  (relabelled / "bundle.json").write_text(json.dumps(index))
  with pytest.raises(transport.MessageError, match="built with .*1.8.0.*rebuild"):
    package_lib.read_package(relabelled, "client")
