"""The profile cache: valid entries reused, a corrupted, foreign or stale cache rebuilt."""

import contextlib
import json

import jax
import pytest

from experiments import edge as edge_experiment
from experiments import run as launcher
from research.edge import profiles
from research.edge import variants
from research.edge.selector import VariantProfile

from tests.edge import _tiny

CONTEXT = {"image_size": _tiny.SIZE, "frame_size": 4}


def some_profiles():
  return {f"{p.stage}/{p.name}": p for row in _tiny.PROFILES for p in row}


def fingerprints(params):
  specs = [s for stage in _tiny.CATALOGUE for s in stage]
  return {s.key: variants.fingerprint(s, _tiny.SIZE, params[s.key]) for s in specs}


def test_round_trip_and_each_kind_of_invalid_cache(tmp_path):
  path = tmp_path / "profiles.json"
  prints = fingerprints(_tiny.params())
  assert profiles.load(path, prints, CONTEXT) == ({}, "no cache file")
  profiles.save(path, some_profiles(), prints, CONTEXT)
  assert profiles.load(path, prints, CONTEXT) == (some_profiles(), "")

  assert profiles.load(path, prints, {**CONTEXT, "frame_size": 8})[1].startswith(
      "profiled for another frame shape")
  data = json.loads(path.read_text())
  data["machine"]["cpu_count"] = -1
  path.write_text(json.dumps(data))
  assert profiles.load(path, prints, CONTEXT) == ({}, "profiled on another machine (or jax "
                                                  "version)")
  path.write_text('{"format": "meshwork.edge-profiles/1", "machine": ')  # cut short
  cached, why = profiles.load(path, prints, CONTEXT)
  assert cached == {} and why.startswith("unreadable cache (JSONDecodeError")
  path.write_text('[1, 2]')
  assert profiles.load(path, prints, CONTEXT)[0] == {}


def test_a_changed_model_invalidates_only_its_own_entry(tmp_path):
  path = tmp_path / "profiles.json"
  params = _tiny.params()
  profiles.save(path, some_profiles(), fingerprints(params), CONTEXT)
  key = "classify/small"
  params[key] = jax.tree.map(lambda x: x + 1e-3, params[key])  # retrained
  cached, why = profiles.load(path, fingerprints(params), CONTEXT)
  assert set(cached) == set(some_profiles()) - {key}
  assert why == f"stale (model changed): {key}"


def test_fingerprint_follows_architecture_and_every_parameter():
  spec = _tiny.CATALOGUE[1][1]
  _, params = variants.build(spec, _tiny.SIZE, seed=0)
  base = variants.fingerprint(spec, _tiny.SIZE, params)
  assert variants.fingerprint(spec, _tiny.SIZE, jax.tree.map(lambda x: x * 1, params)) == base
  assert variants.fingerprint(spec, 16, params) != base
  leaves, tree = jax.tree.flatten(params)
  leaves[-1] = leaves[-1].at[0].add(1.0)
  assert variants.fingerprint(spec, _tiny.SIZE, jax.tree.unflatten(tree, leaves)) != base


@contextlib.contextmanager
def no_load():
  yield lambda: 1.0


def test_experiment_profiles_reuses_and_rebuilds_the_cache(tmp_path, monkeypatch):
  config, _ = launcher.load("configs/edge/smoke.py", [
      f"profile.cache_dir={tmp_path}", "profile.repeats=2", "profile.gap_ms=0",
      f"data.image_size={_tiny.SIZE}", "data.frame_size=4", "params_file="])
  monkeypatch.setattr(edge_experiment, "busy_cpu", lambda workers: no_load())
  compiled = _tiny.compiled()
  scores = [[0.0] * len(row) for row in compiled]
  frame = _tiny.frame()
  measured = []
  real_measure = profiles.measure
  monkeypatch.setattr(profiles, "measure", lambda stage, name, *a, **k: (
      measured.append(f"{stage}/{name}"), real_measure(stage, name, *a, **k))[1])

  first, note = edge_experiment.profile_all(config, compiled, scores, frame, CONTEXT)
  assert len(measured) == 5 and "5 profiled" in note
  assert all(isinstance(p, VariantProfile) and p.p95_ms > 0 for row in first for p in row)
  measured.clear()
  again, note = edge_experiment.profile_all(config, compiled, scores, frame, CONTEXT)
  assert measured == [] and "5 reused" in note and again == first

  (tmp_path / "profiles.json").write_text("not json at all")       # corrupted: all again
  _, note = edge_experiment.profile_all(config, compiled, scores, frame, CONTEXT)
  assert len(measured) == 5 and "unreadable cache" in note
  measured.clear()
  row = compiled[0]
  row[1] = row[1]._replace(params=jax.tree.map(lambda x: x * 2, row[1].params))  # retrained
  _, note = edge_experiment.profile_all(config, compiled, scores, frame, CONTEXT)
  assert measured == ["denoise/small"] and "stale (model changed): denoise/small" in note
