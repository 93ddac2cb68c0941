#!/usr/bin/env bash
# Build (or reuse) the oldest-dependencies environment (scripts/oldest_deps_env.sh), then run the core test suite in
# it: every test outside tests/comfyui, with the lowest version of every range in pyproject.toml.
# Extra arguments go to pytest, e.g. `bash scripts/oldest_deps_tests.sh -k text_encoders -x`.
# Environment: BFS_OLDEST_ROOT (cache root), BFS_OLDEST_PYTEST_TIMEOUT (s for the whole pytest run, default 1500).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
start=$SECONDS
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
# shellcheck source=scripts/oldest_deps_env.sh
. scripts/oldest_deps_env.sh
"$BFS_OLDEST_PYTHON" - <<'PY'
import importlib.metadata as md

names = ["torch", "diffusers", "transformers", "accelerate", "safetensors", "numpy", "pillow", "psd-tools",
         "sentencepiece", "protobuf", "tokenizers", "huggingface-hub"]
print("== oldest versions:", ", ".join(f"{n} {md.version(n)}" for n in names))
PY
echo "== oldest-dependencies environment ready in $((SECONDS - start)) s"
set +e
# `python -m pytest` from the repository root imports bfs_core/training from this checkout (the pack is not installed
# in that environment, see oldest_deps_env.sh).
timeout --kill-after=30 "${BFS_OLDEST_PYTEST_TIMEOUT:-1500}" \
  "$BFS_OLDEST_PYTHON" -m pytest -q -p no:cacheprovider tests --ignore=tests/comfyui "$@"
status=$?
set -e
echo "== oldest-dependencies tests finished in $((SECONDS - start)) s (pytest exit $status)"
if [ "$status" -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi
exit "$status"
