"""The one paper path: kept results under papers/results/, tables in the pages made from them.

A *kept result* is `papers/results/<key>.json`: what one run of an experiment (or a benchmark)
returned, with the command that made it, its config and the resolved package versions. A page
in papers/ shows a table only inside a marked block that names a kept result and a table:

    <!-- paper:kquant.digits_100_a0.1#results -->
    ...generated, never edited by hand...
    <!-- /paper:kquant.digits_100_a0.1#results -->

The block's text is `paper_tables(result)["results"]` of the module that made the result
(`experiments.kquant` here), preceded by one line giving the command and the result file. A key
may end in `*` to name every kept result it matches (in name order); the module's
`paper_tables(*results)` then receives all of them (ranges over runs come from kept runs).

  python -m experiments.run CONFIG [--set k=v ...] --paper KEY   # run, keep, fill KEY's blocks
  python -m experiments.bench_<name> --paper                     # benchmarks: the same
  python -m experiments.paper fill [KEY ...]    # rewrite blocks from kept results (all if none)
  python -m experiments.paper check             # exit 1 if any block differs from its result

`check` is also a test (tests/test_papers.py): a hand-edited cell fails it.
"""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import importlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from research.common import records
from research.common import versions as versions_lib

ROOT = Path(__file__).resolve().parent.parent
PAPERS = ROOT / "papers"
RESULTS = PAPERS / "results"
FORMAT = "meshwork.result/1"
_RESULT_KEY = r"[A-Za-z0-9_.\-]+"  # a kept result's key (its file name)
_KEY = r"[A-Za-z0-9_.\-*]+"        # a block's key: a result key, or a pattern ending in '*'
BLOCK = re.compile(rf"<!-- paper:(?P<key>{_KEY})#(?P<table>[A-Za-z0-9_.\-]+) -->\n"
                   rf"(?P<body>.*?)<!-- /paper:(?P=key)#(?P=table) -->", re.S)
# Blocks of the retired per-module plumbing; a page must not hold them any more.
LEGACY = re.compile(r"<!-- (table|bench|bench_\w+|anchors)(:[^ ]*)? -->")


class PaperError(ValueError):
  """A page block or kept result that does not fit the paper path."""


def _shown(path: Path) -> str:
  """A path as the messages show it: relative to the repository when inside it."""
  try:
    return str(path.resolve().relative_to(ROOT))
  except ValueError:
    return str(path)


def check_key(key: str) -> str:
  """A kept result's key. No '*': a result kept as 'fedavg.*' would be picked up by every
  block pattern it matches (and match other keys as a pattern itself); only block keys glob."""
  if not re.fullmatch(_RESULT_KEY, key) or key.startswith("."):
    raise PaperError(f"result key {key!r}: expected letters, digits, '_', '-', '.' "
                     "(e.g. kquant.digits_100_a0.1; '*' only in a page block's key)")
  return key


def result_path(key: str) -> Path:
  return RESULTS / f"{check_key(key)}.json"


def keep(key: str, *, module: str, page: str, command: str, summary: dict[str, Any],
         config: dict[str, Any] | None = None,
         environment: dict[str, Any] | None = None) -> Path:
  """Writes a kept result (atomically) and returns its path.

  `environment` defaults to this process's resolved package versions; pass it only when
  wrapping a result that another environment (e.g. a GPU machine) made.
  """
  result = {"format": FORMAT, "key": check_key(key), "module": module, "page": page,
            "command": command, "config": config, "summary": summary,
            "environment": (versions_lib.environment() if environment is None
                            else environment)}
  return records.atomic_write_json(result_path(key), result)


def load_result(key: str) -> dict[str, Any]:
  path = result_path(key)
  if not path.exists():
    raise PaperError(f"kept result {_shown(path)} does not exist")
  result = records.read_json(path)
  for field in ("format", "module", "page", "command", "summary"):
    if field not in result:
      raise PaperError(f"{_shown(path)}: missing field {field!r} (expected a "
                       f"{FORMAT} result written by experiments.paper.keep)")
  return result


def matching_keys(pattern: str) -> list[str]:
  """The kept results a block key names: itself, or every match of a key ending in '*'."""
  if "*" not in pattern:
    return [pattern]
  keys = sorted(p.stem for p in RESULTS.glob("*.json") if fnmatch.fnmatchcase(p.stem, pattern))
  if not keys:
    raise PaperError(f"block key {pattern!r} matches no kept result in papers/results/")
  return keys


def _tables_fn(module_name: str) -> Callable[..., dict[str, str]]:
  module = importlib.import_module(module_name)
  tables = getattr(module, "paper_tables", None)
  if not callable(tables):
    raise PaperError(f"{module_name} defines no paper_tables(result) -> {{name: markdown}}")
  return tables


def render(pattern: str, table: str) -> str:
  """The text of one block, made from the kept result(s) its key names."""
  results = [load_result(k) for k in matching_keys(pattern)]
  modules = {r["module"] for r in results}
  if len(modules) != 1:
    raise PaperError(f"block {pattern}#{table}: its results come from several modules "
                     f"{sorted(modules)}")
  tables = _tables_fn(modules.pop())(*results)
  if table not in tables:
    raise PaperError(f"block {pattern}#{table}: paper_tables gives only "
                     f"{sorted(tables)}")
  sources = ", ".join(f"`papers/results/{r['key']}.json`" for r in results)
  commands = "; ".join(dict.fromkeys(f"`{r['command']}`" for r in results))
  body = tables[table].rstrip("\n") + "\n"
  return f"<sub>From {sources}, made by {commands}.</sub>\n\n{body}"


@dataclass(frozen=True)
class Block:
  page: Path
  key: str
  table: str
  body: str


def blocks(pages: Iterable[Path] | None = None) -> list[Block]:
  found = []
  for page in sorted(pages or PAPERS.glob("*.md")):
    text = page.read_text(encoding="utf-8")
    legacy = LEGACY.search(text)
    if legacy:
      raise PaperError(f"{_shown(page)}: block {legacy.group(0)} is not a paper "
                       "block; use <!-- paper:KEY#TABLE --> with a kept result")
    for match in BLOCK.finditer(text):
      found.append(Block(page, match["key"], match["table"], match["body"]))
  return found


def check(pages: Iterable[Path] | None = None) -> list[str]:
  """Every block equals what its kept result regenerates; returns the differences."""
  problems = []
  for block in blocks(pages):
    where = f"{_shown(block.page)}: {block.key}#{block.table}"
    try:
      expected = render(block.key, block.table)
    except PaperError as error:
      problems.append(f"{where}: {error}")
      continue
    if block.body != expected:
      diff = "".join(difflib.unified_diff(expected.splitlines(True), block.body.splitlines(True),
                                          "regenerated", "page", n=0))
      problems.append(f"{where}: differs from its kept result\n{diff}")
  return problems


def fill(keys: Sequence[str] = (), pages: Iterable[Path] | None = None) -> list[str]:
  """Rewrites blocks (those whose key is in `keys`, or all) from their kept results."""
  written = []
  for page in sorted(pages or PAPERS.glob("*.md")):
    text = page.read_text(encoding="utf-8")

    def replace(match):
      # A key names a block when either is a glob matching the other ('kquant.*' or a block
      # key 'kquant.synthetic_*').
      if keys and not any(fnmatch.fnmatchcase(k, match["key"]) or
                          fnmatch.fnmatchcase(match["key"], k) for k in keys):
        return match.group(0)
      written.append(f"{_shown(page)}: {match['key']}#{match['table']}")
      return (f"<!-- paper:{match['key']}#{match['table']} -->\n"
              f"{render(match['key'], match['table'])}"
              f"<!-- /paper:{match['key']}#{match['table']} -->")

    new = BLOCK.sub(replace, text)
    if new != text:
      records.atomic_write_text(page, new)
  return written


def keep_and_fill(key: str, **result: Any) -> None:
  """What `--paper KEY` does after a run: keep the result, rewrite the blocks that name it."""
  path = keep(key, **result)
  print(f"kept result: {_shown(path)}")
  tables = _tables_fn(result["module"])(load_result(key))
  written = fill([key])
  for line in written:
    print(f"table written: {line}")
  page = result["page"]
  missing = [t for t in tables if not any(line.endswith(f"{key}#{t}") for line in written)]
  for table in missing:
    print(f"no block for table {table!r} in {page}; to show it, add\n"
          f"  <!-- paper:{key}#{table} -->\n  <!-- /paper:{key}#{table} -->")


def write_run_tables(run_dir: Path, tables: dict[str, str]) -> Path:
  """A run folder's tables.md: every table its module's paper_tables makes of the run."""
  return records.atomic_write_text(run_dir / "tables.md", "".join(
      f"## {name}\n\n{text}\n" for name, text in tables.items()))


def _paper_key_argument(text: str) -> str:
  try:
    return check_key(text)
  except PaperError as error:
    raise argparse.ArgumentTypeError(str(error)) from None


def add_paper_argument(parser: argparse.ArgumentParser, default_key: str) -> None:
  """The `--paper [KEY]` flag every benchmark takes (KEY defaults to `default_key`), checked
  before the benchmark runs."""
  parser.add_argument("--paper", nargs="?", const=default_key, default=None, metavar="KEY",
                      type=_paper_key_argument,
                      help=f"keep the result as papers/results/KEY.json (default KEY "
                           f"{default_key}) and fill the page's blocks that name it")


def finish_benchmark(name: str, page: str, summary: dict[str, Any], paper_key: str | None,
                     argv: Sequence[str], workdir: str | Path = "runs") -> Path:
  """A benchmark's results go the way an experiment's do.

  Writes `runs/<name>/<timestamp>/summary.json` and `tables.md` (from the module's
  `paper_tables`); with `--paper KEY` also keeps the result and fills the page. Returns the run
  folder.
  """
  from experiments import run as launcher  # pylint: disable=import-outside-toplevel
  module = f"experiments.{name}"
  summary = records.to_jsonable(summary)
  run_dir = launcher.new_run_dir(Path(workdir), name)
  records.atomic_write_json(run_dir / "summary.json", summary)
  write_run_tables(run_dir, _tables_fn(module)({"summary": summary, "config": None}))
  print(f"run folder: {run_dir}")
  if paper_key is not None:
    command = " ".join([f"python -m {module}", *argv])
    keep_and_fill(paper_key, module=module, page=page, command=command, summary=summary)
  return run_dir


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.paper", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  sub.add_parser("check", help="compare every block with its kept result")
  fill_parser = sub.add_parser("fill", help="rewrite blocks from kept results")
  fill_parser.add_argument("keys", nargs="*")
  args = parser.parse_args(argv)
  if args.command == "check":
    problems = check()
    for problem in problems:
      print(problem, file=sys.stderr)
    print(f"{len(blocks())} blocks, {len(problems)} differ")
    return 1 if problems else 0
  for line in fill(args.keys):
    print(f"written: {line}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
