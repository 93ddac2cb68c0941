#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install the pack with its test tools.
# Sourced by .ci/run and scripts/quickstart.sh. Honours BFS_VENV (default: .venv in the repository).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${BFS_VENV:-$repo/.venv}
python=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
stamp="$venv/.bfs-installed-$(sha1sum "$repo/pyproject.toml" | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  # CPU torch first: an unpinned torch would pull a multi-GB CUDA build (2.13.0 is served from local disk here).
  python -m pip install -q --disable-pip-version-check "torch==2.13.0" || python -m pip install -q "torch>=2.5,<2.15"
  python -m pip install -q --disable-pip-version-check -e "$repo[test]"
  touch "$stamp"
fi
