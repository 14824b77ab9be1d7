"""Gaussian denoising with the two-stage non-local CNN against its baselines.

For each noise level sigma, trains with the same budget (steps, batch, patch size, Adam with
cosine decay) on random patches of the bundled training photographs:
(a) two_stage: global parameters from the downscaled image drive a full-resolution non-local
    CNN; (b) plain: the same CNN without non-local operations, widened to about the same
    parameter count; (c) full_nonlocal: a full-resolution non-local block (O(N^2)), trained and
    evaluated at `full_nonlocal_sigmas` only (cost); and evaluates on the held-out photographs
    (center crops, denoised as tiles of `tile` pixels) against (d) the noisy input and
    scikit-image's non-local means (`denoise_nl_means`, h = 0.8 sigma, fast mode, the
    estimated-sigma recipe of its docs). PSNR and SSIM per image and mean; example images saved.

`save_params` writes each trained model's params to the run folder as
`<model>_sigma<sigma>.npz`; `init_params` names a folder of such files to start from (with
`steps=0`: evaluate saved models only, as the demo's row does with papers/artifacts/nonlocal_cnn/).

  python -m experiments.run configs/nonlocal_cnn/smoke.py
  python -m experiments.run configs/nonlocal_cnn/denoise.py [--set ...] --paper nonlocal_cnn.<key>
"""

from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np

from research.common import config as config_lib
from research.common import records
from research.common import tree_io

ROOT = Path(__file__).resolve().parent.parent

METHODS = ("two_stage", "plain", "full_nonlocal", "nl_means", "noisy")


def config_schema() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "sigmas": (15.0, 25.0, 50.0),
      "models": ("two_stage", "plain", "full_nonlocal"),
      "steps": 2000,               # Adam steps per model and noise level (0: evaluate only)
      "batch_size": 16,
      "patch_size": 48,
      "learning_rate": 1e-3,
      "features": 32,
      "depth": 6,
      "factor": 4,                 # downscale factor s of stage one
      "global_depth": 2,
      "test_size": 256,            # center crop of each held-out image
      "tile": 128,                 # evaluation tile (every model sees the same tiles)
      "impl": "auto",              # attention in training (and (c)'s at evaluation): auto is
                                   # the Pallas kernel on GPU / TPU, the jnp reference on CPU
      "eval_impl": "pallas",       # two-stage attention at evaluation (interpret on CPU)
      "full_nonlocal_sigmas": (25.0,),  # (c) is O(N^2): trained at these noise levels only
      "save_params": False,        # write each trained model's params to the run folder
      "init_params": "",           # folder of saved params (relative: to the repository) to
                                   # start from instead of a random initialization
  })


def validate_config(config) -> None:
  from research.nonlocal_cnn import model  # pylint: disable=import-outside-toplevel
  config_lib.check_positive(config, "batch_size", "patch_size", "learning_rate",
                            "features", "depth", "factor", "global_depth", "test_size", "tile")
  config_lib.check_choice(config, "impl", model.IMPLS)
  config_lib.check_choice(config, "eval_impl", model.IMPLS)
  if config.steps < 0:
    raise config_lib.ConfigError(f"config key 'steps': got {config.steps}, expected >= 0")
  if config.init_params and not params_folder(config).is_dir():
    raise config_lib.ConfigError(f"config key 'init_params': got {config.init_params!r}, "
                                 "expected a folder of saved params (see save_params)")
  unknown = [m for m in config.models if m not in model.MODELS]
  if unknown or not config.models:
    raise config_lib.ConfigError(f"config key 'models': got {tuple(config.models)}, expected a "
                                 f"non-empty subset of {model.MODELS}")
  if not config.sigmas or any(s <= 0 for s in config.sigmas):
    raise config_lib.ConfigError(f"config key 'sigmas': got {tuple(config.sigmas)}, expected "
                                 "positive noise levels (on the 0..255 scale)")
  for key in ("patch_size", "tile"):
    if config[key] % config.factor:
      raise config_lib.ConfigError(f"config key {key!r}: got {config[key]}, expected a "
                                   f"multiple of factor={config.factor}")
  if config.test_size % config.tile:
    raise config_lib.ConfigError(f"config key 'test_size': got {config.test_size}, expected a "
                                 f"multiple of tile={config.tile}")


def model_kwargs(kind: str, config, two_stage_params: int) -> dict:
  from research.nonlocal_cnn import model  # pylint: disable=import-outside-toplevel
  kwargs = dict(channels=1, features=config.features, depth=config.depth, factor=config.factor,
                global_depth=config.global_depth)
  if kind == "plain":  # equal parameter count: widen the trunk
    kwargs["features"] = model.plain_features_matching(two_stage_params, 1, config.depth)
  return kwargs


def params_folder(config) -> Path:
  """`init_params` as a path (a relative one is relative to the repository)."""
  return ROOT / config.init_params


def params_file(kind: str, sigma: float) -> str:
  """The file name a model's params are saved under (tree_io.save_tree_npz) and loaded from
  (init_params, tree_io.load_tree_npz)."""
  return f"{kind}_sigma{sigma:g}.npz"


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
  """(PSNR, SSIM) per held-out image."""
  from research.nonlocal_cnn import model  # pylint: disable=import-outside-toplevel
  return {n: (model.psnr(clean[n], estimates[n]), ssim(clean[n], estimates[n])) for n in clean}


def nl_means(noisy: np.ndarray, sigma: float) -> np.ndarray:
  from skimage.restoration import denoise_nl_means  # pylint: disable=import-outside-toplevel
  s = sigma / 255.0
  out = denoise_nl_means(noisy[..., 0], h=0.8 * s, sigma=s, fast_mode=True, patch_size=5,
                         patch_distance=6)
  return out[..., None].astype(np.float32)


def run(config, run):
  import jax  # pylint: disable=import-outside-toplevel
  from research.nonlocal_cnn import data  # pylint: disable=import-outside-toplevel
  from research.nonlocal_cnn import model  # pylint: disable=import-outside-toplevel
  from research.nonlocal_cnn import train  # pylint: disable=import-outside-toplevel

  train_images = data.train_images() if config.steps else None
  test_images = data.test_images(config.test_size)
  two_stage_params = model.param_count(model.build(
      "two_stage", config.seed, abstract=True, channels=1, features=config.features,
      depth=config.depth, factor=config.factor, global_depth=config.global_depth)[1])
  results = {}
  examples = {}
  for sigma in config.sigmas:
    rng = np.random.default_rng([config.seed, int(sigma * 10)])
    noisy_test = {n: data.add_noise(img, sigma, rng) for n, img in test_images.items()}
    outputs = {"noisy": noisy_test,
               "nl_means": {n: nl_means(noisy_test[n], sigma) for n in test_images}}
    params_count = {}
    for kind in config.models:
      if kind == "full_nonlocal" and sigma not in config.full_nonlocal_sigmas:
        continue
      kwargs = model_kwargs(kind, config, two_stage_params)
      # Saved params need no random initialization: only the shapes they must fit.
      apply, params, _ = model.build(kind, config.seed, impl=config.impl,
                                     abstract=bool(config.init_params), **kwargs)
      params_count[kind] = model.param_count(params)
      if config.init_params:
        params = tree_io.load_tree_npz(params_folder(config) / params_file(kind, sigma), params)
      tx = train.optimizer(config.learning_rate, config.steps)
      step = train.train_step(apply, tx)
      opt_state = tx.init(params)
      batch_rng = np.random.default_rng([config.seed, int(sigma * 10), 1])
      for i in run.progress(range(config.steps), description=f"sigma {sigma:g} {kind}"):
        clean = data.random_patches(train_images, config.patch_size, config.batch_size,
                                    batch_rng)
        noisy = data.add_noise(clean, sigma, batch_rng)
        params, opt_state, loss = step(params, opt_state, noisy, clean)
        if i % 50 == 0 or i == config.steps - 1:
          run.log(i, sigma=sigma, model=kind, loss=float(loss))
      if config.save_params and run.workdir is not None:
        tree_io.save_tree_npz(run.workdir / params_file(kind, sigma), params)
      # (c) runs its N^2 self-attention as in training ("auto": the jnp reference on CPU, where
      # the interpreted kernel would walk an N^2 grid of blocks in Python).
      impl = config.eval_impl if kind == "two_stage" else config.impl
      eval_apply = model.build(kind, config.seed, impl=impl, abstract=True, **kwargs)[0]
      denoise = jax.jit(eval_apply)
      outputs[kind] = {}
      for name, noisy in noisy_test.items():
        out = np.asarray(denoise(params, tiles(noisy, config.tile)))
        outputs[kind][name] = untile(out, *noisy.shape[:2])
    measured = {m: scores(test_images, o) for m, o in outputs.items()}
    results[f"{sigma:g}"] = {
        "scores": {m: {n: {"psnr": p, "ssim": s} for n, (p, s) in v.items()}
                   for m, v in measured.items()},
        "mean_psnr": {m: float(np.mean([p for p, _ in v.values()])) for m, v in measured.items()},
        "mean_ssim": {m: float(np.mean([s for _, s in v.values()])) for m, v in measured.items()},
        "params": params_count}
    examples[sigma] = (test_images, outputs, measured)
  print(results_table(results))
  _plot_examples(run, examples)
  key = "25" if "25" in results else next(iter(results))
  mean = results[key]["mean_psnr"]
  model = next(m for m in ("two_stage", *config.models) if m in mean)  # a run may skip (a)
  origin = f"{config.steps} training steps"
  if config.init_params:
    origin = (f"params trained earlier, loaded from {config.init_params}; "
              + (f"then {origin}" if config.steps else "no training in this run"))
  best = max((m for m in mean if m != model), key=mean.get)
  return {
      "headline": {
          "metric": f"mean PSNR (dB), {model.replace('_', '-')}, sigma {key}", "value":
          mean[model],
          # The plain CNN when the run has it, else non-local means (always evaluated).
          "baseline": ("plain CNN, equal parameters" if "plain" in mean and model != "plain"
                       else "non-local means"),
          "baseline_value": mean["plain"] if "plain" in mean and model != "plain" else
          mean["nl_means"],
          "note": (f"{origin}; NL-means {mean['nl_means']:.2f}, noisy {mean['noisy']:.2f}"
                   + ("" if best == "nl_means" else f", best other ({best}) {mean[best]:.2f}")
                   + f" dB; held-out {config.test_size}^2 crops of "
                   f"{', '.join(data.TEST_IMAGES)}")},
      "results": results,
  }


PAPER_PAGE = "papers/nonlocal_cnn.md"


def paper_tables(result: dict) -> dict[str, str]:
  """The page's tables from a kept result: `denoising` (every method at every noise level) and
  `claims` (the two-stage model's margins, which the prose quotes)."""
  config, summary = result["config"], result["summary"]
  training = (f"{config['steps']} Adam steps x {config['batch_size']} patches of "
              f"{config['patch_size']}^2 per model")
  if config.get("init_params"):
    training = (f"params loaded from `{config['init_params']}`, "
                + (f"then {training}" if config["steps"] else "no training in this run"))
  setting = (f"Seed {config['seed']}, {training}; held-out {config['test_size']}^2 center "
             f"crops as {config['tile']}^2 tiles; {summary['seconds'] / 60:.1f} minutes of wall "
             "time in all.")
  return {"denoising": setting + "\n\n" + results_table(summary["results"]),
          "claims": claims_table(summary["results"])}


def claims_table(results: dict) -> str:
  """The readings the page's prose quotes: the two-stage model (a) against each other method."""
  rows = []
  for sigma, r in _by_sigma(results):
    if "two_stage" not in r["mean_psnr"]:
      continue
    ours = r["scores"]["two_stage"]
    for other in (m for m in METHODS if m in r["mean_psnr"] and m != "two_stage"):
      ahead = [n for n in sorted(ours) if ours[n]["psnr"] > r["scores"][other][n]["psnr"]]
      rows.append((sigma, other,
                   f"{r['mean_psnr']['two_stage'] - r['mean_psnr'][other]:+.2f}",
                   f"{r['mean_ssim']['two_stage'] - r['mean_ssim'][other]:+.3f}",
                   f"{len(ahead)} of {len(ours)}" + (f" ({', '.join(ahead)})" if ahead else "")))
  return records.write_markdown_table(
      ("sigma", "two-stage (a) vs", "mean PSNR difference (dB)", "mean SSIM difference",
       "images where (a) has the higher PSNR"), rows)


def _by_sigma(results: dict) -> list:
  """(sigma, result) in increasing noise (a kept result's keys are sorted as strings)."""
  return sorted(results.items(), key=lambda item: float(item[0]))


def results_table(results: dict) -> str:
  rows = []
  for sigma, r in _by_sigma(results):
    for method in METHODS:
      if method not in r["mean_psnr"]:
        continue
      per_image = ", ".join(f"{n} {v['psnr']:.2f}" for n, v in sorted(r["scores"][method].items()))
      rows.append((sigma, method, r["params"].get(method, "-"), f"{r['mean_psnr'][method]:.2f}",
                   f"{r['mean_ssim'][method]:.3f}", per_image))
  return records.write_markdown_table(
      ("sigma", "method", "params", "mean PSNR (dB)", "mean SSIM", "PSNR per image"), rows)


def _plot_examples(run, examples) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  for sigma, (clean, outputs, measured) in examples.items():
    name = next(iter(clean))
    methods = ["noisy"] + [m for m in METHODS if m in outputs and m != "noisy"]
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
    run.save_figure(f"examples_sigma{sigma:g}.png", fig)
    plt.close(fig)
