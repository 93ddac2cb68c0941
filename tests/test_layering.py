"""Dependencies in bfs_core point one way: apps (cli, toy, tiny, bench) -> pipelines -> models/sampling -> ops.

Every import statement of every bfs_core module (module level and inside functions, absolute and relative) is read
with `ast`; a module may import only modules of its own rank or below, and nothing of ComfyUI, the pack's nodes or
training. A new module must be given a rank in `RANKS` (the test names it).
"""

from __future__ import annotations

import ast
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]

# Longest prefix wins. 0 = ops (leaves), 1 = models and sampling, 2 = pipelines, 3 = applications.
RANKS = {
    "bfs_core": 0,  # bfs_core/__init__.py
    "bfs_core.atomic": 0,
    "bfs_core.errors": 0,
    "bfs_core.finite": 0,
    "bfs_core.layer_math": 0,
    "bfs_core.image_ops": 0,
    "bfs_core.conditioning": 0,
    "bfs_core.layered_files": 0,
    "bfs_core.models": 1,
    "bfs_core.sampling": 1,
    "bfs_core.text_encoders": 1,
    "bfs_core.offload": 1,  # offload hooks on the models (torch and diffusers only)
    "bfs_core.latent_files": 1,  # ComfyUI .latent files (uses the Flux latent constants of models)
    "bfs_core.pipelines": 2,
    "bfs_core.cli": 3,
    "bfs_core.toy": 3,
    "bfs_core.tiny": 3,
    "bfs_core.bench": 3,
    "bfs_core.memory": 3,  # the memory model (reads the dual-branch config, as bench does)
    "bfs_core.decomposition_eval": 3,
    "bfs_core.__main__": 3,
}
LAYER_NAMES = {0: "ops", 1: "models/sampling", 2: "pipelines", 3: "applications"}
FORBIDDEN_ROOTS = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "nodes", "training"}


def _rank(module: str) -> int | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        rank = RANKS.get(".".join(parts[:n]))
        if rank is not None and (n > 1 or len(parts) == 1):
            return rank
    return None


def _module_name(path: Path, root: Path) -> tuple[str, str]:
    """(module, package) of a file under `root` (the folder holding bfs_core/)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def _imports(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file; relative imports resolved against `package`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level - 1 >= len(base):  # beyond bfs_core: the pack root (nodes/, training/ ...)
                    found.append((node.lineno, node.module or ""))
                    continue
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
                # `from . import x` / `from .. import x` may name submodules: check each.
                found += [(node.lineno, f"{name}.{a.name}") for a in node.names] if not node.module else []
                if node.module:
                    found.append((node.lineno, name))
            else:
                found.append((node.lineno, node.module or ""))
    return found


def layering_violations(root: Path) -> list[str]:
    problems = []
    for path in sorted((root / "bfs_core").rglob("*.py")):
        module, package = _module_name(path, root)
        own = _rank(module)
        where = path.relative_to(root).as_posix()
        if own is None:
            problems.append(f"{where}: module {module} has no rank in RANKS (tests/test_layering.py); give it one")
            continue
        for line, name in _imports(path, package):
            top = name.split(".")[0]
            if top in FORBIDDEN_ROOTS:
                problems.append(f"{where}:{line} imports {name} (bfs_core never imports ComfyUI, nodes or training)")
            elif top == "bfs_core":
                rank = _rank(name)
                if rank is not None and rank > own:
                    problems.append(
                        f"{where}:{line} ({LAYER_NAMES[own]}) imports {name} ({LAYER_NAMES[rank]}), a layer above it"
                    )
    return problems


def test_bfs_core_imports_point_down_only():
    assert layering_violations(REPO) == []


def test_the_checker_finds_upward_comfy_and_unranked_imports(tmp_path):
    """The checker on a made-up tree: each kind of violation is reported, allowed imports are not."""
    files = {
        "bfs_core/__init__.py": "",
        "bfs_core/atomic.py": "import torch\n",
        "bfs_core/models/__init__.py": "",
        "bfs_core/models/good.py": "from ..atomic import x\nfrom . import other\n",
        "bfs_core/models/other.py": "def f():\n    from ..pipelines.bfs import BFSPipeline\n",  # lazy, still upward
        "bfs_core/models/comfy_user.py": "import comfy.utils\nfrom ...nodes.common import progress\n",
        "bfs_core/pipelines/__init__.py": "from ..models import good\n",
        "bfs_core/pipelines/up.py": "from bfs_core.cli import decompose\nfrom bfs_core.tiny import TINY_FLUX\n",
        "bfs_core/new_thing.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = layering_violations(tmp_path)
    assert [p.split(" ")[0] for p in found] == [
        "bfs_core/models/comfy_user.py:1",
        "bfs_core/models/comfy_user.py:2",
        "bfs_core/models/other.py:2",
        "bfs_core/new_thing.py:",
        "bfs_core/pipelines/up.py:1",
        "bfs_core/pipelines/up.py:2",
    ]
    assert "imports bfs_core.pipelines.bfs (pipelines), a layer above it" in found[2]
    assert "imports nodes.common" in found[1]
