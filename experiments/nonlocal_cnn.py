"""The two-stage non-local CNN against its baselines on two image-to-image tasks.

task "denoise": Gaussian noise at each level in `sigmas` (0..255 scale), held-out photographs as
  `test_size`^2 center crops denoised as tiles of `tile` pixels; classical anchors: scikit-image's
  non-local means (h = 0.8 sigma, fast mode, as its docs' recipe but given the true sigma instead
  of an estimate) and BM3D (`bm3d` package, known sigma; its compiled library is not
  bit-reproducible run to run: the slow re-evaluation test allows it 1e-3 dB), beside the noisy
  input.
task "exposure": an image-wide exposure change (gain, gamma, vignette; research/nonlocal_cnn/
  data.py), each training patch and each held-out image with its own seeded draw; held-out
  photographs as whole scenes resized to `test_size`^2, `eval_draws` draws each (a fixed set,
  `eval_seed`, the same for every training seed), each model sees the whole image; classical
  anchor: histogram matching to the training photographs' pooled histogram (skimage), beside the
  degraded input.

Models, trained with the same budget (steps, batch, patch size, Adam with cosine decay) on random
patches of the bundled training photographs: (a) two_stage; its ablation two_stage_kv (stage one
feeds only the cross block's keys / values) and two_stage_film (only the FiLM scale / shift);
(b) plain, the same CNN without non-local operations widened to (a)'s parameter count; (c)
full_nonlocal, a full-resolution O(N^2) non-local block (for denoising at `full_nonlocal_sigmas`
only). Each for `num_seeds` training seeds (seed, seed + 1, ...): per method the mean and sample
standard deviation over seeds of the mean PSNR / SSIM, and (a) against every other method paired
by (seed, image): mean difference, 95 % bootstrap interval, sign test (research/nonlocal_cnn/
stats.py). Example images saved.

`save_params` writes each trained model's params to the run folder as `<model>_sigma<level>.npz`
(denoise) or `<model>_exposure.npz` (`_seed<s>` added for seeds other than 0; `params_file`);
`init_params` names a folder of such files to start from (with `steps=0`: evaluate saved models
only, as the demo's row does with papers/artifacts/nonlocal_cnn/).

  python -m experiments.run configs/nonlocal_cnn/smoke.py
  python -m experiments.run configs/nonlocal_cnn/denoise.py [--set ...] --paper nonlocal_cnn.<key>
  python -m experiments.run configs/nonlocal_cnn/exposure.py [--set ...] --paper nonlocal_cnn.<key>
"""

from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np

from research.common import config as config_lib
from research.common import records
from research.common import tree_io

ROOT = Path(__file__).resolve().parent.parent

TASKS = ("denoise", "exposure")
# Every method a table may list, in table order; a run has the models it trained and its task's
# classical anchors and input.
METHODS = ("two_stage", "two_stage_kv", "two_stage_film", "plain", "full_nonlocal", "bm3d",
           "nl_means", "hist_match", "noisy", "degraded")
CLASSICAL = {"denoise": ("bm3d", "nl_means", "noisy"), "exposure": ("hist_match", "degraded")}
EXPOSURE_STREAM = 7  # the exposure task's random streams: [eval_seed, 7] held out, [seed, 7, 1]
                     # training (denoising uses [seed, 10 * sigma] and [seed, 10 * sigma, 1])


def config_schema() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "task": "denoise",           # "denoise" or "exposure" (see the module docstring)
      "sigmas": (15.0, 25.0, 50.0),  # denoise: noise levels on the 0..255 scale
      "models": ("two_stage", "plain", "full_nonlocal"),
      "num_seeds": 1,              # training seeds seed, seed + 1, ... (statistics over them)
      "steps": 2000,               # Adam steps per model, noise level and seed (0: evaluate only)
      "batch_size": 16,
      "patch_size": 48,
      "learning_rate": 1e-3,
      "features": 32,
      "depth": 6,
      "factor": 4,                 # downscale factor s of stage one
      "global_depth": 2,
      "test_size": 256,            # denoise: center crop of each held-out image; exposure: the
                                   # whole scene resized to test_size^2
      "tile": 128,                 # denoise: evaluation tile (every model sees the same tiles);
                                   # exposure: must equal test_size (the whole image)
      "eval_draws": 4,             # exposure: degradations per held-out image
      "eval_seed": 0,              # exposure: seeds the held-out draws (fixed across seeds)
      "impl": "auto",              # attention in training (and (c)'s at evaluation): auto is
                                   # the Pallas kernel on GPU / TPU, the jnp reference on CPU
      "eval_impl": "pallas",       # two-stage attention at evaluation (interpret on CPU)
      "full_nonlocal_sigmas": (25.0,),  # denoise: (c) is O(N^2), trained at these levels only
      "save_params": False,        # write each trained model's params to the run folder
      "init_params": "",           # folder of saved params (relative: to the repository) to
                                   # start from instead of a random initialization
  })


def validate_config(config) -> None:
  from research.nonlocal_cnn import model  # pylint: disable=import-outside-toplevel
  config_lib.check_positive(config, "batch_size", "patch_size", "learning_rate", "num_seeds",
                            "features", "depth", "factor", "global_depth", "test_size", "tile",
                            "eval_draws")
  config_lib.check_choice(config, "task", TASKS)
  config_lib.check_choice(config, "impl", model.IMPLS)
  config_lib.check_choice(config, "eval_impl", model.IMPLS)
  if config.steps < 0:
    raise config_lib.ConfigError(f"config key 'steps': got {config.steps}, expected >= 0")
  if config.init_params and not params_folder(config).is_dir():
    raise config_lib.ConfigError(f"config key 'init_params': got {config.init_params!r}, "
                                 "expected a folder of saved params (see save_params)")
  unknown = [m for m in config.models if m not in model.MODELS]
  if unknown or not config.models or len(set(config.models)) != len(config.models):
    raise config_lib.ConfigError(f"config key 'models': got {tuple(config.models)}, expected a "
                                 f"non-empty subset of {model.MODELS} without repeats")
  if not config.sigmas or any(s <= 0 for s in config.sigmas):
    raise config_lib.ConfigError(f"config key 'sigmas': got {tuple(config.sigmas)}, expected "
                                 "positive noise levels (on the 0..255 scale)")
  # Results are keyed by f"{sigma:g}" and the noise is drawn at float(key): a level must come
  # back from its key unchanged (at most 6 significant digits), and no two may share one.
  keys = [f"{s:g}" for s in config.sigmas]
  if any(float(k) != s for k, s in zip(keys, config.sigmas)) or len(set(keys)) != len(keys):
    raise config_lib.ConfigError(f"config key 'sigmas': got {tuple(config.sigmas)}, expected "
                                 "distinct levels of at most 6 significant digits (each "
                                 "level's result key is f'{sigma:g}')")
  streams = [int(s * 10) for s in config.sigmas]  # noise streams (test_set, training_batches)
  if len(set(streams)) != len(streams):
    raise config_lib.ConfigError(f"config key 'sigmas': got {tuple(config.sigmas)}, expected "
                                 "levels at least 0.1 apart (each level's noise is drawn from "
                                 "its own stream, int(10 * sigma))")
  if not any(trains(config, kind, c) for kind in config.models for c in conditions(config)):
    # Only (c) is listed and it trains at none of the levels: no model to report.
    raise config_lib.ConfigError(
        f"config key 'full_nonlocal_sigmas': got {tuple(config.full_nonlocal_sigmas)}, expected "
        f"at least one of sigmas={tuple(config.sigmas)} when models="
        f"{tuple(config.models)} (full_nonlocal trains only at these levels)")
  for key in ("patch_size", "tile"):
    if config[key] % config.factor:
      raise config_lib.ConfigError(f"config key {key!r}: got {config[key]}, expected a "
                                   f"multiple of factor={config.factor}")
  if config.test_size % config.tile:
    raise config_lib.ConfigError(f"config key 'test_size': got {config.test_size}, expected a "
                                 f"multiple of tile={config.tile}")
  if config.task == "exposure" and config.tile != config.test_size:
    raise config_lib.ConfigError(f"config key 'tile': got {config.tile}, expected "
                                 f"test_size={config.test_size} for task 'exposure' (the change "
                                 "is image-wide: every model sees the whole image)")


def seeds(config) -> list[int]:
  return [config.seed + i for i in range(config.num_seeds)]


def conditions(config) -> list[str]:
  """The result keys: each noise level ("25") for denoise, "exposure" for the exposure task."""
  return [f"{s:g}" for s in config.sigmas] if config.task == "denoise" else ["exposure"]


def model_kwargs(kind: str, config) -> dict:
  """`model.build`'s sizes for `kind` from the config ((b) widened to (a)'s parameter count)."""
  from research.nonlocal_cnn import model  # pylint: disable=import-outside-toplevel
  return model.equal_size(kind, channels=1, features=config.features, depth=config.depth,
                          factor=config.factor, global_depth=config.global_depth)


def params_folder(config) -> Path:
  """`init_params` as a path (a relative one is relative to the repository)."""
  return ROOT / config.init_params


def params_file(kind: str, condition: str, seed: int = 0) -> str:
  """The file name a model's params are saved under (tree_io.save_tree_npz) and loaded from
  (init_params, tree_io.load_tree_npz)."""
  tag = condition if condition == "exposure" else f"sigma{condition}"
  return f"{kind}_{tag}" + (f"_seed{seed}" if seed else "") + ".npz"


def tiles(image: np.ndarray, tile: int) -> np.ndarray:
  h, w, c = image.shape
  return (image.reshape(h // tile, tile, w // tile, tile, c).swapaxes(1, 2)
          .reshape(-1, tile, tile, c))


def untile(blocks: np.ndarray, h: int, w: int) -> np.ndarray:
  tile, c = blocks.shape[1], blocks.shape[-1]
  return (blocks.reshape(h // tile, w // tile, tile, tile, c).swapaxes(1, 2)
          .reshape(h, w, c))


def ssim(clean: np.ndarray, estimate: np.ndarray) -> float:
  from skimage.metrics import structural_similarity  # pylint: disable=import-outside-toplevel
  return float(structural_similarity(clean[..., 0], np.clip(estimate[..., 0], 0, 1),
                                     data_range=1.0))


def scores(clean: dict, estimates: dict) -> dict:
  """(PSNR, SSIM) per held-out sample."""
  from research.nonlocal_cnn import model  # pylint: disable=import-outside-toplevel
  return {n: (model.psnr(clean[n], estimates[n]), ssim(clean[n], estimates[n])) for n in clean}


def nl_means(noisy: np.ndarray, sigma: float) -> np.ndarray:
  from skimage.restoration import denoise_nl_means  # pylint: disable=import-outside-toplevel
  s = sigma / 255.0
  out = denoise_nl_means(noisy[..., 0], h=0.8 * s, sigma=s, fast_mode=True, patch_size=5,
                         patch_distance=6)
  return out[..., None].astype(np.float32)


def bm3d_denoise(noisy: np.ndarray, sigma: float) -> np.ndarray:
  """BM3D (the `bm3d` package's default profile) with the true noise level."""
  import bm3d  # pylint: disable=import-outside-toplevel
  return np.asarray(bm3d.bm3d(noisy[..., 0], sigma_psd=sigma / 255.0),
                    np.float32)[..., None]


def hist_match(degraded: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """Global tone mapping: the image's histogram matched to the reference's (skimage)."""
  from skimage.exposure import match_histograms  # pylint: disable=import-outside-toplevel
  return match_histograms(degraded[..., 0], reference).astype(np.float32)[..., None]


def test_set(config, condition: str, seed: int, clean_images: dict) -> tuple[dict, dict]:
  """(clean, degraded) held-out samples for one condition and training seed.

  denoise: one sample per image, noise drawn from the seed (as every earlier run); exposure:
  `eval_draws` samples per image named "<image>#<k>", drawn from `eval_seed` only."""
  from research.nonlocal_cnn import data  # pylint: disable=import-outside-toplevel
  if config.task == "denoise":
    sigma = float(condition)
    rng = np.random.default_rng([seed, int(sigma * 10)])
    return dict(clean_images), {n: data.add_noise(img, sigma, rng)
                                for n, img in clean_images.items()}
  rng = np.random.default_rng([config.eval_seed, EXPOSURE_STREAM])
  clean, degraded = {}, {}
  for name, img in clean_images.items():
    for k in range(config.eval_draws):
      clean[f"{name}#{k}"] = img
      degraded[f"{name}#{k}"] = data.degrade_exposure(img, data.sample_exposure(rng))
  return clean, degraded


def classical(config, condition: str, degraded: dict, reference) -> dict:
  """The task's classical anchors and its input, per sample."""
  if config.task == "denoise":
    sigma = float(condition)
    return {"bm3d": {n: bm3d_denoise(x, sigma) for n, x in degraded.items()},
            "nl_means": {n: nl_means(x, sigma) for n, x in degraded.items()},
            "noisy": degraded}
  return {"hist_match": {n: hist_match(x, reference) for n, x in degraded.items()},
          "degraded": degraded}


def training_batches(config, condition: str, seed: int, train_images):
  """Endless seeded (degraded, clean) patch batches for one condition and seed."""
  from research.nonlocal_cnn import data  # pylint: disable=import-outside-toplevel
  level = int(float(condition) * 10) if config.task == "denoise" else EXPOSURE_STREAM
  rng = np.random.default_rng([seed, level, 1])
  while True:
    clean = data.random_patches(train_images, config.patch_size, config.batch_size, rng)
    if config.task == "denoise":
      yield data.add_noise(clean, float(condition), rng), clean
    else:
      yield data.degrade_exposure_batch(clean, rng), clean


def trains(config, kind: str, condition: str) -> bool:
  return not (config.task == "denoise" and kind == "full_nonlocal"
              and float(condition) not in config.full_nonlocal_sigmas)


def fit_and_apply(config, run, kind: str, condition: str, seed: int, train_images,
                  degraded: dict) -> tuple[dict, int]:
  """Trains one model (or loads it) and returns ({sample: output}, parameter count)."""
  import jax  # pylint: disable=import-outside-toplevel
  from research.nonlocal_cnn import model  # pylint: disable=import-outside-toplevel
  from research.nonlocal_cnn import train  # pylint: disable=import-outside-toplevel
  kwargs = model_kwargs(kind, config)
  # Saved params need no random initialization: only the shapes they must fit.
  apply, params, _ = model.build(kind, seed, impl=config.impl,
                                 abstract=bool(config.init_params), **kwargs)
  count = model.param_count(params)
  if config.init_params:
    params = tree_io.load_tree_npz(params_folder(config) / params_file(kind, condition, seed),
                                   params)
  tx = train.optimizer(config.learning_rate, config.steps)
  step = train.train_step(apply, tx)
  opt_state = tx.init(params)
  batches = training_batches(config, condition, seed, train_images)
  for i in run.progress(range(config.steps), description=f"{condition} {kind} seed {seed}"):
    inputs, clean = next(batches)
    params, opt_state, loss = step(params, opt_state, inputs, clean)
    if i % 50 == 0 or i == config.steps - 1:
      run.log(i, condition=condition, model=kind, seed=seed, loss=float(loss))
  if config.save_params and run.workdir is not None:
    tree_io.save_tree_npz(run.workdir / params_file(kind, condition, seed), params)
  # (c) runs its N^2 self-attention as in training ("auto": the jnp reference on CPU, where
  # the interpreted kernel would walk an N^2 grid of blocks in Python).
  impl = config.eval_impl if kind in model.GLOBAL_MODES else config.impl
  apply_jit = jax.jit(model.build(kind, seed, impl=impl, abstract=True, **kwargs)[0])
  return {name: untile(np.asarray(apply_jit(params, tiles(x, config.tile))), *x.shape[:2])
          for name, x in degraded.items()}, count


def summarize(measured: dict, seed_list: list[int]) -> dict:
  """Per method the seed spread of the mean scores, and (a) against every other method paired
  by (seed, sample). measured: {method: {seed: {sample: (psnr, ssim)}}}."""
  from research.nonlocal_cnn import stats  # pylint: disable=import-outside-toplevel
  psnr = {m: {str(s): {n: v[0] for n, v in by_seed[s].items()} for s in seed_list}
          for m, by_seed in measured.items()}
  out = {"seeds": seed_list,
         "scores": {m: {str(s): {n: {"psnr": p, "ssim": q} for n, (p, q) in by_seed[s].items()}
                        for s in seed_list} for m, by_seed in measured.items()},
         "mean_psnr": {}, "mean_ssim": {}, "comparisons": {}}
  for m, by_seed in measured.items():
    out["mean_psnr"][m] = stats.seed_spread(
        [np.mean([v[0] for v in by_seed[s].values()]) for s in seed_list])
    out["mean_ssim"][m] = stats.seed_spread(
        [np.mean([v[1] for v in by_seed[s].values()]) for s in seed_list])
  if "two_stage" in measured:
    for other in (m for m in METHODS if m in measured and m != "two_stage"):
      out["comparisons"][other] = stats.paired(psnr["two_stage"], psnr[other])
  return out


def run(config, run):
  from research.nonlocal_cnn import data  # pylint: disable=import-outside-toplevel
  from research.nonlocal_cnn import model  # pylint: disable=import-outside-toplevel

  train_images = data.train_images() if config.steps else None
  if config.task == "denoise":
    clean_images, reference = data.test_images(config.test_size), None
  else:
    clean_images = data.resized_images(data.TEST_IMAGES, config.test_size)
    reference = np.concatenate([v[..., 0] for v in data.resized_images(
        data.TRAIN_IMAGES, config.test_size).values()])
  seed_list = seeds(config)
  results, examples = {}, {}
  for condition in conditions(config):
    measured, params_count = {}, {}
    for seed in seed_list:
      clean, degraded = test_set(config, condition, seed, clean_images)
      outputs = classical(config, condition, degraded, reference)
      for kind in (k for k in config.models if trains(config, k, condition)):
        outputs[kind], params_count[kind] = fit_and_apply(
            config, run, kind, condition, seed, train_images, degraded)
      for method, out in outputs.items():
        measured.setdefault(method, {})[seed] = scores(clean, out)
      if seed == seed_list[0]:
        examples[condition] = (clean, outputs, {m: v[seed] for m, v in measured.items()})
    results[condition] = {**summarize(measured, seed_list), "params": params_count}
  print(results_table(results))
  print(comparisons_table(results))
  _plot_examples(run, examples)
  return {"headline": headline(config, results), "results": results}


def headline(config, results: dict) -> dict:
  from research.nonlocal_cnn import data  # pylint: disable=import-outside-toplevel
  # sigma 25 where a model was trained there, else the first condition with one (validation
  # refuses a config in which no model trains at any level).
  trained = [c for c in results if any(m in results[c]["mean_psnr"] for m in config.models)]
  key = "25" if "25" in trained else trained[0]
  mean = {m: v["mean"] for m, v in results[key]["mean_psnr"].items()}
  ours = next(m for m in ("two_stage", *config.models) if m in mean)  # a run may skip (a)
  origin = f"{config.steps} training steps"
  if config.init_params:
    origin = (f"params trained earlier, loaded from {config.init_params}; "
              + (f"then {origin}" if config.steps else "no training in this run"))
  anchor = CLASSICAL[config.task][0]
  base = "plain" if "plain" in mean and ours != "plain" else anchor
  best = max((m for m in mean if m != ours), key=mean.get)
  label = "sigma " + key if config.task == "denoise" else "exposure task"
  view = (f"{config.test_size}^2 crops" if config.task == "denoise"
          else f"whole scenes resized to {config.test_size}^2, {config.eval_draws} draws each")
  return {
      "metric": f"mean PSNR (dB), {ours.replace('_', '-')}, {label}", "value": mean[ours],
      "baseline": "plain CNN, equal parameters" if base == "plain" else anchor,
      "baseline_value": mean[base],
      "note": (f"{origin}, {len(seeds(config))} seed(s); "
               + ", ".join(f"{m} {mean[m]:.2f}" for m in CLASSICAL[config.task])
               + ("" if best in CLASSICAL[config.task] else f", best other ({best}) "
                  f"{mean[best]:.2f}") + f" dB; held-out {view} of "
               f"{', '.join(data.TEST_IMAGES)}")}


PAPER_PAGE = "papers/nonlocal_cnn.md"


def paper_tables(result: dict) -> dict[str, str]:
  """The page's tables from a kept result: `scores` (every method in every condition, mean and
  standard deviation over seeds) and `comparisons` ((a) against each other method, paired)."""
  config, summary = result["config"], result["summary"]
  training = (f"{config['steps']} Adam steps x {config['batch_size']} patches of "
              f"{config['patch_size']}^2 per model")
  if config.get("init_params"):
    training = (f"params loaded from `{config['init_params']}`, "
                + (f"then {training}" if config["steps"] else "no training in this run"))
  first = next(iter(summary["results"].values()))
  view = (f"held-out {config['test_size']}^2 center crops as {config['tile']}^2 tiles"
          if config["task"] == "denoise" else
          f"held-out scenes resized to {config['test_size']}^2, {config['eval_draws']} "
          f"exposure draws each (eval seed {config['eval_seed']})")
  setting = (f"Training seeds {', '.join(map(str, first['seeds']))}; {training}; {view}; "
             f"{summary['seconds'] / 60:.1f} minutes of wall time in all.")
  return {"scores": setting + "\n\n" + results_table(summary["results"]),
          "comparisons": comparisons_table(summary["results"])}


def _by_condition(results: dict) -> list:
  """(condition, result) in increasing noise (a kept result's keys are sorted as strings)."""
  return sorted(results.items(), key=lambda item: (not item[0][0].isdigit(),
                                                   float(item[0]) if item[0][0].isdigit() else 0))


def _spread(v: dict, digits: int) -> str:
  return f"{v['mean']:.{digits}f}" + (f" ± {v['std']:.{digits}f}" if v["n"] > 1 else "")


def results_table(results: dict) -> str:
  rows = []
  for condition, r in _by_condition(results):
    for method in (m for m in METHODS if m in r["mean_psnr"]):
      per_sample = {}
      for by_sample in r["scores"][method].values():
        for n, v in by_sample.items():
          per_sample.setdefault(n.split("#")[0], []).append(v["psnr"])
      rows.append((condition, method, r["params"].get(method, "-"),
                   _spread(r["mean_psnr"][method], 2), _spread(r["mean_ssim"][method], 3),
                   ", ".join(f"{n} {np.mean(v):.2f}" for n, v in sorted(per_sample.items()))))
  return records.write_markdown_table(
      ("condition", "method", "params", "mean PSNR (dB), mean ± std over seeds", "mean SSIM",
       "PSNR per image (mean over seeds and draws)"), rows)


def verdict(comparison: dict) -> str:
  lo, hi = comparison["interval"]
  return "ahead" if lo > 0 else "behind" if hi < 0 else "no clear difference"


def comparisons_table(results: dict) -> str:
  """(a) against each other method: the readings the page's prose quotes."""
  rows = []
  for condition, r in _by_condition(results):
    for other, c in ((m, r["comparisons"][m]) for m in METHODS if m in r["comparisons"]):
      t = c["sign_test"]
      rows.append((condition, other, f"{c['mean']:+.2f}",
                   f"[{c['interval'][0]:+.2f}, {c['interval'][1]:+.2f}]",
                   f"{t['positive']} / {t['negative']}" + (f" ({t['ties']} ties)" if t["ties"]
                                                           else ""),
                   f"{t['p']:.2g}", c["pairs"], verdict(c)))
  return records.write_markdown_table(
      ("condition", "two-stage (a) vs", "mean PSNR difference (dB)", "95 % bootstrap interval",
       "pairs (a) ahead / behind", "sign test p", "pairs (seed x image)", "reading"), rows)


def _plot_examples(run, examples) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  for condition, (clean, outputs, measured) in examples.items():
    name = next(iter(clean))
    methods = [m for m in reversed(METHODS) if m in outputs][:1] + [
        m for m in METHODS if m in outputs and m not in ("noisy", "degraded")]
    fig, axes = plt.subplots(1, len(methods) + 1, figsize=(3 * (len(methods) + 1), 3.3))
    axes[0].imshow(clean[name][..., 0], cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("clean")
    for ax, method in zip(axes[1:], methods):
      out = outputs[method][name]
      ax.imshow(np.clip(out[..., 0], 0, 1), cmap="gray", vmin=0, vmax=1)
      ax.set_title(f"{method}\n{measured[method][name][0]:.2f} dB")
    for ax in axes:
      ax.axis("off")
    fig.tight_layout()
    tag = condition if condition == "exposure" else f"sigma{condition}"
    run.save_figure(f"examples_{tag}.png", fig)
    plt.close(fig)
