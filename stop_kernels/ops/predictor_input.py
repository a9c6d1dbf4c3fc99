"""Fused I-JEPA+StoP predictor input: ``[npred·B, Nc+Nt, D]`` written in place, no repeat/cat.

Row ``k·B + b`` of the output (k < npred target blocks, b < B images) holds

* columns ``[0, Nc)``: the context projection ``ctx[b]·Wᵀ + b_W + ψ[ctx_idx[b]]`` (the same for every
  k: computed once by one GEMM and stored into all npred row groups from its epilogue);
* columns ``[Nc, Nc+Nt)``: the masked tokens of target block k:
  ``learned``   ψ[tgt] + n·Wᵀ + b_W, n ~ N(0, σ² I_E) (the StoP kernel, noise in registers),
  ``isotropic`` ψ[tgt] + n,       n ~ N(0, σ² I_D),
  ``none``      ψ[tgt] + mask_token.

Noise row r runs over the masked tokens flattened row-major over ``[npred, B, Nt]``:
``n = philox_normal(seed, npred·B·Nt, E or D, σ)`` with the seed drawn from the CPU generator.

Forward (learned): one Triton launch writes the context rows and then the StoP rows. Backward (g = ∂L/∂out): the
npred context-row groups are summed first, ``gctx = Σ_k g[k, :, :Nc]``, then ``dctx = gctx·W`` (one GEMM),
``dW = gctxᵀ·ctx + Σ_r g_masked[r]ᵀ n[r]`` (one Triton launch, noise regenerated), ``db = Σ gctx + Σ g_masked``,
``d mask_token = Σ g_masked``, ``dψ`` scatter-added by the indices. Under autocast the op casts W and b itself, so
their gradients come back in their own dtypes without autograd cast nodes: each eager op is host time, which the
eager timings of issue 3 measure (benchmarks/NOTES.md). The mask token is added as it is (fp32 under autocast), as
the official code and the packed predictor add it.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _checks as chk
from .. import reference
from ..backends import custom_op_bypass_ok, eager_twin, first_order_backward
from .philox import check_generator, draw_seed, philox_normal
from .stop_embed import (BACKENDS, _out_dtype, autocast_dtype, check_backend, launch_pos_noise, launch_project,
                         noise_weight_grad_in_backward, scatter_rows)

ASSEMBLY_BACKENDS = tuple(b for b in BACKENDS if b != "cuda")  # the CUDA C++ backend implements stop_embed only


def _views(out: torch.Tensor, npred: int, B: int, Nc: int, Nt: int):
    """(context rows of group 0 ``[B, Nc, D]``, masked rows ``[npred·B, Nt, D]``) of ``out``."""
    D = out.shape[-1]
    out3 = out.view(npred * B, Nc + Nt, D)
    return out3[:B, :Nc], out3[:, Nc:]


def _in_dtype(t: Optional[torch.Tensor], dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    return t if t is None or dtype is None else t.to(dtype)


def _assemble(ctx: torch.Tensor, ctx_idx: torch.Tensor, tgt_idx: torch.Tensor, weight: torch.Tensor,
              bias: Optional[torch.Tensor], pos_embed: torch.Tensor, mask_token: Optional[torch.Tensor],
              seed: torch.Tensor, noise_mode: str, noise_std: float, compute_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """The forward launches (the body of the custom op and of its eager twin ``_AssembleFn``).

    ``compute_dtype`` (the autocast dtype, or None) is the dtype W and b are taken in. They are cast here, where
    autograd does not see it, so their gradients come back in the parameters' own dtypes without an autograd cast
    node per parameter and step. The mask token is not cast: ψ + mask_token is an addition, which autocast leaves
    in fp32 in the official model (and in the packed path, ``models.packing``).
    """
    weight, bias = (_in_dtype(t, compute_dtype) for t in (weight, bias))
    npred, B, Nt = tgt_idx.shape
    Nc, E = ctx.shape[1:]
    D = weight.shape[0]
    out = torch.empty((npred * B, Nc + Nt, D), dtype=_out_dtype(weight, pos_embed), device=weight.device)
    ctx_rows, masked_rows = _views(out, npred, B, Nc, Nt)
    # context: one GEMM ctx·Wᵀ + b + ψ[ctx_idx], its epilogue stores every row into the npred groups; StoP: the
    # noise GEMM's rows in the same launch (programs after the context's), written straight into the masked slots
    tgt = tgt_idx.reshape(-1)
    learned = noise_mode == "learned"
    launch_project(ctx_rows, ctx_idx.reshape(-1), pos_embed, weight, bias, a=ctx.reshape(B * Nc, E),
                   copies=npred, stride_copy=B * (Nc + Nt) * D, seed=int(seed), noise_std=noise_std,
                   noise_rows=(masked_rows, tgt) if learned else None)
    if noise_mode == "isotropic":
        launch_pos_noise(masked_rows, tgt, pos_embed.contiguous(), None, seed=int(seed), noise_std=noise_std)
    elif noise_mode == "none":
        launch_pos_noise(masked_rows, tgt, pos_embed.contiguous(), mask_token.reshape(D).contiguous())
    return out


_assemble_op = torch.library.custom_op("stop_kernels::assemble_predictor_input", _assemble, mutates_args=())


@_assemble_op.register_fake
def _(ctx, ctx_idx, tgt_idx, weight, bias, pos_embed, mask_token, seed, noise_mode, noise_std, compute_dtype):
    npred, B, Nt = tgt_idx.shape
    return weight.new_empty((npred * B, ctx.shape[1] + Nt, weight.shape[0]),
                            dtype=torch.promote_types(compute_dtype or weight.dtype, pos_embed.dtype))


def _assemble_setup(ctx, inputs, output):
    """Save what backward needs: the context tokens (for dW), indices, W and the seed (never the noise)."""
    x, ctx_idx, tgt_idx, weight, bias, pos_embed, mask_token, seed, noise_mode, noise_std, compute_dtype = inputs
    ctx.save_for_backward(x, ctx_idx, tgt_idx, weight, seed)
    ctx.mode, ctx.noise_std, ctx.compute_dtype = noise_mode, noise_std, compute_dtype
    ctx.meta = (x.dtype, bias.dtype if bias is not None else None, pos_embed.shape[0], pos_embed.dtype,
                None if mask_token is None else (mask_token.shape, mask_token.dtype))


@first_order_backward
def _assemble_backward(fctx, grad):
    """Gradients in few launches (each costs host time in an eager, host-bound step; benchmarks/NOTES.md):
    one sum of g's npred context groups in the GEMMs' dtype, one cast of its masked rows, one Triton launch for
    all of dW = gctxᵀ·x + Σ g_maskedᵀ·n (fp32 sums over row splits), dctx = gctx·W (cuBLAS); db from g in fp32.
    No copy of all of g is made, and dW's transients are freed before dctx is allocated: the backward's peak
    is the output, g's masked rows in that dtype and dW's partials (69 MiB at ViT-H, ``AllocationTrace``)."""
    x, ctx_idx, tgt_idx, weight, seed = fctx.saved_tensors
    ctx_dtype, bias_dtype, P, pos_dtype, mask_meta = fctx.meta
    need_ctx, _, _, need_w, need_b, need_pos, need_mask = fctx.needs_input_grad[:7]
    learned = fctx.mode == "learned"
    npred, B, Nt = tgt_idx.shape
    Nc, E = x.shape[1:]
    D = weight.shape[0]
    g = grad.reshape(npred, B, Nc + Nt, D)
    dctx = dw = db = dpos = dmask = None
    if need_ctx or need_w:
        wc = _in_dtype(weight, fctx.compute_dtype)  # the W the forward multiplied with
        # the npred context groups summed, each element rounded to the GEMMs' dtype first (as cuBLAS would read a
        # cast g), then summed in fp32; sum's dtype casts these rows only for the sum's duration
        gctx = g[:, :, :Nc].sum(0, dtype=wc.dtype).reshape(B * Nc, D)  # (not -1: D may be 0)
        noise_rows = learned and fctx.noise_std != 0.0
        if need_w:  # one launch: context rows from memory, masked rows from the regenerated noise. Before dctx's
            # GEMM, so that the masked rows' cast and the fp32 split partials are freed before dctx is allocated
            gmask = (g[:, :, Nc:].to(wc.dtype).reshape(npred * B, Nt, D) if noise_rows
                     else gctx[None, :0])  # (no noise rows)
            dw = noise_weight_grad_in_backward(gmask, wc, seed, fctx.noise_std if noise_rows else 0.0,
                                               ctx_grad=gctx, ctx=x.reshape(B * Nc, E).to(wc.dtype))
            del gmask
            dw = dw.to(weight.dtype)
        if need_ctx:  # the single dX GEMM
            dctx = (gctx @ wc).reshape(B, Nc, E).to(ctx_dtype)
    if need_b:  # Σ of the rows b reached, in fp32: every row (learned), else the context rows of every group
        db = (g if learned else g[:, :, :Nc]).sum((0, 1, 2), dtype=torch.float32).to(bias_dtype)
    if need_mask and fctx.mode == "none":
        shape, dtype = mask_meta
        dmask = g[:, :, Nc:].sum((0, 1, 2), dtype=torch.float32).reshape(shape).to(dtype)
    if need_pos:
        dpos = scatter_rows(g[:, :, :Nc].sum(0, dtype=torch.float32), ctx_idx, P)
        dpos = scatter_rows(g[:, :, Nc:], tgt_idx, P, out=dpos).to(pos_dtype)
    return dctx, None, None, dw, db, dpos, dmask, None, None, None, None


torch.library.register_autograd("stop_kernels::assemble_predictor_input", _assemble_backward,
                                setup_context=_assemble_setup)


# eager calls (custom_op_bypass_ok) run this twin of the custom op: no torch.library dispatch, the same launches
_AssembleFn = eager_twin("_AssembleFn", _assemble, _assemble_setup, _assemble_backward)


def _draws_seed(noise_mode, noise_std) -> bool:
    """Whether a call draws a Philox seed: noise of a StoP mode with σ ≠ 0 (a σ of the wrong type draws, and its
    check then names it)."""
    return noise_mode in ("learned", "isotropic") and not (chk.is_number(noise_std) and noise_std == 0)


def _checked_seed_eager(ctx, ctx_idx, tgt_idx, weight, bias, pos_embed, noise_mode, noise_std, mask_token, generator):
    """Validate and draw the seed as a CPU int64 scalar tensor (0, the generator untouched, when no noise is drawn:
    :func:`_draws_seed`)."""
    tgt = reference.check_assembly_args(ctx, ctx_idx, tgt_idx, weight, bias, pos_embed, noise_mode, noise_std,
                                        mask_token)
    if _draws_seed(noise_mode, noise_std):
        seed = draw_seed(generator)
    else:  # no seed is drawn, but a bad argument is never ignored
        check_generator(generator)
        seed = 0
    return tgt, torch.tensor(seed, dtype=torch.int64, device="cpu")


_checked_seed_disabled = chk.eager_under_compile(_checked_seed_eager)


def _checked_seed(ctx, ctx_idx, tgt_idx, weight, bias, pos_embed, noise_mode, noise_std, mask_token, generator):
    """:func:`_checked_seed_eager`, run eagerly under torch.compile (a graph break) only when it draws a seed from
    the generator: traced otherwise (I-JEPA's mode "none", or σ = 0), so such a model compiles with
    ``fullgraph=True`` (the index values are then checked by eager calls only, as every op checks them)."""
    if torch.compiler.is_compiling() and not _draws_seed(noise_mode, noise_std):
        return _checked_seed_eager(ctx, ctx_idx, tgt_idx, weight, bias, pos_embed, noise_mode, noise_std, mask_token,
                                   generator)
    return _checked_seed_disabled(ctx, ctx_idx, tgt_idx, weight, bias, pos_embed, noise_mode, noise_std, mask_token,
                                  generator)


def assemble_predictor_input(ctx: torch.Tensor, ctx_idx: torch.Tensor, tgt_idx, weight: torch.Tensor,
                             bias: Optional[torch.Tensor], pos_embed: torch.Tensor, *,
                             noise_mode: str = "learned", noise_std: float = 0.25,
                             mask_token: Optional[torch.Tensor] = None,
                             generator: Optional[torch.Generator] = None, noise: Optional[torch.Tensor] = None,
                             backend: str = "auto") -> torch.Tensor:
    """The predictor input ``[npred·B, Nc+Nt, D]``, row order of :func:`stop_kernels.reference.assemble_predictor_input`.

    Args:
        ctx: ``[B, Nc, E]`` context tokens; ctx_idx: ``[B, Nc]`` their positions.
        tgt_idx: ``npred`` tensors ``[B, Nt]`` or one ``[npred, B, Nt]`` of target positions.
        weight, bias: ``[D, E]``, ``[D]`` (or None): the predictor's context projection.
        pos_embed: ``[P, D]`` ψ. noise_mode: "learned" (StoP), "isotropic" or "none" (needs
            ``mask_token`` with D elements). noise_std: σ ≥ 0.
        generator: CPU generator of the per-call Philox seed (default generator when None).
        noise: explicit already-scaled noise (``[npred, B, Nt, E]`` learned, ``[npred, B, Nt, D]``
            isotropic) → computed by the reference path with that noise.
        backend: "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else reference, also inside
            ``torch.func`` transforms such as ``grad``, which the custom op does not support), "triton" or
            "reference" (same seed and Philox noise); the CUDA C++ backend ("cuda") has no kernel for it.
    Returns:
        ``[npred·B, Nc+Nt, D]`` in ``promote(weight.dtype, pos_embed.dtype)``; under autocast (CUDA or CPU)
        ctx, W and b are taken in the autocast dtype (the mask token as it is, as autocast leaves an addition), and
        the gradients of W, b and mask_token come back in their own dtypes (fp32 sums on the Triton backend).
        Rounding: the Triton kernels add b and ψ to the fp32 accumulator and round once, into the output dtype; the
        reference rounds ``x·Wᵀ + b`` to W's dtype first, as the official bf16 Linear does, so with bf16 weights and
        an fp32 ψ the two differ by bf16's rounding of the projection.
    Under ``torch.compile``: one graph break per call, as :func:`stop_kernels.stop_embed` (the seed is drawn
    eagerly); ``fullgraph=True`` refuses it.
    """
    chk.choice("backend", backend, BACKENDS)
    if backend == "cuda":  # a bad argument on every machine, extension built or not
        raise ValueError(f"backend: the CUDA C++ backend implements stop_embed only; assemble_predictor_input "
                         f"takes one of {ASSEMBLY_BACKENDS}, got 'cuda'")
    if noise is not None:
        check_generator(generator)  # unused with explicit noise, but never silently wrong
        return reference.assemble_predictor_input(ctx, ctx_idx, tgt_idx, weight, bias, pos_embed,
                                                  noise_mode=noise_mode, noise_std=noise_std,
                                                  mask_token=mask_token, noise=noise)
    tgt, seed = _checked_seed(ctx, ctx_idx, tgt_idx, weight, bias, pos_embed, noise_mode, noise_std, mask_token,
                              generator)
    amp = autocast_dtype(weight.device)
    if amp is not None:
        ctx = ctx.to(amp)
    # (the mask token only where it is used: the StoP modes ignore it; it is added uncast)
    used = {"weight": weight, "bias": bias, "mask_token": mask_token if noise_mode == "none" else None}
    dtypes = {"ctx": ctx.dtype, "pos_embed": pos_embed.dtype,
              **{arg: (t.dtype if arg == "mask_token" else amp or t.dtype) for arg, t in used.items() if t is not None}}
    resolved = check_backend(backend, weight.device, dtypes)
    npred, B, Nt = tgt.shape
    if resolved == "reference":
        weight, bias = (_in_dtype(t, amp) for t in (weight, bias))
        if noise_mode == "none":
            n = None
        else:
            width = weight.shape[1] if noise_mode == "learned" else weight.shape[0]
            dtype = weight.dtype if noise_mode == "learned" else _out_dtype(weight, pos_embed)
            if _draws_seed(noise_mode, noise_std):
                n = philox_normal(int(seed), npred * B * Nt, width, float(noise_std))
            else:  # σ = 0: no seed, zero noise
                n = torch.zeros(npred * B * Nt, width)
            n = n.to(device=weight.device, dtype=dtype).reshape(npred, B, Nt, width)
        return reference.assemble_predictor_input(ctx, ctx_idx, tgt, weight, bias, pos_embed, noise_mode=noise_mode,
                                                  noise_std=noise_std, mask_token=mask_token, noise=n)
    # the kernels take W and b as they are and cast them themselves (to ``amp``)
    # (the mask token only in mode "none", the one that reads it: a StoP output never requires its gradient)
    args = (ctx, ctx_idx, tgt, weight, bias, pos_embed, used["mask_token"], seed, noise_mode, float(noise_std), amp)
    return _AssembleFn.apply(*args) if custom_op_bypass_ok(ctx) else _assemble_op(*args)


__all__ = ["assemble_predictor_input"]
