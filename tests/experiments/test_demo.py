from experiments import demo
from research.common import records


def test_demo_runs_registered_smoke_configs_and_writes_the_table(tmp_path):
  assert {p.parent.name for p in demo.smoke_configs()} >= {"fedavg", "data_parallel"}
  assert demo.main(["--workdir", str(tmp_path), "--only", "data_parallel"]) == 0
  table = (tmp_path / "demo" / "summary.md").read_text()
  rows = [line for line in table.splitlines() if line.startswith("| data_parallel")]
  assert len(rows) == 1
  cells = [c.strip() for c in rows[0].strip("|").split("|")]
  assert cells[3] == "single device" and cells[5] == "1.000"
  summary_path = next((tmp_path / "data_parallel").iterdir()) / "summary.json"
  assert records.read_json(summary_path)["devices"] == 8


def test_table_row_ratio():
  row = demo.table_row("x", {"headline": {"metric": "acc", "value": 0.9, "baseline": "b",
                                          "baseline_value": 1.0}, "seconds": 2.0})
  assert row == ("x", "acc", "0.9", "b", "1", "0.900", "2.0", "")
  noted = demo.table_row("x", {"headline": {"metric": "acc", "value": 0.9, "baseline": "b",
                                            "baseline_value": 1.0, "note": "5 s/it"},
                               "seconds": 2.0})
  assert noted[-1] == "5 s/it"
