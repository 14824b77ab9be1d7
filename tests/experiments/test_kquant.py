"""The K-quant experiment end to end, including the issue's accuracy goal on digits."""

import pytest

from experiments import kquant
from experiments import run as launcher
from research.common import config as config_lib
from research.common import records


def test_goal_on_digits_non_iid_with_100_clients(tmp_path):
  """K=16 within 0.5 points of float32 FedAvg; K=4 with error feedback within 2 points."""
  summary = launcher.main([
      "configs/kquant/digits_noniid.py", "--workdir", str(tmp_path),
      "--set", "methods=('float32', 'kquant:16', 'kquant:4+ef')"])
  methods = summary["methods"]
  float32 = methods["float32"]["final_accuracy"]
  assert float32 > 0.9
  assert methods["kquant:16"]["final_accuracy"] >= float32 - 0.005
  assert methods["kquant:4+ef"]["final_accuracy"] >= float32 - 0.02
  # 4-bit indices: at least 7x fewer uplink bits than float32 (padding and min/max included).
  assert methods["kquant:16"]["compression_vs_float32"] > 7
  run_dir = next((tmp_path / "kquant").iterdir())
  assert {"accuracy_vs_bits.png", "table.md", "summary.json", "metrics.jsonl",
          "config.json"} <= {p.name for p in run_dir.iterdir()}
  rows = records.read_metrics(run_dir / "metrics.jsonl")
  assert len(rows) == 3 * 60
  k16 = [r for r in rows if r["method"] == "kquant:16"]
  # Exact bits: 100 clients x (39 buckets x 256 indices x 4 bits + 39 x 64 min/max bits).
  assert k16[0]["uplink_bits"] == 100 * (39 * 256 * 4 + 39 * 64)
  assert k16[-1]["cumulative_uplink_bits"] == 60 * k16[0]["uplink_bits"]
  assert all(r["dropped_clients"] == 0 for r in rows)


def test_k_schedule_and_other_policies_run(tmp_path):
  summary = launcher.main([
      "configs/kquant/smoke.py", "--workdir", str(tmp_path), "--set", "rounds=4",
      "--set", "methods=('kquant:schedule', 'qsgd:2', 'terngrad+ef')",
      "--set", "headline_method=kquant:schedule", "--set", "k_schedule=((0, 4), (2, 16))",
      "--set", "range_policy=last_round", "--set", "per_tensor_range=true"])
  rows = records.read_metrics(next((tmp_path / "kquant").iterdir()) / "metrics.jsonl")
  scheduled = [r["uplink_bits"] for r in rows if r["method"] == "kquant:schedule"]
  assert scheduled[0] == scheduled[1] and scheduled[2] == scheduled[3] == 2 * scheduled[0]
  assert 0.0 < summary["headline"]["value"] <= 1.0


@pytest.mark.parametrize("override, match", [
    ("methods=('kquant',)", "'methods': got 'kquant'"),
    ("methods=('kquant:x',)", "needs an int"),
    ("methods=('kquant:512',)", "2 <= K <= 256"),
    ("methods=('zip',)", "'methods': got 'zip'"),
    ("methods=('kquant:schedule',)", "'k_schedule'"),
    ("range_policy=median", "'range_policy': got 'median'"),
    ("headline_method=qsgd:2", "'headline_method': got 'qsgd:2'"),
])
def test_bad_configs_fail_at_load(override, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    launcher.load("configs/kquant/digits_noniid.py", [override])


def test_parse_method():
  assert kquant.parse_method("kquant:4+ef") == ("kquant", 4, True)
  assert kquant.parse_method("sign") == ("sign", None, False)
  assert kquant.parse_method("kquant:schedule") == ("kquant", None, False)
