#!/usr/bin/env bash
# ensure_venv.sh DIR SPEC_FILE -- PIP_INSTALL_ARGS...
#
# Creates the virtual environment DIR and installs PIP_INSTALL_ARGS into it, unless DIR already
# holds a complete environment built from the same SPEC_FILE (its sha256 is kept in
# DIR/.meshwork-stamp, written only after every install step succeeded). A half-built
# environment has no stamp and is rebuilt from scratch, so the target is idempotent.
set -euo pipefail
dir=$1; spec=$2; shift 2
[ "${1:-}" = "--" ] && shift
python=${PYTHON:-python3}
want="$(sha256sum "$spec" | cut -d' ' -f1) $("$python" -c 'import sys; print(sys.version.split()[0])')"
stamp="$dir/.meshwork-stamp"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$dir/bin/python" ]; then
  exit 0
fi
echo ">> building $dir from $spec"
rm -rf "$dir"
"$python" -m venv "$dir"
"$dir/bin/python" -m pip install --quiet --upgrade pip
"$dir/bin/python" -m pip install --quiet "$@"
echo "$want" > "$stamp"
echo ">> $dir ready"
