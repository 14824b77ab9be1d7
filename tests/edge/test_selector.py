"""The selector: exact (equal to brute force), budgets enforced, infeasibility never silent,
hysteresis."""

import itertools
import math

import numpy as np
import pytest

from research.edge import selector
from research.edge.selector import Budget, Resources, VariantProfile

IDLE = Resources(cpu_background=0.0, memory_available_mb=8_000.0, battery_percent=None)


def random_profiles(rng, stages, variants):
  out = []
  for s in range(stages):
    row = []
    for v in range(rng.integers(1, variants + 1)):
      p95 = float(rng.uniform(0.1, 10.0))
      loaded = p95 * rng.uniform(1.0, 4.0)
      row.append(VariantProfile(f"s{s}", f"v{v}", p95 * rng.uniform(0.3, 1.0), p95,
                                loaded * rng.uniform(0.3, 1.0), loaded,
                                float(rng.uniform(0.3, 1.0)), float(rng.uniform(0.1, 50.0)),
                                float(np.log(rng.uniform(0.5, 1.0)))))
    out.append(row)
  return out


def _fastest(profiles, resources):
  """(predicted latency, memory) of the fastest pipeline (then the smallest), by enumeration
  with the selector's latency model (pipeline_p95 over predict_stage), not its search."""
  best = (math.inf, math.inf)
  for picked in itertools.product(*profiles):
    stages = [selector.predict_stage(p, resources) for p in picked]
    latency = selector.pipeline_p95(sum(p50 for p50, _ in stages),
                                    sum((p95 - p50) ** 2 for p50, p95 in stages))
    best = min(best, (latency, sum(p.memory_mb for p in picked)))
  return best


def random_case(seed):
  """1-4 stages of 1-5 variants, random loads; the budgets drawn relative to the fastest
  pipeline (latency 1-3x its predicted p95, memory budget and half the free memory 0.6-3x its
  memory), so that most cases have a pipeline to choose, some have none, and the choice is not
  always the fastest."""
  rng = np.random.default_rng(seed)
  profiles = random_profiles(rng, stages=int(rng.integers(1, 5)), variants=5)
  background, slowdown = float(rng.uniform(0, 1)), float(rng.uniform(1, 2))
  latency, memory = _fastest(profiles, Resources(background, 1.0, None, slowdown))
  headroom = float(rng.uniform(0.7, 1.0))
  budget = Budget(latency_ms=latency * float(rng.uniform(1.0, 3.0)) / headroom,
                  memory_mb=memory * float(rng.uniform(0.6, 3.0)), headroom=headroom)
  resources = Resources(background, 2 * memory * float(rng.uniform(0.6, 3.0)), None, slowdown)
  return profiles, budget, resources


@pytest.mark.parametrize("seed", range(40))
def test_choice_equals_brute_force_on_random_profiles(seed):
  profiles, budget, resources = random_case(seed)
  expected = selector.brute_force(profiles, budget, resources)
  if expected is None:
    with pytest.raises(selector.BudgetError):
      selector.select(profiles, budget, resources)
    return
  chosen = selector.select(profiles, budget, resources)
  assert chosen.choice == expected
  assert not chosen.degraded
  assert chosen.latency_ms <= budget.headroom * budget.latency_ms + 1e-9
  assert chosen.latency_ms <= sum(chosen.predicted_ms) + 1e-9  # never above the p95s' sum
  assert chosen.memory_mb <= selector.memory_limit_mb(budget, resources) + 1e-9
  picked = [profiles[s][i] for s, i in enumerate(chosen.choice)]
  assert chosen.score == pytest.approx(sum(p.score for p in picked))


def test_random_cases_mostly_compare_a_choice_over_several_stages():
  """The brute-force comparison above compares choices, not only two refusals: most of its
  cases are feasible, among them pipelines of 2, 3 and 4 stages, and in some the choice is
  not simply the fastest pipeline."""
  feasible_stages, not_fastest = [], 0
  for seed in range(40):
    profiles, budget, resources = random_case(seed)
    expected = selector.brute_force(profiles, budget, resources)
    if expected is None:
      continue
    feasible_stages.append(len(profiles))
    chosen = selector.select(profiles, budget, resources)
    not_fastest += chosen.latency_ms > _fastest(profiles, resources)[0] + 1e-9
  assert len(feasible_stages) >= 30, f"only {len(feasible_stages)} of 40 cases feasible"
  assert {2, 3, 4} <= set(feasible_stages), sorted(feasible_stages)
  assert not_fastest >= 10, f"only {not_fastest} choices differ from the fastest pipeline"


def test_pipeline_p95_is_medians_plus_root_sum_square_of_spreads():
  stages = [[VariantProfile("a", "x", 3.0, 7.0, 3.0, 7.0, 1.0, 1.0, 0.0)],
            [VariantProfile("b", "y", 1.0, 4.0, 1.0, 4.0, 1.0, 1.0, 0.0)]]
  chosen = selector.select(stages, Budget(100.0, 100.0), IDLE)
  assert chosen.predicted_ms == (7.0, 4.0)
  assert chosen.latency_ms == pytest.approx(4.0 + 5.0)  # 3 + 1 + sqrt(4^2 + 3^2)


def test_ties_break_to_the_faster_pipeline_in_both():
  row = [VariantProfile("a", "slow", 1, 4.0, 1, 4.0, 1.0, 1.0, -0.1),
         VariantProfile("a", "fast", 1, 2.0, 1, 2.0, 1.0, 1.0, -0.1)]
  chosen = selector.select([row, row], Budget(100.0, 100.0), IDLE)
  assert chosen.choice == (1, 1) == selector.brute_force([row, row], Budget(100.0, 100.0), IDLE)


def test_background_load_moves_the_choice_to_a_faster_variant():
  row = [VariantProfile("c", "small", 1, 2.0, 1, 4.0, 1.0, 1.0, math.log(0.8)),
         VariantProfile("c", "large", 1, 6.0, 1, 18.0, 1.0, 1.0, math.log(0.9))]
  budget = Budget(latency_ms=10.0, memory_mb=100.0, headroom=1.0)
  assert selector.select([row], budget, IDLE).names == ("large",)
  loaded = IDLE._replace(cpu_background=0.5)  # large: 6 + 0.5 x 12 = 12 ms > 10
  assert selector.predict_ms(row[1], loaded) == pytest.approx(12.0)
  assert selector.select([row], budget, loaded).names == ("small",)
  slowed = IDLE._replace(slowdown=2.0)  # the runtime's feedback: large 12 ms
  assert selector.select([row], budget, slowed).names == ("small",)


def test_free_memory_limits_the_choice():
  row = [VariantProfile("c", "small", 1, 1.0, 1, 1.0, 1.0, 10.0, math.log(0.8)),
         VariantProfile("c", "large", 1, 1.0, 1, 1.0, 1.0, 300.0, math.log(0.9))]
  budget = Budget(latency_ms=10.0, memory_mb=1_000.0, memory_fraction=0.5)
  assert selector.select([row], budget, IDLE).names == ("large",)
  assert selector.select([row], budget, IDLE._replace(memory_available_mb=400)).names == ("small",)


def test_impossible_budget_raises_naming_it_or_degrades_visibly():
  row = [VariantProfile("c", "only", 1, 30.0, 1, 40.0, 1.0, 1.0, math.log(0.9))]
  budget = Budget(latency_ms=10.0, memory_mb=100.0)
  with pytest.raises(selector.BudgetError, match=r"fastest \(only\) is predicted at 30.0 ms.*"
                     r"latency_ms=10.*on_infeasible='degrade'"):
    selector.select([row], budget, IDLE)
  degraded = selector.select([row], budget, IDLE, on_infeasible="degrade")
  assert degraded.degraded and degraded.names == ("only",)
  assert degraded.reason.startswith("degraded: no pipeline fits")


def test_bad_profiles_are_refused_naming_the_field():
  bad = VariantProfile("c", "x", 1, float("nan"), 1, 1, 1.0, 1, 0.0)
  with pytest.raises(ValueError, match="profile c/x: p95_ms=nan"):
    selector.select([[bad]], Budget(10, 10), IDLE)
  with pytest.raises(ValueError, match="on_infeasible='never'"):
    selector.select([[bad._replace(p95_ms=1.0)]], Budget(10, 10), IDLE, on_infeasible="never")


def test_hysteresis_band():
  at = Resources(0.5, 1_000.0, None, 1.0)
  assert not selector.moved(at, at._replace(cpu_background=0.6), band=0.15)
  assert selector.moved(at, at._replace(cpu_background=0.7), band=0.15)
  assert not selector.moved(at, at._replace(slowdown=1.1), band=0.15)
  assert selector.moved(at, at._replace(slowdown=1.2), band=0.15)
  assert selector.moved(at, at._replace(memory_available_mb=700.0), band=0.15)
