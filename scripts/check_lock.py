"""Is a lock file in step with the spec it was made from?  Standard library (+ pip's packaging).

    python3 scripts/check_lock.py LOCK            exit 1 (and say why) when LOCK is stale
    python3 scripts/check_lock.py --digest INPUT...   print the digest of the lock's inputs

`scripts/lock.sh` writes two header lines into every lock it makes:

    # meshwork-lock-inputs: pyproject.toml[dev] scripts/lock-build.in
    # meshwork-lock-digest: sha256:<hex>

The digest covers what the resolver read from each input: for `pyproject.toml[EXTRA,...]` its
`requires-python`, `[project] dependencies` and the named optional-dependency lists; for a
requirements file its requirement lines (comments and blank lines dropped). Comments, the
pytest section and the rest of pyproject.toml are not in it.

The check (run by `make venv` / `make venv-fhe` before anything is installed):
- every requirement of the inputs (whose marker holds here) must be pinned in the lock, at a
  version its specifier allows; otherwise it fails, naming them: run `make lock`;
- when all are satisfied but the digest differs (a requirement removed, a bound loosened, a
  line reworded), it only warns: the lock still installs a valid environment, `make lock`
  tidies it;
- when the lock was made for another Python minor version than the running one, it warns.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tomllib
from pathlib import Path

INPUTS_KEY = "# meshwork-lock-inputs:"
DIGEST_KEY = "# meshwork-lock-digest:"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")
PYVER = re.compile(r"--python-version[ =](\d+\.\d+)")


def _norm_name(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_lines(path: Path) -> list[str]:
  lines = []
  for raw in path.read_text().splitlines():
    line = raw.split(" #", 1)[0].strip()
    if line and not line.startswith(("#", "-")):
      lines.append(line)
  return lines


def _split_input(spec: str) -> tuple[Path, list[str]]:
  match = re.fullmatch(r"(.+?)(?:\[([^\]]*)\])?", spec)
  path, extras = match.group(1), match.group(2)
  return Path(path), [e.strip() for e in extras.split(",")] if extras else []


def requirements_of(spec: str, root: Path) -> tuple[object, list[str]]:
  """(what the digest covers, the requirement strings) of one input, e.g. pyproject.toml[dev]."""
  path, extras = _split_input(spec)
  path = root / path
  if path.name == "pyproject.toml":
    project = tomllib.loads(path.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    missing = [e for e in extras if e not in optional]
    if missing:
      raise SystemExit(f"check_lock: {path} has no optional-dependencies {missing}")
    reqs = list(project.get("dependencies", [])) + [r for e in extras for r in optional[e]]
    covered = {"requires-python": project.get("requires-python"),
               "dependencies": sorted(" ".join(r.split()) for r in project.get("dependencies", [])),
               **{f"extra:{e}": sorted(" ".join(r.split()) for r in optional[e]) for e in extras}}
    return covered, reqs
  reqs = _requirement_lines(path)
  return sorted(" ".join(r.split()) for r in reqs), reqs


def digest(inputs: list[str], root: Path) -> str:
  covered = {spec: requirements_of(spec, root)[0] for spec in inputs}
  blob = json.dumps(covered, sort_keys=True, separators=(",", ":")).encode()
  return "sha256:" + hashlib.sha256(blob).hexdigest()


def _packaging():
  try:
    from packaging.requirements import Requirement
    from packaging.version import Version
  except ImportError:
    try:
      from pip._vendor.packaging.requirements import Requirement
      from pip._vendor.packaging.version import Version
    except ImportError:
      return None
  return Requirement, Version


def _header_value(text: str, key: str) -> str | None:
  for line in text.splitlines():
    if line.startswith(key):
      return line[len(key):].strip()
  return None


def check(lock: Path) -> int:
  root = lock.resolve().parent
  text = lock.read_text()
  inputs_line = _header_value(text, INPUTS_KEY)
  recorded = _header_value(text, DIGEST_KEY)
  if inputs_line is None or recorded is None:
    print(f"check_lock: {lock} has no '{INPUTS_KEY}' / '{DIGEST_KEY}' header: "
          "it was not made by `make lock` (scripts/lock.sh)", file=sys.stderr)
    return 1
  inputs = inputs_line.split()
  pins = {}
  for line in text.splitlines():
    match = PIN.match(line)
    if match:
      pins[_norm_name(match.group(1))] = match.group(2)

  problems = []
  tools = _packaging()
  for spec in inputs:
    for req_text in requirements_of(spec, root)[1]:
      if tools is None:
        break
      Requirement, Version = tools
      req = Requirement(req_text)
      if req.marker is not None and not req.marker.evaluate():
        continue
      pinned = pins.get(_norm_name(req.name))
      if pinned is None:
        problems.append(f"{req_text!r} (from {spec}) is not pinned in {lock.name}")
      elif not req.specifier.contains(Version(pinned), prereleases=True):
        problems.append(f"{req_text!r} (from {spec}) but {lock.name} pins {req.name}=={pinned}")

  fresh = digest(inputs, root)
  if problems or (tools is None and fresh != recorded):
    print(f"check_lock: {lock} is out of date with {' '.join(inputs)}:", file=sys.stderr)
    for problem in problems:
      print(f"  - {problem}", file=sys.stderr)
    if not problems:
      print("  - its recorded digest differs (and no packaging module here to say more)",
            file=sys.stderr)
    print("  regenerate it with `make lock` (scripts/lock.sh) and commit the new lock",
          file=sys.stderr)
    return 1
  if fresh != recorded:
    print(f"check_lock: warning: {' '.join(inputs)} changed since {lock.name} was made; every "
          f"requirement is still satisfied by its pins, `make lock` would tidy it",
          file=sys.stderr)
  pyver = PYVER.search(text)
  here = f"{sys.version_info[0]}.{sys.version_info[1]}"
  if pyver and pyver.group(1) != here:
    print(f"check_lock: warning: {lock.name} was resolved for Python {pyver.group(1)}, this is "
          f"Python {here}", file=sys.stderr)
  return 0


def main(argv: list[str]) -> int:
  if len(argv) >= 2 and argv[0] == "--digest":
    print(digest(argv[1:], Path.cwd()))
    return 0
  if len(argv) == 1 and not argv[0].startswith("-"):
    return check(Path(argv[0]))
  print(__doc__.split("\n\n")[1], file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
