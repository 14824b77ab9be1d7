"""The rl_cache experiment through the launcher: a short run's bookkeeping adds up with the RL
actors in their own processes (fast) and in-process (slow), 8 actors solve CartPole-v1 on every
backend (slow), and the broadcast benchmark measures and counts what it claims (slow)."""

import pytest

from experiments import run as launcher

ROLLOUT_STEPS = 8 * 8  # envs_per_actor x rollout_length (AgentConfig's defaults)


def _assert_bookkeeping_adds_up(summary, actors: int) -> None:
  # every rollout taken went into the table (a run on processes drains the ones in flight)
  assert summary["replay"]["inserted"] * ROLLOUT_STEPS == summary["env_steps"]
  assert summary["replay"]["inserted"] == summary["replay"]["size"] + summary["replay"]["evicted"]
  # one version per 16 updates plus the initial one; one blob of learner egress per version,
  # where a flat broadcast would send one per actor
  assert summary["versions"] == summary["updates"] // 16 + 1
  assert summary["learner_egress_bytes"] == summary["versions"] * summary["blob_bytes"]
  assert summary["flat_broadcast_bytes"] == actors * summary["learner_egress_bytes"]
  assert summary["updates"] > 0 and summary["mean_staleness_versions"] >= 0


@pytest.mark.slow  # default: the same bookkeeping with actors in processes (next test)
def test_a_short_run_publishes_versions_through_the_cache_and_accounts_for_every_item(tmp_path):
  summary = launcher.main(["configs/rl_cache/smoke.py", "--workdir", str(tmp_path),
                           "--set", "learning_starts=1024", "--set", "total_env_steps=2048",
                           "--set", "eval_every=2048", "--set", "eval_episodes=5"])
  assert summary["env_steps"] == 2048 and summary["services"] == "in_process"
  _assert_bookkeeping_adds_up(summary, actors=8)


def test_actors_in_their_own_processes_feed_the_learner_through_the_manager_services(tmp_path):
  summary = launcher.main(["configs/rl_cache/smoke.py", "--workdir", str(tmp_path),
                           "--set", "backend=processes", "--set", "num_actors=2",
                           "--set", "transitions_per_item=32", "--set", "learning_starts=256",
                           "--set", "total_env_steps=512", "--set", "eval_every=512",
                           "--set", "eval_episodes=5"])
  assert summary["services"] == "processes"
  assert 512 <= summary["env_steps"] <= 512 + 2 * ROLLOUT_STEPS  # + the drained rollouts
  _assert_bookkeeping_adds_up(summary, actors=2)
  assert summary["replay"]["sampled"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["in_process", "processes", "ray"])
def test_eight_actors_solve_cartpole(tmp_path, backend):
  summary = launcher.main(["configs/rl_cache/cartpole.py", "--workdir", str(tmp_path),
                           "--set", f"backend={backend}"])
  assert summary["solved"], summary["eval_curve"]
  assert summary["final_eval_return"] >= 475.0
  assert summary["solved_at_env_steps"] <= 200_000  # the config's total_env_steps
  _assert_bookkeeping_adds_up(summary, actors=8)


@pytest.mark.slow  # starts Ray, receivers, cache nodes and an RL actor process
def test_bench_rl_cache_measures_every_broadcast_and_counts_learner_egress(tmp_path, monkeypatch):
  from experiments import bench_rl_cache  # pylint: disable=import-outside-toplevel
  from research.common import records  # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(tmp_path)
  assert bench_rl_cache.main(["--actors", "1", "5", "--repeats", "1", "--large-mb", "0.01",
                              "--throughput-actors", "1", "--throughput-rollouts", "2"]) == 0
  run_dir = next((tmp_path / "runs" / "bench_rl_cache").iterdir())
  summary = records.read_json(run_dir / "summary.json")
  rows = {(r["blob"], r["method"], r["actors"]): r for r in summary["rows"]}
  assert len(rows) == 2 * 3 * 2
  for (blob, method, actors), row in rows.items():
    blobs_per_version = row["learner_egress_bytes"] / row["blob_bytes"]
    assert blobs_per_version == (actors if method == "flat" else 1), (blob, method, actors)
    assert row["latency_s"] > 0
  assert rows[("cartpole", "tree", 5)]["tree_depth"] == 2  # fanout 4, 4 actors per leaf
  assert [p["actors"] for p in summary["projections"]] == [100, 1_000, 10_000] * 2
  assert [(c["hops"], c["serves"]) for c in summary["calibration"]] == (
      [(1, 1), (2, 1), (3, 1), (4, 1), (1, 2), (1, 4)] * 2)
  projected = [p["tree_latency_s"] for p in summary["projections"][:3]]
  assert projected == sorted(projected)  # deeper trees, never faster
  assert summary["throughput"][0]["env_steps"] == 2 * 64
  assert "## broadcast" in (run_dir / "tables.md").read_text()
  assert (run_dir / "bench_rl_cache.png").stat().st_size > 0
