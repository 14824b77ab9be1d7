"""Choosing one variant per stage for the device's current resources: an exact multiple-choice
knapsack, solved by dynamic programming over the Pareto front.

Every variant has a profile (profiles.py): latency percentiles measured on this machine idle and
under a known background CPU load, peak memory, and a stage score. The end-to-end accuracy of a
pipeline is estimated as the product of per-stage factors (stage scores are log-accuracy
factors, so a pipeline's score is their sum; experiments/edge.py measures how close the
estimate is to every combination's measured accuracy). A pipeline's memory is the sum over its
stages (all resident); its predicted p95 latency is the sum of the stages' medians plus the
root-sum-square of their spreads p95 - p50 (`pipeline_p95`: stages do not all peak on the same
frame, so the sum of their p95s would overestimate it), each stage's medians and p95s
interpolated at the measured background CPU between its idle and loaded profile.

`select` maximizes the summed score subject to predicted p95 <= headroom x latency budget and
memory <= memory budget. Stage by stage it extends the partial pipelines kept so far by every
variant of the next stage and keeps only the Pareto front in (score, sum of medians, sum of
squared spreads, memory); the predicted latency grows with both sums, so a dominated partial
can never complete better than its dominator, and partials over a budget are dropped (later
stages only add), which makes the front's best feasible member the exact optimum (`brute_force`
is the test oracle). Ties break the same way in both: higher score, then lower predicted
latency, then lower memory, then the lexicographically smaller choice of variant indices.

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
  loaded_p50_ms: float    # the same with `loaded_fraction` of the CPU busy with other processes
  loaded_p95_ms: float
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
  predicted_ms: tuple[float, ...]     # per stage p95, at the resources it was chosen for
  latency_ms: float                   # the pipeline's predicted p95 (pipeline_p95)
  memory_mb: float
  score: float
  degraded: bool
  reason: str
  front_size: int                     # pipelines on the final Pareto front (considered)


class BudgetError(ValueError):
  """No pipeline fits the latency / memory budget at the current resources."""


def _at_load(idle: float, loaded: float, profile: VariantProfile, background: float) -> float:
  """Linear in the background CPU fraction between the idle and the loaded measurement
  (extrapolated above it); never below the idle value."""
  slope = max(loaded - idle, 0.0) / profile.loaded_fraction
  return idle + slope * min(max(background, 0.0), 1.0)


def predict_stage(profile: VariantProfile, resources: Resources) -> tuple[float, float]:
  """(p50, p95) of one stage at the current background load, times the measured slowdown."""
  scale = max(resources.slowdown, 0.0)
  p50 = _at_load(profile.p50_ms, profile.loaded_p50_ms, profile, resources.cpu_background)
  p95 = _at_load(profile.p95_ms, profile.loaded_p95_ms, profile, resources.cpu_background)
  return p50 * scale, max(p95, p50) * scale


def predict_ms(profile: VariantProfile, resources: Resources) -> float:
  """One stage's predicted p95 at these resources."""
  return predict_stage(profile, resources)[1]


def memory_limit_mb(budget: Budget, resources: Resources) -> float:
  return min(budget.memory_mb, budget.memory_fraction * resources.memory_available_mb)


def check_profiles(stages: Sequence[Sequence[VariantProfile]]) -> None:
  if not stages or any(not variants for variants in stages):
    raise ValueError("profiles: expected at least one stage and one variant per stage")
  for variants in stages:
    for p in variants:
      for field in ("p50_ms", "p95_ms", "loaded_p50_ms", "loaded_p95_ms", "memory_mb"):
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
  """A partial pipeline: sums over its stages so far. Field order = the Pareto pass's order."""
  neg_score: float
  p50: float        # sum of the stages' median latencies
  var: float        # sum of the stages' squared spreads (p95 - p50)
  memory: float
  choice: tuple[int, ...]

  @property
  def latency(self) -> float:
    return pipeline_p95(self.p50, self.var)

  def key(self):
    """The final order (better first): score, then predicted latency, memory, choice."""
    return (self.neg_score, self.latency, self.memory, self.choice)


def pipeline_p95(p50_sum: float, spread_square_sum: float) -> float:
  """A pipeline's predicted p95: the sum of the stages' medians plus the root-sum-square of
  their spreads (p95 - p50). The sum of the stages' p95s overestimates the p95 of a sum of
  latencies that do not all peak on the same frame; this is the normal approximation of it."""
  return p50_sum + math.sqrt(max(spread_square_sum, 0.0))


def _dominates(a: _Partial, b: _Partial) -> bool:
  """a is at least as good as b in every coordinate and, where all are equal, its choice comes
  first: no completion of b can beat the same completion of a (the predicted latency grows with
  both p50 and var, so the constraint and the order keep their sense under completion)."""
  return (a.neg_score <= b.neg_score and a.p50 <= b.p50 and a.var <= b.var
          and a.memory <= b.memory and a < b)


def _pareto(partials: list[_Partial]) -> list[_Partial]:
  front: list[_Partial] = []
  for p in sorted(partials):  # a dominator sorts before what it dominates
    if not any(_dominates(q, p) for q in front):
      front.append(p)
  return front


def _costs(stages, resources):
  """Per stage and variant: (p50, squared spread, memory, score) at these resources."""
  out = []
  for variants in stages:
    row = []
    for p in variants:
      p50, p95 = predict_stage(p, resources)
      row.append((p50, max(p95 - p50, 0.0) ** 2, p.memory_mb, p.score))
    out.append(row)
  return out


def _extend(front, stage_costs):
  return [_Partial(p.neg_score - score, p.p50 + p50, p.var + var, p.memory + memory,
                   p.choice + (i,))
          for p in front for i, (p50, var, memory, score) in enumerate(stage_costs)]


def _front(costs, latency_limit: float, memory_limit: float) -> list[_Partial]:
  front = [_Partial(0.0, 0.0, 0.0, 0.0, ())]
  for stage_costs in costs:
    # Dropping a partial over a limit is exact: every later stage only adds to p50, var, memory.
    front = _pareto([p for p in _extend(front, stage_costs)
                     if p.latency <= latency_limit and p.memory <= memory_limit])
    if not front:
      break
  return front


def select(stages: Sequence[Sequence[VariantProfile]], budget: Budget, resources: Resources,
           on_infeasible: str = "raise") -> Selection:
  """The best pipeline within the budget at these resources (module docstring)."""
  if on_infeasible not in ("raise", "degrade"):
    raise ValueError(f"on_infeasible={on_infeasible!r}: expected 'raise' or 'degrade'")
  check_profiles(stages)
  costs = _costs(stages, resources)
  latency_limit = budget.headroom * budget.latency_ms
  memory_limit = memory_limit_mb(budget, resources)
  front = _front(costs, latency_limit, memory_limit)
  if front:
    return _selection(stages, resources, min(front, key=_Partial.key), False,
                      f"the most accurate of {len(front)} Pareto-optimal pipelines within "
                      f"{latency_limit:.1f} ms ({budget.headroom:g} x the {budget.latency_ms:g} ms "
                      f"budget) and {memory_limit:.0f} MB at background CPU "
                      f"{resources.cpu_background:.2f}, slowdown {resources.slowdown:.2f}",
                      len(front))
  # The fastest pipeline (then the smallest): on the unconstrained front, as latency is monotone.
  fastest = min(_front(costs, math.inf, math.inf),
                key=lambda p: (p.latency, p.memory, p.neg_score, p.choice))
  message = (f"no pipeline fits: the fastest ({'+'.join(_names(stages, fastest.choice))}) is "
             f"predicted at {fastest.latency:.1f} ms and {fastest.memory:.0f} MB against "
             f"{latency_limit:.1f} ms ({budget.headroom:g} x latency_ms={budget.latency_ms:g}) "
             f"and {memory_limit:.0f} MB (memory_mb={budget.memory_mb:g}, "
             f"{budget.memory_fraction:g} x {resources.memory_available_mb:.0f} MB free) at "
             f"background CPU {resources.cpu_background:.2f}")
  if on_infeasible == "raise":
    raise BudgetError(message + "; raise the budget or run with on_infeasible='degrade'")
  return _selection(stages, resources, fastest, True, "degraded: " + message, 0)


def _names(stages, choice) -> tuple[str, ...]:
  return tuple(stages[s][i].name for s, i in enumerate(choice))


def _selection(stages, resources, best: _Partial, degraded: bool, reason: str,
               front_size: int) -> Selection:
  return Selection(best.choice, _names(stages, best.choice),
                   tuple(predict_ms(stages[s][i], resources) for s, i in enumerate(best.choice)),
                   best.latency, best.memory, -best.neg_score, degraded, reason, front_size)


def brute_force(stages: Sequence[Sequence[VariantProfile]], budget: Budget,
                resources: Resources) -> tuple[int, ...] | None:
  """Every combination, the same objective and tie-break as `select` (the tests' oracle)."""
  costs = _costs(stages, resources)
  feasible = []
  for choice in itertools.product(*(range(len(c)) for c in costs)):
    partial = _Partial(0.0, 0.0, 0.0, 0.0, ())
    for stage_costs, i in zip(costs, choice):
      partial = _extend([partial], [stage_costs[i]])[0]
    partial = dataclasses.replace(partial, choice=choice)
    if (partial.latency <= budget.headroom * budget.latency_ms
        and partial.memory <= memory_limit_mb(budget, resources)):
      feasible.append(partial)
  return min(feasible, key=_Partial.key).choice if feasible else None


def moved(at_selection: Resources, now: Resources, band: float) -> bool:
  """Hysteresis: re-select only when the resources moved beyond the band since the last
  selection: background CPU by more than `band` (absolute fraction), the slowdown or the free
  memory by more than `band` relative."""
  def relative(a, b):
    return abs(b - a) > band * max(abs(a), 1e-9)
  return (abs(now.cpu_background - at_selection.cpu_background) > band
          or relative(at_selection.slowdown, now.slowdown)
          or relative(at_selection.memory_available_mb, now.memory_available_mb))
