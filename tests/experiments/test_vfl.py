"""The vfl experiment end to end: in one process (three methods agree), and as two OS processes
over gRPC with mutual TLS (the same numbers as in one process)."""

import subprocess
import sys
from pathlib import Path

import chex
import numpy as np
import pytest

from experiments import run as launcher
from experiments import vfl
from research.common import config as config_lib
from research.common import records
from research.vfl import model as model_lib

REPO = Path(__file__).resolve().parents[2]
SHORT = ["--set", "max_train_batches=3", "--set", "max_eval_batches=2", "--set", "batch_size=32"]


def test_encrypted_plaintext_and_centralized_train_the_same_network(tmp_path):
  summary = launcher.main(["configs/vfl/smoke.py", "--workdir", str(tmp_path), *SHORT])
  run_dir = Path(summary["run_dir"])
  assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  methods = summary["seeds"][0]["methods"]
  # Same initial weights, schedule and math: the encrypted protocol's masks cancel exactly and
  # its noise up to fixed-point rounding (2**-32), so losses agree far below float32 noise...
  np.testing.assert_allclose(methods["encrypted"]["losses"], methods["plaintext"]["losses"],
                             rtol=1e-5)
  np.testing.assert_allclose(methods["plaintext"]["losses"], methods["centralized"]["losses"],
                             rtol=1e-5)
  assert len(methods["encrypted"]["losses"]) == 3
  for method in ("encrypted", "plaintext"):
    assert methods[method]["auc"] == pytest.approx(methods["centralized"]["auc"], abs=1e-6)
  # ... and ciphertexts cost bytes: 1024-bit keys, 256-byte ciphertexts, several per sample.
  assert methods["encrypted"]["bytes_per_sample"] > 20 * methods["plaintext"]["bytes_per_sample"]
  assert summary["within_goal"]
  metrics = records.read_metrics(run_dir / "metrics.jsonl")
  assert sum("encrypted_loss" in m for m in metrics) == 3


@pytest.mark.slow  # two launcher processes, jax.distributed, gRPC with TLS
def test_two_processes_over_grpc_compute_what_one_process_computes(tmp_path):
  # Each party's private seed given (by default each draws its own): the run is reproducible.
  args = ["--set", "methods=('encrypted',)", "--set", "party_seeds=(0, 0)", *SHORT]
  result = subprocess.run(
      [sys.executable, "-m", "experiments.run", "configs/vfl/grpc.py", "--processes", "2",
       "--workdir", str(tmp_path / "two"), *args], cwd=REPO, capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  (run_dir,) = list((tmp_path / "two" / "vfl").iterdir())
  two = records.read_json(run_dir / "summary.json")
  assert two["processes"] == 2
  (seed,) = two["seeds"]
  assert seed["transport"] == "grpc" and seed["tls"] is True
  encrypted = seed["methods"]["encrypted"]
  # Both directions carry ciphertexts (packed by default: the active party sends fewer than it
  # receives, since the revealed products come back as B x h integers).
  assert encrypted["bytes_sent"] > 0 and encrypted["bytes_received"] > 0
  one = launcher.main(["configs/vfl/grpc.py", "--workdir", str(tmp_path / "one"), *args])
  reference = one["seeds"][0]["methods"]["encrypted"]
  # PSI keys are random in each run, but the aligned rows are sorted by ID: same batches, same
  # initial weights, same noise; the masks cancel exactly.
  assert seed["aligned_samples"] == one["seeds"][0]["aligned_samples"]
  np.testing.assert_allclose(encrypted["losses"], reference["losses"], rtol=1e-6)
  assert encrypted["auc"] == pytest.approx(reference["auc"], abs=1e-9)
  # The active party counts every message of the session, both ways, as the one process does
  # (ciphertexts' byte lengths vary by a byte or so from run to run).
  assert encrypted["bytes_per_sample"] == pytest.approx(reference["bytes_per_sample"], rel=0.01)


def grpc_setup(*overrides):
  config, _ = launcher.load("configs/vfl/grpc.py", list(overrides))
  return config, vfl.network_spec(config, vfl.party_tables(config))


def test_two_process_parties_draw_their_secrets_unless_seeds_are_given():
  config, spec = grpc_setup()
  assert tuple(config.party_seeds) == (-1, -1)  # the default: each party draws its own
  _, shared = model_lib.build(spec, config.seed)
  (_, active1, _), (_, active2, _) = (vfl.party_init(config, spec, "active") for _ in range(2))
  (*_, noise1), (*_, noise2) = (vfl.party_init(config, spec, "passive") for _ in range(2))
  # W'_0 (with e_acc_0 it gives W_p) and the passive noise seed are not the shared seed's, and
  # differ between draws; the passive party cannot recompute W'_0, the active party e_acc.
  for w in (active1.w_passive, active2.w_passive):
    assert w.shape == shared.w_passive.shape and w.dtype == np.float32
    assert not np.allclose(w, shared.w_passive)
  assert not np.allclose(active1.w_passive, active2.w_passive)
  assert len({noise1, noise2, vfl.passive_noise_seed(config.seed)}) == 3
  # Given seeds reproduce the one-process run of that seed exactly.
  config, spec = grpc_setup("party_seeds=(5, 5)")
  _, reference = model_lib.build(spec, 5)
  _, active, _ = vfl.party_init(config, spec, "active")
  _, passive, noise = vfl.party_init(config, spec, "passive")
  np.testing.assert_array_equal(active.w_passive, reference.w_passive)
  chex.assert_trees_all_equal(passive.passive_bottom, reference.passive_bottom)
  assert noise == vfl.passive_noise_seed(5)


def test_drawn_share_has_the_initializers_scale():
  # LeCun normal over fan-in passive_out, times sqrt(passive_out / fan_in): variance 1 / fan_in.
  _, spec = grpc_setup()
  rng = np.random.default_rng(0)
  draws = np.stack([model_lib.draw_w_passive(spec, rng) for _ in range(500)])
  fan_in = spec.passive_out + spec.active_out
  assert np.std(draws) == pytest.approx(np.sqrt(1 / fan_in), rel=0.03)
  bound = 2 / .87962566103423978 * np.sqrt(1 / fan_in)  # truncated at two standard deviations
  assert np.max(np.abs(draws)) <= bound


@pytest.mark.parametrize("override, key", [
    ("party_seeds=(3,)", "party_seeds"), ("party_seeds=(-2, 0)", "party_seeds"),
    ("he.mask_bits=0", "he.mask_bits"), ("he.noise_scale=-0.1", "he.noise_scale")])
def test_bad_party_seeds_and_he_settings_are_refused_naming_the_key(override, key):
  with pytest.raises(config_lib.ConfigError, match=f"'{key}'"):
    grpc_setup(override)
