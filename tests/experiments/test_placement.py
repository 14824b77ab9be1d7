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
  for a, b in zip(first["per_seed"], second["per_seed"]):
    np.testing.assert_allclose(a["agents"]["final_cost"], b["agents"]["final_cost"], rtol=1e-6)
    assert a["agents"]["migrations"] == b["agents"]["migrations"]
