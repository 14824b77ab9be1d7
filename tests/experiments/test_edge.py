"""The edge experiment: config checks, kept variants, the trace pass; the smoke run (slow)."""

import json

import jax
import numpy as np
import pytest

from experiments import edge
from experiments import run as launcher
from research.common import config as config_lib
from research.common import tree_io
from research.edge import pipeline
from research.edge.selector import VariantProfile

from tests.edge import _tiny

SMOKE = "configs/edge/smoke.py"


@pytest.mark.parametrize("override, message", [
    ("data.image_size=12", "'data.image_size': got 12, expected a multiple of 8"),
    ("data.noise_sigma=-0.1", "'data.noise_sigma': got -0.1"),
    ("budget.latency_ms=0", "'budget.latency_ms': got 0.0, expected a positive"),
    ("runtime.on_infeasible=ignore", "'runtime.on_infeasible': got 'ignore'"),
    ("runtime.band=1.5", "'runtime.band': got 1.5"),
    ("statics=best", "'statics': got 'best'"),
    ("trace.phases=((1.0, -1),)", "'trace.phases'"),
    ("trace.phases=((0.0, 1),)", "'trace.phases'"),
    ("params_file=nowhere.npz", "no file 'nowhere.npz'"),
    ("profile.gap_ms=-1", "'profile.gap_ms'"),
])
def test_bad_config_is_refused_naming_the_key(override, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    launcher.load(SMOKE, [override])


def test_kept_variants_load_back_and_a_mismatch_names_the_leaf(tmp_path):
  params = _tiny.params()
  tree_io.save_tree_npz(tmp_path / "v.npz", params)
  loaded = edge.load_params(tmp_path / "v.npz", _tiny.CATALOGUE, _tiny.SIZE)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  with pytest.raises(config_lib.ConfigError,
                     match=r"config key 'params_file': .*\['classify/large'\]\['head'\]"
                           r"\['kernel'\]\.value: saved \(64, 10\), model \(256, 10\)"):
    edge.load_params(tmp_path / "v.npz", _tiny.CATALOGUE, 16)


def test_stage_scores_make_the_reference_pipeline_exact():
  accuracy = np.array([[0.80, 0.85, 0.90], [0.82, 0.88, 0.95]])
  den, cls = edge.stage_scores(accuracy)
  np.testing.assert_allclose(np.exp(den[-1] + cls), accuracy[-1])   # reference denoiser row
  np.testing.assert_allclose(np.exp(den + cls[-1]), accuracy[:, -1])  # reference classifier


def test_pareto_statics_drop_dominated_pipelines():
  front = edge.pareto_statics(_tiny.PROFILES)
  assert (1, 0) not in front  # small+tiny: slower and larger than identity+small, less accurate
  assert (1, 2) in front and (0, 0) in front


def test_pareto_statics_rank_latency_as_the_selector_predicts_it():
  # a0+b: medians 2, spreads 4 and 4 -> 2 + sqrt(32) = 7.66 ms (p95s sum to 10);
  # a1+b: medians 4, spreads 0.2 and 4 -> 4 + sqrt(16.04) = 8.00 ms (p95s sum to 8.2).
  # By the selector's model a0+b is faster, as small and more accurate: a1+b is dominated
  # (by the sum of p95s it would be the faster one, and kept).
  a0 = VariantProfile("a", "a0", 1.0, 5.0, 1.0, 5.0, 1.0, 1.0, -0.1)
  a1 = VariantProfile("a", "a1", 3.0, 3.2, 3.0, 3.2, 1.0, 1.0, -0.2)
  b = VariantProfile("b", "b", 1.0, 5.0, 1.0, 5.0, 1.0, 1.0, 0.0)
  assert edge.pareto_statics([[a0, a1], [b]]) == [(0, 0)]


class _FakeClock:
  """A clock that moves only when slept on or advanced by the test."""

  def __init__(self):
    self.now, self.sleeps = 100.0, []

  def clock(self):
    return self.now

  def sleep(self, seconds):
    self.sleeps.append(seconds)
    self.now += seconds


def test_trace_pass_paces_frames_and_switches_load_at_phase_edges(monkeypatch):
  fake, load = _FakeClock(), []

  def start_busy(workers, seconds):
    load.append(("start", workers, pytest.approx(seconds)))
    return [f"busy{workers}"]

  monkeypatch.setattr(edge, "start_busy", start_busy)
  monkeypatch.setattr(edge, "stop_busy", lambda processes: load.append(("stop", list(processes))))
  trace = edge.TracePass(((0.2, 0), (0.2, 1)), period_ms=50.0, clock=fake.clock,
                         sleep=fake.sleep)
  seen = []
  for i, t, workers in trace:
    seen.append((t, workers))
    fake.now += 0.12 if i == 2 else 0.01  # frame 2 takes past frames 3's and 4's due times
  assert len(seen) == trace.frames == 8
  # On time: due at i x 50 ms; late frames run at once, in arrival order, never early.
  np.testing.assert_allclose([t for t, _ in seen], [0.0, 0.05, 0.10, 0.22, 0.23, 0.25, 0.30,
                                                    0.35], atol=1e-9)
  np.testing.assert_allclose(fake.sleeps, [0.04, 0.04, 0.01, 0.04, 0.04], atol=1e-9)
  # Each frame runs in the phase its arrival time falls in (late frame 3 already in the second);
  # the load switches there, for the rest of the phase, and is stopped after the pass.
  assert [w for _, w in seen] == [0, 0, 0, 1, 1, 1, 1, 1]
  assert load == [("stop", []), ("start", 0, 0.2), ("stop", ["busy0"]), ("start", 1, 0.18),
                  ("stop", ["busy1"])]


def test_trace_pass_starts_and_stops_real_busy_processes(monkeypatch):
  started = []

  def start_busy(workers, seconds):
    started.append(real_start(workers, seconds))
    return started[-1]

  real_start = edge.start_busy
  monkeypatch.setattr(edge, "start_busy", start_busy)
  trace = edge.TracePass(((0.2, 0), (0.2, 1)), period_ms=50.0)
  seen = list(trace)
  assert len(seen) == trace.frames == 8
  times = [t for _, t, _ in seen]
  assert all(later > earlier for earlier, later in zip(times, times[1:]))
  assert all(t >= i * trace.period - 1e-9 for i, t in enumerate(times))  # never early
  # (no upper bound: a loaded machine may run a frame late; the fake-clock test pins pacing)
  assert [w for _, _, w in seen] == [trace.phases[trace.phase_at(t)][1] for t in times]
  assert seen[0][2] == 0 and seen[-1][2] == 1
  assert [len(processes) for processes in started] == [0, 1]
  assert all(p.returncode is not None for p in started[1])  # ended and reaped after the pass


@pytest.mark.slow
def test_smoke_runs_the_trace_with_valid_metadata(tmp_path):
  summary = launcher.main([SMOKE, "--workdir", str(tmp_path),
                           "--set", f"profile.cache_dir={tmp_path / 'cache'}"])
  assert set(summary["methods"]) >= {"adaptive"} and len(summary["methods"]) >= 2
  adaptive = summary["methods"]["adaptive"]
  assert adaptive["frames"] == summary["trace"]["frames"] > 0
  outputs = list((tmp_path / "edge").glob("*/outputs.jsonl"))
  lines = [json.loads(line) for line in outputs[0].read_text().splitlines()]
  assert len(lines) == adaptive["frames"]
  for info in lines:
    pipeline.validate_metadata(info)
  assert [info["frame"] for info in lines] == list(range(len(lines)))
  assert 0 <= adaptive["violation_rate"] <= 1
