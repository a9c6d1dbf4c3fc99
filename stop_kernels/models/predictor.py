"""The I-JEPA predictor with Stochastic Positional Embeddings.

Input assembly (the only part StoP changes) is one call to
:func:`stop_kernels.ops.predictor_input.assemble_predictor_input`: context rows are
``predictor_embed(ctx) + ψ[ctx_idx]``; each masked row is

* ``noise_mode="learned"`` (StoP): ``ψ_j + predictor_embed(n_j)``, n_j ~ N(0, σ² I_E), so the
  covariance σ²·A·Aᵀ is tied to the context projection A and cannot collapse;
* ``"isotropic"``: ``ψ_j + n_j``, n_j ~ N(0, σ² I_D) (the paper's fixed-covariance ablation);
* ``"none"``: ``ψ_j + mask_token`` (plain I-JEPA).

Parameter names follow the official code so checkpoints load by name.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from .. import _checks as chk
from .. import reference
from .vit import LN_EPS, INIT_STD, Block, check_transformer_sizes, grid_size, init_weights, run_blocks

Masks = Union[torch.Tensor, Sequence[torch.Tensor]]


def _parametrized(module: nn.Module) -> bool:
    from torch.nn.utils import parametrize
    return parametrize.is_parametrized(module)
# "unfused" is the official code's path (torch.randn noise + Linear + gather + repeat + cat); "cuda" draws the
# StoP rows with the CUDA C++ stop_embed (it has no assembly kernel) and joins them to the context rows as the
# official code does (the other noise modes run as "auto"); the others select the backend of the fused op
# (see stop_kernels.ops.predictor_input)
INPUT_BACKENDS = ("auto", "triton", "cuda", "reference", "unfused")


class VisionTransformerPredictor(nn.Module):
    """Narrow transformer predicting target-block features from context tokens.

    ``forward(x[B, Nc, E], masks_x, masks)`` → ``[npred·B, Nt, E]`` where ``masks_x`` is the
    context index tensor ``[B, Nc]`` (or a one-element list) and ``masks`` the ``npred`` target
    index tensors ``[B, Nt]``; row ``k·B + b`` is target block k of image b.

    ``mask_token`` is used by ``noise_mode="none"`` only; the StoP modes keep it (the official
    checkpoints hold it) without a gradient, so wrapping the predictor in PyTorch's DDP needs
    ``find_unused_parameters=True`` there (FSDP2, as the training pipeline shards, needs nothing).
    """

    residual_dtype: Optional[torch.dtype] = None  # see vit.run_blocks (config key bf16_residual)

    def __init__(self, num_patches: int, embed_dim: int = 768, predictor_embed_dim: int = 384, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 noise_mode: str = "learned", noise_std: float = 0.25, input_backend: str = "auto"):
        super().__init__()
        chk.choice("noise_mode", noise_mode, reference.NOISE_MODES)
        chk.choice("input_backend", input_backend, INPUT_BACKENDS)
        self.input_backend = input_backend
        self.noise_std = chk.non_negative("noise_std", noise_std)
        self.noise_mode = noise_mode
        check_transformer_sizes("predictor_embed_dim", predictor_embed_dim, depth, num_heads, mlp_ratio)
        if not chk.is_int(embed_dim) or embed_dim < 1:
            raise ValueError(f"embed_dim: expected an integer >= 1, got {embed_dim!r}")
        if not chk.is_int(num_patches) or num_patches < 1:
            raise ValueError(f"num_patches: expected a square integer >= 1, got {num_patches!r}")
        g = int(round(num_patches ** 0.5))
        if g * g != num_patches:
            raise ValueError(f"num_patches: expected a square number of patches, got {num_patches}")
        self.num_patches, self.embed_dim = num_patches, embed_dim
        self.predictor_embed = nn.Linear(embed_dim, predictor_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, predictor_embed_dim))
        self.register_buffer("predictor_pos_embed", reference.sincos_pos_embed_2d(predictor_embed_dim, g))
        self.predictor_blocks = nn.ModuleList(
            [Block(predictor_embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth)])
        self.predictor_norm = nn.LayerNorm(predictor_embed_dim, eps=LN_EPS)
        self.predictor_proj = nn.Linear(predictor_embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise every parameter as the official trainer does (:func:`~stop_kernels.models.vit.init_weights`,
        then the mask token) and recompute the sin-cos position table: also for a model built on the meta
        device and then given storage (``to_empty``), whose buffers hold whatever that memory held."""
        with torch.no_grad():
            self.predictor_pos_embed.copy_(reference.sincos_pos_embed_2d(self.predictor_pos_embed.shape[1],
                                                                          int(round(self.num_patches ** 0.5))))
        init_weights(self)
        nn.init.trunc_normal_(self.mask_token, std=INIT_STD)

    def embed_linear(self) -> nn.Linear:
        """``predictor_embed``, checked to be a plain ``nn.Linear`` without forward hooks: every input path reads its
        ``weight`` and ``bias`` (the fused StoP op multiplies by them inside its kernels) and never calls it, so a
        subclass's ``forward``, a wrapper (LoRA, quantisation) or a hook would be silently ignored. Parametrizations
        (``torch.nn.utils.parametrize``) are honoured: they act through ``.weight``."""
        emb = self.predictor_embed
        if type(emb) is not nn.Linear and not (isinstance(emb, nn.Linear) and _parametrized(emb)):
            raise TypeError(f"predictor_embed: expected a plain nn.Linear, got {type(emb).__name__}: the predictor "
                            f"reads its weight and bias and never calls it, so its forward would be ignored "
                            f"(parametrize the weight instead, torch.nn.utils.parametrize)")
        if emb._forward_hooks or emb._forward_pre_hooks:  # (global module hooks only observe: not refused)
            raise TypeError("predictor_embed: forward hooks on it would never run: the predictor reads its weight "
                            "and bias and never calls it")
        return emb

    def assemble(self, x: torch.Tensor, masks_x: Masks, masks: Masks, *, noise: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The predictor's input ``[npred·B, Nc+Nt, D]`` (see the module docstring)."""
        from ..ops.predictor_input import assemble_predictor_input

        chk.float_tensor("x", x, ndim=3)
        if x.shape[-1] != self.embed_dim:  # (checked here: the op's check would blame predictor_embed's weight)
            raise ValueError(f"x: expected the encoder's width {self.embed_dim} in the last dim, got shape "
                             f"{tuple(x.shape)}")
        ctx_idx = masks_x
        if not isinstance(masks_x, torch.Tensor):
            if len(masks_x) != 1:
                raise ValueError(f"masks_x: expected one context mask (I-JEPA uses one), got {len(masks_x)}")
            ctx_idx = masks_x[0]
        tgt = [masks] if isinstance(masks, torch.Tensor) and masks.dim() == 2 else masks
        if isinstance(noise, (list, tuple)):  # the official per-block list of [B, Nt, width]
            noise = torch.stack(list(noise))
        emb = self.embed_linear()
        args = (x, ctx_idx, tgt, emb.weight, emb.bias, self.predictor_pos_embed)
        kw = dict(noise_mode=self.noise_mode, noise_std=self.noise_std, mask_token=self.mask_token, noise=noise,
                  generator=generator)
        if self.input_backend == "unfused":
            return reference.assemble_predictor_input(*args, **kw)
        if self.input_backend == "cuda" and self.noise_mode == "learned" and noise is None:
            return self._assemble_with_cuda_stop(*args, generator=generator)
        backend = "auto" if self.input_backend == "cuda" else self.input_backend
        return assemble_predictor_input(*args, backend=backend, **kw)

    def _assemble_with_cuda_stop(self, x, ctx_idx, tgt, weight, bias, pos_embed, *, generator):
        """input_backend "cuda", learned noise: the masked rows from the CUDA C++ ``stop_embed`` (same Philox
        stream as the fused op), joined to ``predictor_embed(x) + ψ[ctx_idx]`` as the official code joins them."""
        tgt = reference.check_assembly_args(x, ctx_idx, tgt, weight, bias, pos_embed, self.noise_mode,
                                            self.noise_std, self.mask_token)
        return reference.join_predictor_rows(reference.context_rows(x, ctx_idx, weight, bias, pos_embed),
                                             self.stop_rows(tgt, generator=generator))

    def stop_rows(self, idx: torch.Tensor, *, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """StoP masked rows ``ψ[idx] + n·Wᵀ + b`` (W, b: ``predictor_embed``) → ``[..., M, D]`` by
        :func:`stop_kernels.stop_embed` with this predictor's σ and input backend ("auto" for "unfused").
        The CUDA C++ backend takes ψ in the autocast dtype too: its kernels run in one dtype, and the fp32
        table would make it fp32 in a bf16 step."""
        from ..ops.stop_embed import autocast_dtype, stop_embed

        backend = "auto" if self.input_backend == "unfused" else self.input_backend
        pos, emb = self.predictor_pos_embed, self.embed_linear()
        amp = autocast_dtype(torch.device("cuda")) if backend == "cuda" else None  # "cuda" takes CUDA tensors only
        return stop_embed(pos if amp is None else pos.to(amp), idx, emb.weight, emb.bias, noise_std=self.noise_std,
                          generator=generator, backend=backend)

    def forward(self, x, masks_x: Masks, masks: Masks, *, noise: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Rectangular: ``x[B, Nc, E]`` → ``[npred·B, Nt, E]``. Packed: ``x`` a
        :class:`~stop_kernels.models.packing.Packed` from the encoder and ragged masks (lists of B 1-D
        tensors) → ``[Mt, E]``, the target tokens in (block, image, token) order."""
        from .packing import Packed, predict_packed

        if isinstance(x, Packed):
            ctx_masks = masks_x[0] if len(masks_x) == 1 and isinstance(masks_x[0], (list, tuple)) else masks_x
            return predict_packed(self, x, ctx_masks, masks, noise=noise, generator=generator)
        z = self.assemble(x, masks_x, masks, noise=noise, generator=generator)  # (checks x)
        n_ctx = x.shape[1]
        z = self.predictor_norm(run_blocks(self.predictor_blocks, z, residual_dtype=self.residual_dtype))
        return self.predictor_proj(z[:, n_ctx:])


def vit_predictor(*, num_patches: int, embed_dim: int, num_heads: int, predictor_embed_dim: int = 384,
                  depth: int = 12, noise_mode: str = "learned", noise_std: float = 0.25,
                  input_backend: str = "auto") -> VisionTransformerPredictor:
    """A :class:`VisionTransformerPredictor` for an encoder of width ``embed_dim`` with ``num_heads`` heads over
    ``num_patches`` patches (a square grid); :func:`predictor_for` derives these from an encoder."""
    return VisionTransformerPredictor(num_patches=num_patches, embed_dim=embed_dim,
                                      predictor_embed_dim=predictor_embed_dim, depth=depth, num_heads=num_heads,
                                      noise_mode=noise_mode, noise_std=noise_std, input_backend=input_backend)


def predictor_for(encoder, *, img_size: int, patch_size: int, **kw) -> VisionTransformerPredictor:
    """The predictor matching an encoder (heads = encoder heads, as in I-JEPA); ``img_size`` and
    ``patch_size`` must give the encoder's patch grid (else every position would be placed wrong). Width and
    depth are the official defaults whatever the encoder (``predictor_embed_dim`` 384, ``depth`` 12: for a
    small encoder, pass smaller ones, e.g. 96 and 2 for ``vit_tiny``)."""
    if not all(hasattr(encoder, a) for a in ("num_patches", "embed_dim", "num_heads", "img_size", "patch_size")):
        raise TypeError(f"encoder: expected an encoder built by vit_encoder (a VisionTransformer), got "
                        f"{type(encoder).__name__}")
    num_patches = grid_size(img_size, patch_size) ** 2
    if num_patches != encoder.num_patches:
        raise ValueError(f"img_size: {img_size} px with patch {patch_size} gives {num_patches} patches, but the encoder "
                         f"has {encoder.num_patches} (img_size {encoder.img_size}, patch {encoder.patch_size})")
    return vit_predictor(num_patches=num_patches, embed_dim=encoder.embed_dim, num_heads=encoder.num_heads, **kw)
