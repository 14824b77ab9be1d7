"""The K-quant experiment end to end, including the issue's accuracy goal on digits."""

from pathlib import Path

import pytest

from experiments import kquant
from experiments import run as launcher
from research.common import config as config_lib
from research.common import records


GOAL_METHODS = "methods=('float32', 'kquant:16', 'kquant:4+ef')"


def check_goal_run(summary, tmp_path, num_clients, rounds, k16_points, k4ef_points):
  """The goal's shape: K=16 and K=4 + error feedback close to float32 FedAvg, exact bits."""
  methods = summary["methods"]
  float32 = methods["float32"]["final_accuracy"]
  assert float32 > 0.9
  assert methods["kquant:16"]["final_accuracy"] >= float32 - k16_points / 100
  assert methods["kquant:4+ef"]["final_accuracy"] >= float32 - k4ef_points / 100
  # 4-bit indices: at least 7x fewer uplink bits than float32 (padding and min/max included).
  assert methods["kquant:16"]["compression_vs_float32"] > 7
  assert summary["headline"]["note"] == (
      f"digits, {num_clients} clients (Dirichlet 0.1), {rounds} rounds; "
      f"{methods['kquant:16']['compression_vs_float32']:.1f}x fewer uplink bits than float32")
  run_dir = Path(summary["run_dir"])
  assert {"accuracy_vs_bits.png", "tables.md", "summary.json", "metrics.jsonl",
          "config.json"} <= {p.name for p in run_dir.iterdir()}
  rows = records.read_metrics(run_dir / "metrics.jsonl")
  assert [(r["method"], r["round"]) for r in rows] == [
      (m, r) for m in ("float32", "kquant:16", "kquant:4+ef") for r in range(1, rounds + 1)]
  k16 = [r for r in rows if r["method"] == "kquant:16"]
  # Exact bits: clients x (39 buckets x 256 indices x 4 bits + 39 x 64 min/max bits).
  assert k16[0]["uplink_bits"] == num_clients * (39 * 256 * 4 + 39 * 64)
  assert k16[-1]["cumulative_uplink_bits"] == rounds * k16[0]["uplink_bits"]
  assert all(r["dropped_clients"] == 0 for r in rows)
  assert summary["num_params"] == 9610 and summary["num_buckets"] == 39
  tables = (run_dir / "tables.md").read_text()
  assert "## results" in tables and "| kquant:4+ef |" in tables and "## uplink" in tables


@pytest.mark.slow
def test_goal_on_digits_non_iid_with_100_clients(tmp_path):
  """The page's goal: K=16 within 0.5 points of float32 FedAvg; K=4 + EF within 2 points."""
  summary = launcher.main(["configs/kquant/digits_noniid.py", "--workdir", str(tmp_path),
                           "--set", GOAL_METHODS])
  check_goal_run(summary, tmp_path, num_clients=100, rounds=60, k16_points=0.5, k4ef_points=2)


def test_goal_setting_with_fewer_clients_and_rounds(tmp_path):
  """The goal test's behaviour on a smaller run of the same non-IID setting (default suite)."""
  summary = launcher.main(["configs/kquant/digits_noniid.py", "--workdir", str(tmp_path),
                           "--set", GOAL_METHODS, "--set", "num_clients=20",
                           "--set", "rounds=12"])
  check_goal_run(summary, tmp_path, num_clients=20, rounds=12, k16_points=1, k4ef_points=3)


def test_k_schedule_with_the_last_round_per_tensor_range(tmp_path):
  summary = launcher.main([
      "configs/kquant/smoke.py", "--workdir", str(tmp_path), "--set", "rounds=4",
      "--set", "methods=('kquant:schedule',)", "--set", "headline_method=kquant:schedule",
      "--set", "k_schedule=((0, 4), (2, 16))", "--set", "range_policy=last_round",
      "--set", "per_tensor_range=true"])
  rows = records.read_metrics(Path(summary["run_dir"]) / "metrics.jsonl")
  # K = 4 (2 bits) for rounds 0-1, then K = 16 (4 bits); no min/max report under last_round.
  assert [r["uplink_bits"] for r in rows] == [10 * 39 * 256 * b for b in (2, 2, 4, 4)]
  # The range message: a float32 pair per tensor (4 tensors) plus K.
  assert all(r["downlink_range_bits"] == 64 * 4 + 8 for r in rows)
  assert all(r["dropped_clients"] == 0 and 0 < r["relative_error"] < 1 for r in rows)
  headline = summary["headline"]
  assert headline["baseline"] == "kquant:schedule"  # no float32 run: the first method
  assert headline["value"] == headline["baseline_value"] > 0.5
  assert "compression_vs_float32" not in summary["methods"]["kquant:schedule"]


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


def _result(partition, num_clients, gaps):
  """A kept result as the launcher writes it, with only what paper_tables reads."""
  methods = {"float32": {"final_accuracy": 0.9, "accuracy_gap_points": 0.0,
                         "uplink_bits_per_round": 32 * 9610 * num_clients,
                         "compression_vs_float32": 1.0, "rounds_to_target": 3}}
  for method, gap in gaps.items():
    methods[method] = {"final_accuracy": 0.9 - gap / 100, "accuracy_gap_points": gap,
                       "uplink_bits_per_round": 42432 * num_clients,
                       "compression_vs_float32": 32 * 9610 / 42432, "rounds_to_target": None}
  config = dict(kquant.config_schema().to_dict(), experiment="kquant", seed=0,
                partition=partition, num_clients=num_clients, methods=tuple(methods))
  return {"config": config, "summary": {"methods": methods, "num_params": 9610,
                                        "num_buckets": 39}}


def test_paper_tables_one_setting_and_gaps_across_settings():
  one = _result("dirichlet", 100, {"kquant:16": 0.22, "kquant:16+ef": -0.5})
  tables = kquant.paper_tables(one)
  assert "| kquant:16 | 0.8978 | +0.22 | 4,243,200 | 7.2x | - |" in tables["results"]
  assert tables["uplink"].startswith("9,610 parameters in 39 buckets of 256 (9,984 slots")
  assert "| kquant:16 | 42,432 | 7.2x |" in tables["uplink"]
  assert "kquant:16+ef" not in tables["uplink"]  # the same bits as kquant:16
  other = _result("iid", 10, {"kquant:16": -1.5})
  gaps = kquant.paper_tables(one, other)
  assert set(gaps) == {"gaps"}
  lines = gaps["gaps"].splitlines()
  assert lines[0] == "| method | digits 100 a0.1 | digits 10 iid | largest abs gap |"
  assert "| kquant:16 | +0.22 | -1.50 | 1.50 |" in lines
  assert "| kquant:16+ef | -0.50 | - | 0.50 |" in lines  # not run in the second setting


def test_bench_kquant_writes_its_tables_into_a_run_folder(tmp_path, monkeypatch):
  from experiments import bench_kquant
  monkeypatch.chdir(tmp_path)
  assert bench_kquant.main(["--sizes", "8192", "--clients", "2", "--repeats", "1"]) == 0
  run_dir = next((tmp_path / "runs" / "bench_kquant").iterdir())
  summary = records.read_json(run_dir / "summary.json")
  assert [r["op"] for r in summary["results"]] == [
      "elementwise baseline (x*a+b)", "encode+pack K=16 (4 bits)", "float32 aggregate (2 clients)",
      "decode+aggregate K=16 (2 clients)"]
  tables = (run_dir / "tables.md").read_text()
  assert "## throughput" in tables and "| encode+pack K=16 (4 bits) | reference | 8,192 |" in tables
