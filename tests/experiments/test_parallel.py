"""The parallel experiment through the launcher: sliced training equals one device; plan bytes."""

import pytest

from experiments import run as launcher
from research.common import config as config_lib


def test_one_model_and_strategy_through_the_launcher(tmp_path):
  summary = launcher.main(["configs/parallel/smoke.py", "--workdir", str(tmp_path),
                           "--set", "models=('mlp',)", "--set", "strategies=('data_parallel',)",
                           "--set", "steps=2", "--set", "bench_pairs=1"])
  run_dir = next((tmp_path / "parallel").iterdir())
  assert summary["all_equal"] is True and list(summary["training"]) == ["mlp/data_parallel"]
  result = summary["training"]["mlp/data_parallel"]
  # The fast counterpart of tests/parallel/test_graph.py's slow step-by-step training test.
  assert len(result["losses"]) == 2 and result["max_rel_diff"] < 1e-4
  assert result["reference_losses"][1] < result["reference_losses"][0]
  assert result["collectives"] == {"all-reduce": 1}  # the loss only
  bytes_ = summary["bytes"]
  assert bytes_["pairs"] == 4 and bytes_["ours_worse"] == 0
  assert summary["headline"]["value"] <= summary["headline"]["baseline_value"]
  assert summary["headline"]["note"].startswith("2 Adam steps, mlp/data_parallel on a (2, 4) mesh")
  assert (run_dir / "losses.png").read_bytes()[:4] == b"\x89PNG"
  assert "## mlp / data_parallel" in (run_dir / "graphs.md").read_text()
  tables = (run_dir / "tables.md").read_text()
  assert "| mlp | data_parallel |" in tables and "## bytes" in tables


@pytest.mark.slow
def test_paper_setting_shrunk_training_equal_and_plans_never_move_more_than_xla(tmp_path):
  summary = launcher.main(["configs/parallel/train.py", "--workdir", str(tmp_path),
                           "--set", "steps=3", "--set", "bench_pairs=6"])
  assert summary["all_equal"] is True
  assert len(summary["training"]) == 6
  for result in summary["training"].values():
    assert result["max_rel_diff"] < 1e-4
    assert len(result["losses"]) == 3
  mixed = summary["training"]["transformer_block/mixed"]["collectives"]
  assert mixed["all-gather"] == 2 and mixed["reduce-scatter"] == 2
  bytes_ = summary["bytes"]
  assert bytes_["pairs"] == 24 and bytes_["ours_worse"] == 0
  assert summary["headline"]["value"] <= summary["headline"]["baseline_value"]
  assert summary["headline"]["note"].startswith("3 Adam steps, 6 model x strategy runs")
  run_dir = next((tmp_path / "parallel").iterdir())
  assert "all-gather(dim 1 over mp)" in (run_dir / "graphs.md").read_text()
  assert "| transformer_block | mixed |" in (run_dir / "tables.md").read_text()


@pytest.mark.parametrize("override, match", [
    ("strategies=('zero',)", r"'strategies': got \('zero',\), expected a non-empty subset"),
    ("mesh_shape=(8,)", r"'mesh_shape': got \(8,\), expected two sizes"),
    ("bench_pairs=-1", "'bench_pairs': got -1"),
])
def test_bad_config_is_refused(tmp_path, override, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    launcher.main(["configs/parallel/smoke.py", "--workdir", str(tmp_path), "--set", override])
