"""The checkpoint experiment through the launcher: both jobs end bit for bit on the reference."""

import pytest

from experiments import run as launcher
from research.common import config as config_lib


def test_smoke_faulted_job_ends_bit_exact_and_logs_each_recovery(tmp_path):
  summary = launcher.main(["configs/checkpoint/smoke.py", "--workdir", str(tmp_path)])
  run_dir = next((tmp_path / "checkpoint").iterdir())
  assert summary["bit_exact"] is True
  faulted = summary["jobs"]["faulted"]
  assert faulted["bit_exact"] and faulted["replicas_equal"] and faulted["restarts"] == 1
  assert {f["kind"] for f in faulted["faults"]} == {"kill_worker", "kill_agent",
                                                    "corrupt_checkpoint"}
  # A restore from local memory, when the node failure (same step here) did not pre-empt it,
  # is the warm spare's, which stood by before step 1 (tests/checkpoint pins this case).
  assert all(r.startswith("warm spare, ") for r in faulted["local_restores"][:1])
  events = (run_dir / "events.log").read_text()
  assert "skip persisted step" in events and "corrupted" in events
  assert "restoring every worker from persisted step" in events
  assert (run_dir / "steps_vs_time.png").read_bytes()[:4] == b"\x89PNG"
  assert "bit-exact vs fault-free: yes" in summary["headline"]["note"]


@pytest.mark.parametrize("override, match", [
    ("persist_every=4", "'persist_every': got 4, expected a multiple of snapshot_every"),
    ("worker_failures=-1", "'worker_failures': got -1"),
])
def test_bad_config_is_refused(tmp_path, override, match):
  overrides = ["--set", override]
  if override.startswith("persist"):
    overrides += ["--set", "snapshot_every=3"]
  with pytest.raises(config_lib.ConfigError, match=match):
    launcher.main(["configs/checkpoint/smoke.py", "--workdir", str(tmp_path), *overrides])
