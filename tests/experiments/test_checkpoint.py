"""The checkpoint experiment through the launcher: the demo row, the fault draw, bad configs."""

import dataclasses
import json
import subprocess
import time
import types
from pathlib import Path

import numpy as np
import pytest

from experiments import checkpoint as experiment
from experiments import run as launcher
from research.checkpoint import protocol, store, transport
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
  # No step lost: from the step every process had completed when the kill was decided up to
  # the newest the killed process had recorded once it landed; the newest every process held.
  assert failure["step"] <= failure["restored_step"] <= failure["completed"], failure
  assert failure["restored_step"] == failure["held_by_all"], failure
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


def test_each_fault_gets_the_first_failure_seen_after_it_not_the_next_in_order():
  # A failure no fault caused (detected at 2.0, before the kill fired at 3.0) and a node fault
  # that never fired: in order, the kill would take the early failure and the hang the kill's.
  faults = [experiment.Fault("kill_process", 4, 1, fired_at=3.0),
            experiment.Fault("hang_process", 8, 0, fired_at=9.0),
            experiment.Fault("kill_node", 12, 0)]
  plan = protocol.RestorePlan(4, (protocol.Choice(0, protocol.Source.LOCAL, "a"),
                                  protocol.Choice(1, protocol.Source.LOCAL, "a")))

  def recovery(kind, detected_at):
    return transport.Recovery(protocol.Failure(kind, 0, None, 0, detected_at, ""), plan,
                              detected_at + 0.5, detected_at + 1.0)

  result = types.SimpleNamespace(recoveries=[recovery("hang", 2.0), recovery("exit", 3.1),
                                             recovery("hang", 12.0)])
  rows = experiment._failure_rows(result, faults)  # pylint: disable=protected-access
  assert [(r["kind"], r["seen_as"]) for r in rows] == [
      ("kill_process", "exit"), ("hang_process", "hang"), ("kill_node", None)]
  np.testing.assert_allclose([rows[0]["detection_s"], rows[1]["detection_s"]], [0.1, 3.0])
  assert not rows[2]["fired"] and rows[2]["wasted_s"] is None
  table = experiment.paper_tables({"summary": {"jobs": {"faulted": {
      "bit_exact": True, "attempts": 4, "seconds": 20.0, "failures": rows}}}})["faults"]
  assert "| kill_node (process 0) @ step 12 (never fired) | - | - | - | - |" in table


def commit_step(directory: Path, step: int) -> None:
  """A persisted step as restorable_steps sees it: its files and a manifest of their hashes."""
  step_dir = directory / "steps" / str(step)
  step_dir.mkdir(parents=True)
  (step_dir / "leaf_00000").write_bytes(bytes(range(256)) * (step + 1))
  (directory / store.MANIFESTS).mkdir(exist_ok=True)
  (directory / store.MANIFESTS / f"{step}.json").write_text(
      json.dumps({"step": step, "files": store._file_hashes(step_dir)}))  # pylint: disable=protected-access


class OneNode:
  """A node agent with one live process to kill (a `sleep`), called in-process."""

  def __init__(self):
    self.child = subprocess.Popen(["sleep", "60"])

  def pids(self):
    return {1: self.child.pid}


def view_at(step: int, agents: dict, nodes=("a",), node_of=(0, 0)) -> transport.JobView:
  """The driver's view with every process alive at `step`, process p on nodes[node_of[p]]."""
  reports = [protocol.ProcessReport(p, True, None, 0.0, step, True) for p in range(len(node_of))]
  return transport.JobView(time.monotonic(), 0, protocol.Placement(nodes, node_of), reports,
                           agents)


def fire_kill(injector, agent: OneNode, step: int = 5) -> None:
  """The injector's poll at `step` on `agent`'s node; its process must die of kill -9."""
  try:
    injector(view_at(step, {"a": agent}))
    assert agent.child.wait(timeout=10) == -9
  finally:
    agent.child.kill()


def test_a_corruption_hits_the_step_the_restore_would_take_not_the_one_at_the_fault(tmp_path):
  # Process 0 may commit the save in flight after its companion fault fired; the corruption
  # waits for the restore, so that step is the one corrupted and the restore takes the one before.
  persistent = tmp_path / "persistent"
  commit_step(persistent, 3)
  faults = [experiment.Fault("corrupt_checkpoint", 5, 0), experiment.Fault("kill_process", 5, 1)]
  lines = []
  injector = experiment.Injector(faults, None, tmp_path, "job", persistent, lines.append)
  agent = OneNode()
  fire_kill(injector, agent)
  assert faults[1].fired_at is not None and faults[0].fired_at is None
  assert faults[0].step == faults[1].step == 5 and lines == [f"fault: kill_process at step 5: "
                                                             f"process 1 (pid {agent.child.pid})"]
  commit_step(persistent, 6)  # the save in flight commits before process 0 is stopped
  injector.before_restore(2)
  assert faults[0].fired_at is not None and "steps/6/" in faults[0].detail.replace("\\", "/")
  assert store.restorable_steps(persistent, lines.append) == [3]
  assert lines[-1].startswith("skip persisted step 6: files") and "corrupted" in lines[-1]
  injector.before_restore(3)  # fired once
  assert sum(line.startswith("fault: corrupt_checkpoint") for line in lines) == 1


def write_local_memory(memory_root: Path, job: str, node: str, process: int, steps) -> None:
  """A process's local-memory file on `node` holding snapshots of `steps` (oldest first)."""
  memory, _ = transport.process_files(memory_root, job, node, process)
  slots = store.LocalSlots(memory, 8, create=True, slots=3)
  for step in steps:
    slots.write(step, [np.zeros(2, np.float32)], job)
  slots.close()


def test_a_kill_records_the_newest_step_the_process_had_written_once_the_signal_landed(
    tmp_path):
  # The reports said step 5; process 1 had snapshotted step 6 and was killed before its status
  # said so: it had recorded step 6. Once the job is stopped, process 0 holds 5-7 and process 1
  # 4-6: every process holds 6.
  job = "00000000000000aa"
  faults = [experiment.Fault("kill_process", 5, 1)]
  injector = experiment.Injector(faults, None, tmp_path, job, tmp_path / "persistent",
                                 lambda line: None)
  write_local_memory(tmp_path, job, "a", 0, (5, 6, 7))
  write_local_memory(tmp_path, job, "a", 1, (4, 5, 6))
  agent = OneNode()
  status = store.ProcessStatus(transport.process_files(tmp_path, job, "a", 1)[1], create=True)
  status.write(agent.child.pid, 5, "training")
  status.close()
  fire_kill(injector, agent)
  assert faults[0].step == 5 and faults[0].completed == 6 and faults[0].held_by_all is None
  injector.before_restore(2)
  assert faults[0].held_by_all == 6


def test_a_hang_records_the_stopped_process_last_heartbeat(tmp_path):
  job = "00000000000000aa"
  faults = [experiment.Fault("hang_process", 5, 1)]
  injector = experiment.Injector(faults, None, tmp_path, job, tmp_path / "persistent",
                                 lambda line: None)
  agent = OneNode()
  status = store.ProcessStatus(transport.process_files(tmp_path, job, "a", 1)[1], create=True)
  status.write(agent.child.pid, 5, "training")
  beat = status.read()[2]
  status.close()
  try:
    injector(view_at(5, {"a": agent}))
    state = Path(f"/proc/{agent.child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    assert state == "T"  # stopped by the time the injector returns
  finally:
    agent.child.kill()
    agent.child.wait()
  assert faults[0].last_beat_ns == beat and faults[0].completed == 5
  assert beat / 1e9 <= faults[0].fired_at  # one clock: CLOCK_MONOTONIC


class Cluster:
  """Ray's test cluster as the injector uses it: nodes to list and to remove."""

  def __init__(self, nodes):
    self.nodes = [types.SimpleNamespace(node_id=n) for n in nodes]
    self.removed = []

  def list_all_nodes(self):
    return list(self.nodes)

  def remove_node(self, node, allow_graceful):
    assert not allow_graceful
    self.nodes.remove(node)
    self.removed.append(node.node_id)


def test_a_node_is_removed_only_once_its_peer_holds_replicas_at_the_observed_step(tmp_path):
  # Process 0 runs on node a, whose replicas node b keeps. At step 5 the peer's newest replica
  # is step 4: removing a then would restore step 4, so the injector waits (and does not arm
  # the corruption that goes with the removal either); once b holds step 6, a is removed.
  job = "00000000000000aa"
  faults = [experiment.Fault("corrupt_checkpoint", 5, 0), experiment.Fault("kill_node", 5, 0)]
  cluster = Cluster(["a", "b"])
  injector = experiment.Injector(faults, cluster, tmp_path, job, tmp_path / "persistent",
                                 lambda line: None)
  peer = transport.NodeAgent("b", job, str(tmp_path), str(tmp_path / "spec.json"))
  view = view_at(5, {"a": None, "b": peer}, nodes=("a", "b"), node_of=(0, 1))
  try:
    peer.store_replica(0, 4, store.job_number(job), bytes(8))
    peer.store_replica(1, 6, store.job_number(job), bytes(8))  # b's own process: not a's
    injector(view)
    assert cluster.removed == [] and faults[1].fired_at is None and injector.armed == []
    # Training went on meanwhile (step 7 observed): the wait is for the step the fault came
    # due at, not for the moving newest one, which fast steps could outrun forever.
    view.reports = [dataclasses.replace(r, step=7) for r in view.reports]
    peer.store_replica(0, 6, store.job_number(job), bytes(8))
    injector(view)
  finally:
    peer.shutdown()
  assert cluster.removed == ["a"] and faults[1].fired_at is not None
  assert faults[1].due_step == 5 and faults[1].replicated_step == 6 and faults[1].step == 7
  assert injector.armed == [faults[0]] and faults[0].step == 7  # armed as the node went


def test_a_corruption_with_no_fault_after_it_fires_at_its_step(tmp_path):
  persistent = tmp_path / "persistent"
  commit_step(persistent, 3)
  faults = [experiment.Fault("corrupt_checkpoint", 4, 0)]
  injector = experiment.Injector(faults, None, tmp_path, "job", persistent, lambda line: None)
  injector(view_at(3, {}, node_of=(0,)))
  assert faults[0].fired_at is None  # step 4 not reached
  injector(view_at(4, {}, node_of=(0,)))
  assert faults[0].fired_at is not None and store.restorable_steps(persistent, print) == []


def test_a_node_of_a_job_without_local_memory_is_removed_without_waiting(tmp_path):
  # Policy (c) of the benchmark: no snapshots, so no replicas will ever come; the node goes as
  # soon as the fault is due (waiting would let the job finish without its fault).
  job = "00000000000000bb"
  faults = [experiment.Fault("kill_node", 5, 0)]
  cluster = Cluster(["a", "b"])
  injector = experiment.Injector(faults, cluster, tmp_path, job, tmp_path / "persistent",
                                 lambda line: None, replicas=False)
  injector(view_at(5, {"a": None, "b": None}, nodes=("a", "b"), node_of=(0, 1)))
  assert cluster.removed == ["a"] and faults[0].fired_at is not None
  assert faults[0].due_step is None and faults[0].replicated_step is None
