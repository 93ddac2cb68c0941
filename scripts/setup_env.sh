#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install the pack with its test tools.
# Sourced by .ci/run and scripts/quickstart.sh. Honours BFS_VENV (default: .venv in the repository).
#
# PyTorch, in this order:
#   1. a torch already importable in the venv (2.5 <= version < 2.15) is kept as it is, e.g. a GPU user's CUDA build:
#      create the venv, `pip install` the torch you want into it, then run this;
#   2. with an NVIDIA GPU (nvidia-smi lists one): torch==2.13.0 from PyPI, the CUDA build: the torch wheel plus about
#      17 nvidia-* CUDA library packages, several GB;
#   3. without a GPU: the CPU build torch==2.13.0+cpu (one wheel of about 200 MB), from wherever pip is configured to
#      look first (a local wheel folder, as on this project's machines), else from the PyTorch CPU index
#      https://download.pytorch.org/whl/cpu. Never the multi-GB CUDA build on a machine that cannot use it.
# Then the pack itself (`pip install -e .[test]`, from PyPI: diffusers, transformers, accelerate, safetensors,
# psd-tools, ... and pytest, ruff, pyora), which keeps the torch chosen above.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${BFS_VENV:-$repo/.venv}
python=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"

bfs_install_torch() {
  local pip=(python -m pip install -q --disable-pip-version-check)
  local have
  if have=$(python -c 'import sys, torch
v = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
print(torch.__version__, "CUDA " + torch.version.cuda if torch.version.cuda else "CPU")
sys.exit(0 if (2, 5) <= v < (2, 15) else 1)' 2>/dev/null); then
    echo "setup_env: keeping the torch already in $venv: $have"
    return
  fi
  if [ -n "$have" ]; then
    echo "setup_env: the torch in $venv ($have) is outside 2.5-2.14, which the pack needs; replacing it"
  fi
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup_env: NVIDIA GPU found: installing torch==2.13.0 (CUDA build, with its nvidia-* packages: several GB)"
    "${pip[@]}" "torch==2.13.0"
  elif "${pip[@]}" "torch==2.13.0+cpu" 2>/dev/null; then
    echo "setup_env: no GPU: installed the CPU build torch==2.13.0+cpu"
  else
    echo "setup_env: no GPU: installing the CPU build torch==2.13.0+cpu (about 200 MB) from the PyTorch CPU index"
    "${pip[@]}" "torch==2.13.0+cpu" --index-url https://download.pytorch.org/whl/cpu || {
      echo "setup_env: could not install torch 2.13.0+cpu. Install a torch (2.5 to 2.14) into $venv yourself" \
        "(https://pytorch.org/get-started/locally/) and run this again: it keeps the one it finds." >&2
      return 1
    }
  fi
}

stamp="$venv/.bfs-installed-$(sha1sum "$repo/pyproject.toml" | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  bfs_install_torch
  python -m pip install -q --disable-pip-version-check -e "$repo[test]"
  touch "$stamp"
fi
