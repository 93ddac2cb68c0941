"""Headless trainers for BFS: Φ, stage 1, stage 2, and the synthetic-triplet builder (see training/README.md).

Never imports ComfyUI; depends on bfs_core, torch, diffusers, accelerate, transformers, pyyaml and tqdm.
"""
