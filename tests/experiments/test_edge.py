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


def test_trace_pass_runs_frames_at_the_period_and_starts_and_stops_load():
  trace = edge.TracePass(((0.2, 0), (0.2, 1)), period_ms=50.0)
  seen = list(trace)
  assert len(seen) == trace.frames == 8
  times = [t for _, t, _ in seen]
  assert all(later > earlier for earlier, later in zip(times, times[1:]))
  assert 0.35 <= times[-1] < 0.6  # frame 7 is due at 0.35 s (a loaded machine may be late)
  # Each frame runs in the phase its arrival time falls in.
  assert [w for _, _, w in seen] == [trace.phases[trace.phase_at(t)][1] for t in times]
  assert seen[0][2] == 0 and seen[-1][2] == 1


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
