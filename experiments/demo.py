"""The main job (`make demo`): every registered experiment's smoke config, one summary table.

An experiment is registered by having `configs/<system>/smoke.py`. Each runs through the launcher
in this process (8 CPU devices unless XLA_FLAGS says otherwise); the table (system, headline
metric, value, baseline, ratio, seconds) is printed and written to runs/demo/summary.md.

  python -m experiments.demo [--workdir runs] [--only fedavg,data_parallel]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

from research.common import mesh as mesh_lib
from research.common import records

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"
HEADER = ("system", "headline metric", "value", "baseline", "baseline value", "ratio", "seconds",
          "note")


def smoke_configs(only: set[str] | None = None) -> list[Path]:
  found = sorted(CONFIG_ROOT.glob("*/smoke.py"))
  if only:
    unknown = only - {p.parent.name for p in found}
    if unknown:
      raise SystemExit(f"--only names unknown systems {sorted(unknown)}; known: "
                       + ", ".join(p.parent.name for p in found))
    found = [p for p in found if p.parent.name in only]
  return found


def table_row(system: str, summary: dict) -> tuple:
  headline = summary["headline"]
  value, baseline_value = float(headline["value"]), float(headline["baseline_value"])
  ratio = value / baseline_value if baseline_value else float("nan")
  return (system, headline["metric"], f"{value:.4g}", headline["baseline"],
          f"{baseline_value:.4g}", f"{ratio:.3f}", f"{summary['seconds']:.1f}",
          headline.get("note", ""))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.demo", description=__doc__)
  parser.add_argument("--workdir", default="runs")
  parser.add_argument("--only", default="", help="comma-separated systems to run")
  args = parser.parse_args(argv)
  if "XLA_FLAGS" not in os.environ or "device_count" not in os.environ["XLA_FLAGS"]:
    mesh_lib.set_cpu_device_count(8)
  from experiments import run as launcher  # pylint: disable=import-outside-toplevel

  rows, failures = [], []
  start = time.perf_counter()
  for config in smoke_configs({s for s in args.only.split(",") if s}):
    system = config.parent.name
    print(f"\n== {system}: {config.relative_to(CONFIG_ROOT.parent)}", flush=True)
    try:
      summary = launcher.main([str(config), "--workdir", args.workdir])
      rows.append(table_row(system, summary))
    except Exception:  # pylint: disable=broad-except
      traceback.print_exc()
      failures.append(system)
      rows.append((system, "FAILED", "", "", "", "", "", ""))

  markdown = (f"# meshwork demo\n\nEvery registered experiment's smoke config "
              f"(`python -m experiments.demo`), {time.perf_counter() - start:.0f} s in all.\n\n"
              + records.write_markdown_table(HEADER, rows))
  path = records.atomic_write_text(Path(args.workdir) / "demo" / "summary.md", markdown)
  _print_table(rows)
  print(f"table written to {path}")
  if failures:
    print(f"failed: {', '.join(failures)}", file=sys.stderr)
    return 1
  return 0


def _print_table(rows) -> None:
  from rich.console import Console  # pylint: disable=import-outside-toplevel
  from rich.table import Table  # pylint: disable=import-outside-toplevel

  table = Table(title="meshwork demo")
  for column in HEADER:
    table.add_column(column, justify="right" if column in ("value", "baseline value", "ratio",
                                                           "seconds") else "left")
  for row in rows:
    table.add_row(*row)
  Console(width=max(140, Console().width)).print(table)


if __name__ == "__main__":
  sys.exit(main())
