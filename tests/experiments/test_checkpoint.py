"""The checkpoint experiment through the launcher: both jobs end bit for bit on the reference."""

import re
from pathlib import Path

import pytest

from experiments import run as launcher
from research.common import config as config_lib


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
  """The session's jax compilation cache for checkpoint jobs (tests/checkpoint shares it; a
  run's own cache would start empty)."""
  path = tmp_path_factory.getbasetemp() / "checkpoint_jax_compilation_cache"
  path.mkdir(exist_ok=True)
  return str(path)


def test_smoke_killed_worker_is_restored_from_local_memory_bit_exact(tmp_path,
                                                                    compilation_cache):
  summary = launcher.main(["configs/checkpoint/smoke.py", "--workdir", str(tmp_path),
                           "--set", f"compilation_cache={compilation_cache}"])
  run_dir = Path(summary["run_dir"])
  assert summary["bit_exact"] is True
  faulted, clean = summary["jobs"]["faulted"], summary["jobs"]["fault_free"]
  assert clean["bit_exact"] and clean["local_restores"] == [] and clean["restarts"] == 0
  assert faulted["bit_exact"] and faulted["replicas_equal"] and faulted["restarts"] == 0
  assert [f["kind"] for f in faulted["faults"]] == ["kill_worker"]
  # The node's warm spare stood by before step 1; it takes over and restores in one copy.
  assert len(faulted["local_restores"]) == 1, faulted
  assert faulted["local_restores"][0].startswith("warm spare, "), faulted["local_restores"]
  assert faulted["steps_lost"] == [0]
  assert "the warm spare takes over" in (run_dir / "events.log").read_text()
  assert (run_dir / "steps_vs_time.png").read_bytes()[:4] == b"\x89PNG"
  assert "| faulted | kill_worker" in (run_dir / "tables.md").read_text()
  note = summary["headline"]["note"]
  assert "restored from local memory: warm spare, " in note
  assert "bit-exact vs the single-process reference: yes" in note


@pytest.mark.slow
def test_node_failure_through_the_launcher_skips_the_corrupted_checkpoint(tmp_path):
  summary = launcher.main(["configs/checkpoint/smoke.py", "--workdir", str(tmp_path),
                           "--set", "num_agents=2", "--set", "steps=12", "--set",
                           "persist_every=3", "--set", "agent_failures=1"])
  run_dir = Path(summary["run_dir"])
  assert summary["bit_exact"] is True
  faulted = summary["jobs"]["faulted"]
  assert faulted["bit_exact"] and faulted["replicas_equal"] and faulted["restarts"] == 1
  assert {f["kind"] for f in faulted["faults"]} == {"kill_worker", "kill_agent",
                                                    "corrupt_checkpoint"}
  events = (run_dir / "events.log").read_text()
  corrupted = re.search(r"fault: corrupted persistent/worker_\d+/steps/(\d+)/", events)
  assert corrupted, events
  assert re.search(rf"skip persisted step {corrupted[1]} of worker_\d+: .*\(corrupted\)", events)
  # The restart goes to an older committed step, or to the start when the corrupted step was
  # the only one committed (the newer save still in flight on a loaded machine).
  restart = re.search(r"restoring every worker from persisted step (\d+)|no committed checkpoint",
                      events)
  assert restart and int(restart[1] or 0) < int(corrupted[1]), events
  # The worker killed at the node failure's step may be restored before the job restarts.
  assert all(r.startswith(("warm spare, ", "new process, ")) for r in faulted["local_restores"])


@pytest.mark.parametrize("override, match", [
    ("persist_every=4", "'persist_every': got 4, expected a multiple of snapshot_every"),
    ("worker_failures=-1", "'worker_failures': got -1"),
    ("compilation_cache=", "'compilation_cache': got ''"),
])
def test_bad_config_is_refused(tmp_path, override, match):
  overrides = ["--set", override]
  if override.startswith("persist"):
    overrides += ["--set", "snapshot_every=3"]
  with pytest.raises(config_lib.ConfigError, match=match):
    launcher.main(["configs/checkpoint/smoke.py", "--workdir", str(tmp_path), *overrides])
