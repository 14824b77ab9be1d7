"""The nonlocal_cnn experiment through the launcher: tables, pictures, saved params, refusals."""

import numpy as np
import pytest

from experiments import nonlocal_cnn
from experiments import run as launcher
from research.common import config as config_lib
from research.common import records
from research.common import tree_io

TINY = ["--set", "test_size=64", "--set", "tile=64", "--set", "batch_size=2", "--set",
        "patch_size=16"]


def test_trains_evaluates_and_saves_params_and_examples(tmp_path):
  """The default path at a tiny size, (a) only: train, save params, evaluate, tables, picture."""
  summary = launcher.main(["configs/nonlocal_cnn/smoke.py", "--workdir", str(tmp_path),
                           "--set", "steps=2", "--set", "save_params=True", "--set",
                           "init_params=", "--set", "models=('two_stage',)", *TINY])
  run_dir = next((tmp_path / "nonlocal_cnn").iterdir())
  result = summary["results"]["25"]
  assert set(result["mean_psnr"]) == {"two_stage", "bm3d", "nl_means", "noisy"}
  mean = {m: v["mean"] for m, v in result["mean_psnr"].items()}
  assert mean["bm3d"] > mean["noisy"] + 3 and mean["nl_means"] > mean["noisy"] + 3
  assert 19 < mean["noisy"] < 22  # sigma 25 on [0, 1] images: about 20.2 dB
  assert result["seeds"] == [0] and result["mean_psnr"]["two_stage"]["n"] == 1
  assert (run_dir / "examples_sigma25.png").read_bytes()[:4] == b"\x89PNG"
  assert summary["headline"]["metric"] == "mean PSNR (dB), two-stage, sigma 25"
  assert summary["headline"]["note"].startswith("2 training steps, 1 seed(s); bm3d")
  # The launcher's tables.md is paper_tables of this run's config and summary (as kept).
  tables = nonlocal_cnn.paper_tables({"config": records.read_json(run_dir / "config.json"),
                                      "summary": records.read_json(run_dir / "summary.json")})
  assert set(tables) == {"scores", "comparisons"}
  text = (run_dir / "tables.md").read_text()
  assert all(table in text for table in tables.values())
  assert f"| 25 | two_stage | {result['params']['two_stage']} |" in tables["scores"]
  for other in ("bm3d", "nl_means", "noisy"):
    assert f"| 25 | {other} |" in tables["comparisons"]
  with np.load(run_dir / "two_stage_sigma25.npz") as saved:
    assert sum(saved[k].size for k in saved.files) == result["params"]["two_stage"] == 81281
  assert not (run_dir / "plain_sigma25.npz").exists()


def test_exposure_task_over_seeds_pairs_every_seed_and_draw(tmp_path):
  """The exposure task at a tiny size, two seeds: (a), its FiLM-only ablation and (b); the
  held-out draws are the same for every seed; (a) is compared with each method over
  seeds x images x draws pairs."""
  summary = launcher.main(["configs/nonlocal_cnn/exposure.py", "--workdir", str(tmp_path),
                           "--set", "steps=2", "--set", "num_seeds=2", "--set", "eval_draws=2",
                           "--set", "models=('two_stage','two_stage_film','plain')",
                           "--set", "test_size=32", "--set", "tile=32", "--set", "batch_size=2",
                           "--set", "patch_size=16", "--set", "save_params=True"])
  result = summary["results"]["exposure"]
  assert result["seeds"] == [0, 1]
  assert set(result["mean_psnr"]) == {"two_stage", "two_stage_film", "plain", "hist_match",
                                      "degraded"}
  assert set(result["comparisons"]) == {"two_stage_film", "plain", "hist_match", "degraded"}
  assert all(c["pairs"] == 2 * 3 * 2 for c in result["comparisons"].values())
  # The held-out draws do not depend on the training seed: the input scores equal per seed.
  degraded = result["scores"]["degraded"]
  assert degraded["0"] == degraded["1"] and len(degraded["0"]) == 6
  assert result["mean_psnr"]["hist_match"]["mean"] > result["mean_psnr"]["degraded"]["mean"]
  run_dir = next((tmp_path / "nonlocal_cnn").iterdir())
  assert (run_dir / "examples_exposure.png").exists()
  assert (run_dir / "plain_exposure_seed1.npz").exists() and (run_dir /
                                                               "plain_exposure.npz").exists()
  tables = (run_dir / "tables.md").read_text()
  assert "| exposure | plain |" in tables and " ± " in tables


@pytest.mark.slow
def test_both_models_saved_params_evaluate_to_the_same_scores_again(tmp_path):
  """(a) and (b), trained and saved; a second run from the saved params (steps=0) scores the
  same. Fast counterparts: the test above and test_saved_params_round_trip."""
  summary = launcher.main(["configs/nonlocal_cnn/smoke.py", "--workdir", str(tmp_path / "a"),
                           "--set", "steps=3", "--set", "save_params=True", "--set",
                           "init_params=", "--set", "models=('two_stage','plain')", *TINY])
  run_dir = next((tmp_path / "a" / "nonlocal_cnn").iterdir())
  result = summary["results"]["25"]
  assert set(result["mean_psnr"]) == {"two_stage", "plain", "bm3d", "nl_means", "noisy"}
  # The plain baseline is widened to the two-stage parameter count (within 3 %).
  assert abs(result["params"]["plain"] - result["params"]["two_stage"]) < \
      0.03 * result["params"]["two_stage"]
  assert summary["headline"]["baseline"] == "plain CNN, equal parameters"
  claims = (run_dir / "tables.md").read_text()
  assert "| 25 | plain |" in claims
  for kind in ("two_stage", "plain"):
    with np.load(run_dir / f"{kind}_sigma25.npz") as saved:
      assert sum(saved[k].size for k in saved.files) == result["params"][kind]
  again = launcher.main(["configs/nonlocal_cnn/smoke.py", "--workdir", str(tmp_path / "b"),
                         "--set", "steps=0", "--set", f"init_params={run_dir}", "--set",
                         "models=('two_stage','plain')", *TINY])
  # BM3D's compiled library is not bit-reproducible run to run; it is allowed 1e-3 dB.
  for kind, tol in (("two_stage", 1e-6), ("plain", 1e-6), ("noisy", 1e-6), ("nl_means", 1e-6),
                    ("bm3d", 1e-3)):
    for image, score in result["scores"][kind]["0"].items():
      assert again["results"]["25"]["scores"][kind]["0"][image] == pytest.approx(
          score, rel=tol, abs=tol), (kind, image)
  assert again["headline"]["note"].startswith(
      f"params trained earlier, loaded from {run_dir}; no training in this run, 1 seed(s); bm3d")


def test_saved_params_round_trip(tmp_path):
  """save_tree_npz -> .npz -> load_tree_npz gives the params back, in their structure."""
  from research.nonlocal_cnn import model  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  _, shapes, _ = model.build("two_stage", 0, abstract=True, features=8, depth=2)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
  tree_io.save_tree_npz(tmp_path / "p.npz", params)
  loaded = tree_io.load_tree_npz(tmp_path / "p.npz", shapes)
  assert jax.tree.structure(loaded) == jax.tree.structure(shapes)
  got, want = jax.tree.leaves(loaded), jax.tree.leaves(params)
  assert len(got) == len(want) > 10
  assert all(np.array_equal(g, w) for g, w in zip(got, want))


def test_saved_params_must_fit_the_model(tmp_path):
  tree_io.save_tree_npz(tmp_path / "p.npz", {"w": np.zeros((3, 4), np.float32)})
  import jax  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match=r"saved params do not fit the model \(1 paths differ"):
    tree_io.load_tree_npz(tmp_path / "p.npz", {"w": jax.ShapeDtypeStruct((3, 5), np.float32)})
  loaded = tree_io.load_tree_npz(tmp_path / "p.npz",
                                 {"w": jax.ShapeDtypeStruct((3, 4), np.float32)})
  assert loaded["w"].shape == (3, 4)


@pytest.mark.parametrize("override, match", [
    ("patch_size=30", r"'patch_size': got 30, expected a multiple of factor=4"),
    ("test_size=100", r"'test_size': got 100, expected a multiple of tile=128"),
    ("models=('unet',)", r"'models': got \('unet',\)"),
    ("sigmas=(0.0,)", r"'sigmas': got \(0.0,\), expected positive"),
    ("sigmas=(15.0000001,)", r"'sigmas': got \(15.0000001,\), expected distinct levels of at "
                             r"most 6 significant digits"),
    ("sigmas=(25.0, 25)", r"'sigmas': got \(25.0, 25.0\), expected distinct levels"),
    ("sigmas=(15.0, 15.05)", r"'sigmas': got \(15.0, 15.05\), expected levels at least 0.1 "
                             r"apart"),
    ("eval_impl=cuda", r"'eval_impl': got 'cuda', expected one of 'auto', 'pallas', 'reference'"),
    ("steps=-1", r"'steps': got -1, expected >= 0"),
    ("init_params=no/such/folder", r"'init_params': got 'no/such/folder', expected a folder"),
    ("task=deblur", r"'task': got 'deblur', expected one of 'denoise', 'exposure'"),
    ("num_seeds=0", r"'num_seeds'"),
    ("models=('plain','plain')", r"'models': got \('plain', 'plain'\), expected a non-empty "
                                 r"subset .* without repeats"),
])
def test_bad_config_is_refused(tmp_path, override, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    launcher.main(["configs/nonlocal_cnn/smoke.py", "--workdir", str(tmp_path), "--set",
                   override])


def test_a_config_in_which_no_model_trains_is_refused():
  """(c) alone, at levels outside full_nonlocal_sigmas, would train nothing: refused on load
  naming the key, not by a StopIteration from the headline after the classical anchors ran."""
  with pytest.raises(config_lib.ConfigError,
                     match=r"'full_nonlocal_sigmas': got \(25.0,\), expected at least one of "
                           r"sigmas=\(15.0,\) when models=\('full_nonlocal',\)"):
    launcher.load("configs/nonlocal_cnn/smoke.py", ["models=('full_nonlocal',)",
                                                   "sigmas=(15.0,)"])
  # Trained at one of the levels: accepted.
  launcher.load("configs/nonlocal_cnn/smoke.py", ["models=('full_nonlocal',)",
                                                 "sigmas=(15.0, 25.0)"])


def test_headline_reports_a_level_at_which_a_model_trained():
  """sigma 25 is preferred, but where no listed model trained there the headline takes the first
  level with one."""
  config, _ = launcher.load("configs/nonlocal_cnn/smoke.py", [
      "models=('full_nonlocal',)", "sigmas=(25.0, 50.0)", "full_nonlocal_sigmas=(50.0,)"])
  spread = lambda v: {"mean": v, "std": 0.0, "n": 1}  # pylint: disable=unnecessary-lambda-assignment
  classical = {"bm3d": spread(29.0), "nl_means": spread(27.0), "noisy": spread(20.0)}
  results = {"25": {"mean_psnr": classical},
             "50": {"mean_psnr": {**classical, "full_nonlocal": spread(26.0)}}}
  headline = nonlocal_cnn.headline(config, results)
  assert headline["metric"] == "mean PSNR (dB), full-nonlocal, sigma 50"
  assert headline["value"] == 26.0 and headline["baseline"] == "bm3d"


def test_exposure_task_needs_the_whole_image(tmp_path):
  with pytest.raises(config_lib.ConfigError, match=r"'tile': got 48, expected test_size=96 for "
                                                   r"task 'exposure'"):
    launcher.main(["configs/nonlocal_cnn/exposure.py", "--workdir", str(tmp_path), "--set",
                   "tile=48"])
