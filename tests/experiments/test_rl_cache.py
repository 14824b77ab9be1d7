"""The rl_cache experiment through the launcher: a short run's bookkeeping adds up (fast), and
the cartpole setting solves CartPole-v1 (slow)."""

import pytest

from experiments import run as launcher


def test_a_short_run_publishes_versions_through_the_cache_and_accounts_for_every_item(tmp_path):
  summary = launcher.main(["configs/rl_cache/smoke.py", "--workdir", str(tmp_path),
                           "--set", "total_env_steps=4096",
                           "--set", "eval_every=4096", "--set", "eval_episodes=10"])
  rollout_steps = 8 * 8
  assert summary["env_steps"] == 4096
  assert summary["replay"]["inserted"] == 4096 // rollout_steps
  assert summary["replay"]["inserted"] == summary["replay"]["size"] + summary["replay"]["evicted"]
  # one version per 16 updates plus the initial one; one blob of learner egress per version,
  # where a flat broadcast would send one per actor (8)
  assert summary["versions"] == summary["updates"] // 16 + 1
  assert summary["learner_egress_bytes"] == summary["versions"] * summary["blob_bytes"]
  assert summary["flat_broadcast_bytes"] == 8 * summary["learner_egress_bytes"]
  assert summary["updates"] > 0 and summary["mean_staleness_versions"] >= 0


@pytest.mark.slow
def test_eight_actors_solve_cartpole_in_process(tmp_path):
  summary = launcher.main(["configs/rl_cache/cartpole.py", "--workdir", str(tmp_path)])
  assert summary["solved"], summary["eval_curve"]
  assert summary["final_eval_return"] >= 475.0
  assert summary["solved_at_env_steps"] <= 200_000  # the config's total_env_steps
