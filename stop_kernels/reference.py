"""Pure-PyTorch reference implementations: the ground truth every fused kernel is tested against.

Everything here is written for clarity, in the order of operations of the official I-JEPA / StoP
code, and runs on any device. The fused ops in :mod:`stop_kernels.ops` must agree with these
functions (to float rounding) on every valid input.

Notation (shapes):
    P  number of patch positions (rows of the positional table ψ)
    E  encoder width, D predictor width
    B  images in the batch, npred target blocks per image
    Nc context tokens per image, Nt tokens per target block
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from . import _checks as chk

NOISE_MODES = ("learned", "isotropic", "none")

TargetIndices = Union[torch.Tensor, Sequence[torch.Tensor]]


# ----------------------------------------------------------------------------------------------
# token gathering (the official `apply_masks`)
# ----------------------------------------------------------------------------------------------
def stack_target_indices(tgt_idx: TargetIndices, name: str = "tgt_idx", *, checked: bool = False) -> torch.Tensor:
    """Normalise target indices to one ``[npred, B, Nt]`` tensor.

    Accepts the official layout (a list of ``npred`` tensors ``[B, Nt]``) or an already stacked
    ``[npred, B, Nt]`` tensor. ``checked``: the caller has already validated this layout (no checks).
    """
    if isinstance(tgt_idx, torch.Tensor):
        if not checked:
            chk.tensor(name, tgt_idx, ndim=3, dtypes=chk.INDEX_DTYPES)
        return tgt_idx
    if not checked:
        if not isinstance(tgt_idx, (list, tuple)) or len(tgt_idx) == 0:
            raise TypeError(f"{name}: expected a non-empty list of [B, Nt] index tensors or a [npred, B, Nt] tensor")
        for i, t in enumerate(tgt_idx):
            chk.tensor(f"{name}[{i}]", t, ndim=2, dtypes=chk.INDEX_DTYPES)
            if t.shape != tgt_idx[0].shape:
                raise ValueError(f"{name}[{i}]: expected shape {tuple(tgt_idx[0].shape)} like {name}[0], got "
                                 f"{tuple(t.shape)}")
            if t.device != tgt_idx[0].device:
                raise ValueError(f"{name}[{i}]: expected device {tgt_idx[0].device} like {name}[0], got {t.device}")
    return torch.stack(list(tgt_idx), 0)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather tokens per sample: ``x[B, N, C]``, ``idx[B, K]`` or ``[npred, B, K]`` → ``[npred·B, K, C]``.

    With ``idx`` of shape ``[npred, B, K]`` block k of sample b lands at row ``k·B + b``: the
    official ``apply_masks``.
    """
    B = x.shape[0]
    if idx.dim() == 2:
        idx = idx.unsqueeze(0)
    rows = torch.arange(B, device=x.device).view(1, B, 1)
    out = x[rows, idx]  # [npred, B, K, C]
    return out.reshape(idx.shape[0] * B, idx.shape[-1], x.shape[-1])  # (not -1: K may be 0)


# ----------------------------------------------------------------------------------------------
# StoP: ψ̂ = ψ[idx] + n·Wᵀ + b
# ----------------------------------------------------------------------------------------------
def stop_embed(pos_embed: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
               bias: Optional[torch.Tensor], noise: torch.Tensor) -> torch.Tensor:
    """Stochastic positional embedding of masked tokens, given the noise.

    ``out[..., m, :] = pos_embed[idx[..., m]] + noise[..., m, :] @ weight.T + bias``

    Args:
        pos_embed: ``[P, D]`` positional table ψ.
        idx: ``[..., M]`` integer positions in ``[0, P)``.
        weight: ``[D, E]`` the predictor's context projection (A = B in the paper).
        bias: ``[D]`` or None.
        noise: ``[..., M, E]`` the already scaled noise n ~ N(0, σ² I).
    Returns:
        ``[..., M, D]`` in ``promote(weight.dtype, pos_embed.dtype)`` (``noise`` has the weight's dtype),
        as the fused op.
    """
    chk.position_table("pos_embed", pos_embed)
    chk.float_tensor("weight", weight, ndim=2)
    chk.float_tensor("noise", noise, min_ndim=2)
    if bias is not None:
        chk.float_tensor("bias", bias, ndim=1)
    chk.index_tensor("idx", idx, upper=pos_embed.shape[0], what=f"pos_embed has {pos_embed.shape[0]} rows", min_ndim=1)
    chk.same_device(pos_embed=pos_embed, idx=idx, weight=weight, bias=bias, noise=noise)
    chk.projection_weight("weight", weight, pos_embed.shape[1], "pos_embed.shape[1]", bias=bias)
    D, E = weight.shape
    chk.dim_equals("pos_embed", pos_embed, 1, D, "predictor width D = weight.shape[0]")
    if noise.shape[:-1] != idx.shape or noise.shape[-1] != E:
        raise ValueError(f"noise: expected shape {tuple(idx.shape) + (E,)} (idx shape + encoder width), got {tuple(noise.shape)}")
    if noise.dtype != weight.dtype and not chk.autocast_on(noise.device.type):  # autocast casts both
        raise TypeError(f"noise: expected the dtype of weight ({weight.dtype}) for n·Wᵀ, got {noise.dtype}")
    if bias is not None:
        chk.dim_equals("bias", bias, 0, D, "predictor width D")
        bias = bias.to(weight.dtype)  # as the fused ops take it: a bias of another dtype is cast, not refused
    return F.linear(noise, weight, bias) + pos_embed[idx]


def draw_noise(shape, *, noise_std: float, dtype, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """n ~ N(0, noise_std² I) of the given shape (the official ``torch.randn(...) * std``), drawn on the
    generator's device (a CPU generator with CUDA tensors: drawn on the host, then moved)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    where = generator.device if generator is not None else device
    n = torch.randn(shape, dtype=dtype, device=where, generator=generator) * noise_std
    return n.to(device)


# ----------------------------------------------------------------------------------------------
# predictor input assembly
# ----------------------------------------------------------------------------------------------
def check_no_noise(noise, noise_mode: str) -> None:
    """``noise_mode='none'`` takes no noise: one given is refused, not ignored."""
    if noise is not None and noise_mode == "none":
        raise ValueError("noise: noise_mode='none' uses no noise (the mask token); pass noise=None")


def check_isotropic_noise(noise: torch.Tensor, shape, pos_embed: torch.Tensor) -> None:
    """Explicit isotropic noise (predictor width, added to ψ): a float tensor of ``shape`` on ψ's device."""
    chk.float_tensor("noise", noise)
    chk.same_device(pos_embed=pos_embed, noise=noise)
    if tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise: expected shape {tuple(shape)} (target tokens, predictor width) for "
                         f"noise_mode='isotropic', got {tuple(noise.shape)}")


_ASSEMBLY_CHECKED = chk.CheckedSignatures()


def check_assembly_args(ctx, ctx_idx, tgt_idx, weight, bias, pos_embed, noise_mode, noise_std, mask_token):
    """Validate the arguments of :func:`assemble_predictor_input` (shared with the fused op).

    Returns the stacked ``[npred, B, Nt]`` target indices. The checks of kinds, shapes, dtypes and devices run
    once per distinct signature of the arguments (``chk.CheckedSignatures``: a training step repeats a few); the
    index values are checked on every call (unless ``trusted_device_indices`` for device tensors).
    """
    autocast = chk.autocast_on(ctx.device.type) if isinstance(ctx, torch.Tensor) else None
    key = _ASSEMBLY_CHECKED.key((ctx, ctx_idx, tgt_idx, weight, bias, pos_embed, noise_mode, noise_std, mask_token,
                                 autocast))
    known = key in _ASSEMBLY_CHECKED
    if not known:
        _check_assembly_metadata(ctx, ctx_idx, tgt_idx, weight, bias, pos_embed, noise_mode, noise_std, mask_token,
                                 autocast)
    tgt = stack_target_indices(tgt_idx, checked=known)
    if not known:  # (stack_target_indices checked the kind and dtype)
        if tgt.shape[1] != ctx.shape[0]:
            raise ValueError(f"tgt_idx: expected batch size {ctx.shape[0]} (ctx.shape[0]), got shape {tuple(tgt.shape)}")
        chk.same_device(ctx=ctx, ctx_idx=ctx_idx, tgt_idx=tgt, weight=weight, bias=bias, pos_embed=pos_embed,
                        mask_token=mask_token)
        chk.kernel_sizes("tgt_idx", tgt.numel(), "masked tokens", weight)  # (one noise row per masked token)
    P = pos_embed.shape[0]
    chk.index_range("ctx_idx", ctx_idx, upper=P, what=f"pos_embed has {P} rows")
    chk.index_range("tgt_idx", tgt, upper=P, what=f"pos_embed has {P} rows")
    if not known:
        _ASSEMBLY_CHECKED.add(key)
    return tgt


def _check_assembly_metadata(ctx, ctx_idx, tgt_idx, weight, bias, pos_embed, noise_mode, noise_std, mask_token,
                             autocast):
    """The checks of :func:`check_assembly_args` that read kinds, shapes, dtypes and values other than indices."""
    chk.float_tensor("ctx", ctx, ndim=3)
    chk.float_tensor("weight", weight, ndim=2)
    chk.position_table("pos_embed", pos_embed)
    chk.choice("noise_mode", noise_mode, NOISE_MODES)
    chk.non_negative("noise_std", noise_std)
    B, Nc, E = ctx.shape
    D = weight.shape[0]
    if ctx.dtype != weight.dtype and not autocast:  # autocast casts both
        raise TypeError(f"ctx: expected the dtype of weight ({weight.dtype}) for the context projection, got {ctx.dtype}")
    if bias is not None:
        chk.float_tensor("bias", bias, ndim=1)
    chk.projection_weight("weight", weight, pos_embed.shape[1], "pos_embed.shape[1]", E=E, E_from="ctx.shape[-1]",
                          bias=bias)
    chk.dim_equals("pos_embed", pos_embed, 1, D, "predictor width D = weight.shape[0]")
    chk.tensor("ctx_idx", ctx_idx, dtypes=chk.INDEX_DTYPES, ndim=2)
    if tuple(ctx_idx.shape) != (B, Nc):
        raise ValueError(f"ctx_idx: expected shape {(B, Nc)} (ctx.shape[:2]), got {tuple(ctx_idx.shape)}")
    if bias is not None:
        chk.dim_equals("bias", bias, 0, D, "predictor width D")
    if noise_mode == "none" and mask_token is None:
        raise ValueError("mask_token: required when noise_mode='none'")
    if mask_token is not None:
        chk.float_tensor("mask_token", mask_token)
        if mask_token.numel() != D:
            raise ValueError(f"mask_token: expected {D} elements (predictor width), got shape {tuple(mask_token.shape)}")


def assemble_predictor_input(ctx: torch.Tensor, ctx_idx: torch.Tensor, tgt_idx: TargetIndices,
                             weight: torch.Tensor, bias: Optional[torch.Tensor], pos_embed: torch.Tensor, *,
                             noise_mode: str = "learned", noise_std: float = 0.25,
                             mask_token: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
                             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The I-JEPA predictor's input sequence, exactly as the official predictor builds it.

    Args:
        ctx: ``[B, Nc, E]`` context-encoder output.
        ctx_idx: ``[B, Nc]`` patch index of each context token.
        tgt_idx: ``npred`` tensors ``[B, Nt]`` (or one ``[npred, B, Nt]``): target positions.
        weight, bias: the predictor's context projection ``[D, E]``, ``[D]``.
        pos_embed: ``[P, D]`` the predictor's positional table ψ.
        noise_mode: ``"learned"`` (StoP: ψ + W n + b, n in the encoder width), ``"isotropic"``
            (ψ + n, n ~ N(0, σ² I) in the predictor width), ``"none"`` (ψ + mask_token).
        noise: optional explicit noise (``[npred, B, Nt, E]`` learned, ``[npred, B, Nt, D]``
            isotropic), already scaled; drawn from ``generator`` when None.
    Returns:
        ``[npred·B, Nc + Nt, D]``; rows ``k·B + b`` hold sample b's context followed by its k-th
        target block.
    """
    tgt = check_assembly_args(ctx, ctx_idx, tgt_idx, weight, bias, pos_embed, noise_mode, noise_std, mask_token)
    check_no_noise(noise, noise_mode)
    npred, B, Nt = tgt.shape
    E = ctx.shape[2]
    D = weight.shape[0]
    if bias is not None:
        bias = bias.to(weight.dtype)  # as the fused op takes it: a bias of another dtype is cast, not refused
    x = context_rows(ctx, ctx_idx, weight, bias, pos_embed)
    dtype = x.dtype
    if noise_mode == "learned":
        if noise is None:  # in the weight's dtype, as n·Wᵀ needs it (and the fused op draws it)
            noise = draw_noise((npred, B, Nt, E), noise_std=noise_std, dtype=weight.dtype, device=ctx.device,
                               generator=generator)
        masked = stop_embed(pos_embed, tgt, weight, bias, noise)
    elif noise_mode == "isotropic":
        if noise is None:
            noise = draw_noise((npred, B, Nt, D), noise_std=noise_std, dtype=dtype, device=ctx.device, generator=generator)
        check_isotropic_noise(noise, (npred, B, Nt, D), pos_embed)
        masked = pos_embed[tgt] + noise
    else:
        masked = mask_token.reshape(D) + pos_embed[tgt]
    return join_predictor_rows(x, masked)


def context_rows(ctx: torch.Tensor, ctx_idx: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 pos_embed: torch.Tensor) -> torch.Tensor:
    """The predictor's context rows ``predictor_embed(ctx) + ψ[ctx_idx]`` → ``[B, Nc, D]``, shared by every
    target block (arguments as :func:`assemble_predictor_input`, checked there)."""
    return F.linear(ctx, weight, bias) + pos_embed[ctx_idx]


def join_predictor_rows(x: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Context rows ``x[B, Nc, D]`` and masked rows ``[npred, B, Nt, D]`` → ``[npred·B, Nc+Nt, D]`` in x's dtype,
    row ``k·B + b`` = image b's context followed by its k-th target block (the official repeat + cat)."""
    npred, B, Nt, D = masked.shape
    Nc = x.shape[1]
    x = x.unsqueeze(0).expand(npred, B, Nc, D)
    return torch.cat([x, masked.to(x.dtype)], dim=2).reshape(npred * B, Nc + Nt, D)


# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
              cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Non-causal softmax attention ``softmax(q kᵀ · scale) v`` per head.

    Layout ``[B, N, H, Dh]`` (or ``[T, H, Dh]`` packed with ``cu_seqlens`` [n+1], block-diagonal).
    Computed in float32 (float64 when given float64); returned in the input dtype.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        chk.float_tensor(name, t)
    if k.shape != v.shape or q.shape[:-3] != k.shape[:-3] or q.shape[-2:] != k.shape[-2:]:
        raise ValueError(f"k, v: shapes must match q's batch, heads and head dim: q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    layout = ("[T, H, Dh] (packed, with cu_seqlens)" if cu_seqlens is not None
              else "[B, N, H, Dh] (or [T, H, Dh] with cu_seqlens)")
    if q.dim() != (3 if cu_seqlens is not None else 4) or q.shape[-1] == 0:
        raise ValueError(f"q: expected {layout} with a head dim Dh >= 1, got shape {tuple(q.shape)}")
    if cu_seqlens is not None and k.shape[0] != q.shape[0]:  # one cu_seqlens bounds the queries and the keys
        raise ValueError(f"k, v: packed sequences share q's token count T = {q.shape[0]} (one cu_seqlens bounds "
                         f"both), got k {tuple(k.shape)}, v {tuple(v.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if cu_seqlens is not None:
        chk.tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=chk.INDEX_DTYPES)
        bounds = cu_seqlens.tolist()
        chk.packed_offsets("cu_seqlens", bounds, q.shape[0])  # a gap, overlap or end past T: another length
        outs = [attention(q[None, a:b], k[None, a:b], v[None, a:b], scale=scale)[0]
                for a, b in zip(bounds[:-1], bounds[1:])]
        return torch.cat(outs, 0) if outs else (q + k + v).to(q.dtype)  # no sequence (T = 0): empty, with a grad_fn
    s = torch.einsum("bnhd,bmhd->bhnm", q.to(acc), k.to(acc)) * scale
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhnm,bmhd->bnhd", p, v.to(acc)).to(q.dtype)


# ----------------------------------------------------------------------------------------------
# targets and loss
# ----------------------------------------------------------------------------------------------
def target_features(h: torch.Tensor, tgt_idx: TargetIndices) -> torch.Tensor:
    """I-JEPA targets: LayerNorm over features (no affine, eps 1e-5), then the target blocks.

    ``h[B, N, E]`` target-encoder output → ``[npred·B, Nt, E]``.
    """
    chk.float_tensor("h", h, ndim=3)
    tgt = stack_target_indices(tgt_idx)
    chk.index_tensor("tgt_idx", tgt, upper=h.shape[1], what=f"{h.shape[1]} tokens of h")
    chk.same_device(h=h, tgt_idx=tgt)
    chk.dim_equals("tgt_idx", tgt, 1, h.shape[0], "the batch of h")
    return gather_tokens(F.layer_norm(h, (h.size(-1),)), tgt)


def jepa_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 between predictor output and targets (mean over all elements)."""
    if pred.shape != target.shape:  # smooth_l1_loss would broadcast them with only a warning
        raise ValueError(f"target: expected the shape of pred {tuple(pred.shape)}, got {tuple(target.shape)}")
    return F.smooth_l1_loss(pred, target)


def sincos_pos_embed_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """1-D sin-cos table ``[len(pos), dim]`` in float64: [sin(pos·ω), cos(pos·ω)], ω_i = 10000^(-2i/dim)."""
    if dim % 2:
        raise ValueError(f"dim: expected an even width for sin-cos positions, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: Optional[int] = None) -> torch.Tensor:
    """Fixed 2-D sin-cos positions ``[grid_h·grid_w, dim]`` (float32), as the official code builds them.

    Row-major over the grid. As in the official code (``np.meshgrid(grid_w, grid_h)`` feeding the
    "h" half), the first half of the channels encodes the column index and the second half the row
    index. Computed in float64 then rounded once, like the official numpy code.
    """
    grid_w = grid_h if grid_w is None else grid_w
    if dim % 4:
        raise ValueError(f"dim: expected a width divisible by 4 for 2-D sin-cos positions, got {dim}")
    hh, ww = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64),
                            indexing="ij")
    emb = torch.cat([sincos_pos_embed_1d(dim // 2, ww), sincos_pos_embed_1d(dim // 2, hh)], dim=1)
    return emb.float()


__all__ = [
    "NOISE_MODES", "stack_target_indices", "gather_tokens", "stop_embed", "draw_noise",
    "check_assembly_args", "assemble_predictor_input", "attention", "target_features", "jepa_loss",
    "sincos_pos_embed_1d", "sincos_pos_embed_2d",
]
