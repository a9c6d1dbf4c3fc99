"""stop_kernels: fused kernels and a training pipeline for I-JEPA with Stochastic Positional Embeddings.

StoP replaces each masked token's position ψ_j in the I-JEPA predictor with ψ̂_j = A·n_j + ψ_j,
n_j ~ N(0, σ² I) (σ: ``noise_std``), A tied to the predictor's context projection.

Public API:
    stop_embed, assemble_predictor_input   fused StoP ops (noise generated in registers)
    attention, dispatch_attention          flash attention for the model's shapes, and the backend switch
    use_attention_backend, use_auto_policy force a backend / adjust what "auto" picks per head dim
    get_attention_backend, set_attention_backend  read / set the default backend of dispatch_attention
    attention_qkv, dispatch_attention_qkv  the same over a packed [B, N, 3, H, Dh] QKV buffer (one dqkv written)
    reference                              pure-PyTorch twins of the fused ops (linear_gelu's: in its module)
    models, data                           the ViT / predictor presets (models.packing: packed forwards), the
                                           datasets and the multi-block mask collator
    load_official_checkpoint               official I-JEPA / StoP checkpoints → project models
    save_official_checkpoint               project models → a checkpoint in the official layout
    trusted_device_indices                 skip the host-syncing index range checks in hot loops
    backends()                             which backends (reference, triton, cuda, xformers) are usable here
    __version__                            the package version
"""
from . import data, models, reference
from ._checks import trusted_device_indices
from .backends import backends
from .models import load_official_checkpoint, save_official_checkpoint
from .ops.attention import (attention, attention_qkv, dispatch_attention, dispatch_attention_qkv,
                            get_attention_backend, set_attention_backend, use_attention_backend, use_auto_policy)
from .ops.predictor_input import assemble_predictor_input
from .ops.stop_embed import stop_embed

__version__ = "0.1.0"

__all__ = ["data", "models", "reference", "trusted_device_indices", "backends", "load_official_checkpoint", "save_official_checkpoint",
           "assemble_predictor_input",
           "stop_embed", "attention", "attention_qkv", "dispatch_attention", "dispatch_attention_qkv",
           "get_attention_backend", "set_attention_backend",
           "use_attention_backend", "use_auto_policy", "__version__"]
