"""The runtime's decisions as pure functions: placement, restore plans, the driver's state machine."""

import dataclasses

import pytest

from research.checkpoint import protocol as pr

JOB = "00000000000000aa"


def snap(process, step, node, tier=pr.Tier.LOCAL, job=JOB):
  return pr.Snapshot(process, step, node, tier, job)


def test_placement_in_blocks_with_a_ring_of_peers():
  placement = pr.place(4, 2, ["a", "b", "c"])
  assert placement.nodes == ("a", "b") and placement.process_slots == (0, 0, 1, 1)
  assert placement.processes_on("b") == (2, 3)
  assert placement.peer_of("a") == "b" and placement.peer_of("b") == "a"
  assert pr.place(1, 1, ["a"]).peer_of("a") is None
  with pytest.raises(ValueError, match="4 processes at 1 per node need 4 nodes; the cluster has 3"):
    pr.place(4, 1, ["a", "b", "c"])
  with pytest.raises(ValueError, match="placement.nodes: expected distinct"):
    pr.Placement(("a", "a"), (0, 1))


def test_a_lost_node_is_replaced_by_a_spare_or_its_processes_move_to_survivors():
  placement = pr.place(4, 2, ["a", "b"])
  assert pr.replace_nodes(placement, ["a"], ["c"]) == pr.Placement(("c", "b"), (0, 0, 1, 1))
  moved = pr.replace_nodes(placement, ["a"], [])
  assert moved.nodes == ("b",) and moved.process_slots == (0, 0, 0, 0)
  three = pr.place(3, 1, ["a", "b", "c"])
  both = pr.replace_nodes(three, ["a", "b"], ["d"])  # one spare for two lost nodes
  assert both.nodes == ("d", "c") and [both.node_of(p) for p in range(3)] == ["d", "d", "c"]
  with pytest.raises(ValueError, match="every node of the job is lost"):
    pr.replace_nodes(placement, ["a", "b"], [])


def test_restore_plan_takes_the_newest_step_every_process_holds():
  placement = pr.place(2, 1, ["a", "b"])
  snapshots = [snap(0, 5, "a"), snap(0, 4, "a"), snap(1, 4, "b"), snap(1, 3, "b"),
               snap(0, 4, "b", pr.Tier.REPLICA), snap(1, 3, "a", pr.Tier.REPLICA),
               snap(1, 9, "b", job="00000000000000bb")]  # another job's newer step: ignored
  plan = pr.plan_restore(placement, JOB, snapshots, persistent_steps=[2])
  assert plan.step == 4 and plan.sources == ("local", "local")
  # A persistent step newer than anything in memory wins; at an equal step memory wins.
  assert pr.plan_restore(placement, JOB, snapshots, [6]).sources == ("persistent",) * 2
  assert pr.plan_restore(placement, JOB, snapshots, [4]).sources == ("local", "local")
  assert pr.plan_restore(placement, JOB, [], []) == pr.RestorePlan(
      0, (pr.Choice(0, pr.Source.INIT, None), pr.Choice(1, pr.Source.INIT, None)))


def test_after_a_node_loss_its_processes_restore_from_the_peer_replica():
  placement = pr.replace_nodes(pr.place(2, 1, ["a", "b"]), ["a"], ["c"])
  survivors = [snap(1, 6, "b"), snap(1, 5, "b"),                     # b's own
               snap(0, 6, "b", pr.Tier.REPLICA), snap(0, 5, "b", pr.Tier.REPLICA)]
  plan = pr.plan_restore(placement, JOB, survivors, [4])
  assert plan.step == 6
  assert plan.choices == (pr.Choice(0, pr.Source.PEER, "b"), pr.Choice(1, pr.Source.LOCAL, "b"))
  # The replica lags one step behind b's own snapshots: the common step is the older one.
  lagging = [snap(1, 6, "b"), snap(1, 5, "b"), snap(0, 5, "b", pr.Tier.REPLICA)]
  assert pr.plan_restore(placement, JOB, lagging, [4]).step == 5
  # Both copies of process 0 lost (its node and its peer): orbax's newest intact step.
  lost_both = [snap(1, 6, "c")]
  assert pr.plan_restore(placement, JOB, lost_both, [4, 2]).sources == ("persistent",) * 2
  assert pr.plan_restore(placement, JOB, lost_both, []).step == 0


CONFIG = pr.DriverConfig(num_processes=2, steps=10, heartbeat_timeout_s=3.0,
                         startup_timeout_s=30.0, max_restarts=2)


def report(process, step=3, alive=True, code=None, age=0.1, started=True):
  return pr.ProcessReport(process, alive, code, age, step, started)


def running():
  state, commands = pr.driver_step(CONFIG, pr.DriverState(), pr.Launched(0.0, None))
  assert state.phase is pr.Phase.RUNNING and state.attempt == 1 and commands == []
  return state


def test_driver_restarts_the_whole_job_when_a_process_dies():
  state, commands = pr.driver_step(CONFIG, running(), pr.Reports(
      1.0, (report(0, 4, alive=False, code=-9), report(1, 5))))
  assert commands == [pr.StopJob(), pr.Restart(())]
  assert state.phase is pr.Phase.STOPPED and state.newest_step == 5
  assert state.failures[0] == pr.Failure("exit", 0, None, 5, 1.0,
                                         "process 0 exited with code -9")
  with pytest.raises(ValueError, match="launch in phase running"):
    pr.driver_step(CONFIG, running(), pr.Launched(2.0, None))
  relaunched, _ = pr.driver_step(CONFIG, state, pr.Launched(2.0, None))
  assert relaunched.attempt == 2 and relaunched.phase is pr.Phase.RUNNING


def test_driver_fences_a_silent_process_before_restarting():
  state, commands = pr.driver_step(CONFIG, running(), pr.Reports(
      1.0, (report(0, 4), report(1, 4, age=3.5))))
  assert commands == [pr.Fence(1), pr.StopJob(), pr.Restart(())]
  assert state.failures[-1].kind == "hang"
  # Before its first heartbeat a process gets the startup timeout instead.
  quiet = (report(0, 0, age=10.0, started=False), report(1, 0, age=10.0, started=False))
  assert pr.driver_step(CONFIG, running(), pr.Reports(1.0, quiet))[1] == []
  late = (report(0, 0, age=31.0, started=False), report(1, 0))
  assert pr.driver_step(CONFIG, running(), pr.Reports(1.0, late))[1][0] == pr.Fence(0)


def test_driver_replaces_lost_nodes_finishes_and_gives_up():
  state, commands = pr.driver_step(CONFIG, running(), pr.Reports(1.0, (report(1),), ("a",)))
  assert commands == [pr.StopJob(), pr.Restart(("a",))] and state.failures[-1].kind == "node"
  # A process its agent no longer reports is a failure too.
  assert pr.driver_step(CONFIG, running(), pr.Reports(1.0, (report(1),)))[0].failures[-1] \
      .process == 0
  done = (report(0, 10, alive=False, code=0), report(1, 10, alive=False, code=0))
  state, commands = pr.driver_step(CONFIG, running(), pr.Reports(1.0, done))
  assert commands == [pr.Finish()] and state.phase is pr.Phase.DONE
  short = (report(0, 10, alive=False, code=0), report(1, 7, alive=False, code=0))
  assert pr.driver_step(CONFIG, running(), pr.Reports(1.0, short))[0].failures[-1].process == 1
  tired = dataclasses.replace(running(), failures=(pr.Failure("exit", 0, None, 1, 0.0, ""),) * 2)
  state, commands = pr.driver_step(CONFIG, tired, pr.Reports(
      1.0, (report(0, alive=False, code=1), report(1))))
  assert state.phase is pr.Phase.FAILED and isinstance(commands[-1], pr.GiveUp)
  assert "3 failures; max_restarts=2" in commands[-1].reason


def test_job_spec_refuses_bad_fields_by_name():
  good = dict(job=JOB, num_processes=2, devices_per_process=1, hidden=(8,), batch_per_device=4,
              learning_rate=0.1, dropout=0.0, seed=0, steps=3, snapshot_every=1,
              persist_every=0, min_step_seconds=0.0, inputs_file="i", persistent_dir="p", results_dir="r")
  spec = pr.JobSpec(**good)
  assert pr.JobSpec.from_json(spec.to_json()) == spec
  with pytest.raises(ValueError, match="num_processes=0: expected a positive int"):
    pr.JobSpec(**dict(good, num_processes=0))
  with pytest.raises(ValueError, match=r"persist_every=-1: expected an int >= 0 \(0: never\)"):
    pr.JobSpec(**dict(good, persist_every=-1))
