"""The launcher's multi-process path: 2 local processes x 2 CPU devices vs 1 process x 4."""

import subprocess
import sys
from pathlib import Path

import numpy as np

from research.common import records

REPO = Path(__file__).resolve().parents[2]


def launch(tmp_path, *args):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.run", "configs/data_parallel/smoke.py", "--workdir",
       str(tmp_path), *args], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  (run_dir,) = [p for p in (tmp_path / "data_parallel").iterdir()]
  summary = records.read_json(run_dir / "summary.json")
  assert len(records.read_metrics(run_dir / "metrics.jsonl")) == summary["steps_run"]
  return summary


def test_two_processes_compute_what_one_process_computes(tmp_path):
  two = launch(tmp_path / "two", "--processes", "2", "--cpu-devices", "2")
  one = launch(tmp_path / "one", "--cpu-devices", "4")
  assert (two["processes"], two["devices"]) == (2, 4)
  assert (one["processes"], one["devices"]) == (1, 4)
  for summary in (one, two):
    assert summary["global_index_sum"] == summary["expected_index_sum"] == 256 * 255 // 2
    # The sharded steps (explicit pmean) equal plain single-device steps.
    np.testing.assert_allclose(summary["final_params"], summary["reference_params"], rtol=1e-5,
                               atol=1e-6)
  np.testing.assert_allclose(two["final_params"], one["final_params"], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(two["headline"]["value"], one["headline"]["value"], rtol=1e-6)


def test_an_invalid_config_fails_before_any_process_starts(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.run", "configs/data_parallel/smoke.py", "--workdir",
       str(tmp_path), "--processes", "2", "--set", "steps=-1"], cwd=REPO, capture_output=True,
      text=True, timeout=300)
  assert result.returncode == 2
  assert "'steps': got -1, expected a positive int" in result.stderr
  assert list(tmp_path.iterdir()) == []
