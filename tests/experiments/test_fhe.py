"""The FHE experiment through the launcher: the main environment drives the FHE one by processes.

Needs .venv-fhe (`make venv-fhe`; `make test` builds it before this suite).
"""

import pytest

from experiments import run as launcher
from research.common import config as config_lib
from research.common import records


def test_smoke_round_trip_reports_encrypted_and_clear_results(tmp_path):
  summary = launcher.main(["configs/fhe/smoke.py", "--workdir", str(tmp_path)])
  run_dir = next((tmp_path / "fhe").iterdir())
  for name in ("accuracy_vs_iterations.png", "table.md", "metrics.jsonl", "summary.json",
               "compare_simulate.json", "hospital/model.npz", "wire/model/bundle.json"):
    assert (run_dir / name).is_file(), name
  assert (run_dir / "accuracy_vs_iterations.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  execute, simulate = summary["execute"], summary["simulate"]
  full = records.read_json(run_dir / "compare_simulate.json")
  assert summary["headline"]["value"] == full["curve"][-1]["accuracy"]
  assert summary["headline"]["baseline_value"] == \
      full["clear"]["sklearn_logistic_regression"]["accuracy"]
  assert execute["iterations"] == 2 and len(execute["iteration_seconds"]) == 2
  assert execute["seconds_per_iteration"] > 0 and execute["evaluation_key_bytes"] > 1e7
  assert execute["max_steps_from_simulation"] <= 3  # p_error 0.01: a PBS error moves a step
  assert "s per encrypted iteration" in summary["headline"]["note"]
  assert 0.6 < simulate["test"]["accuracy"] <= 1.0
  metrics = records.read_metrics(run_dir / "metrics.jsonl")
  assert [m["step"] for m in metrics if m.get("mode") == "simulate"] == list(range(5, 45, 5))
  # The wire holds only bundles; the client's private state stays under hospital/.
  assert sorted(p.name for p in (run_dir / "wire").iterdir()) == ["model", "upload"]
  assert not any(p.name.startswith("secretKey") for p in (run_dir / "wire").rglob("*"))
  assert any(p.name.startswith("secretKey") for p in (run_dir / "hospital").rglob("*"))


@pytest.mark.parametrize("override, match", [
    ("execute_features=31", "'execute_features': got 31"),
    ("fhe_python=/nonexistent/python", "'fhe_python'.*make venv-fhe"),
    ("p_error=1.5", "'p_error': got 1.5"),
])
def test_bad_config_is_refused_before_anything_runs(tmp_path, override, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    launcher.main(["configs/fhe/smoke.py", "--workdir", str(tmp_path), "--set", override])
  assert not (tmp_path / "fhe").exists()
