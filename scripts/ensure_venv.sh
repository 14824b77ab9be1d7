#!/usr/bin/env bash
# ensure_venv.sh DIR LOCK_FILE [EDITABLE_PROJECT]
#
# Creates the virtual environment DIR from LOCK_FILE (made by `make lock`, scripts/lock.sh), every
# package at its pinned version and each downloaded file checked against the lock's sha256:
#   without EDITABLE_PROJECT (.venv-fhe):
#     pip install --require-hashes -r LOCK_FILE          (pip also checks the pins' dependencies)
#   with EDITABLE_PROJECT (.venv):
#     pip install --require-hashes --no-deps -r LOCK_FILE
#     pip install --no-deps --no-build-isolation -e EDITABLE_PROJECT   (its build backend,
#                                                         setuptools, comes from the lock)
#     pip check                                          (the pins and the project agree)
# unless DIR already holds a complete environment built from the same LOCK_FILE and Python: the
# stamp DIR/.meshwork-stamp holds "<sha256 of LOCK_FILE> <python version>" and is written only
# after every step succeeded. A half-built environment has no stamp and is rebuilt from scratch,
# so the target is idempotent; changing the lock file (or the Python) rebuilds the environment.
# First of all, scripts/check_lock.py fails if LOCK_FILE is out of date with its inputs
# (pyproject.toml, requirements-fhe.txt): regenerate it with `make lock`.
set -euo pipefail
dir=$1; lock=$2; editable=${3:-}
python=${PYTHON:-python3}
"$python" "$(dirname "$0")/check_lock.py" "$lock"
want="$(sha256sum "$lock" | cut -d' ' -f1) $("$python" -c 'import sys; print(sys.version.split()[0])')"
stamp="$dir/.meshwork-stamp"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$dir/bin/python" ]; then
  exit 0
fi
echo ">> building $dir from $lock"
rm -rf "$dir"
"$python" -m venv "$dir"
# The venv's own pip (the one bundled with this Python) installs; the lock pins everything else.
if [ -n "$editable" ]; then
  "$dir/bin/python" -m pip install --quiet --require-hashes --no-deps -r "$lock"
  "$dir/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$editable"
  "$dir/bin/python" -m pip check
else
  "$dir/bin/python" -m pip install --quiet --require-hashes -r "$lock"
fi
echo "$want" > "$stamp"
echo ">> $dir ready"
