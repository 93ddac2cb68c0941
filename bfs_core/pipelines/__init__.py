"""Images in, layers out: the pipelines around the models (pipelines -> models -> layers/ops, never back).

bfs: BG2FG and extraction with the two-branch BFS model. decomposition: Outpaint-and-Remove. codec: the Flux VAE as
the pipelines' image codec. loading: the BFS pipeline (and the FLUX.1 VAE) from local files.
"""

from .bfs import BFSPipeline, LayerResult
from .codec import DiffusersFluxVAE
from .decomposition import DecompositionPipeline, DecompositionResult
from .loading import load_flux_vae, load_pipeline, parse_dtype


__all__ = [
    "BFSPipeline",
    "DecompositionPipeline",
    "DecompositionResult",
    "DiffusersFluxVAE",
    "LayerResult",
    "load_flux_vae",
    "load_pipeline",
    "parse_dtype",
]
