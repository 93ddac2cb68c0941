#!/usr/bin/env bash
# The README's first command: set up, write the tiny model set, and run BG2FG end to end on it (CPU, seconds).
# Usage: bash scripts/quickstart.sh [OUT_DIR]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$repo/out/quickstart}
steps=${BFS_QUICKSTART_STEPS:-8}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
. "$repo/scripts/setup_env.sh"
cd "$repo"
python -m bfs_core make-tiny "$out/tiny"
python - "$out/background.png" <<'PY'
import sys
from pathlib import Path
from PIL import Image
photo = Path("tests/assets/photos")
files = sorted(photo.glob("*.png")) + sorted(photo.glob("*.jpg"))
image = Image.open(files[0]).convert("RGB") if files else Image.new("RGB", (320, 240), (120, 170, 230))
image.save(sys.argv[1])
print(f"background: {sys.argv[1]} {image.size}")
PY
python -m bfs_core generate --base "$out/tiny/flux-fill-diffusers" --bfs "$out/tiny/bfs/trained_weights.pt" \
  --rgba-vae "$out/tiny/rgba_vae/bfs_transparency_vae" --background "$out/background.png" \
  --box 40,60,200,220 --prompt "a red ceramic vase" --steps "$steps" --dtype fp32 --out "$out/bg2fg"
python -m bfs_core save-layers "$out/background.png" "$out/bg2fg/foreground.png" --out "$out/scene.ora"
echo "The tiny models above are random (noise by design): they prove every loader and the whole path."
# The embedded toy model (trained by training/ on a 64x64 toy world): layers, chaining, PSD/ORA, a contact sheet.
python -m bfs_core demo --out "$out/toy_demo"
echo "Done. Look at $out/toy_demo/contact_sheet.png; layered files are in $out/toy_demo and $out/scene.ora."
echo "To run the README's python commands in a new shell, activate the environment first: . $VIRTUAL_ENV/bin/activate"
