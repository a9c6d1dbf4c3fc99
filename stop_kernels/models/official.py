"""Load checkpoints written by the official I-JEPA / StoP code.

Official layout: a dict with ``encoder``, ``predictor`` and ``target_encoder`` state dicts whose
keys carry the DDP ``module.`` prefix (plus ``opt``, ``epoch`` … which are ignored here). The
project's modules use the same parameter names, so loading is a prefix strip plus a reshape of the
``[1, P, D]`` positional tables into the project's ``[P, D]`` buffers. Sizes (width, depth, patch,
image size, MLP ratio) are read from the weights; the head count is not stored in a checkpoint and
comes from the preset matching the width, or from ``num_heads``.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Mapping, NamedTuple, Optional, Union

import torch

from .predictor import VisionTransformerPredictor
from .vit import VIT_PRESETS, VisionTransformer, resolve_model_name


class OfficialModels(NamedTuple):
    encoder: VisionTransformer
    predictor: VisionTransformerPredictor
    target_encoder: Optional[VisionTransformer]
    epoch: Optional[int]


class EncoderSizes(NamedTuple):
    embed_dim: int
    depth: int
    num_heads: Optional[int]
    mlp_ratio: float
    patch_size: int
    img_size: int
    in_chans: int


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str = "module.") -> Dict[str, torch.Tensor]:
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def _depth(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    ids = {int(m.group(1)) for k in state for m in [re.match(rf"{prefix}\.(\d+)\.", k)] if m}
    return max(ids) + 1 if ids else 0


def _require(state: Mapping[str, torch.Tensor], key: str, where: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"checkpoint: {where} state dict has no '{key}' (is this an official I-JEPA/StoP checkpoint?)")
    return state[key]


def heads_for_width(embed_dim: int) -> Optional[int]:
    for spec in VIT_PRESETS.values():
        if spec.embed_dim == embed_dim:
            return spec.num_heads
    return None


def infer_encoder_sizes(state: Mapping[str, torch.Tensor]) -> EncoderSizes:
    """Read an encoder's sizes from its (prefix-stripped) state dict."""
    w = _require(state, "patch_embed.proj.weight", "encoder")
    E, C, p, _ = w.shape
    P = _require(state, "pos_embed", "encoder").reshape(-1, E).shape[0]
    g = int(round(P ** 0.5))
    hidden = _require(state, "blocks.0.mlp.fc1.weight", "encoder").shape[0]
    return EncoderSizes(embed_dim=E, depth=_depth(state, "blocks"), num_heads=heads_for_width(E),
                        mlp_ratio=hidden / E, patch_size=p, img_size=g * p, in_chans=C)


def _load_exact(module: torch.nn.Module, state: Dict[str, torch.Tensor], what: str) -> None:
    """Load every tensor; any missing or unexpected key (or shape mismatch) is an error listing them."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"checkpoint: {what} keys do not match the model: missing {missing}, unexpected {unexpected}")
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in state.items() if v.numel() != own[k].numel()]
    if bad:
        raise ValueError(f"checkpoint: {what} tensor shapes do not match the model: {bad}")
    module.load_state_dict({k: v.reshape(own[k].shape) for k, v in state.items()}, strict=True)


def load_official_checkpoint(ckpt: Union[str, os.PathLike, Mapping], *, model: Optional[str] = None,
                             num_heads: Optional[int] = None, patch_size: Optional[int] = None,
                             img_size: Optional[int] = None, noise_mode: str = "learned",
                             noise_std: float = 0.25, map_location="cpu") -> OfficialModels:
    """Build the project's encoder, predictor and target encoder from an official checkpoint.

    Args:
        ckpt: path to a ``.pth.tar`` / ``.pt`` file or an already loaded dict.
        model, num_heads, patch_size, img_size: optional; inferred from the weights when omitted
            and checked against them when given (a contradiction is a ``ValueError``).
        noise_mode, noise_std: the predictor's StoP setting (not stored in official checkpoints).
    """
    if isinstance(ckpt, (str, os.PathLike)):
        if not os.path.isfile(ckpt):
            raise FileNotFoundError(f"ckpt: no such file: {os.fspath(ckpt)}")
        ckpt = torch.load(ckpt, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, Mapping):
        raise TypeError(f"ckpt: expected a path or a dict, got {type(ckpt).__name__}")
    for key in ("encoder", "predictor"):
        if key not in ckpt:
            raise ValueError(f"ckpt: missing key '{key}' (found {sorted(ckpt)}); expected the official layout "
                             "with 'encoder', 'predictor' and 'target_encoder'")
    enc_sd = strip_prefix(ckpt["encoder"])
    sizes = infer_encoder_sizes(enc_sd)
    heads = sizes.num_heads
    if model is not None:
        spec = VIT_PRESETS[resolve_model_name(model)]
        if (spec.embed_dim, spec.depth) != (sizes.embed_dim, sizes.depth):
            raise ValueError(f"model: {model} has width {spec.embed_dim} and depth {spec.depth}, but the checkpoint "
                             f"holds width {sizes.embed_dim} and depth {sizes.depth}")
        heads = spec.num_heads
    if num_heads is not None:
        heads = num_heads
    if heads is None:
        raise ValueError(f"num_heads: the checkpoint's width {sizes.embed_dim} matches no preset; pass num_heads")
    if sizes.embed_dim % heads:
        raise ValueError(f"num_heads: {heads} does not divide the checkpoint's width {sizes.embed_dim}")
    for name, given, found in (("patch_size", patch_size, sizes.patch_size), ("img_size", img_size, sizes.img_size)):
        if given is not None and given != found:
            raise ValueError(f"{name}: given {given}, but the checkpoint was trained with {found}")

    def encoder(sd: Dict[str, torch.Tensor], what: str) -> VisionTransformer:
        enc = VisionTransformer(img_size=sizes.img_size, patch_size=sizes.patch_size, in_chans=sizes.in_chans,
                                embed_dim=sizes.embed_dim, depth=sizes.depth, num_heads=heads,
                                mlp_ratio=sizes.mlp_ratio)
        _load_exact(enc, sd, what)
        return enc

    pred_sd = strip_prefix(ckpt["predictor"])
    D = _require(pred_sd, "predictor_embed.weight", "predictor").shape[0]
    pred = VisionTransformerPredictor(
        num_patches=(sizes.img_size // sizes.patch_size) ** 2, embed_dim=sizes.embed_dim, predictor_embed_dim=D,
        depth=_depth(pred_sd, "predictor_blocks"), num_heads=heads,
        mlp_ratio=_require(pred_sd, "predictor_blocks.0.mlp.fc1.weight", "predictor").shape[0] / D,
        noise_mode=noise_mode, noise_std=noise_std)
    _load_exact(pred, pred_sd, "predictor")
    target = encoder(strip_prefix(ckpt["target_encoder"]), "target_encoder") if "target_encoder" in ckpt else None
    epoch = ckpt.get("epoch")
    return OfficialModels(encoder(enc_sd, "encoder"), pred, target, int(epoch) if epoch is not None else None)
