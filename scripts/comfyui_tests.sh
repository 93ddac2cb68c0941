#!/usr/bin/env bash
# Build (or reuse) the ComfyUI test environment, then run tests/comfyui against a real ComfyUI server with its venv.
# Extra arguments go to pytest, e.g. `bash scripts/comfyui_tests.sh -k smoke -x`.
# Environment: BFS_COMFY_ROOT (cache root), BFS_COMFY_BROWSER=0 (skip Chromium), BFS_COMFY_START_TIMEOUT (s, 300),
# BFS_COMFY_PYTEST_TIMEOUT (s for the whole pytest run, default 1200).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
start=$SECONDS
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
# shellcheck source=scripts/comfyui_env.sh
. scripts/comfyui_env.sh
echo "== ComfyUI environment ready in $((SECONDS - start)) s"
pidfile=$(mktemp)
cleanup() {
  # The server runs in its own process group; pytest stops it, this only catches a pytest killed before teardown.
  local pid
  pid=$(cat "$pidfile" 2>/dev/null || true)
  if [ -n "$pid" ] && grep -qs main.py "/proc/$pid/cmdline"; then
    kill -TERM -- "-$pid" 2>/dev/null || true
    sleep 5
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}
trap cleanup EXIT
set +e
BFS_COMFY_TESTS=1 BFS_COMFY_PIDFILE=$pidfile timeout --kill-after=30 "${BFS_COMFY_PYTEST_TIMEOUT:-1200}" \
  "$BFS_COMFY_PYTHON" -m pytest -q -p no:cacheprovider tests/comfyui "$@"
status=$?
set -e
echo "== ComfyUI tests finished in $((SECONDS - start)) s (pytest exit $status)"
if [ "$status" -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi
exit "$status"
