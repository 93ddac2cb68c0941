"""The pack's ComfyUI nodes (V3 schema). Imported only inside ComfyUI; `bfs_core` does the work.

Node ids are stable and prefixed `BFS`.
"""

from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import ComfyExtension, io
from typing_extensions import override


# models/bfs holds BFS weights and RGBA VAEs; register it once, at import, with the usual weight extensions, and
# create it, so the folder the README and the loaders' tooltips name is there to put files in.
BFS_MODELS_DIR = os.path.join(folder_paths.models_dir, "bfs")
try:
    os.makedirs(BFS_MODELS_DIR, exist_ok=True)
except OSError as err:  # a read-only models folder: the pack still loads; the loaders then list nothing
    logging.getLogger(__name__).warning("Could not create %s (%s); put BFS files there by hand.", BFS_MODELS_DIR, err)
folder_paths.add_model_folder_path("bfs", BFS_MODELS_DIR)
folder_paths.folder_names_and_paths["bfs"] = (
    folder_paths.get_folder_paths("bfs"),
    folder_paths.supported_pt_extensions,
)

from .decompose import DecomposeNodes  # noqa: E402  (the folder must be registered before the schemas list it)
from .layers import LayerNodes  # noqa: E402
from .loaders import LoaderNodes  # noqa: E402
from .reference import ReferenceNodes  # noqa: E402
from .sampling import SamplingNodes  # noqa: E402
from .toy import ToyNodes  # noqa: E402


class BFSExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        extensions = [LoaderNodes(), SamplingNodes(), LayerNodes(), DecomposeNodes(), ToyNodes(), ReferenceNodes()]
        if os.environ.get("BFS_TEST_NODES") == "1":
            from .testing import TestingNodes

            extensions.append(TestingNodes())
        return [node for ext in extensions for node in await ext.get_node_list()]


async def comfy_entrypoint() -> BFSExtension:
    return BFSExtension()
