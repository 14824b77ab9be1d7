"""Edge pipeline built at run time: the adaptive pipeline against every static one under a
background-load trace.

The run:
1. variants (research/edge/variants.py): trains 4 denoisers and 4 classifiers on the noisy
   digits task (or loads them from `params_file`);
2. scores: on a validation half of the test images, each variant's stage score (the log of its
   accuracy factor: a denoiser's is the reference classifier's accuracy on its output over that
   on the reference denoiser's output, a classifier's its accuracy on the reference denoiser's
   output; the references are each stage's last variant) and every combination's measured
   accuracy, to report how well the product model predicts it;
3. profiles (research/edge/profiles.py): latency p50 / p95 of one frame per variant, idle and
   while `profile.load_workers` busy processes run, and peak memory, cached under
   `profile.cache_dir` (rebuilt when a model, the machine or the data changes);
4. the trace: frames arrive every `trace.frame_period_ms`; background CPU load follows
   `trace.phases` ((seconds, busy processes), ...), real processes that spin and stop by
   themselves at the end of their phase. The adaptive pipeline (research/edge/pipeline.py:
   psutil readings, the selector, hysteresis) and each static pipeline on the Pareto front of
   the idle profile (a dominated one is less accurate and slower than another) each face the
   same trace in turn, on the other half of the test images.
Per method: accuracy, budget-violation rate (frames whose measured latency exceeds
`budget.latency_ms`), latency p50 / p95. The best static pipeline is the most accurate one whose
violation rate is below `max_violation_rate` (Chameleon's "best static configuration"); the
headline compares the adaptive pipeline's accuracy with it. Every adaptive output's metadata is
validated against the schema and written to outputs.jsonl.

  python -m experiments.run configs/edge/trace.py --paper edge.trace
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from research.common import config as config_lib
from research.common import records
from research.common import tree_io
from research.edge import pipeline as pipeline_lib
from research.edge import profiles as profiles_lib
from research.edge import resources as resources_lib
from research.edge import selector as selector_lib
from research.edge import variants as variants_lib

PAPER_PAGE = "papers/edge.md"


def config_schema() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "data": {"image_size": 16, "noise_sigma": 0.25, "frame_size": 128},
      "train": {"steps": 300, "batch_size": 64, "learning_rate": 3e-3},
      "params_file": "",            # trained variants (.npz) to load instead of training
      "profile": {"repeats": 40, "load_workers": 0,   # 0: one busy process per core
                  "gap_ms": 50.0,                     # idle time before each timed call
                  "cache_dir": "runs/edge_profiles"},
      "budget": {"latency_ms": 25.0, "memory_mb": 256.0, "headroom": 0.9,
                 "memory_fraction": 0.5},
      "runtime": {"band": 0.15, "alpha": 0.3, "on_infeasible": "degrade"},
      "trace": {"frame_period_ms": 50.0,
                "phases": ((4.0, 0), (4.0, 2), (4.0, 0), (4.0, 1))},
      # static baselines: "pareto" (the idle profile's Pareto front), "all", or "predicted" (the
      # two the selector picks from the profile for an idle and a fully loaded machine)
      "statics": "pareto",
      "max_violation_rate": 0.05,
  })


def validate_config(config) -> None:
  config_lib.check_positive(config, "data.image_size", "data.frame_size", "train.steps",
                            "train.batch_size", "train.learning_rate", "profile.repeats",
                            "budget.latency_ms", "budget.memory_mb", "budget.headroom",
                            "budget.memory_fraction", "trace.frame_period_ms")
  if config.data.image_size % 8 or config.data.image_size < 8:
    raise config_lib.ConfigError(f"config key 'data.image_size': got {config.data.image_size}, "
                                 "expected a multiple of 8 (the digits are 8x8)")
  if config.data.noise_sigma < 0:
    raise config_lib.ConfigError(f"config key 'data.noise_sigma': got "
                                 f"{config.data.noise_sigma}, expected >= 0")
  if config.profile.gap_ms < 0:
    raise config_lib.ConfigError(f"config key 'profile.gap_ms': got {config.profile.gap_ms}, "
                                 "expected >= 0")
  if config.profile.load_workers < 0:
    raise config_lib.ConfigError(f"config key 'profile.load_workers': got "
                                 f"{config.profile.load_workers}, expected >= 0 (0: one per core)")
  config_lib.check_choice(config, "runtime.on_infeasible", ("raise", "degrade"))
  config_lib.check_choice(config, "statics", ("pareto", "all", "predicted"))
  if not 0 <= config.runtime.band < 1:
    raise config_lib.ConfigError(f"config key 'runtime.band': got {config.runtime.band}, "
                                 "expected a fraction in [0, 1)")
  if not 0 < config.runtime.alpha <= 1:
    raise config_lib.ConfigError(f"config key 'runtime.alpha': got {config.runtime.alpha}, "
                                 "expected in (0, 1]")
  if not 0 < config.max_violation_rate < 1:
    raise config_lib.ConfigError(f"config key 'max_violation_rate': got "
                                 f"{config.max_violation_rate}, expected in (0, 1)")
  phases = config.trace.phases
  if not phases or any(not isinstance(p, (tuple, list)) or len(p) != 2 or not p[0] > 0
                       or int(p[1]) != p[1] or p[1] < 0 for p in phases):
    raise config_lib.ConfigError(f"config key 'trace.phases': got {phases!r}, expected "
                                 "((seconds > 0, busy processes >= 0), ...)")
  if config.params_file and not os.path.exists(config.params_file):
    raise config_lib.ConfigError(f"config key 'params_file': no file {config.params_file!r}")


# ---- background load: real processes that spin until their deadline -------------------------

_SPIN = "import time, sys\nend = float(sys.argv[1])\nwhile time.time() < end:\n  pass\n"


def start_busy(workers: int, seconds: float) -> list[subprocess.Popen]:
  """`workers` Python processes that each keep one core busy for `seconds`, then exit."""
  deadline = time.time() + seconds
  return [subprocess.Popen([sys.executable, "-c", _SPIN, repr(deadline)])
          for _ in range(workers)]


def stop_busy(processes: list[subprocess.Popen]) -> None:
  for process in processes:
    if process.poll() is None:
      process.kill()
  for process in processes:
    process.wait()


@contextlib.contextmanager
def busy_cpu(workers: int, seconds: float = 600.0):
  """Keeps `workers` cores busy inside the block; yields a function returning the background
  CPU fraction measured since the block began (psutil)."""
  processes = start_busy(workers, seconds)
  try:
    time.sleep(0.3)  # let the interpreters start and spin before anything is timed
    source = resources_lib.PsutilSource()
    yield lambda: source.read().cpu_background
  finally:
    stop_busy(processes)


# ---- variants, scores, profiles -----------------------------------------------------------

def load_params(path, catalogue, image_size: int) -> dict[str, Any]:
  """Variants kept by tree_io.save_tree_npz ({variant key: params}), checked leaf by leaf
  against the catalogue's architectures."""
  like = {spec.key: variants_lib.abstract(spec, image_size)[1]
          for stage in catalogue for spec in stage}
  try:
    return tree_io.load_tree_npz(path, like)
  except ValueError as error:
    raise config_lib.ConfigError(
        f"config key 'params_file': {error} (data.image_size and the variant catalogue must "
        "match the training run)") from None


def train_variants(config, catalogue, train: variants_lib.Frames, seed: int) -> dict[str, Any]:
  size, cfg = config.data.image_size, variants_lib.TrainConfig(**config.train.to_dict())
  params = {}
  for spec in catalogue[0]:
    params[spec.key], _ = variants_lib.train_denoiser(spec, train, size, cfg, seed)
  reference = catalogue[0][-1]
  apply, _ = variants_lib.abstract(reference, size)
  denoised = np.asarray(jax.jit(apply)(params[reference.key], train.noisy))
  # Classifiers see both raw noisy frames and denoised ones: any denoiser may precede them.
  images = np.concatenate([train.noisy, denoised])
  labels = np.concatenate([train.labels, train.labels])
  for spec in catalogue[1]:
    params[spec.key], _ = variants_lib.train_classifier(spec, images, labels, size, cfg, seed)
  return params


def combination_accuracy(compiled, images, labels, batch: int) -> np.ndarray:
  """Accuracy of every (denoiser, classifier) pair, shape (n_denoisers, n_classifiers), in
  batches of the frame size (the executables the trace uses; no compile for another shape)."""
  n = len(labels)
  padded = np.concatenate([np.asarray(images), np.asarray(images)[:(-n) % batch]])
  chunks = [jnp.asarray(padded[i:i + batch]) for i in range(0, len(padded), batch)]
  out = np.zeros((len(compiled[0]), len(compiled[1])))
  for i, den in enumerate(compiled[0]):
    denoised = [den.fn(den.params, chunk) for chunk in chunks]
    for j, cls in enumerate(compiled[1]):
      predicted = np.concatenate([np.argmax(np.asarray(cls.fn(cls.params, x)), -1)
                                  for x in denoised])[:n]
      out[i, j] = float(np.mean(predicted == np.asarray(labels)))
  return out


def stage_scores(accuracy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Log accuracy factors (module docstring): denoisers against the reference classifier,
  classifiers on the reference denoiser's output."""
  floor = 1e-6
  ref_den, ref_cls = accuracy.shape[0] - 1, accuracy.shape[1] - 1
  den = np.log(np.maximum(accuracy[:, ref_cls], floor) / max(accuracy[ref_den, ref_cls], floor))
  cls = np.log(np.maximum(accuracy[ref_den, :], floor))
  return den, cls


def profile_all(config, compiled, scores, frame, context) -> tuple[list, str]:
  """Profiles per stage (from the cache where valid) and what happened to the cache."""
  fingerprints = {c.spec.key: variants_lib.fingerprint(c.spec, config.data.image_size, c.params)
                  for row in compiled for c in row}
  path = os.path.join(config.profile.cache_dir, "profiles.json")
  cached, why = profiles_lib.load(path, fingerprints, context)
  workers = config.profile.load_workers or (os.cpu_count() or 1)
  out, measured = [], []
  for row, row_scores in zip(compiled, scores):
    stage = []
    for c, score in zip(row, row_scores):
      if c.spec.key in cached and math.isclose(cached[c.spec.key].score, float(score)):
        stage.append(cached[c.spec.key])
        continue
      stage.append(profiles_lib.measure(c.spec.stage, c.spec.name, c.fn, c.params, frame,
                                        float(score), config.profile.repeats,
                                        lambda: busy_cpu(workers),
                                        gap_s=config.profile.gap_ms / 1e3))
      measured.append(c.spec.key)
    out.append(stage)
  if measured:
    profiles_lib.save(path, {p.stage + "/" + p.name: p for row in out for p in row},
                      fingerprints, context)
  note = (f"cache {path}: {len(fingerprints) - len(measured)} reused, {len(measured)} profiled"
          + (f" ({why})" if why and measured else ""))
  return out, note


def pareto_statics(profiles) -> list[tuple[int, ...]]:
  """Combinations not dominated by another: slower on the idle machine, larger in memory and
  less accurate. Latency is the selector's prediction on the idle machine
  (`selector.pipeline_p95`: stages' medians plus the root-sum-square of their spreads)."""
  idle = selector_lib.Resources(0.0, math.inf, None, 1.0)
  combos = []
  for choice in itertools.product(*(range(len(r)) for r in profiles)):
    ps = [profiles[s][i] for s, i in enumerate(choice)]
    stages = [selector_lib.predict_stage(p, idle) for p in ps]
    latency = selector_lib.pipeline_p95(sum(p50 for p50, _ in stages),
                                        sum((p95 - p50) ** 2 for p50, p95 in stages))
    combos.append((choice, latency, sum(p.memory_mb for p in ps), sum(p.score for p in ps)))
  front = []
  for c in combos:
    if not any(o[1] <= c[1] and o[2] <= c[2] and o[3] >= c[3] and o[1:] != c[1:]
               for o in combos):
      front.append(c[0])
  return front


def static_baselines(kind: str, profiles, budget) -> list[tuple[int, ...]]:
  if kind == "pareto":
    return pareto_statics(profiles)
  if kind == "all":
    return [tuple(c) for c in np.ndindex(*(len(r) for r in profiles))]
  picks = []
  for background in (0.0, 1.0):
    reading = selector_lib.Resources(background, 1e9, None, 1.0)
    choice = selector_lib.select(profiles, budget, reading, "degrade").choice
    if choice not in picks:
      picks.append(choice)
  return picks


# ---- the trace ------------------------------------------------------------------------------

class TracePass:
  """One pass over the trace: frames at a fixed period, busy processes per phase. `clock` and
  `sleep` are the timer it paces frames with (a fake pair in tests)."""

  def __init__(self, phases, period_ms: float, clock=time.perf_counter, sleep=time.sleep):
    self.phases = [(float(s), int(w)) for s, w in phases]
    self.period = period_ms / 1e3
    self.duration = sum(s for s, _ in self.phases)
    self.frames = int(self.duration / self.period)
    self.clock, self.sleep = clock, sleep

  def phase_at(self, t: float) -> int:
    edge = 0.0
    for i, (seconds, _) in enumerate(self.phases):
      edge += seconds
      if t < edge:
        return i
    return len(self.phases) - 1

  def __iter__(self):
    start, phase, processes = self.clock(), -1, []
    try:
      for i in range(self.frames):
        target = start + i * self.period
        delay = target - self.clock()
        if delay > 0:
          self.sleep(delay)
        now = self.clock() - start
        current = self.phase_at(now)
        if current != phase:
          stop_busy(processes)
          phase = current
          end = sum(s for s, _ in self.phases[:phase + 1])
          processes = start_busy(self.phases[phase][1], max(end - now, 0.0))
        yield i, now, self.phases[phase][1]
    finally:
      stop_busy(processes)


def run_method(name, trace, compiled, profiles, budget, config, images, labels, run_ctx,
               choice=None, outputs=None) -> dict[str, Any]:
  """One method over the trace: the adaptive runtime (choice None) or a static pipeline."""
  source = resources_lib.PsutilSource()
  runtime = None
  if choice is None:
    runtime = pipeline_lib.EdgeRuntime(compiled, profiles, budget, source,
                                       band=config.runtime.band, alpha=config.runtime.alpha,
                                       on_infeasible=config.runtime.on_infeasible)
  else:
    stages = [row[i] for row, i in zip(compiled, choice)]
  f = config.data.frame_size
  rows = []
  for i, t, workers in trace:
    idx = (np.arange(f) + i * f) % len(labels)
    frame = images[idx]
    if runtime is not None:
      logits, info = runtime.process(frame)
      pipeline_lib.validate_metadata(info)
      measured, used = info["measured_ms"], tuple(runtime.state.selection.choice)
      background = info["resources"]["cpu_background"]
      if outputs is not None:
        outputs.write(json.dumps(info, sort_keys=True) + "\n")
    else:
      background = source.read().cpu_background
      logits, times = pipeline_lib.run_frame(stages, frame)
      measured, used = sum(times), choice
    correct = float(np.mean(np.argmax(np.asarray(logits), -1) == labels[idx]))
    rows.append({"t": t, "workers": workers, "background": background, "ms": measured,
                 "choice": list(used), "accuracy": correct})
  ms = np.array([r["ms"] for r in rows])
  summary = {"method": name, "frames": len(rows),
             "accuracy": float(np.mean([r["accuracy"] for r in rows])),
             "violation_rate": float(np.mean(ms > budget.latency_ms)),
             "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
             "max_ms": float(ms.max())}
  if runtime is not None:
    summary["selections"] = runtime.state.selections
  run_ctx.log(len(rows), **{k: v for k, v in summary.items() if k != "method"}, method=name)
  return {"summary": summary, "frames": rows}


def run(config, run_ctx) -> dict[str, Any]:
  catalogue = variants_lib.DEFAULT_VARIANTS
  size = config.data.image_size
  train, test = variants_lib.digit_frames(size, config.data.noise_sigma, config.seed,
                                          test_fraction=0.4)
  half = len(test.labels) // 2
  val_x, val_y = jnp.asarray(test.noisy[:half]), jnp.asarray(test.labels[:half])
  trace_x, trace_y = test.noisy[half:], test.labels[half:]

  start = time.perf_counter()
  if config.params_file:
    params = load_params(config.params_file, catalogue, size)
  else:
    params = train_variants(config, catalogue, train, config.seed)
  train_seconds = time.perf_counter() - start
  if run_ctx.workdir is not None and not config.params_file:
    tree_io.save_tree_npz(run_ctx.workdir / "variants.npz", params)
  compiled = pipeline_lib.compile_variants(catalogue, params, size)

  accuracy = combination_accuracy(compiled, val_x, val_y, config.data.frame_size)
  scores = stage_scores(accuracy)
  predicted = np.exp(scores[0][:, None] + scores[1][None, :])
  frame = jnp.asarray(trace_x[:config.data.frame_size])
  context = {"image_size": size, "noise_sigma": config.data.noise_sigma,
             "frame_size": config.data.frame_size, "seed": config.seed,
             "repeats": config.profile.repeats, "gap_ms": config.profile.gap_ms}
  profiles, cache_note = profile_all(config, compiled, scores, frame, context)
  print(cache_note, flush=True)

  budget = selector_lib.Budget(**config.budget.to_dict())
  statics = static_baselines(config.statics, profiles, budget)
  methods = [("adaptive", None)] + [("+".join(profiles[s][i].name for s, i in enumerate(c)), c)
                                    for c in statics]
  results = {}
  outputs_path = run_ctx.workdir / "outputs.jsonl" if run_ctx.workdir is not None else None
  with (open(outputs_path, "w", encoding="utf-8") if outputs_path else
        contextlib.nullcontext()) as outputs:
    for name, choice in run_ctx.progress(methods, description="trace passes"):
      trace = TracePass(config.trace.phases, config.trace.frame_period_ms)
      results[name] = run_method(name, trace, compiled, profiles, budget, config, trace_x,
                                 trace_y, run_ctx, choice=choice, outputs=outputs)

  per_method = {name: r["summary"] for name, r in results.items()}
  meeting = [s for name, s in per_method.items()
             if name != "adaptive" and s["violation_rate"] < config.max_violation_rate]
  best_static = max(meeting, key=lambda s: (s["accuracy"], -s["p95_ms"])) if meeting else None
  adaptive = per_method["adaptive"]
  if run_ctx.workdir is not None:
    plot(run_ctx, config, results, best_static, budget)
  return {
      "headline": {"metric": "accuracy at the latency budget, adaptive",
                   "value": adaptive["accuracy"], "baseline": "best static pipeline",
                   "baseline_value": best_static["accuracy"] if best_static else float("nan"),
                   "note": "; ".join(
                       f"{name} {s['accuracy']:.4f}, {s['violation_rate'] * 100:.1f} % over "
                       "budget" for name, s in per_method.items())
                       + f" (static pipelines under {config.max_violation_rate:.0%} over "
                       "budget count as meeting it)"},
      "methods": per_method,
      "best_static": best_static["method"] if best_static else None,
      "profiles": [[p._asdict() for p in row] for row in profiles],
      "profile_cache": cache_note,
      "validation_accuracy": accuracy.tolist(),
      "predicted_accuracy": predicted.tolist(),
      "prediction_max_abs_error": float(np.max(np.abs(predicted - accuracy))),
      "budget": budget._asdict(),
      "trace": {"phases": [list(p) for p in config.trace.phases],
                "frame_period_ms": config.trace.frame_period_ms,
                "frames": TracePass(config.trace.phases, config.trace.frame_period_ms).frames},
      "adaptive_frames": [{k: r[k] for k in ("t", "workers", "background", "ms", "choice")}
                          for r in results["adaptive"]["frames"]],
      "train_seconds": train_seconds,
      "machine": profiles_lib.machine(),
  }


def plot(run_ctx, config, results, best_static, budget) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
  adaptive = results["adaptive"]["frames"]
  t = [r["t"] for r in adaptive]
  shown = [("adaptive", "tab:blue")]
  if best_static is not None:
    shown.append((best_static["method"], "tab:orange"))
  for name, colour in shown:
    frames = results[name]["frames"]
    axes[0].plot([r["t"] for r in frames], [r["ms"] for r in frames], ".", ms=3, color=colour,
                 label=name)
  axes[0].axhline(budget.latency_ms, color="k", lw=1, ls="--", label="budget")
  axes[0].set_ylabel("frame latency (ms)")
  axes[0].legend(fontsize=7)
  for stage, label in enumerate(("denoiser", "classifier")):
    axes[1].step(t, [r["choice"][stage] + 0.1 * stage for r in adaptive], where="post",
                 label=label)
  axes[1].set_ylabel("variant index (0 smallest)")
  axes[1].legend(fontsize=7)
  axes[2].plot(t, [r["background"] for r in adaptive], label="background CPU (psutil)")
  axes[2].step(t, [r["workers"] / (os.cpu_count() or 1) for r in adaptive], where="post",
               label="busy processes / cores")
  axes[2].set_ylabel("fraction")
  axes[2].set_xlabel("time in the trace (s)")
  axes[2].legend(fontsize=7)
  fig.suptitle("adaptive edge pipeline under a background-load trace")
  fig.tight_layout()
  run_ctx.save_figure("edge", fig)
  plt.close(fig)


def paper_tables(*results) -> dict[str, str]:
  tables = {}
  rows, profile_rows, goal_rows = [], [], []
  for result in results:
    s = result["summary"]
    for name, m in sorted(s["methods"].items(), key=lambda kv: (kv[0] != "adaptive",
                                                                  -kv[1]["accuracy"])):
      tag = " (best static)" if name == s["best_static"] else ""
      rows.append((name + tag, f"{m['accuracy']:.3f}", f"{m['violation_rate'] * 100:.1f}",
                   f"{m['p50_ms']:.2f}", f"{m['p95_ms']:.2f}", f"{m['frames']}"))
    for row in s["profiles"]:
      for p in row:
        profile_rows.append((p["stage"], p["name"], f"{p['p50_ms']:.2f}", f"{p['p95_ms']:.2f}",
                             f"{p['loaded_p50_ms']:.2f}", f"{p['loaded_p95_ms']:.2f}",
                             f"{p['loaded_fraction']:.2f}",
                             f"{p['memory_mb']:.2f}", f"{math.exp(p['score']):.3f}"))
    adaptive = s["methods"]["adaptive"]
    best = s["methods"].get(s["best_static"]) if s["best_static"] else None
    run = result.get("key", "")
    goal_rows.append((run, "adaptive accuracy vs the best static pipeline within the budget",
                      f"{adaptive['accuracy']:.3f} vs "
                      + (f"{best['accuracy']:.3f} ({s['best_static']})" if best else "none"),
                      "higher", "met" if best and adaptive["accuracy"] > best["accuracy"]
                      else "not met"))
    max_rate = result["config"]["max_violation_rate"]  # the goal the run was made against
    goal_rows.append((run, "adaptive budget-violation rate",
                      f"{adaptive['violation_rate'] * 100:.1f} %", f"< {max_rate * 100:g} %",
                      "met" if adaptive["violation_rate"] < max_rate else "not met"))
  combo_rows = []
  for result in results:
    s = result["summary"]
    names = [[p["name"] for p in row] for row in s["profiles"]]
    for i, den in enumerate(names[0]):
      for j, cls in enumerate(names[1]):
        combo_rows.append((f"{den}+{cls}", f"{s['validation_accuracy'][i][j]:.3f}",
                           f"{s['predicted_accuracy'][i][j]:.3f}"))
  tables["combinations"] = records.write_markdown_table(
      ("pipeline", "validation accuracy (measured)", "product of stage factors (selector)"),
      combo_rows)
  header = ("pipeline", "accuracy", "frames over budget (%)", "latency p50 (ms)",
            "latency p95 (ms)", "frames")
  tables["results"] = records.write_markdown_table(header, rows)
  tables["profiles"] = records.write_markdown_table(
      ("stage", "variant", "p50 (ms)", "p95 (ms)", "p50 loaded (ms)", "p95 loaded (ms)",
       "background when loaded",
       "memory (MB)", "accuracy factor"), profile_rows)
  tables["goals"] = records.write_markdown_table(("kept run", "measure", "value", "goal",
                                                  "status"), goal_rows)
  return tables
