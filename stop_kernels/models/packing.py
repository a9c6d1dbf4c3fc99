"""Packed (varlen) I-JEPA: ragged masks, no patch dropped.

The official collator truncates every context and target mask to the batch minimum so masks stack
into rectangles; the dropped patches are simply never seen. With ``MultiBlockMaskCollator(...,
truncate=False)`` the masks stay ragged, and the encoder and predictor work on packed sequences: all
tokens of all sequences along one axis ``[T, C]`` with ``cu_seqlens`` (block-diagonal attention through
:func:`stop_kernels.ops.attention.dispatch_attention`). The models' own ``forward`` dispatches here when
given ragged masks, so wrappers such as FSDP see an ordinary forward call.

Sequence order matches the rectangular path: context sequences by image; predictor sequences
``s = k·B + b`` (target block k of image b) hold image b's context followed by its k-th block.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import _checks as chk
from .. import reference
from .vit import run_blocks


class Packed(NamedTuple):
    """Tokens of several sequences along one axis."""
    tokens: torch.Tensor        # [T, C]
    cu_seqlens: torch.Tensor    # int32 [n + 1]
    max_seqlen: int
    lengths: Optional[tuple] = None  # the n sequence lengths on the host (checked without a device sync)


def is_ragged(masks) -> bool:
    """True for ragged masks: a list of masks whose first entry is itself a list of 1-D tensors."""
    return isinstance(masks, (list, tuple)) and len(masks) > 0 and isinstance(masks[0], (list, tuple))


def mean_tokens(masks) -> float:
    """Mean tokens per image of the first mask, rectangular ``[B, K]`` or ragged (list of 1-D tensors)."""
    m = masks[0]
    if isinstance(m, (list, tuple)):
        return sum(len(t) for t in m) / max(len(m), 1)
    return float(m.shape[1])


def _cu(lengths: Sequence[int], device) -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0).to(torch.int32)
    return cu.to(device)


def check_ragged(name: str, masks, batch: int, num_patches: int) -> List[torch.Tensor]:
    """A list of ``batch`` 1-D index tensors, each non-empty and within ``[0, num_patches)``."""
    if not isinstance(masks, (list, tuple)) or len(masks) != batch:
        raise ValueError(f"{name}: expected a list of {batch} 1-D index tensors (one per image)")
    for i, m in enumerate(masks):
        chk.index_tensor(f"{name}[{i}]", m, upper=num_patches, what=f"{num_patches} patches", ndim=1)
        if m.numel() == 0:
            raise ValueError(f"{name}[{i}]: expected at least one patch index")
    return list(masks)


def check_target_blocks(name: str, tgt_masks, batch: int, num_patches: int) -> List[List[torch.Tensor]]:
    """Ragged target blocks: a non-empty list of blocks, each a list of ``batch`` 1-D index tensors
    (:func:`check_ragged`), named ``name[k]``."""
    if not isinstance(tgt_masks, (list, tuple)) or len(tgt_masks) == 0:
        raise TypeError(f"{name}: expected a non-empty list of target blocks, each a list of {batch} 1-D index "
                        f"tensors (one per image)")
    return [check_ragged(f"{name}[{k}]", blocks, batch, num_patches) for k, blocks in enumerate(tgt_masks)]


def encode_packed(encoder, imgs: torch.Tensor, masks: Sequence[torch.Tensor]) -> Packed:
    """Context encoder over ragged masks: ``imgs[B, C, H, W]``, ``masks[b]`` 1-D → packed ``[T, E]``."""
    x = encoder.embed(imgs)
    B = x.shape[0]
    masks = check_ragged("masks", masks, B, encoder.num_patches)
    lengths = [len(m) for m in masks]
    rows = torch.repeat_interleave(torch.arange(B, device=x.device),
                                   torch.tensor(lengths, device=x.device))
    x = x[rows, torch.cat(list(masks))]
    cu, max_len = _cu(lengths, x.device), max(lengths)
    x = run_blocks(encoder.blocks, x, cu, max_len, residual_dtype=encoder.residual_dtype)
    return Packed(encoder.norm(x), cu, max_len, tuple(lengths))


class PredictorLayout(NamedTuple):
    """Where every predictor token comes from and where the targets sit (host-built per batch)."""
    src: torch.Tensor          # [T] row of cat([context rows, masked rows]) feeding each packed token
    tgt_rows: torch.Tensor     # [Mt] packed positions of the target tokens, in (k, b, t) order
    cu_seqlens: torch.Tensor   # [npred·B + 1]
    max_seqlen: int


def predictor_layout(ctx_lengths: Sequence[int], tgt_lengths: Sequence[Sequence[int]], device) -> PredictorLayout:
    """Layout for sequences ``s = k·B + b`` = [context of b ; target block k of b]."""
    B = len(ctx_lengths)
    ctx_off = [0]
    for n in ctx_lengths:
        ctx_off.append(ctx_off[-1] + n)
    n_ctx = ctx_off[-1]
    src, tgt_rows, lengths = [], [], []
    pos, t_off = 0, 0
    for k, blocks in enumerate(tgt_lengths):
        if len(blocks) != B:
            raise ValueError(f"tgt_idx[{k}]: expected {B} per-image masks, got {len(blocks)}")
        for b, nt in enumerate(blocks):
            nc = ctx_lengths[b]
            src.append(torch.arange(ctx_off[b], ctx_off[b] + nc))
            src.append(torch.arange(n_ctx + t_off, n_ctx + t_off + nt))
            tgt_rows.append(torch.arange(pos + nc, pos + nc + nt))
            t_off += nt
            pos += nc + nt
            lengths.append(nc + nt)
    return PredictorLayout(torch.cat(src).to(device), torch.cat(tgt_rows).to(device), _cu(lengths, device),
                           max(lengths))


def predict_packed(predictor, ctx: Packed, ctx_masks: Sequence[torch.Tensor],
                   tgt_masks: Sequence[Sequence[torch.Tensor]], *, noise: Optional[torch.Tensor] = None,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Predictor over packed sequences → predictions ``[Mt, E]`` for the target tokens in (k, b, t) order.

    ``ctx_masks[b]`` are image b's context indices (as given to :func:`encode_packed`);
    ``tgt_masks[k][b]`` its k-th target block. Masked rows use the predictor's ``noise_mode``; the
    StoP rows come from the fused :func:`stop_kernels.ops.stop_embed.stop_embed` (noise generated in
    registers), or from ``noise`` (``[Mt, E]`` / ``[Mt, D]``) when given.
    """

    # the image count of the packed context where it says (the encoder's): masks for another count are
    # the context masks' error, not the (then wrongly sized) target masks'
    B = len(ctx.lengths) if ctx.lengths is not None else len(ctx_masks)
    P = predictor.num_patches
    ctx_idx = torch.cat(check_ragged("ctx_idx", ctx_masks, B, P))
    tgt = check_target_blocks("tgt_idx", tgt_masks, B, P)
    tgt_idx = torch.cat([m for blocks in tgt for m in blocks])
    if ctx.tokens.shape[0] != ctx_idx.numel():
        raise ValueError(f"ctx: expected {ctx_idx.numel()} packed tokens (the context masks), got {ctx.tokens.shape[0]}")
    ctx_lengths = tuple(len(m) for m in ctx_masks)
    if ctx.lengths is not None and tuple(ctx.lengths) != ctx_lengths:  # same total, other split: rows of wrong images
        raise ValueError(f"ctx_masks: lengths {list(ctx_lengths)} differ from the packed context's sequences "
                         f"{list(ctx.lengths)} (the masks given to encode_packed)")
    emb, pos = predictor.embed_linear(), predictor.predictor_pos_embed
    # the rectangular path's context rows (ψ added in its own dtype: under autocast an fp32 table keeps the
    # stream fp32 whatever the encoder's output dtype, unless residual_dtype says otherwise)
    c = reference.context_rows(ctx.tokens, ctx_idx, emb.weight, emb.bias, pos)
    mode = predictor.noise_mode
    if mode == "learned":
        if noise is None and predictor.input_backend == "unfused":  # the official path: torch.randn noise
            noise = reference.draw_noise((tgt_idx.numel(), emb.weight.shape[1]), noise_std=predictor.noise_std,
                                         dtype=emb.weight.dtype, device=c.device, generator=generator)
        if noise is None:
            masked = predictor.stop_rows(tgt_idx, generator=generator)
        else:
            masked = reference.stop_embed(pos, tgt_idx, emb.weight, emb.bias, noise)
    elif mode == "isotropic":
        if noise is None and predictor.input_backend == "unfused":  # the official path: torch.randn noise
            noise = reference.draw_noise((tgt_idx.numel(), pos.shape[1]), noise_std=predictor.noise_std,
                                         dtype=c.dtype, device=c.device, generator=generator)
        if noise is None:  # the Philox stream of the rectangular path (same rows in (k, b, t) order)
            # "cuda" has a kernel for the learned rows only: the other modes run as "auto", as assemble does
            backend = "auto" if predictor.input_backend == "cuda" else predictor.input_backend
            masked = isotropic_positions(pos, tgt_idx, emb.weight.dtype, predictor.noise_std, generator, backend)
        else:
            reference.check_isotropic_noise(noise, (tgt_idx.numel(), pos.shape[1]), pos)
            masked = pos[tgt_idx] + noise
    else:
        reference.check_no_noise(noise, mode)
        masked = predictor.mask_token.reshape(-1) + pos[tgt_idx]
    layout = predictor_layout(ctx_lengths, [[len(m) for m in blocks] for blocks in tgt], c.device)
    # one gather builds every sequence; its backward sums the npred copies of each context row. On the CPU
    # indexing's backward (index_put_ with accumulate) adds duplicate rows with atomics, in an order that
    # varies with the threads; index_select's (index_add_) is deterministic there, while on CUDA it is
    # index_add_ that uses atomics and indexing that sorts (torch.use_deterministic_algorithms lists both)
    rows = torch.cat([c, masked.to(c.dtype)])
    z = rows.index_select(0, layout.src) if rows.device.type == "cpu" else rows[layout.src]
    z = run_blocks(predictor.predictor_blocks, z, layout.cu_seqlens, layout.max_seqlen,
                   residual_dtype=predictor.residual_dtype)
    z = predictor.predictor_norm(z[layout.tgt_rows])
    return predictor.predictor_proj(z)


def isotropic_positions(pos: torch.Tensor, idx: torch.Tensor, weight_dtype: torch.dtype, noise_std: float,
                        generator: Optional[torch.Generator], backend: str) -> torch.Tensor:
    """ψ[idx] + n, n ~ N(0, σ² I_D) from the Philox stream that the rectangular predictor input uses
    (rows in idx order), ``[len(idx), D]`` in promote(weight dtype, ψ dtype): generated in registers by
    the Triton kernel where ``backend`` resolves to it and ψ needs no gradient, else on the host."""
    from ..ops.philox import draw_seed, philox_normal
    from ..ops.stop_embed import check_backend, launch_pos_noise

    seed = draw_seed(generator)
    R, D = idx.numel(), pos.shape[1]
    dtype = torch.promote_types(weight_dtype, pos.dtype)
    if check_backend(backend, pos.device, {"pos_embed": pos.dtype}) != "reference" and not pos.requires_grad:
        out = torch.empty((R, D), dtype=dtype, device=pos.device)
        launch_pos_noise(out.view(1, R, D), idx, pos.contiguous(), None, seed=seed, noise_std=float(noise_std))
        return out
    n = philox_normal(seed, R, D, float(noise_std)).to(device=pos.device, dtype=dtype)
    return pos[idx].to(dtype) + n


def packed_targets(h: torch.Tensor, tgt_masks: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """I-JEPA targets for ragged blocks: LayerNorm(h) rows in (k, b, t) order → ``[Mt, E]``.

    ``h[B, N, E]`` (the target encoder's output); ``tgt_masks[k][b]`` the 1-D indices in ``[0, N)`` of
    block k of image b, checked as :func:`predict_packed` checks them (a negative index would
    otherwise wrap around to another patch, and one ``>= N`` fail inside the gather: on a GPU a
    device-side assert; the training step computes the targets before the predictor sees the masks)."""
    chk.float_tensor("h", h, ndim=3)
    tgt_masks = check_target_blocks("tgt_masks", tgt_masks, h.shape[0], h.shape[1])
    h = F.layer_norm(h, (h.size(-1),))
    rows = torch.cat([torch.full((len(m),), b, dtype=torch.long, device=h.device)
                      for blocks in tgt_masks for b, m in enumerate(blocks)])
    return h[rows, torch.cat([m for blocks in tgt_masks for m in blocks])]
