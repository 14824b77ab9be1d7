"""The runtime pipeline: metadata valid for every output, no switch mid-frame, hysteresis,
infeasible budgets visible, the slowdown feedback."""

import copy

import jax
import jsonschema
import pytest

from research.edge import pipeline
from research.edge import resources
from research.edge import selector
from research.edge.selector import Budget, Resources

from tests.edge import _tiny

IDLE = Resources(0.0, 4_000.0, None)
LOADED = Resources(1.0, 4_000.0, 55.0)
BUDGET = Budget(latency_ms=10.0, memory_mb=100.0, headroom=1.0)


def make_runtime(readings, budget=BUDGET, on_infeasible="raise", band=0.15, step=0.001):
  return pipeline.EdgeRuntime(_tiny.compiled(), _tiny.PROFILES, budget,
                              resources.SequenceSource(readings), band=band,
                              on_infeasible=on_infeasible, clock=_tiny.TickClock(step))


def test_every_output_has_metadata_that_validates_and_names_its_variants():
  readings = [IDLE] * 3 + [LOADED] * 3 + [IDLE] * 2
  runtime = make_runtime(readings)
  frame = _tiny.frame()
  seen = []
  for i in range(len(readings)):
    logits, info = runtime.process(frame)
    pipeline.validate_metadata(info)
    assert logits.shape == (4, 10)
    assert info["frame"] == i
    assert info["pipeline_id"] == pipeline.pipeline_id([s["variant"] for s in info["stages"]])
    seen.append(tuple(s["variant"] for s in info["stages"]))
  assert seen[:3] == [("small", "large")] * 3     # idle: 3 + 5 ms
  assert seen[3:6] == [("identity", "small")] * 3  # loaded: 0.2 + 8 ms
  assert seen[6:] == [("small", "large")] * 2
  assert [runtime.state.selections] == [3]


def test_the_output_is_the_chosen_variants_applied_in_order():
  runtime = make_runtime([IDLE])
  frame = _tiny.frame()
  logits, info = runtime.process(frame)
  by_name = {row[0].spec.stage: {c.spec.name: c for c in row} for row in runtime.compiled}
  den, cls = by_name["denoise"]["small"], by_name["classify"]["large"]
  expected = cls.fn(cls.params, den.fn(den.params, frame))
  assert jax.numpy.allclose(logits, expected)


def test_no_switch_mid_frame_resources_are_read_once_before_the_first_stage():
  reads = []

  class CountingSource:
    def __init__(self):
      self.inner = resources.SequenceSource([IDLE, LOADED, IDLE, LOADED])

    def read(self, slowdown=1.0):
      reads.append("read")
      return self.inner.read(slowdown)

  runtime = pipeline.EdgeRuntime(_tiny.compiled(), _tiny.PROFILES, BUDGET, CountingSource(),
                                 clock=_tiny.TickClock())
  calls = []
  for row in runtime.compiled:  # record, per stage call, how many readings had been taken
    for j, stage in enumerate(row):
      row[j] = stage._replace(fn=lambda p, x, fn=stage.fn, name=stage.spec.key:
                              (calls.append((name, len(reads))), fn(p, x))[1])
  for _ in range(4):
    runtime.process(_tiny.frame())
  # Two stage calls per frame, both after that frame's one reading and before the next.
  assert [n for _, n in calls] == [1, 1, 2, 2, 3, 3, 4, 4]
  assert [name for name, _ in calls] == ["denoise/small", "classify/large",
                                         "denoise/identity", "classify/small"] * 2


def test_readings_inside_the_band_keep_the_pipeline():
  jitter = [Resources(0.3 + 0.05 * (i % 2), 4_000.0, None) for i in range(8)]
  runtime = make_runtime(jitter, band=0.15)
  infos = [runtime.process(_tiny.frame())[1] for _ in jitter]
  assert runtime.state.selections == 1
  assert [i["reselected"] for i in infos] == [True] + [False] * 7
  wide = make_runtime(jitter, band=0.01)
  for _ in jitter:
    wide.process(_tiny.frame())
  assert wide.state.selections == 8


def test_impossible_budget_raises_or_is_marked_degraded_never_silent():
  tight = Budget(latency_ms=0.1, memory_mb=100.0)
  with pytest.raises(selector.BudgetError, match="no pipeline fits"):
    make_runtime([IDLE], budget=tight).process(_tiny.frame())
  _, info = make_runtime([IDLE], budget=tight, on_infeasible="degrade").process(_tiny.frame())
  pipeline.validate_metadata(info)
  assert info["degraded"] and info["reason"].startswith("degraded: no pipeline fits")
  assert [s["variant"] for s in info["stages"]] == ["identity", "tiny"]  # the fastest
  assert not info["within_budget"]


def test_slow_frames_raise_the_slowdown_and_it_never_drops_below_one():
  state = pipeline.initial_state()
  state, _ = pipeline.decide(state, IDLE, _tiny.PROFILES, BUDGET, band=0.15)
  fast = pipeline.observe(state, predicted_ms=8.0, measured_ms=2.0, alpha=0.5)
  assert fast.slowdown == 1.0
  slow = pipeline.observe(state, predicted_ms=8.0, measured_ms=24.0, alpha=0.5)
  assert slow.slowdown == pytest.approx(2.0)  # 0.5 x 1 + 0.5 x 3
  # The next decision sees the slowdown and re-selects a faster pipeline.
  state2, reselected = pipeline.decide(slow, IDLE, _tiny.PROFILES, BUDGET, band=0.15)
  assert reselected and state2.selection.names != state.selection.names
  assert state2.at_selection.slowdown == pytest.approx(2.0)


def test_the_schema_refuses_broken_metadata():
  _, info = make_runtime([IDLE]).process(_tiny.frame())
  for field, value in [("pipeline_id", "XYZ"), ("measured_ms", -1.0), ("stages", [])]:
    broken = copy.deepcopy(info)
    broken[field] = value
    with pytest.raises(jsonschema.ValidationError):
      pipeline.validate_metadata(broken)
  broken = copy.deepcopy(info)
  broken["resources"]["cpu_background"] = 1.5
  with pytest.raises(jsonschema.ValidationError, match="1.5"):
    pipeline.validate_metadata(broken)
  broken = copy.deepcopy(info)
  del broken["reason"]
  with pytest.raises(jsonschema.ValidationError, match="'reason' is a required property"):
    pipeline.validate_metadata(broken)


def test_runtime_refuses_profiles_that_do_not_match_the_variants():
  with pytest.raises(ValueError, match="same order"):
    pipeline.EdgeRuntime(_tiny.compiled(), _tiny.PROFILES[::-1], BUDGET,
                         resources.SequenceSource([IDLE]))


def test_a_recorded_trace_replays_to_the_same_pipelines():
  readings = [IDLE, LOADED, LOADED, Resources(0.5, 4_000.0, None), IDLE]
  first = make_runtime(readings)
  infos = [first.process(_tiny.frame())[1] for _ in readings]
  # The metadata's resources are the readings the selections were made for: replaying them
  # (resources.from_records) makes the same choices frame by frame.
  recorded = resources.from_records(i["resources"] for i in infos)
  replay = pipeline.EdgeRuntime(_tiny.compiled(), _tiny.PROFILES, BUDGET,
                                resources.SequenceSource(recorded, keep_slowdown=True),
                                clock=_tiny.TickClock())
  again = [replay.process(_tiny.frame())[1] for _ in readings]
  assert [i["pipeline_id"] for i in again] == [i["pipeline_id"] for i in infos]
  with pytest.raises(ValueError, match="recorded resources #0"):
    resources.from_records([{"cpu_background": 0.1}])
