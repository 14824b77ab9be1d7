"""The vfl experiment end to end: in one process (three methods agree), and as two OS processes
over gRPC with mutual TLS (the same numbers as in one process)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import run as launcher
from research.common import records

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
  args = ["--set", "methods=('encrypted',)", *SHORT]
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
  # The active party sends B x h and B x d_a ciphertexts per batch and receives B x d_a.
  assert encrypted["bytes_sent"] > encrypted["bytes_received"] > 0
  one = launcher.main(["configs/vfl/grpc.py", "--workdir", str(tmp_path / "one"), *args])
  reference = one["seeds"][0]["methods"]["encrypted"]
  # PSI keys are random in each run, but the aligned rows are sorted by ID: same batches, same
  # initial weights, same noise; the masks cancel exactly.
  assert seed["aligned_samples"] == one["seeds"][0]["aligned_samples"]
  np.testing.assert_allclose(encrypted["losses"], reference["losses"], rtol=1e-6)
  assert encrypted["auc"] == pytest.approx(reference["auc"], abs=1e-9)
