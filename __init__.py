"""ComfyUI entry point of the BFS layered-image pack.

ComfyUI imports this folder as a package. Outside ComfyUI (tests, training, the command line) the import must still
work, so everything ComfyUI-specific is guarded, in the style of ComfyUI-GGUF. The headless core is `bfs_core/`.
"""

try:
    import comfy_api  # noqa: F401  (only present inside ComfyUI)
except ImportError:  # imported outside ComfyUI: there is nothing to register
    NODE_CLASS_MAPPINGS = {}
else:
    # The node modules arrive with the ComfyUI node issue; until then the pack registers no nodes.
    NODE_CLASS_MAPPINGS = {}

NODE_DISPLAY_NAME_MAPPINGS = {}
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
