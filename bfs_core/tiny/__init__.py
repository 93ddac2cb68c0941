"""Tiny random models in every on-disk format the pack reads (for tests, CI, training tests and anyone checking the
loaders): the one home of every tiny config and tiny-model writer.

`write_tiny_set(out_dir)` is what `python -m bfs_core make-tiny DIR` runs; `write_tiny_models(out_dir)` is the set the
training tests train. The tiny Flux-Fill keeps the real layout (384 input channels, guidance embedding, text width =
joint_attention_dim) at width 64 so everything runs on a CPU in seconds. Nothing here is a trained model: outputs are
noise-like by design. One module per family: flux (transformer, Flux VAE), bfs, decomposition, rgba_vae,
text_encoders; sets assembles them.
"""

from .bfs import TINY_BFS, official_release_state_dict, randomize_bfs_parameters
from .decomposition import write_tiny_decomposition
from .flux import TINY_FLUX, dual_inputs, make_tiny_flux, write_tiny_flux_fill, write_tiny_flux_vae
from .rgba_vae import tiny_release_vae, tiny_transparent_vae_state_dict, write_tiny_rgba_vaes
from .sets import TINY_PHI, write_tiny_models, write_tiny_set
from .text_encoders import write_tiny_text_encoders


__all__ = [
    "TINY_BFS",
    "TINY_FLUX",
    "TINY_PHI",
    "dual_inputs",
    "make_tiny_flux",
    "official_release_state_dict",
    "randomize_bfs_parameters",
    "tiny_release_vae",
    "tiny_transparent_vae_state_dict",
    "write_tiny_decomposition",
    "write_tiny_flux_fill",
    "write_tiny_flux_vae",
    "write_tiny_models",
    "write_tiny_rgba_vaes",
    "write_tiny_set",
    "write_tiny_text_encoders",
]
