"""ComfyUI entry point of the BFS layered-image pack.

ComfyUI imports this folder as a package and calls `comfy_entrypoint()` (V3 nodes). Outside ComfyUI (tests,
training, the command line) the import must still work, so the ComfyUI side is guarded, in the style of
ComfyUI-GGUF. The headless core is `bfs_core/`.
"""

WEB_DIRECTORY = "./web"  # the frontend extension (plain JS, no build step): the box editor on the sampler nodes

try:
    import comfy_api.latest  # noqa: F401  (only present inside ComfyUI)
except ImportError:  # imported outside ComfyUI: there is nothing to register
    comfy_entrypoint = None
else:
    from .nodes import comfy_entrypoint  # noqa: F401
