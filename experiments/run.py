"""The launcher: `python -m experiments.run CONFIG [--set key=value ...]`.

Loads and validates the config against the experiment's schema (nothing runs before that
succeeds), initializes jax (one process, N local processes on CPU, or a cluster's processes),
creates `runs/<experiment>/<timestamp>/`, runs `experiments.<name>.run(config, run)`, and writes
the resolved config (config.json), metrics (metrics.jsonl), summary.json and the experiment's
plots there, each written atomically.

  python -m experiments.run configs/fedavg/digits.py --set rounds=20
  python -m experiments.run configs/data_parallel/smoke.py --processes 2 --cpu-devices 2
  srun python -m experiments.run CONFIG --cluster        # SLURM / TPU pod / MPI: auto-detected
  python -m experiments.run CONFIG --coordinator HOST:PORT --num-processes N --process-id I
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from research.common import config as config_lib
from research.common import mesh as mesh_lib
from research.common import records
from research.common import versions

HEADLINE_KEYS = ("metric", "value", "baseline", "baseline_value")


def available_experiments() -> list[str]:
  here = Path(__file__).parent
  return sorted(m.name for m in pkgutil.iter_modules([str(here)])
                if not m.name.startswith(("_", "bench_")) and m.name not in ("run", "demo", "paper"))


def experiment_module(name: str):
  """Imports `experiments.<name>`, which must define `config_schema()` and `run(config, run)`
  (and may define `validate_config(config)`)."""
  if name not in available_experiments():
    raise config_lib.ConfigError(f"config key 'experiment': got {name!r}, expected one of "
                                 + ", ".join(available_experiments()))
  module = importlib.import_module(f"experiments.{name}")
  for attribute in ("config_schema", "run"):
    if not callable(getattr(module, attribute, None)):
      raise config_lib.ConfigError(f"experiments/{name}.py defines no {attribute}()")
  return module


def load(config_path: str, overrides: Sequence[str] = ()):
  """Loads, validates and locks a config; returns (config, experiment module).

  Validation is the schema's keys and types, then the experiment's own `validate_config(config)`
  (value ranges, choices), if it defines one.
  """
  given = config_lib.load_config_file(config_path)
  config = config_lib.resolve(given, overrides,
                              lambda name: experiment_module(name).config_schema())
  module = experiment_module(config.experiment)
  if hasattr(module, "validate_config"):
    module.validate_config(config)
  return config, module


class Run:
  """What an experiment sees of the launcher: logging, progress, figures, its folder.

  Only the main process (jax process 0) writes files and draws progress; on the others every
  method is a no-op apart from iterating.
  """

  def __init__(self, workdir: Path | None, is_main: bool = True):
    self.workdir = workdir
    self.is_main = is_main and workdir is not None
    self._metrics = records.MetricsWriter(workdir / "metrics.jsonl") if self.is_main else None
    self._progress = None
    self._task = None

  def log(self, step: int, **metrics: Any) -> None:
    """Appends one metrics record (JSON line) and shows it on the progress bar."""
    if not self.is_main:
      return
    record = self._metrics.write(step, **metrics)
    if self._progress is not None:
      shown = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in record.items() if k != "step")
      self._progress.update(self._task, metrics=shown)

  def progress(self, iterable: Iterable, total: int | None = None,
               description: str = "steps") -> Iterator:
    """Iterates with a progress bar that shows the latest logged metrics."""
    if not self.is_main:
      yield from iterable
      return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,  # pylint: disable=import-outside-toplevel
                               TimeElapsedColumn, TimeRemainingColumn)
    from rich.console import Console  # pylint: disable=import-outside-toplevel
    if total is None and hasattr(iterable, "__len__"):
      total = len(iterable)
    console = Console()
    if not console.is_terminal:  # logs and CI: wide enough for the bar and the metrics
      console = Console(width=140)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"),
                  console=console, transient=False) as progress:
      self._progress, self._task = progress, progress.add_task(description, total=total,
                                                               metrics="")
      try:
        for item in iterable:
          yield item
          progress.advance(self._task)
      finally:
        self._progress = self._task = None

  def save_figure(self, name: str, figure: Any) -> Path | None:
    """Saves a matplotlib figure as <workdir>/<name> (PNG unless the name says otherwise)."""
    if not self.is_main:
      return None
    name = name if Path(name).suffix else f"{name}.png"
    return records.atomic_save_figure(self.workdir / name, figure)

  def save_text(self, name: str, text: str) -> Path | None:
    """Writes a text artifact (e.g. a markdown table) as <workdir>/<name>, atomically."""
    if not self.is_main:
      return None
    return records.atomic_write_text(self.workdir / name, text)

  def close(self) -> None:
    if self._metrics is not None:
      self._metrics.close()


def new_run_dir(root: Path, experiment: str) -> Path:
  base = root / experiment / time.strftime("%Y%m%d-%H%M%S")
  for suffix in [""] + [f"-{i}" for i in range(1, 1000)]:
    path = base.with_name(base.name + suffix)
    try:
      path.mkdir(parents=True, exist_ok=False)
      return path
    except FileExistsError:
      continue
  raise RuntimeError(f"could not create a run folder under {base.parent}")


def check_summary(summary: Any, experiment: str) -> dict[str, Any]:
  if not isinstance(summary, dict) or not isinstance(summary.get("headline"), dict) or \
      any(k not in summary["headline"] for k in HEADLINE_KEYS):
    raise TypeError(f"experiments/{experiment}.py run() must return a dict with a 'headline' "
                    f"dict holding {HEADLINE_KEYS}; got {summary!r}")
  return summary


def _init_distributed(args) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  if args.coordinator is None and not args.cluster:
    return
  # Cross-process collectives between CPU devices go through gloo (no effect on GPU/TPU devices).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if args.cluster:
    jax.distributed.initialize()  # SLURM, TPU pods, Open MPI: jax reads the cluster environment
  else:
    if args.num_processes is None or args.process_id is None:
      raise SystemExit("--coordinator needs --num-processes and --process-id")
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)


def run_in_this_process(args) -> dict[str, Any]:
  if args.cpu_devices is not None:
    mesh_lib.set_cpu_device_count(args.cpu_devices)
  config, module = load(args.config, args.set)
  _init_distributed(args)
  import jax  # pylint: disable=import-outside-toplevel
  is_main = jax.process_index() == 0
  workdir = None
  if is_main:
    workdir = Path(args.run_dir) if args.run_dir else new_run_dir(Path(args.workdir),
                                                                    config.experiment)
    workdir.mkdir(parents=True, exist_ok=True)
    # The resolved config, plus the package versions it ran with (not a config key).
    records.atomic_write_json(workdir / "config.json",
                              dict(config.to_dict(), environment=versions.environment()))
    print(f"run folder: {workdir}", flush=True)
  run = Run(workdir, is_main)
  start = time.perf_counter()
  try:
    summary = check_summary(module.run(config, run), config.experiment)
  finally:
    run.close()
  summary = dict(summary, seconds=round(time.perf_counter() - start, 3),
                 config_file=str(args.config), processes=jax.process_count(),
                 devices=jax.device_count(), backend=jax.default_backend())
  if is_main:
    records.atomic_write_json(workdir / "summary.json", summary)
    if callable(getattr(module, "paper_tables", None)):
      from experiments import paper  # pylint: disable=import-outside-toplevel
      paper.write_run_tables(workdir, module.paper_tables(
          {"config": config.to_dict(), "summary": records.to_jsonable(summary)}))
    headline = summary["headline"]
    print(f"{config.experiment}: {headline['metric']} = {headline['value']:.4g} "
          f"({headline['baseline']}: {headline['baseline_value']:.4g}) in "
          f"{summary['seconds']:.1f} s", flush=True)
  return dict(records.to_jsonable(summary), run_dir=str(workdir) if workdir else None)


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_local_processes(args) -> dict[str, Any]:
  """Starts `--processes N` copies of this launcher as one multi-controller jax job on CPU."""
  config, _ = load(args.config, args.set)  # fail fast, before starting anything
  run_dir = Path(args.run_dir) if args.run_dir else new_run_dir(Path(args.workdir),
                                                                  config.experiment)
  coordinator = f"127.0.0.1:{_free_port()}"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  mesh_lib.set_cpu_device_count(args.cpu_devices or 1, env)
  children = []
  try:
    for process_id in range(args.processes):
      command = [sys.executable, "-m", "experiments.run", str(args.config), "--workdir",
                 str(args.workdir), "--run-dir", str(run_dir), "--coordinator", coordinator,
                 "--num-processes", str(args.processes), "--process-id", str(process_id)]
      for override in args.set:
        command += ["--set", override]
      children.append(subprocess.Popen(command, env=env))
    while True:
      codes = [child.poll() for child in children]
      failed = next((i for i, code in enumerate(codes) if code not in (None, 0)), None)
      if failed is not None:
        # The others may be blocked in a collective waiting for it: stop them.
        raise SystemExit(f"process {failed} of {args.processes} exited with code "
                         f"{codes[failed]}; run folder {run_dir}")
      if all(code == 0 for code in codes):
        break
      time.sleep(0.1)
  finally:
    for child in children:
      if child.poll() is None:
        child.kill()
  return dict(records.read_json(run_dir / "summary.json"), run_dir=str(run_dir))


def _shell_word(text: str) -> str:
  """`text` as one shell word: bare when safe, else in double quotes when that suffices."""
  quoted = shlex.quote(text)
  if quoted == text or any(c in text for c in '"$`\\!'):
    return quoted
  return f'"{text}"'


def command_line(args) -> str:
  """The command that reproduces a run (what a kept result records)."""
  words = ["python -m experiments.run", str(args.config)]
  words += [f"--set {_shell_word(override)}" for override in args.set]
  if args.processes > 1:
    words += [f"--processes {args.processes}"]
  if args.cpu_devices is not None:
    words += [f"--cpu-devices {args.cpu_devices}"]
  return " ".join(words + [f"--paper {args.paper}"])


def keep_for_paper(args, summary: dict[str, Any]) -> None:
  """`--paper KEY`: keep the run as papers/results/KEY.json and fill the blocks naming it."""
  from experiments import paper  # pylint: disable=import-outside-toplevel
  run_dir = Path(summary["run_dir"])
  config = records.read_json(run_dir / "config.json")
  config.pop("environment", None)
  module = experiment_module(config["experiment"])
  page = getattr(module, "PAPER_PAGE", None)
  if page is None or not callable(getattr(module, "paper_tables", None)):
    raise config_lib.ConfigError(f"--paper: experiments/{config['experiment']}.py defines no "
                                 "PAPER_PAGE and paper_tables(result); it has no paper page")
  kept = {k: v for k, v in summary.items() if k != "run_dir"}  # a local path
  paper.keep_and_fill(args.paper, module=module.__name__, page=page,
                      command=command_line(args), summary=kept, config=config)


def parse_args(argv: Sequence[str] | None):
  parser = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("config", help="config file, e.g. configs/fedavg/digits.py")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key (dotted for sections); repeatable")
  parser.add_argument("--workdir", default="runs", help="root of run folders (default: runs)")
  parser.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--cpu-devices", type=int, default=None,
                      help="CPU devices per process (sets XLA_FLAGS before jax starts)")
  parser.add_argument("--processes", type=int, default=1,
                      help="start N local processes as one multi-process jax job on CPU")
  parser.add_argument("--cluster", action="store_true",
                      help="initialize jax.distributed from the cluster environment")
  parser.add_argument("--coordinator", default=None, help="coordinator address HOST:PORT")
  parser.add_argument("--num-processes", type=int, default=None)
  parser.add_argument("--process-id", type=int, default=None)
  parser.add_argument("--paper", default=None, metavar="KEY",
                      help="keep the result as papers/results/KEY.json and fill the page's "
                           "blocks that name KEY (see experiments/paper.py)")
  args = parser.parse_args(argv)
  if args.paper is not None:
    from experiments import paper  # pylint: disable=import-outside-toplevel
    try:
      paper.check_key(args.paper)
    except paper.PaperError as error:
      parser.error(f"--paper: {error}")
  if args.processes < 1:
    parser.error(f"--processes={args.processes}: expected a positive int")
  if args.cpu_devices is not None and args.cpu_devices < 1:
    parser.error(f"--cpu-devices={args.cpu_devices}: expected a positive int")
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.processes > 1:
    summary = run_local_processes(args)
  else:
    summary = run_in_this_process(args)
  if args.paper is not None and summary.get("run_dir"):
    keep_for_paper(args, summary)
  return summary


if __name__ == "__main__":
  try:
    main()
  except config_lib.ConfigError as error:
    print(f"config error: {error}", file=sys.stderr)
    sys.exit(2)
