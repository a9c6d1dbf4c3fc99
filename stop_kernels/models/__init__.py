"""Models: the ViT encoder presets, the StoP predictor, their packed (varlen) forwards (``packing``), FLOP counts
(``flops``), and the official-checkpoint loader and writer."""
from . import flops, packing
from .official import (OfficialModels, infer_encoder_sizes, load_official_checkpoint, official_checkpoint,
                       official_state_dict, save_official_checkpoint)
from .predictor import VisionTransformerPredictor, predictor_for, vit_predictor
from .vit import (ALIASES, VIT_PRESETS, Block, VisionTransformer, ViTSpec, grid_size, resolve_model_name,
                  vit_base, vit_encoder, vit_giant, vit_huge, vit_large, vit_small, vit_tiny)

__all__ = [
    "OfficialModels", "infer_encoder_sizes", "load_official_checkpoint", "official_checkpoint", "official_state_dict",
    "save_official_checkpoint", "VisionTransformerPredictor",
    "predictor_for", "vit_predictor", "ALIASES", "VIT_PRESETS", "Block", "VisionTransformer", "ViTSpec",
    "grid_size", "resolve_model_name", "vit_base", "vit_encoder", "vit_giant", "vit_huge", "vit_large",
    "vit_small", "vit_tiny",
]
