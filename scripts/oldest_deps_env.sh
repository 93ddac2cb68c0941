#!/usr/bin/env bash
# Create (or reuse) a second virtual environment holding the OLDEST version of every dependency range in
# pyproject.toml, so CI can run the core tests at the low end of each range as well as at the newest versions.
#
# Every `name>=X` in [project].dependencies and the `training` extra becomes a constraint `name==X`, so pip installs
# exactly that release. torch is the exception: its range (>=2.5) cannot be tested cheaply here, because every torch
# wheel for x86_64 on PyPI except the local CPU build of 2.13.0 is a multi-GB CUDA build; this environment therefore
# uses torch==2.13.0+cpu, as the main one does, and the torch lower bound is only as tested as the README says.
# The test tools (pytest, ruff, pyora, ...) are not pinned low: they are not what a user installs.
# The pack itself is not installed: the tests run from the repository root (`python -m pytest` puts it on sys.path),
# so the cached environment does not depend on where the repository lives.
#
# Layout of the cached root (default ${BFS_OLDEST_ROOT:-$HOME/.cache/bfs-oldest-deps}):
#   venv/                  the environment
#   constraints.txt        the generated `name==lowest` pins
#   requirements.txt       what is installed (the pack's dependencies, the training and test extras)
#   .stamp-<hash>          present when venv/ was built from exactly these two files and this recipe
#
# Usage:  bash scripts/oldest_deps_env.sh      # build or reuse; prints BFS_OLDEST_PYTHON
#         . scripts/oldest_deps_env.sh         # also exports BFS_OLDEST_ROOT and BFS_OLDEST_PYTHON
# Options (environment): BFS_OLDEST_ROOT, PYTHON (interpreter for the venv, default python3),
#   BFS_OLDEST_REBUILD=1 (start from scratch).
set -euo pipefail

_bfs_oldest_env() {
  local recipe="oldest-torch-2.13.0cpu-r1"
  local repo root python venv constraints requirements deps_hash stamp lock_fd
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  root=${BFS_OLDEST_ROOT:-$HOME/.cache/bfs-oldest-deps}
  python=${PYTHON:-python3}
  mkdir -p "$root"
  root=$(cd "$root" && pwd)
  venv="$root/venv"

  exec {lock_fd}>"$root/.lock"
  if ! flock -w 900 "$lock_fd"; then
    echo "oldest_deps_env: could not lock $root/.lock within 900 s" >&2
    return 1
  fi

  # Written to temporary names first: the stamp compares them with what the venv was built from.
  "$python" - "$repo/pyproject.toml" "$root/constraints.txt.new" "$root/requirements.txt.new" <<'PY'
import re
import sys
import tomllib

project = tomllib.load(open(sys.argv[1], "rb"))["project"]
runtime = project["dependencies"] + project["optional-dependencies"]["training"]
pins, seen = [], set()
for spec in runtime:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*(,.*)?", spec)
    if not match:
        sys.exit(f"oldest_deps_env: {spec!r} in pyproject.toml has no `>=` lower bound to pin")
    name, lowest = match.group(1).lower(), match.group(2)
    if name in seen:
        continue
    seen.add(name)
    # See the header: the only torch this environment installs is the local 2.13.0 CPU build.
    pins.append("torch==2.13.0" if name == "torch" else f"{name}=={lowest}")
extras = project["optional-dependencies"]
open(sys.argv[2], "w").write("\n".join(pins) + "\n")
open(sys.argv[3], "w").write("\n".join(runtime + extras["test"]) + "\n")
PY
  constraints="$root/constraints.txt"
  requirements="$root/requirements.txt"
  deps_hash=$(cat "$root/constraints.txt.new" "$root/requirements.txt.new" <(echo "$recipe") | sha1sum | cut -c1-12)
  stamp="$root/.stamp-$deps_hash"

  if [ "${BFS_OLDEST_REBUILD:-0}" = 1 ] || { [ ! -f "$stamp" ] && [ -e "$venv" ]; }; then
    # Other pins (or an unfinished build): start over rather than downgrade on top of newer packages.
    echo "oldest_deps_env: rebuilding $venv"
    rm -rf "$venv" "$root"/.stamp-*
  fi
  mv "$root/constraints.txt.new" "$constraints"
  mv "$root/requirements.txt.new" "$requirements"

  if [ ! -f "$stamp" ]; then
    local t0=$SECONDS
    "$python" -m venv "$venv"
    local pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
    # torch first, alone: the CPU build from the local wheel folder pip is configured with (or the PyTorch CPU index).
    "${pip[@]}" "torch==2.13.0+cpu" 2>/dev/null \
      || "${pip[@]}" "torch==2.13.0+cpu" --index-url https://download.pytorch.org/whl/cpu
    "${pip[@]}" -c "$constraints" -r "$requirements"
    "$venv/bin/python" -m pip check
    touch "$stamp"
    echo "oldest_deps_env: environment built in $((SECONDS - t0)) s"
  fi
  flock -u "$lock_fd"
  exec {lock_fd}>&-
  export BFS_OLDEST_ROOT="$root" BFS_OLDEST_PYTHON="$venv/bin/python"
  echo "BFS_OLDEST_PYTHON=$BFS_OLDEST_PYTHON"
}

_bfs_oldest_env
