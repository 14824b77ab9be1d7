"""FedAvg end to end through the launcher, on the digits config the README quotes."""

import numpy as np
import pytest

from experiments import run as launcher
from research.common import config as config_lib
from research.common import records


def test_fedavg_digits_is_within_two_points_of_centralized(tmp_path):
  summary = launcher.main(["configs/fedavg/digits.py", "--workdir", str(tmp_path)])
  run_dir = next((tmp_path / "fedavg").iterdir())
  assert sorted(p.name for p in run_dir.iterdir()) == [
      "accuracy.png", "config.json", "metrics.jsonl", "summary.json", "tables.md"]
  assert summary.pop("run_dir") == str(run_dir)
  assert records.read_json(run_dir / "summary.json") == summary
  config = records.read_json(run_dir / "config.json")
  assert config["experiment"] == "fedavg" and config["rounds"] == 40
  # The package versions it ran with are recorded beside the resolved config.
  import jax
  assert config["environment"]["jax"] == jax.__version__
  assert f"| {summary['final_test_accuracy']:.4f} |" in (run_dir / "tables.md").read_text()
  metrics = records.read_metrics(run_dir / "metrics.jsonl")
  assert [m["step"] for m in metrics] == list(range(1, 41))
  assert metrics[-1]["test_accuracy"] == summary["final_test_accuracy"]
  assert (run_dir / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  assert summary["centralized_test_accuracy"] > 0.95
  assert summary["final_test_accuracy"] >= summary["centralized_test_accuracy"] - 0.02
  assert metrics[0]["test_accuracy"] < summary["final_test_accuracy"]  # it learned over rounds
  assert summary["param_count"] == 64 * 128 + 128 + 128 * 10 + 10
  assert summary["client_sizes"] == [135] * 7 + [134] * 3


def test_fedavg_non_iid_runs_and_is_seeded(tmp_path):
  args = ["configs/fedavg/smoke.py", "--workdir", str(tmp_path), "--set", "partition=dirichlet",
          "--set", "dirichlet_alpha=0.1", "--set", "rounds=3"]
  first, second = launcher.main(args), launcher.main(args)
  assert first["final_test_accuracy"] == second["final_test_accuracy"]
  assert len(set(first["client_sizes"])) > 1  # label skew gives unequal clients
  np.testing.assert_equal(sum(first["client_sizes"]), 1347)


def test_a_server_learning_rate_that_is_not_positive_is_refused():
  for value in ("0", "-1.0"):
    with pytest.raises(config_lib.ConfigError, match=rf"'server_learning_rate': got "
                                                     rf"{float(value)!r}, expected a positive"):
      launcher.load("configs/fedavg/smoke.py", [f"server_learning_rate={value}"])
  assert launcher.load("configs/fedavg/smoke.py", ["server_learning_rate=0.5"])[0] \
      .server_learning_rate == 0.5
