"""Faults at random steps; the job must end bit for bit where the fault-free run ends.

Real processes (2 agents x 2 workers, spawned), kill -9, hung workers, slow heartbeats, a node
failure with the newest persisted checkpoint corrupted. About a minute per test on 2 cores.
"""

import re

import numpy as np
import pytest

from research.checkpoint import store
from research.checkpoint import transport
from research.checkpoint import worker as worker_lib

STEPS = 12


@pytest.fixture(scope="module")
def fault_free():
  spec = transport.JobSpec(workdir="unused", steps=STEPS)
  return store.pack(worker_lib.reference_run(worker_lib.make_problem(spec.num_workers), STEPS))


def _spec(tmp_path, **kwargs):
  return transport.JobSpec(workdir=str(tmp_path / "job"), steps=STEPS, persist_every=3,
                           min_step_seconds=0.15, **kwargs)


def test_worker_failures_recover_from_local_memory_bit_for_bit(tmp_path, fault_free):
  rng = np.random.default_rng(7)
  kill_step, hang_step = (int(s) for s in rng.choice(np.arange(2, STEPS), 2, replace=False))
  faults = [transport.Fault("kill_worker", int(rng.integers(4)), kill_step),
            transport.Fault("hang_worker", 2, hang_step, seconds=4.0),
            transport.Fault("delay_heartbeats", 1, 1, seconds=0.6)]  # slow, under the timeout
  lines = []
  result = transport.run_job(_spec(tmp_path), faults, log=lines.append)
  assert result.final_state == fault_free
  assert result.replicas_equal and result.restarts == 0
  replaced = [line for line in lines if "failed (" in line]
  assert len(replaced) == 2, lines  # the killed and the hung worker, not the slow one
  assert any("worker 2 failed (no heartbeat" in line for line in replaced)
  # Each node's spare stood by before step 1: the first failure takes it, restoring in one copy.
  assert "the warm spare takes over" in replaced[0], replaced
  assert sum("restored from local" in line for line in lines) == 2
  assert any("from local memory (warm spare" in line for line in lines), lines
  assert result.steps_lost == [0, 0]  # snapshots every step: only the step in flight is redone
  assert list(store.local_memory_root().glob(f"{_spec(tmp_path).slots_path(0).name}*")) == []


def test_node_failure_restores_the_newest_intact_committed_checkpoint(tmp_path, fault_free):
  rng = np.random.default_rng(11)
  # A random step two paced steps after a persist, so the newest save has usually committed; on
  # a loaded machine it may not have, so the expectations below follow what was corrupted.
  fail_step = int(rng.choice([s for s in range(7, STEPS + 1) if (s - 1) % 3 == 2]))
  faults = [transport.Fault("corrupt_checkpoint", 3, fail_step),
            transport.Fault("kill_agent", 1, fail_step)]
  lines = []
  result = transport.run_job(_spec(tmp_path), faults, log=lines.append)
  assert result.final_state == fault_free
  assert result.replicas_equal and result.restarts == 1
  corrupted = [re.search(r"worker_3/steps/(\d+)/", line) for line in lines
               if line.startswith("fault: corrupted")]
  assert len(corrupted) == 1 and corrupted[0], lines
  corrupted_step = int(corrupted[0].group(1))
  newest = (fail_step - 1) // 3 * 3  # persisted every 3 steps, step fail_step - 1 done
  assert corrupted_step in (newest, newest - 3)  # the newest committed when the fault hit
  skipped = [line for line in lines if "skip persisted step" in line]
  assert any(f"skip persisted step {corrupted_step} of worker_3" in line and "corrupted" in line
             for line in skipped), lines
  # Every other skip is a save still in flight (no manifest) when the node died.
  assert all("no commit manifest" in line for line in skipped
             if f"step {corrupted_step} of worker_3" not in line), skipped
  restored = [int(line.rsplit(" ", 1)[1]) for line in lines
              if line.startswith("restoring every worker from persisted step")]
  assert len(restored) == 1 and restored[0] != corrupted_step and restored[0] <= newest, lines
  assert result.steps_lost == [fail_step - 1 - restored[0]]


def test_job_spec_refuses_bad_policies(tmp_path):
  with pytest.raises(ValueError, match="persist_every=4 must be a multiple of snapshot_every=3"):
    transport.JobSpec(workdir=str(tmp_path), snapshot_every=3, persist_every=4)
  with pytest.raises(ValueError, match="heartbeat_interval"):
    transport.JobSpec(workdir=str(tmp_path), heartbeat_interval=3.0, heartbeat_timeout=2.0)
  with pytest.raises(ValueError, match="fault kind='reboot'"):
    transport.Fault("reboot", 0, 1)
