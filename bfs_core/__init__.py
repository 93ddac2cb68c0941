"""Headless core of the BFS layered-image pack: dual-branch Flux-Fill, Φ, samplers, loaders.

Nothing in this package imports ComfyUI; the nodes in ``nodes/`` wrap it.
"""

__version__ = "0.1.0"
