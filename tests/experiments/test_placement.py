"""The placement experiment: its config checks (fast) and a run end to end (slow)."""

import numpy as np
import pytest

from experiments import run as launcher
from research.common import config as config_lib

SMOKE = "configs/placement/smoke.py"


@pytest.mark.parametrize("override, message", [
    ("scenario=dynamic", "'milp' solves the static problem"),
    ("topology.cluster_links=((0, 1), (1, 2))", "cluster ids in"),  # smoke has 1 cluster
    ("workload.instances=99", "workload.instances: got 99"),
    ("agent.sharing=central", "agent.sharing: got 'central'"),
    ("train.racks_per_zone=1", "per_agent parameters"),
    ("train.iterations=-1", "train.iterations"),
    ("train.params_file=nowhere.npz", "no file .nowhere.npz."),
    ("eval.methods=('agents', 'prior')", "the headline's baseline"),
    ("eval.methods=('milp',)", "expected 'agents'"),
    ("eval.settle_rounds=48", r"eval.settle_rounds': got 48, expected 0 ... eval.rounds - 1"),
])
def test_bad_config_is_refused_naming_the_key(override, message):
  overrides = [override] + (["agent.sharing=per_agent"] if "racks_per_zone" in override else [])
  with pytest.raises(config_lib.ConfigError, match=message):
    launcher.load(SMOKE, overrides)


def test_config_names_the_disconnected_clusters():
  with pytest.raises(config_lib.ConfigError, match=r"disconnected: clusters \[2\]"):
    launcher.load(SMOKE, ["topology.clusters=3", "topology.cluster_links=((0, 1),)"])


@pytest.mark.slow
def test_smoke_trains_evaluates_and_kept_params_reproduce_the_evaluation(tmp_path):
  args = [SMOKE, "--workdir", str(tmp_path / "a"), "--set", "train.iterations=2",
          "--set", "train.params_file="]  # from the untrained policy
  first = launcher.main(args)
  for row in first["per_seed"]:
    if row["milp"]["violations"] == 0:  # the MILP is the optimum of every term but SLO's
      assert row["agents"]["final_cost"] >= row["milp"]["final_cost"] - 1e-4
      for method in ("least_allocated", "most_allocated", "random"):
        assert row[method]["final_cost"] >= row["milp"]["final_cost"] - 1e-4
  kept = next((tmp_path / "a").rglob("agents.npz"))
  second = launcher.main([SMOKE, "--workdir", str(tmp_path / "b"), "--set", "train.iterations=0",
                          "--set", f"train.params_file={kept}"])
  for a, b in zip(first["per_seed"], second["per_seed"], strict=True):
    np.testing.assert_allclose(a["agents"]["final_cost"], b["agents"]["final_cost"], rtol=1e-6)
    assert a["agents"]["migrations"] == b["agents"]["migrations"]


def test_rollouts_average_sampled_runs_and_the_first_is_the_single_run(tmp_path):
  methods = "eval.methods=('agents', 'prior', 'least_allocated')"
  one = launcher.main([SMOKE, "--workdir", str(tmp_path / "one"), "--set", methods])
  three = launcher.main([SMOKE, "--workdir", str(tmp_path / "three"), "--set", methods,
                         "--set", "eval.rollouts=3"])
  for a, b in zip(one["per_seed"], three["per_seed"], strict=True):
    for method in ("agents", "prior"):
      costs = b[method]["final_costs"]
      assert len(costs) == 3 and costs[0] == pytest.approx(a[method]["final_cost"], rel=1e-6)
      assert b[method]["final_cost"] == pytest.approx(np.mean(costs), rel=1e-6)
  assert any(len(set(r["agents"]["final_costs"])) > 1 for r in three["per_seed"])  # sampled


def test_greedy_with_several_rollouts_is_refused():
  with pytest.raises(config_lib.ConfigError, match="eval.rollouts': got 2, expected 1 with"):
    launcher.load(SMOKE, ["eval.greedy=True", "eval.rollouts=2"])
