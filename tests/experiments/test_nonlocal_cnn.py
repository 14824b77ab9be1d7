"""The nonlocal_cnn experiment through the launcher: tables, pictures, refusals."""

import pytest

from experiments import run as launcher
from research.common import config as config_lib


def test_smoke_trains_evaluates_and_saves_examples(tmp_path):
  summary = launcher.main(["configs/nonlocal_cnn/smoke.py", "--workdir", str(tmp_path),
                           "--set", "steps=3", "--set", "test_size=64", "--set", "tile=64",
                           "--set", "batch_size=2", "--set", "patch_size=16"])
  run_dir = next((tmp_path / "nonlocal_cnn").iterdir())
  result = summary["results"]["25"]
  assert set(result["mean_psnr"]) == {"two_stage", "plain", "nl_means", "noisy"}
  # The plain baseline is widened to the two-stage parameter count (within 3 %).
  assert abs(result["params"]["plain"] - result["params"]["two_stage"]) < \
      0.03 * result["params"]["two_stage"]
  assert result["mean_psnr"]["nl_means"] > result["mean_psnr"]["noisy"] + 3
  assert 19 < result["mean_psnr"]["noisy"] < 22  # sigma 25 on [0, 1] images: about 20.2 dB
  assert (run_dir / "examples_sigma25.png").read_bytes()[:4] == b"\x89PNG"
  assert "| 25 | two_stage |" in (run_dir / "table.md").read_text()
  assert summary["headline"]["baseline"] == "plain CNN, equal parameters"


@pytest.mark.parametrize("override, match", [
    ("patch_size=30", r"'patch_size': got 30, expected a multiple of factor=4"),
    ("test_size=100", r"'test_size': got 100, expected a multiple of tile=128"),
    ("models=('unet',)", r"'models': got \('unet',\)"),
    ("sigmas=(0.0,)", r"'sigmas': got \(0.0,\), expected positive"),
    ("eval_impl=cuda", r"'eval_impl': got 'cuda', expected one of 'reference', 'pallas'"),
])
def test_bad_config_is_refused(tmp_path, override, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    launcher.main(["configs/nonlocal_cnn/smoke.py", "--workdir", str(tmp_path), "--set",
                   override])
