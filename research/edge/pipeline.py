"""The runtime pipeline: selected variants composed stage after stage, with metadata per output.

Each variant is compiled once (`compile_variants`: one `jax.jit` per variant; jax caches the
executable per input shape), and a pipeline is a tuple of compiled stages chosen by the selector,
so switching pipelines never recompiles. Re-selection happens only between frames (`decide`,
before a frame is run): a frame goes through the pipeline chosen for it from its first stage to
its last, and its metadata names exactly those variants.

`decide` is the control rule, a pure function of the previous `RuntimeState` and a resource
reading: the first frame selects; later frames re-select only when the resources moved beyond
the hysteresis band since the last selection (selector.moved), so readings that jitter around a
boundary do not flip the pipeline on every frame. The measured slowdown (measured over
predicted latency, an exponential moving average, never below 1: the profile's p95 is the normal
case) is part of the resources and feeds the next prediction.

Every output carries metadata (OUTPUT_SCHEMA, JSON Schema 2020-12, checked with the `jsonschema`
library by `validate_metadata`): the pipeline id (a hash of its variants), each stage's variant
with predicted and measured latency, the totals against the budget, the resources seen at the
selection, and why this pipeline was chosen (or that it is a degraded choice).
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax

from research.edge import selector as selector_lib
from research.edge import variants as variants_lib
from research.edge.selector import Budget, Resources, Selection, VariantProfile

SCHEMA_ID = "meshwork.edge-output/1"
_NUMBER = {"type": "number", "minimum": 0}
OUTPUT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": SCHEMA_ID,
    "title": "metadata of one edge-pipeline output",
    "type": "object",
    "additionalProperties": False,
    "required": ["schema", "frame", "pipeline_id", "selection", "reselected", "stages",
                 "predicted_ms", "measured_ms", "budget_ms", "within_budget", "memory_mb",
                 "predicted_accuracy", "resources", "degraded", "reason"],
    "properties": {
        "schema": {"const": SCHEMA_ID},
        "frame": {"type": "integer", "minimum": 0},
        "pipeline_id": {"type": "string", "pattern": "^[0-9a-f]{12}$"},
        "selection": {"type": "integer", "minimum": 0,
                      "description": "how many selections were made before this one"},
        "reselected": {"type": "boolean", "description": "this frame made a new selection"},
        "stages": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False,
            "required": ["stage", "variant", "predicted_ms", "measured_ms"],
            "properties": {"stage": {"type": "string"}, "variant": {"type": "string"},
                           "predicted_ms": _NUMBER, "measured_ms": _NUMBER}}},
        "predicted_ms": _NUMBER,
        "measured_ms": _NUMBER,
        "budget_ms": {"type": "number", "exclusiveMinimum": 0},
        "within_budget": {"type": "boolean"},
        "memory_mb": _NUMBER,
        "predicted_accuracy": {"type": "number", "minimum": 0, "maximum": 1},
        "resources": {
            "type": "object", "additionalProperties": False,
            "required": ["cpu_background", "memory_available_mb", "battery_percent",
                         "slowdown"],
            "properties": {
                "cpu_background": {"type": "number", "minimum": 0, "maximum": 1},
                "memory_available_mb": _NUMBER,
                "battery_percent": {"type": ["number", "null"], "minimum": 0, "maximum": 100},
                "slowdown": {"type": "number", "minimum": 1}}},
        "degraded": {"type": "boolean"},
        "reason": {"type": "string", "minLength": 1},
    },
}


def validate_metadata(metadata: dict[str, Any]) -> None:
  """Raises jsonschema.ValidationError naming the offending field when metadata breaks the
  schema."""
  import jsonschema  # pylint: disable=import-outside-toplevel
  jsonschema.Draft202012Validator(OUTPUT_SCHEMA).validate(metadata)


class CompiledStage(NamedTuple):
  spec: variants_lib.VariantSpec
  fn: Callable       # jitted apply(params, x)
  params: Any


def compile_variants(catalogue: Sequence[Sequence[variants_lib.VariantSpec]],
                     params: dict[str, Any], image_size: int
                     ) -> list[list[CompiledStage]]:
  """One jitted function per variant (compiled at its first frame, then cached by jax)."""
  stages = []
  for specs in catalogue:
    row = []
    for spec in specs:
      if spec.key not in params:
        raise KeyError(f"params: no entry for variant {spec.key!r}")
      apply, _ = variants_lib.abstract(spec, image_size)
      row.append(CompiledStage(spec, jax.jit(apply), params[spec.key]))
    stages.append(row)
  return stages


def pipeline_id(names: Sequence[str]) -> str:
  return hashlib.sha256("|".join(names).encode()).hexdigest()[:12]


class RuntimeState(NamedTuple):
  selection: Selection | None
  at_selection: Resources | None   # the resources the selection was made for
  slowdown: float                  # EWMA of measured / predicted latency, >= 1
  selections: int                  # how many selections so far
  frames: int


def initial_state() -> RuntimeState:
  return RuntimeState(None, None, 1.0, 0, 0)


def decide(state: RuntimeState, reading: Resources, profiles: Sequence[Sequence[VariantProfile]],
           budget: Budget, band: float, on_infeasible: str = "raise"
           ) -> tuple[RuntimeState, bool]:
  """(the state to run the next frame with, whether it re-selected): see the module docstring."""
  reading = reading._replace(slowdown=state.slowdown)
  if state.selection is not None and not selector_lib.moved(state.at_selection, reading, band):
    return state, False
  selection = selector_lib.select(profiles, budget, reading, on_infeasible)
  return state._replace(selection=selection, at_selection=reading,
                        selections=state.selections + 1), True


def observe(state: RuntimeState, predicted_ms: float, measured_ms: float,
            alpha: float) -> RuntimeState:
  """After a frame: fold its measured / predicted latency into the slowdown."""
  # predicted_ms was made with the slowdown of the selection; undo it to compare with the model.
  ratio = measured_ms / max(predicted_ms, 1e-9) * state.at_selection.slowdown
  slowdown = max(1.0, (1 - alpha) * state.slowdown + alpha * ratio)
  return state._replace(slowdown=slowdown, frames=state.frames + 1)


def run_frame(stages: Sequence[CompiledStage], frame,
              clock: Callable[[], float] = time.perf_counter) -> tuple[Any, list[float]]:
  """The frame through every stage in order; (output, measured ms per stage)."""
  x, times = frame, []
  for stage in stages:
    start = clock()
    x = jax.block_until_ready(stage.fn(stage.params, x))
    times.append((clock() - start) * 1e3)
  return x, times


def metadata(state: RuntimeState, frame_index: int, reselected: bool, measured: Sequence[float],
             budget: Budget, stage_names: Sequence[str]) -> dict[str, Any]:
  selection = state.selection
  resources = state.at_selection
  return {
      "schema": SCHEMA_ID, "frame": int(frame_index),
      "pipeline_id": pipeline_id(selection.names), "selection": state.selections - 1,
      "reselected": bool(reselected),
      "stages": [{"stage": stage, "variant": name, "predicted_ms": float(p),
                  "measured_ms": float(m)}
                 for stage, name, p, m in zip(stage_names, selection.names,
                                              selection.predicted_ms, measured)],
      "predicted_ms": float(selection.latency_ms),
      "measured_ms": float(sum(measured)), "budget_ms": float(budget.latency_ms),
      "within_budget": bool(sum(measured) <= budget.latency_ms),
      "memory_mb": float(selection.memory_mb),
      "predicted_accuracy": float(min(max(math.exp(selection.score), 0.0), 1.0)),
      "resources": {"cpu_background": float(resources.cpu_background),
                    "memory_available_mb": float(resources.memory_available_mb),
                    "battery_percent": resources.battery_percent,
                    "slowdown": float(resources.slowdown)},
      "degraded": bool(selection.degraded), "reason": selection.reason,
  }


class EdgeRuntime:
  """The adaptive pipeline on a device: read resources, decide, run the frame, report.

  The stateful shell around `decide` / `run_frame` / `observe`: it owns the resource source,
  the clock and the current `RuntimeState`.
  """

  def __init__(self, compiled: list[list[CompiledStage]],
               profiles: Sequence[Sequence[VariantProfile]], budget: Budget,
               source, band: float = 0.15, alpha: float = 0.3, on_infeasible: str = "raise",
               clock: Callable[[], float] = time.perf_counter):
    if len(compiled) != len(profiles) or any(
        [c.spec.name for c in row] != [p.name for p in prow]
        for row, prow in zip(compiled, profiles)):
      raise ValueError("EdgeRuntime: the profiles must list the compiled variants, stage by "
                       "stage, in the same order")
    if not 0 <= band < 1:
      raise ValueError(f"band={band!r}: expected a fraction in [0, 1)")
    if not 0 < alpha <= 1:
      raise ValueError(f"alpha={alpha!r}: expected in (0, 1]")
    self.compiled, self.profiles, self.budget = compiled, profiles, budget
    self.source, self.band, self.alpha = source, band, alpha
    self.on_infeasible, self.clock = on_infeasible, clock
    self.state = initial_state()
    self.stage_names = [row[0].spec.stage for row in compiled]

  def process(self, frame) -> tuple[Any, dict[str, Any]]:
    index = self.state.frames
    self.state, reselected = decide(self.state, self.source.read(self.state.slowdown),
                                    self.profiles, self.budget, self.band, self.on_infeasible)
    # The pipeline is fixed here, before the frame's first stage runs.
    stages = [row[i] for row, i in zip(self.compiled, self.state.selection.choice)]
    output, measured = run_frame(stages, frame, self.clock)
    info = metadata(self.state, index, reselected, measured, self.budget, self.stage_names)
    self.state = observe(self.state, info["predicted_ms"], info["measured_ms"], self.alpha)
    return output, info
