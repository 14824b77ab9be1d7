"""Wall time of each module's default tests (what `make test` runs, `slow` left out), one pytest
process per module, so that "a module's default tests stay under 90 s on 2 cores" is a measured
line and not a guess.

  python scripts/module_test_times.py [--out papers/results/module_test_times.cpu.txt]

A module's tests are tests/<module>/ plus tests/experiments/test_<module>.py and
tests/experiments/test_bench_<module>.py where they exist; `foundation` is everything else
(tests/common, the top-level tests, the launcher's multi-process check, the demo). The FHE
module runs in .venv-fhe as `make test-fhe` does (its experiment test in .venv, as `make
test-main` does). Each time includes its pytest process's start (imports, jax's first
compiles): a module forked alone pays it too. The table is written to a temporary name and
renamed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAIN, FHE = ROOT / ".venv" / "bin" / "python", ROOT / ".venv-fhe" / "bin" / "python"
LIMIT_S = 90.0  # the issues' per-module budget for default tests on 2 cores


def module_paths() -> dict[str, list[tuple[Path, list[str]]]]:
  """module -> [(python, pytest arguments)], covering every test file of the default suites."""
  tests = ROOT / "tests"
  modules = sorted(p.name for p in tests.iterdir()
                   if p.is_dir() and p.name not in ("experiments", "common", "__pycache__"))
  experiment_tests = {p.name for p in (tests / "experiments").glob("test_*.py")}
  claimed: set[str] = set()
  plan: dict[str, list[tuple[Path, list[str]]]] = {}
  for module in modules:
    extra = [f"tests/experiments/{name}" for name in
             (f"test_{module}.py", f"test_bench_{module}.py") if name in experiment_tests]
    claimed.update(Path(e).name for e in extra)
    if module == "fhe":
      plan[module] = [(FHE, [f"tests/{module}", "-p", "no:cacheprovider"])]
      if extra:
        plan[module].append((MAIN, extra))
    else:
      plan[module] = [(MAIN, [f"tests/{module}", *extra])]
  rest = ["tests/common", *(str(p.relative_to(ROOT)) for p in sorted(tests.glob("test_*.py"))),
          *(f"tests/experiments/{n}" for n in sorted(experiment_tests - claimed))]
  plan["foundation"] = [(MAIN, rest)]
  return plan


def run_pytest(python: Path, args: list[str]) -> tuple[float, str]:
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  start = time.perf_counter()
  done = subprocess.run([str(python), "-m", "pytest", "-q", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, check=False)
  seconds = time.perf_counter() - start
  lines = [l for l in done.stdout.splitlines() if re.search(r"\d+ (passed|failed|error)", l)]
  outcome = lines[-1].strip("= ") if lines else f"exit {done.returncode}"
  if done.returncode not in (0, 5):
    sys.stderr.write(done.stdout[-4000:] + done.stderr[-2000:])
  return seconds, outcome


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", type=Path, default=ROOT / "papers/results/module_test_times.cpu.txt")
  args = parser.parse_args(argv)
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=False).stdout.strip()
  rows, failed = [], False
  for module, runs in module_paths().items():
    seconds, outcomes = 0.0, []
    for python, pytest_args in runs:
      s, outcome = run_pytest(python, pytest_args)
      seconds += s
      outcomes.append(outcome)
      failed |= "failed" in outcome or "error" in outcome or outcome.startswith("exit")
    verdict = "under" if seconds < LIMIT_S else "OVER"
    rows.append(f"| {module} | {seconds:.1f} | {verdict} {LIMIT_S:.0f} s | {'; '.join(outcomes)} |")
    print(rows[-1], flush=True)
  header = (f"# Default tests per module (python scripts/module_test_times.py), "
            f"{datetime.date.today().isoformat()}, commit {commit}, {os.cpu_count()} cores, "
            "one pytest process per module, nothing else running\n\n"
            "| module | seconds | budget | pytest |\n|---|---|---|---|\n")
  args.out.parent.mkdir(parents=True, exist_ok=True)
  tmp = args.out.with_name(args.out.name + ".tmp")
  tmp.write_text(header + "\n".join(rows) + "\n", encoding="utf-8")
  tmp.replace(args.out)
  print(f"written: {args.out}")
  return 1 if failed else 0


if __name__ == "__main__":
  raise SystemExit(main())
