#!/usr/bin/env bash
# lock.sh [main|fhe]... [-- UV_ARGS...]
#
# Regenerates the lock files (`make lock`): every package of an environment pinned with the
# sha256 of each of its distributions, resolved by uv for Linux x86_64 (glibc >= 2.28) / Python 3.11.7:
#   requirements.lock      (.venv)      from pyproject.toml [project] dependencies + the dev extra
#                                       + scripts/lock-build.in (setuptools for the editable build)
#   requirements-fhe.lock  (.venv-fhe)  from requirements-fhe.txt
# uv keeps the versions already pinned in an existing lock unless the inputs demand otherwise,
# so a plain `make lock` after editing a dependency changes only what it must. To move pins:
#   make lock LOCK_ARGS='-- --upgrade'                 (everything to the newest allowed)
#   make lock LOCK_ARGS='-- --upgrade-package jax'     (one package)
#   make lock LOCK_ARGS='fhe'                          (only requirements-fhe.lock)
# uv: $UV, else `uv` on PATH, else uv==$UV_VERSION installed into .venv-uv/ (git-ignored).
# Each lock starts with a comment naming this script and the exact uv command (uv's header),
# and records its inputs' digest, which scripts/check_lock.py compares on every `make venv`.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
UV_VERSION=${UV_VERSION:-0.13.9}
PY_VERSION=3.11.7  # not 3.11(.0): concrete-ml 1.9 pins protobuf 3.20.3 only for Python <= 3.11.0
PLATFORM=x86_64-manylinux_2_28

which=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do which+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
uv_args=("$@")
[ ${#which[@]} -eq 0 ] && which=(main fhe)

uv=${UV:-}
if [ -z "$uv" ]; then
  if command -v uv >/dev/null 2>&1; then
    uv=uv
  else
    if ! [ -x .venv-uv/bin/uv ] || [ "$(.venv-uv/bin/uv --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
      echo ">> installing uv==$UV_VERSION into .venv-uv"
      rm -rf .venv-uv
      "$python" -m venv .venv-uv
      .venv-uv/bin/python -m pip install --quiet "uv==$UV_VERSION"
    fi
    uv=.venv-uv/bin/uv
  fi
fi

# lock OUTPUT DESCRIPTION INSTALL INPUT... : INPUT is a file, pyproject.toml[EXTRA] for extras.
lock() {
  local out=$1 what=$2 install=$3; shift 3
  local inputs=("$@") sources=() extras=() spec
  for spec in "${inputs[@]}"; do
    if [[ $spec == *\[*\] ]]; then
      sources+=("${spec%%\[*}")
      local list=${spec#*\[}; list=${list%\]}
      local e; for e in ${list//,/ }; do extras+=(--extra "$e"); done
    else
      sources+=("$spec")
    fi
  done
  echo ">> $out from ${inputs[*]}"
  # No --no-header: uv's header (the exact command) stays under ours. stdout (the lock again) dropped.
  "$uv" pip compile "${sources[@]}" "${extras[@]}" --generate-hashes \
    --python-version "$PY_VERSION" --python-platform "$PLATFORM" "${uv_args[@]}" -o "$out" >/dev/null
  local digest; digest=$("$python" scripts/check_lock.py --digest "${inputs[@]}")
  local body; body=$(grep -v -e '^# meshwork-' -e '^# Lock file of' -e '^# Regenerate' -e '^#   (' "$out")
  {
    echo "# Lock file of $what: every package pinned, with the sha256 of each distribution."
    echo "# Regenerate with \`make lock\` (scripts/lock.sh, which runs the uv command below); never edit by hand."
    echo "#   (installed by scripts/ensure_venv.sh: $install)"
    echo "# meshwork-lock-inputs: ${inputs[*]}"
    echo "# meshwork-lock-digest: $digest"
    printf '%s\n' "$body"
  } > "$out.tmp"
  mv "$out.tmp" "$out"
}

for w in "${which[@]}"; do
  case $w in
    main) lock requirements.lock ".venv (the jax stack and the project's dev tools)" \
            "pip install --require-hashes --no-deps -r requirements.lock; pip install --no-deps --no-build-isolation -e ." \
            "pyproject.toml[dev]" scripts/lock-build.in ;;
    fhe)  lock requirements-fhe.lock ".venv-fhe (concrete-ml and its numpy/torch pins)" \
            "pip install --require-hashes -r requirements-fhe.lock" \
            requirements-fhe.txt ;;
    *) echo "lock.sh: unknown lock '$w' (main, fhe)" >&2; exit 2 ;;
  esac
done
