"""Choosing one variant per stage for the device's current resources: an exact multiple-choice
knapsack, solved by dynamic programming over the Pareto front.

Every variant has a profile (profiles.py): latency percentiles measured on this machine idle and
under a known background CPU load, peak memory, and a stage score. The end-to-end accuracy of a
pipeline is estimated as the product of per-stage factors (stage scores are log-accuracy
factors, so a pipeline's score is their sum; experiments/edge.py measures how close the
estimate is to every combination's measured accuracy). A pipeline's latency and memory are the
sums over its stages (the stages run one after the other, all resident).

`select` maximizes the summed score subject to predicted latency <= latency budget and memory <=
memory budget. Stage by stage it extends the partial pipelines kept so far by every variant of
the next stage and keeps only the Pareto front (no kept partial is at least as slow, as large
and as poorly scored as another); partials over a budget are dropped (every later term is >= 0),
so the front's best feasible member is the exact optimum (`brute_force` is the test oracle).
Ties break the same way in both: higher score, then lower latency, then lower memory, then the
lexicographically smaller choice of variant indices.

No pipeline fits: `on_infeasible="raise"` raises `BudgetError` naming the budget and the
fastest pipeline's predicted latency; `"degrade"` returns the fastest pipeline (then the
smallest) marked `degraded=True` with the reason, which the runtime's metadata carries, so a
violation is never silent.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import NamedTuple, Sequence


class VariantProfile(NamedTuple):
  """What the selector knows about one variant, measured on this machine (profiles.py)."""
  stage: str
  name: str
  p50_ms: float           # latency of one frame, idle machine
  p95_ms: float
  loaded_p95_ms: float    # p95 with `loaded_fraction` of the CPU busy with other processes
  loaded_fraction: float  # the background CPU fraction during the loaded measurement (0, 1]
  memory_mb: float        # parameters + the compiled program's temporaries, arguments, outputs
  score: float            # log of its accuracy factor (<= 0 for an accuracy factor <= 1)


class Resources(NamedTuple):
  """One reading of the device's resources (resources.py)."""
  cpu_background: float        # fraction of all cores busy with other processes, [0, 1]
  memory_available_mb: float
  battery_percent: float | None
  slowdown: float = 1.0        # measured / predicted latency of recent frames (EWMA), feedback


class Budget(NamedTuple):
  latency_ms: float
  memory_mb: float
  headroom: float = 0.9        # select against headroom x latency budget (p95 noise margin)
  memory_fraction: float = 0.5  # and at most this fraction of the free memory


class Selection(NamedTuple):
  choice: tuple[int, ...]             # variant index per stage
  names: tuple[str, ...]
  predicted_ms: tuple[float, ...]     # per stage, at the resources it was chosen for
  memory_mb: float
  score: float
  degraded: bool
  reason: str
  front_size: int                     # pipelines on the final Pareto front (considered)


class BudgetError(ValueError):
  """No pipeline fits the latency / memory budget at the current resources."""


def predict_ms(profile: VariantProfile, resources: Resources) -> float:
  """p95 latency at the current background load: linear between the idle and the loaded
  measurement (extrapolated above it), times the runtime's measured slowdown."""
  slope = (profile.loaded_p95_ms - profile.p95_ms) / profile.loaded_fraction
  base = profile.p95_ms + max(slope, 0.0) * min(max(resources.cpu_background, 0.0), 1.0)
  return base * max(resources.slowdown, 0.0)


def memory_limit_mb(budget: Budget, resources: Resources) -> float:
  return min(budget.memory_mb, budget.memory_fraction * resources.memory_available_mb)


def check_profiles(stages: Sequence[Sequence[VariantProfile]]) -> None:
  if not stages or any(not variants for variants in stages):
    raise ValueError("profiles: expected at least one stage and one variant per stage")
  for variants in stages:
    for p in variants:
      for field in ("p50_ms", "p95_ms", "loaded_p95_ms", "memory_mb"):
        value = getattr(p, field)
        if not (math.isfinite(value) and value >= 0):
          raise ValueError(f"profile {p.stage}/{p.name}: {field}={value!r}, expected a finite "
                           "number >= 0")
      if not (0 < p.loaded_fraction <= 1):
        raise ValueError(f"profile {p.stage}/{p.name}: loaded_fraction={p.loaded_fraction!r}, "
                         "expected in (0, 1]")
      if not math.isfinite(p.score):
        raise ValueError(f"profile {p.stage}/{p.name}: score={p.score!r}, expected finite")


@dataclasses.dataclass(frozen=True, order=True)
class _Partial:
  # Field order = the tie-break order: a smaller _Partial is the better pipeline.
  neg_score: float
  latency: float
  memory: float
  choice: tuple[int, ...]


def _dominates(a: _Partial, b: _Partial) -> bool:
  """a is at least as good as b in every coordinate and, where all are equal, its choice comes
  first: no completion of b can beat the same completion of a."""
  return (a.neg_score <= b.neg_score and a.latency <= b.latency and a.memory <= b.memory
          and a < b)


def _pareto(partials: list[_Partial]) -> list[_Partial]:
  front: list[_Partial] = []
  for p in sorted(partials):  # best first, so a dominator is always seen before what it beats
    if not any(_dominates(q, p) for q in front):
      front.append(p)
  return front


def _costs(stages, resources):
  return [[(predict_ms(p, resources), p.memory_mb, p.score) for p in variants]
          for variants in stages]


def _best(partials: list[_Partial]) -> _Partial:
  return min(partials)


def _fastest(costs) -> _Partial:
  """The pipeline of every stage's fastest variant (then smallest, then first)."""
  choice = tuple(min(range(len(c)), key=lambda i, c=c: (c[i][0], c[i][1], i)) for c in costs)
  return _Partial(-sum(c[i][2] for c, i in zip(costs, choice)),
                  sum(c[i][0] for c, i in zip(costs, choice)),
                  sum(c[i][1] for c, i in zip(costs, choice)), choice)


def select(stages: Sequence[Sequence[VariantProfile]], budget: Budget, resources: Resources,
           on_infeasible: str = "raise") -> Selection:
  """The best pipeline within the budget at these resources (module docstring)."""
  if on_infeasible not in ("raise", "degrade"):
    raise ValueError(f"on_infeasible={on_infeasible!r}: expected 'raise' or 'degrade'")
  check_profiles(stages)
  costs = _costs(stages, resources)
  latency_limit = budget.headroom * budget.latency_ms
  memory_limit = memory_limit_mb(budget, resources)
  front = [_Partial(0.0, 0.0, 0.0, ())]
  for stage_costs in costs:
    extended = [_Partial(p.neg_score - score, p.latency + latency, p.memory + memory,
                         p.choice + (i,))
                for p in front for i, (latency, memory, score) in enumerate(stage_costs)]
    front = _pareto([p for p in extended
                     if p.latency <= latency_limit and p.memory <= memory_limit])
    if not front:
      break
  if front:
    return _selection(stages, costs, _best(front), False,
                      f"the most accurate of {len(front)} Pareto-optimal pipelines within "
                      f"{latency_limit:.1f} ms ({budget.headroom:g} x the {budget.latency_ms:g} ms "
                      f"budget) and {memory_limit:.0f} MB at background CPU "
                      f"{resources.cpu_background:.2f}, slowdown {resources.slowdown:.2f}",
                      len(front))
  fastest = _fastest(costs)
  message = (f"no pipeline fits: the fastest ({'+'.join(_names(stages, fastest.choice))}) is "
             f"predicted at {fastest.latency:.1f} ms and {fastest.memory:.0f} MB against "
             f"{latency_limit:.1f} ms ({budget.headroom:g} x latency_ms={budget.latency_ms:g}) "
             f"and {memory_limit:.0f} MB (memory_mb={budget.memory_mb:g}, "
             f"{budget.memory_fraction:g} x {resources.memory_available_mb:.0f} MB free) at "
             f"background CPU {resources.cpu_background:.2f}")
  if on_infeasible == "raise":
    raise BudgetError(message + "; raise the budget or run with on_infeasible='degrade'")
  return _selection(stages, costs, fastest, True, "degraded: " + message, 0)


def _names(stages, choice) -> tuple[str, ...]:
  return tuple(stages[s][i].name for s, i in enumerate(choice))


def _selection(stages, costs, best: _Partial, degraded: bool, reason: str,
               front_size: int) -> Selection:
  return Selection(best.choice, _names(stages, best.choice),
                   tuple(costs[s][i][0] for s, i in enumerate(best.choice)), best.memory,
                   -best.neg_score, degraded, reason, front_size)


def brute_force(stages: Sequence[Sequence[VariantProfile]], budget: Budget,
                resources: Resources) -> tuple[int, ...] | None:
  """Every combination, the same objective and tie-break as `select` (the tests' oracle)."""
  costs = _costs(stages, resources)
  feasible = []
  for choice in itertools.product(*(range(len(c)) for c in costs)):
    latency = sum(costs[s][i][0] for s, i in enumerate(choice))
    memory = sum(costs[s][i][1] for s, i in enumerate(choice))
    score = sum(costs[s][i][2] for s, i in enumerate(choice))
    if (latency <= budget.headroom * budget.latency_ms
        and memory <= memory_limit_mb(budget, resources)):
      feasible.append(_Partial(-score, latency, memory, choice))
  return min(feasible).choice if feasible else None


def moved(at_selection: Resources, now: Resources, band: float) -> bool:
  """Hysteresis: re-select only when the resources moved beyond the band since the last
  selection: background CPU by more than `band` (absolute fraction), the slowdown or the free
  memory by more than `band` relative."""
  def relative(a, b):
    return abs(b - a) > band * max(abs(a), 1e-9)
  return (abs(now.cpu_background - at_selection.cpu_background) > band
          or relative(at_selection.slowdown, now.slowdown)
          or relative(at_selection.memory_available_mb, now.memory_available_mb))
