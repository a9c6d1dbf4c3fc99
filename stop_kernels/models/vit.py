"""Vision Transformer encoder of I-JEPA (context and target encoder), with a timm-style registry.

The module and parameter names follow the official I-JEPA code (``patch_embed.proj``,
``blocks.{i}.attn.qkv`` …) so official checkpoints load by name (see :mod:`.official`).
Attention goes through :func:`stop_kernels.ops.attention.dispatch_attention_qkv`, which picks the
fused Triton kernel on CUDA and SDPA / the reference elsewhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Union

import torch
import torch.nn as nn

from .. import _checks as chk
from .. import reference
from ..ops.attention import dispatch_attention_qkv
from ..ops.linear_gelu import linear_gelu, records_grad

LN_EPS = 1e-6
INIT_STD = 0.02


@dataclass(frozen=True)
class ViTSpec:
    """Width, depth, heads and MLP ratio of a ViT preset (as in I-JEPA)."""
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0


VIT_PRESETS: Dict[str, ViTSpec] = {
    "vit_tiny": ViTSpec(192, 12, 3),
    "vit_small": ViTSpec(384, 12, 6),
    "vit_base": ViTSpec(768, 12, 12),
    "vit_large": ViTSpec(1024, 24, 16),
    "vit_huge": ViTSpec(1280, 32, 16),
    "vit_giant": ViTSpec(1408, 40, 16, 48 / 11),
}
# short aliases used on the command line (`--model vit_h`)
ALIASES = {"vit_t": "vit_tiny", "vit_s": "vit_small", "vit_b": "vit_base", "vit_l": "vit_large",
           "vit_h": "vit_huge", "vit_g": "vit_giant"}


def resolve_model_name(name: str) -> str:
    """The preset name of ``name``: an alias such as ``vit_h`` becomes ``vit_huge``; ``ValueError`` naming
    ``model`` for a name that is neither a preset of :data:`VIT_PRESETS` nor an alias."""
    if not isinstance(name, str):
        raise TypeError(f"model: expected a preset name such as 'vit_huge' or 'vit_h', got {type(name).__name__}")
    name = ALIASES.get(name, name)
    chk.choice("model", name, VIT_PRESETS)
    return name


def grid_size(img_size: int, patch_size: int, *, name: str = "img_size") -> int:
    """Patches per side; validates that the image size is a positive multiple of the patch size.

    ``name`` is the caller's name of the image-size argument, used in the error messages."""
    for arg, v in ((name, img_size), ("patch_size", patch_size)):
        if not chk.is_int(v) or v <= 0:  # (a bool is an int in Python, never a size)
            raise ValueError(f"{arg}: expected a positive integer, got {v!r}")
    if img_size % patch_size:
        raise ValueError(f"{name}: expected a multiple of patch_size={patch_size}, got {img_size}")
    return img_size // patch_size


# ----------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """Image ``[B, C, H, W]`` → patch tokens ``[B, (H/p)·(W/p), E]``: y = patches(x)·Wᵀ + b.

    The patches do not overlap (kernel = stride = p), so the strided convolution of the official code is a
    matrix product: each token is the ``C·p·p`` pixels of its patch in (c, i, j) order times the flattened
    ``[E, C, p, p]`` kernel. Computed that way it runs as one GEMM over ``[B·N, C·p·p]``; cuDNN's
    convolution took 0.59 ms per call at ViT-H/14, batch 64, on an H200 (GPU run 5), ≈ 17× the time of its
    24.7 GFLOP at the card's matmul rate. The kernel stays an ``nn.Conv2d`` so the parameter names, shapes
    and initialisation are the official ones (checkpoints load unchanged); only its forward is not called.
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.num_patches = grid_size(img_size, patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        p = self.patch_size
        gh, gw = H // p, W // p
        k = C * p * p
        # K padded with zeros to a multiple of 8 (p = 14: 588 → 592) so the bf16 rows are 16-byte aligned,
        # as cuBLAS's TMA kernels need; one copy gathers the patches (and casts them, under autocast)
        pad = -k % 8
        # (autocast never casts float64: a float64 model stays float64 under it, as its Linear would)
        amp = chk.autocast_on(x.device.type) and self.proj.weight.dtype != torch.float64
        dt = torch.get_autocast_dtype(x.device.type) if amp else x.dtype
        patches = x.new_empty(B, gh * gw, k + pad, dtype=dt)
        patches[..., :k].view(B, gh, gw, C, p, p).copy_(x.view(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5))
        weight = self.proj.weight.flatten(1)  # a view: no copy where K needs no padding (p = 16: 768)
        if pad:
            patches[..., k:].zero_()
            weight = nn.functional.pad(weight, (0, pad))
        return nn.functional.linear(patches, weight, self.proj.bias)


class MLP(nn.Module):
    """``fc2(GELU(fc1(x)))``, the official block's MLP (exact GELU).

    ``gelu_epilogue`` (False; config key ``fused_target_gelu`` sets it in the target encoder's blocks): where
    autograd records nothing (no grad mode, or no tensor of the call requiring grad), ``fc1``, its bias and a
    tanh-form GELU run as one GEMM (:func:`stop_kernels.ops.linear_gelu.linear_gelu`: the activation is not read
    back by an elementwise kernel; the tanh form differs from the exact one by far less than bf16 rounding). Calls
    that autograd records keep the exact path."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.gelu_epilogue = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gelu_epilogue and not records_grad(x, self.fc1.weight, self.fc1.bias):
            return self.fc2(linear_gelu(x, self.fc1.weight, self.fc1.bias))
        return self.fc2(self.act(self.fc1(x)))


def use_gelu_epilogue(model: nn.Module, on: bool = True) -> nn.Module:
    """Set :attr:`MLP.gelu_epilogue` in every MLP of ``model`` (the training loop: the target encoder's, config key
    ``fused_target_gelu``); returns ``model``."""
    for m in model.modules():
        if isinstance(m, MLP):
            m.gelu_epilogue = bool(on)
    return model


class Attention(nn.Module):
    """Multi-head self-attention over the fused QKV projection's output ``[..., N, 3, H, Dh]`` (no
    permute or copy; the Triton backend also writes its gradient in that layout)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads: expected a divisor of the width {dim}, got {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                max_seqlen: Optional[int] = None) -> torch.Tensor:
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim))  # a view
        if cu_seqlens is None:
            o = dispatch_attention_qkv(qkv, scale=self.scale)
        else:
            o = dispatch_attention_qkv(qkv, scale=self.scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return self.proj(o.flatten(-2))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                max_seqlen: Optional[int] = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cu_seqlens, max_seqlen)
        return x + self.mlp(self.norm2(x))


def init_weights(module: nn.Module) -> None:
    """The official training's initialisation: truncated normal (std 0.02) Linear and Conv2d weights, zero
    biases, unit LayerNorm.

    The official ``vision_transformer.py`` constructors also divide each block's ``attn.proj`` and ``mlp.fc2``
    weights by sqrt(2·layer), but both official trainers (I-JEPA's ``src/helper.py:init_model``, StoP's
    ``main.py``) re-initialise every ``nn.Linear`` with std 0.02 right after building the models, which undoes
    that rescale: their runs start from this."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=INIT_STD)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------
# encoder
# ----------------------------------------------------------------------------------------------
def check_transformer_sizes(width_name: str, width, depth, num_heads, mlp_ratio) -> None:
    """The size checks shared by the encoder and the predictor, each error naming its argument (depth
    0 is allowed: a model of its embeddings and tables only, as the similarity-map plots build)."""
    for name, v, lo in ((width_name, width, 1), ("depth", depth, 0), ("num_heads", num_heads, 1)):
        chk.int_at_least(name, v, lo)
    if width % 4:
        raise ValueError(f"{width_name}: expected a multiple of 4 (2-D sin-cos positions), got {width}")
    if width % num_heads:
        raise ValueError(f"num_heads: expected a divisor of {width_name}={width}, got {num_heads}")
    if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not 0 < mlp_ratio < math.inf:
        raise ValueError(f"mlp_ratio: expected a positive finite number, got {mlp_ratio!r}")
    if int(width * mlp_ratio) < 1:  # (the MLP of hidden width int(width · ratio) 0 that mlp_ratio 0 would build)
        raise ValueError(f"mlp_ratio: expected at least one hidden unit, int({width_name}={width} x {mlp_ratio!r}) "
                         f"= 0")


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, *args, residual_dtype: Optional[torch.dtype] = None):
    """``x`` (the residual stream) through ``blocks`` in order; ``args`` go to every block (packed
    mode: ``cu_seqlens, max_seqlen``).

    ``residual_dtype``: under autocast the stream stays in fp32 (the embeddings' fp32 positions and
    the fp32 residual adds make it so), so each block's LayerNorms and residual adds read and write
    4 bytes per element. Given ``torch.bfloat16`` the stream is cast once, before the first block,
    and every residual add then stays in bf16, as every model's stream already does where FSDP2
    gathers bf16 parameters (several GPUs): ≈ 8 of the ≈ 42 bytes per token and width that a
    compiled block's elementwise kernels move in the forward. Outside autocast it changes nothing."""
    if residual_dtype is not None and x.dtype != residual_dtype and chk.autocast_on(x.device.type):
        x = x.to(residual_dtype)
    run = getattr(blocks, "compiled_run", None)  # the stack as one compiled graph (training.parallelize.compile_stack)
    if run is not None:
        return run(x, *args)
    for blk in blocks:
        x = blk(x, *args)
    return x


class VisionTransformer(nn.Module):
    """I-JEPA encoder: patch embedding + fixed 2-D sin-cos positions + blocks + LayerNorm.

    ``forward(imgs[B, C, H, W], masks=None)`` returns ``[B, N, E]`` for all patches, or with
    ``masks`` (a ``[B, K]`` index tensor or a list of them) only the kept tokens of each mask,
    stacked as ``[nmask·B, K, E]`` (the official ``apply_masks`` order).
    """

    residual_dtype: Optional[torch.dtype] = None  # see run_blocks (config key bf16_residual)

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        check_transformer_sizes("embed_dim", embed_dim, depth, num_heads, mlp_ratio)
        chk.int_at_least("in_chans", in_chans, 1)
        g = grid_size(img_size, patch_size)
        self.img_size, self.patch_size, self.grid = img_size, patch_size, g
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.register_buffer("pos_embed", reference.sincos_pos_embed_2d(embed_dim, g))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
        init_weights(self)

    def reset_parameters(self) -> None:
        """Initialise every parameter as the constructor does (:func:`init_weights`) and recompute the sin-cos
        position table: for a model built on the meta device and then given storage (``to_empty``), whose
        buffers hold whatever that memory held."""
        with torch.no_grad():
            self.pos_embed.copy_(reference.sincos_pos_embed_2d(self.embed_dim, self.grid))
        init_weights(self)

    def embed(self, imgs: torch.Tensor) -> torch.Tensor:
        chk.float_tensor("imgs", imgs, ndim=4)
        C, H, W = imgs.shape[1:]
        if (H, W) != (self.img_size, self.img_size) or C != self.patch_embed.proj.in_channels:
            raise ValueError(f"imgs: expected [B, {self.patch_embed.proj.in_channels}, {self.img_size}, "
                             f"{self.img_size}], got {tuple(imgs.shape)}")
        w_dtype = self.patch_embed.proj.weight.dtype
        # autocast casts the patches, not the position table added to them: a float64 image still fails there
        if imgs.dtype != w_dtype and (not chk.autocast_on(imgs.device.type) or imgs.dtype == torch.float64):
            raise TypeError(f"imgs: expected the encoder's dtype {str(w_dtype).replace('torch.', '')} (under "
                            f"autocast, any 16- or 32-bit float), got {str(imgs.dtype).replace('torch.', '')}")
        return self.patch_embed(imgs) + self.pos_embed.to(imgs.dtype)

    def forward(self, imgs: torch.Tensor, masks: Union[None, torch.Tensor, Sequence[torch.Tensor]] = None):
        """Rectangular masks give ``[nmask·B, K, E]``; ragged masks (one context mask given as a list of
        B 1-D index tensors, or the one-element list of it that ``MultiBlockMaskCollator(truncate=False)``
        returns as ``masks_enc``) give a packed :class:`~stop_kernels.models.packing.Packed` ``[T, E]``
        with ``cu_seqlens`` (no patch dropped)."""
        from .packing import encode_packed, is_ragged

        if is_ragged(masks):
            if len(masks) != 1:
                raise ValueError(f"masks: packed mode takes one context mask (a list of B tensors), got {len(masks)}")
            return encode_packed(self, imgs, masks[0])
        if isinstance(masks, (list, tuple)) and masks and all(isinstance(m, torch.Tensor) and m.ndim == 1
                                                              for m in masks):
            # the context mask itself (masks_enc[0]), as the predictor takes it: 1-D entries are never rectangular
            return encode_packed(self, imgs, masks)
        x = self.embed(imgs)
        if masks is not None:
            idx = reference.stack_target_indices([masks] if isinstance(masks, torch.Tensor) else masks, "masks")
            chk.index_tensor("masks", idx, upper=self.num_patches, what=f"{self.num_patches} patches")
            if idx.shape[-1] == 0:
                raise ValueError(f"masks: expected at least one patch index per mask, got shape {tuple(idx.shape)}")
            if idx.shape[1] != x.shape[0]:
                raise ValueError(f"masks: expected batch size {x.shape[0]}, got shape {tuple(idx.shape)}")
            x = reference.gather_tokens(x, idx)
        return self.norm(run_blocks(self.blocks, x, residual_dtype=self.residual_dtype))


def vit_encoder(name: str, *, img_size: int = 224, patch_size: int = 16, in_chans: int = 3) -> VisionTransformer:
    """Build an encoder preset by name (``vit_tiny`` … ``vit_giant``, or ``vit_h`` style aliases)."""
    spec = VIT_PRESETS[resolve_model_name(name)]
    return VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                             embed_dim=spec.embed_dim, depth=spec.depth, num_heads=spec.num_heads,
                             mlp_ratio=spec.mlp_ratio)


def _preset(name: str) -> Callable[..., VisionTransformer]:
    def build(**kw) -> VisionTransformer:
        return vit_encoder(name, **kw)
    build.__name__ = name
    build.__doc__ = f"{name}: {VIT_PRESETS[name]}"
    return build


vit_tiny, vit_small, vit_base, vit_large, vit_huge, vit_giant = (_preset(n) for n in VIT_PRESETS)
