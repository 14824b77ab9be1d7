"""The checkpoint experiment through the launcher: the demo row, the fault draw, bad configs."""

from pathlib import Path

import pytest

from experiments import checkpoint as experiment
from experiments import run as launcher
from research.common import config as config_lib


def test_smoke_killed_process_restarts_from_local_memory_bit_exact(tmp_path):
  summary = launcher.main(["configs/checkpoint/smoke.py", "--workdir", str(tmp_path)])
  run_dir = Path(summary["run_dir"])
  assert summary["bit_exact"] is True and summary["reference"] == "in_process"
  faulted = summary["jobs"]["faulted"]
  assert faulted["bit_exact"] and faulted["attempts"] == 2
  [failure] = faulted["failures"]
  assert failure["kind"] == "kill_process" and failure["seen_as"] == "exit"
  assert failure["restored_from"] == ["local"]
  assert failure["step"] <= failure["restored_step"] <= failure["step"] + 1  # no step lost
  assert 0 < failure["detection_s"] < failure["wasted_s"]
  assert sorted(r["source"] for r in faulted["restores"]) == ["init", "init", "local", "local"]
  assert "fault: kill_process at step" in (run_dir / "events.log").read_text()
  assert (run_dir / "steps_vs_time.png").read_bytes()[:4] == b"\x89PNG"
  assert "| faulted | yes | 2 | kill_process (process" in (run_dir / "tables.md").read_text()
  assert "final state bit-exact vs one process with 2 devices: yes" in \
      summary["headline"]["note"]


def test_faults_are_drawn_in_order_at_increasing_steps_from_the_seed():
  config, _ = launcher.load("configs/checkpoint/faults.py")
  faults = experiment.draw_faults(config)
  assert [f.kind for f in faults] == list(experiment.FAULTS)
  steps = [f.step for f in faults]
  assert steps == sorted(steps) and 2 <= steps[0] and steps[-1] < config.steps
  corrupt, both = faults[3], faults[4]
  assert corrupt.step == both.step >= 2 * config.persist_every + 2  # two persisted steps first
  assert len({f.step for f in faults}) == 4  # distinct but for the corruption's
  assert [(f.kind, f.step, f.process) for f in experiment.draw_faults(config)] == \
      [(f.kind, f.step, f.process) for f in faults]


@pytest.mark.parametrize("override, match", [
    ("processes=3", "'processes': got 3, more than devices=2"),
    ("devices=3", "'devices': got 3, expected a multiple of processes=2"),
    ("nodes=3", "'nodes': got 3, more than processes=2"),
    ("faults=('kill_worker',)", r"'faults': unknown \['kill_worker'\]"),
    ("reference=in_process,devices=4", "'in_process' needs devices <= 2"),
    ("compilation_cache=", "'compilation_cache': got ''"),
    ("steps=6", "'steps': got 6, expected >= 15 for 5 faults"),
])
def test_bad_config_is_refused_before_anything_starts(tmp_path, override, match):
  overrides = []
  for item in override.split(",") if "(" not in override else [override]:
    overrides += ["--set", item]
  with pytest.raises(config_lib.ConfigError, match=match):
    launcher.main(["configs/checkpoint/faults.py", "--workdir", str(tmp_path), *overrides])
  assert not list(tmp_path.iterdir())  # no run folder half-written
