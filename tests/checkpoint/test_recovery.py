"""Faults at random steps; the job must end bit for bit where the fault-free run ends.

Real processes (spawned), kill -9, hung workers, slow heartbeats, a node failure with the newest
persisted checkpoint corrupted. By default one node x 2 workers sharing a compilation cache
(about 10 s a job on 2 cores); the `slow` cases run the paper's 2 nodes x 2 workers with warm
spares and no cache (about a minute each).
"""

import functools
import re

import numpy as np
import pytest

from research.checkpoint import store
from research.checkpoint import transport
from research.checkpoint import worker as worker_lib

STEPS = 12
FAST_STEPS = 7


@functools.lru_cache(maxsize=None)
def reference(num_workers: int, steps: int, cache: str = "") -> bytes:
  """The packed final state of the fault-free single-process run; its compilations go into
  `cache` too, for the jobs' processes to load."""
  with transport.compiling_into(cache):
    return store.pack(worker_lib.reference_run(worker_lib.make_problem(num_workers), steps))


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
  """The session's jax compilation cache for checkpoint jobs (tests/experiments shares it)."""
  path = tmp_path_factory.getbasetemp() / "checkpoint_jax_compilation_cache"
  path.mkdir(exist_ok=True)
  return str(path)


def _spec(tmp_path, **kwargs):
  return transport.JobSpec(workdir=str(tmp_path / "job"), steps=STEPS, persist_every=3,
                           min_step_seconds=0.15, **kwargs)


def _fast_spec(tmp_path, cache, **kwargs):
  """One node x 2 workers, no warm spare: each replacement is a new process."""
  return transport.JobSpec(**{
      "workdir": str(tmp_path / "job"), "num_agents": 1, "steps": FAST_STEPS,
      "persist_every": 2, "min_step_seconds": 0.1, "heartbeat_timeout": 1.5,
      "warm_spare": False, "compilation_cache": cache, **kwargs})


def _assert_local_memory_cleaned_up(spec):
  assert list(store.local_memory_root().glob(f"{spec.slots_path(0).name}*")) == []


def test_hung_worker_is_fenced_and_restored_from_local_memory_bit_for_bit(tmp_path,
                                                                         compilation_cache):
  # (A killed worker taken over by the warm spare: tests/experiments/test_checkpoint.py.)
  spec = _fast_spec(tmp_path, compilation_cache)
  expected = reference(2, FAST_STEPS, compilation_cache)
  faults = [transport.Fault("delay_heartbeats", 1, 1, seconds=0.5),  # slow, under the timeout
            transport.Fault("hang_worker", 0, 4, seconds=3.0)]
  lines = []
  result = transport.run_job(spec, faults, log=lines.append)
  assert result.final_state == expected
  assert result.replicas_equal and result.restarts == 0
  replaced = [line for line in lines if "failed (" in line]
  assert len(replaced) == 1 and "worker 0 failed (no heartbeat" in replaced[0], lines
  assert len(result.local_restores) == 1, lines  # not the slow worker 1
  assert result.local_restores[0].startswith("new process, "), result.local_restores
  assert any("worker 0: restored step 3 from local memory" in line for line in lines), lines
  assert result.steps_lost == [0]  # snapshots every step: only the step in flight is redone
  _assert_local_memory_cleaned_up(spec)


def test_node_failure_skips_the_corrupted_checkpoint_bit_for_bit(tmp_path, compilation_cache):
  spec = _fast_spec(tmp_path, compilation_cache, workers_per_agent=1)  # (2 x 2: the slow case)
  # Saves start at steps 2, 4, 6 (each after the one before committed); at step 7 the newest
  # committed one (6, or 4 when the save of 6 is still in flight) is corrupted and the node
  # killed: the job restarts from the committed step before it.
  faults = [transport.Fault("corrupt_checkpoint", 0, 7), transport.Fault("kill_agent", 0, 7)]
  expected = reference(1, FAST_STEPS, compilation_cache)
  lines = []
  result = transport.run_job(spec, faults, log=lines.append)
  assert result.final_state == expected
  assert result.restarts == 1
  corrupted = [re.search(r"worker_0/steps/(\d+)/", line) for line in lines
               if line.startswith("fault: corrupted")]
  assert len(corrupted) == 1 and corrupted[0], lines
  corrupted_step = int(corrupted[0].group(1))
  assert corrupted_step in (6, 4), lines
  assert any(f"skip persisted step {corrupted_step} of worker_0" in line and "corrupted" in line
             for line in lines), lines
  restored = [int(line.rsplit(" ", 1)[1]) for line in lines
              if line.startswith("restoring every worker from persisted step")]
  assert restored == [corrupted_step - 2], lines
  assert result.steps_lost == [7 - 1 - restored[0]]
  _assert_local_memory_cleaned_up(spec)


@pytest.mark.slow
def test_worker_failures_recover_from_local_memory_bit_for_bit(tmp_path):
  rng = np.random.default_rng(7)
  kill_step, hang_step = (int(s) for s in rng.choice(np.arange(2, STEPS), 2, replace=False))
  faults = [transport.Fault("kill_worker", int(rng.integers(4)), kill_step),
            transport.Fault("hang_worker", 2, hang_step, seconds=4.0),
            transport.Fault("delay_heartbeats", 1, 1, seconds=0.6)]  # slow, under the timeout
  lines = []
  result = transport.run_job(_spec(tmp_path), faults, log=lines.append)
  assert result.final_state == reference(4, STEPS)
  assert result.replicas_equal and result.restarts == 0
  replaced = [line for line in lines if "failed (" in line]
  assert len(replaced) == 2, lines  # the killed and the hung worker, not the slow one
  assert any("worker 2 failed (no heartbeat" in line for line in replaced)
  # Each node's spare stood by before step 1: the first failure takes it, restoring in one copy.
  assert "the warm spare takes over" in replaced[0], replaced
  assert sum("restored from local" in line for line in lines) == 2
  assert any("from local memory (warm spare" in line for line in lines), lines
  assert len(result.local_restores) == 2 and result.local_restores[0].startswith("warm spare, ")
  assert result.steps_lost == [0, 0]  # snapshots every step: only the step in flight is redone
  _assert_local_memory_cleaned_up(_spec(tmp_path))


@pytest.mark.slow
def test_node_failure_restores_the_newest_intact_committed_checkpoint(tmp_path):
  rng = np.random.default_rng(11)
  # A random step two paced steps after a persist, so the newest save has usually committed; on
  # a loaded machine it may not have, so the expectations below follow what was corrupted.
  fail_step = int(rng.choice([s for s in range(7, STEPS + 1) if (s - 1) % 3 == 2]))
  faults = [transport.Fault("corrupt_checkpoint", 3, fail_step),
            transport.Fault("kill_agent", 1, fail_step)]
  lines = []
  result = transport.run_job(_spec(tmp_path), faults, log=lines.append)
  assert result.final_state == reference(4, STEPS)
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
