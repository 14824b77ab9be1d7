"""`make venv` / `make venv-fhe` (scripts/ensure_venv.sh) install from the lock files, hashes
required, and rebuild an environment exactly when its lock file changes.

Each case copies a lock and the inputs it was made from into a temporary folder and runs the
real script with a stand-in Python: its `-m venv DIR` makes a DIR whose `bin/python` only logs
its arguments (so nothing is downloaded or installed); everything else runs on this Python (the
lock check, the version query).
"""

import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# lock, the inputs its header names (copied beside it), the editable project argument
LOCKS = {
    "fhe": ("requirements-fhe.lock", ["requirements-fhe.txt"], None),
    "main": ("requirements.lock", ["pyproject.toml", "scripts/lock-build.in"], "."),
}


def stand_in_python(folder: Path) -> Path:
  script = folder / "python-stand-in"
  script.write_text(f"""#!/usr/bin/env bash
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin"
  printf '#!/usr/bin/env bash\\necho "$*" >> "$(dirname "$0")/../pip.log"\\n' > "$3/bin/python"
  chmod +x "$3/bin/python"
  exit 0
fi
exec {sys.executable} "$@"
""")
  script.chmod(script.stat().st_mode | stat.S_IXUSR)
  return script


def ensure(tmp_path: Path, name: str) -> subprocess.CompletedProcess:
  lock, _, editable = LOCKS[name]
  args = ["bash", str(REPO / "scripts" / "ensure_venv.sh"), str(tmp_path / "env"),
          str(tmp_path / lock)] + ([str(tmp_path / editable)] if editable else [])
  return subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, check=False,
                        env=dict(os.environ, PYTHON=str(stand_in_python(tmp_path))))


def copy_inputs(tmp_path: Path, name: str) -> Path:
  lock, inputs, _ = LOCKS[name]
  for path in [lock, *inputs]:
    (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / path, tmp_path / path)
  return tmp_path / lock


def pip_calls(tmp_path: Path) -> list[str]:
  log = tmp_path / "env" / "pip.log"
  return log.read_text().splitlines() if log.exists() else []


def stamp_sha(tmp_path: Path) -> str:
  return (tmp_path / "env" / ".meshwork-stamp").read_text().split()[0]


@pytest.mark.parametrize("name", sorted(LOCKS))
def test_builds_from_the_lock_with_hashes_and_rebuilds_only_when_the_lock_changes(tmp_path, name):
  lock = copy_inputs(tmp_path, name)
  done = ensure(tmp_path, name)
  assert done.returncode == 0, done.stderr
  calls = pip_calls(tmp_path)
  assert calls[0].startswith("-m pip install") and "--require-hashes" in calls[0]
  assert calls[0].endswith(f"-r {lock}")
  if LOCKS[name][2]:  # .venv: pins without their dependencies, then the project, then pip check
    assert "--no-deps" in calls[0] and calls[1].endswith(f"-e {tmp_path / '.'}")
    assert calls[2] == "-m pip check"
  assert stamp_sha(tmp_path) == hashlib.sha256(lock.read_bytes()).hexdigest()

  sentinel = tmp_path / "env" / "sentinel"
  sentinel.write_text("this environment")

  # The same lock again: nothing is installed, the environment is the same one.
  assert ensure(tmp_path, name).returncode == 0
  assert pip_calls(tmp_path) == calls and sentinel.exists()

  # A changed lock (a comment: its pins still satisfy the inputs): built again from scratch.
  lock.write_text(lock.read_text() + "# touched\n")
  assert ensure(tmp_path, name).returncode == 0
  assert not sentinel.exists()
  assert pip_calls(tmp_path) == calls  # one fresh install; the old log went with the old one
  assert stamp_sha(tmp_path) == hashlib.sha256(lock.read_bytes()).hexdigest()


def test_a_half_built_environment_is_rebuilt(tmp_path):
  copy_inputs(tmp_path, "fhe")
  (tmp_path / "env" / "bin").mkdir(parents=True)
  (tmp_path / "env" / "leftover").write_text("from a build that failed half way")
  assert ensure(tmp_path, "fhe").returncode == 0
  assert not (tmp_path / "env" / "leftover").exists()
  assert len(pip_calls(tmp_path)) == 1


def test_a_lock_that_no_longer_satisfies_its_inputs_is_refused_before_anything_is_built(tmp_path):
  lock = copy_inputs(tmp_path, "fhe")
  lock.write_text(re.sub(r"^concrete-ml==\S+", "concrete-ml==0.0.1", lock.read_text(),
                         flags=re.MULTILINE))
  done = ensure(tmp_path, "fhe")
  assert done.returncode != 0
  assert "concrete-ml" in done.stderr and "make lock" in done.stderr
  assert not (tmp_path / "env").exists()
