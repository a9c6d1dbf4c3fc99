"""stop_kernels: fused kernels and a training pipeline for I-JEPA with Stochastic Positional Embeddings.

StoP replaces each masked token's position ψ_j in the I-JEPA predictor with ψ̂_j = A·n_j + ψ_j,
n_j ~ N(0, σ I), A tied to the predictor's context projection.
"""
from . import reference
from .models import load_official_checkpoint

__version__ = "0.1.0"
