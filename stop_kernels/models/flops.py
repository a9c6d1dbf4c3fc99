"""Analytic matrix-multiply FLOPs of an I-JEPA + StoP training step (for TFLOP/s and MFU).

Counts the multiply-adds of every Linear, the patch-embedding convolution, the StoP noise
projection and attention (Q·Kᵀ and P·V), as 2 FLOPs each. A backward costs twice the forward
(gradients of inputs and of weights), once where the input needs no gradient: the patch
embedding (its input is the image) and the StoP noise projection (its input is the noise) cost
forward + weight gradient. The target encoder runs forward only. Elementwise work (LayerNorm,
GELU, softmax, the optimizer) is left out, as in the usual MFU convention.

* target encoder: forward over all N patches of B images;
* context encoder: forward + backward over the Nc kept patches (the patch embedding runs on
  every patch);
* predictor: forward + backward over npred·B sequences of Nc + Nt tokens, plus the context
  projection (B·Nc rows), the StoP noise projection (npred·B·Nt rows, ``learned`` mode) and the
  output projection (npred·B·Nt rows).

ViT-H/14 at 224, batch 64, 74 context and 42 target tokens, 4 blocks: target forward ≈ 20.6 TFLOP,
context forward+backward ≈ 17.9, predictor ≈ 3.8, attention ≈ 1.1 (the numbers of ANCHORS.md).
This is the one FLOP model of the project: ``training.metrics.step_flops`` reads its total.
"""
from __future__ import annotations

from typing import Dict

# dense bf16 tensor-core peak by device name (datasheets), MFU is quoted against it; the most specific name
# first: "NVIDIA H100 PCIe" and "NVIDIA H100 NVL" are H100s with lower clocks and fewer SMs than the SXM's
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H200 NVL": 835.0, "H100": 989.0, "H200": 989.0}


def peak_tflops(device_name: str, default: float = 989.0) -> float:
    """The dense bf16 peak (TFLOP/s) of the card named ``device_name`` (``torch.cuda.get_device_name``); the first
    key of :data:`PEAK_BF16_TFLOPS` it contains, else ``default``."""
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return value
    return default


def transformer_flops(seqs: float, seqlen: float, width: int, depth: int, mlp_ratio: float = 4.0) -> Dict[str, float]:
    """Forward FLOPs of ``depth`` pre-norm blocks over ``seqs`` sequences of ``seqlen`` tokens:
    ``linear`` (QKV 3E², projection E², fc1 + fc2 2·r·E² per token) and ``attention`` (Q·Kᵀ and P·V)."""
    tokens = seqs * seqlen
    linear = 2.0 * tokens * width * width * (4.0 + 2.0 * mlp_ratio) * depth
    attention = 4.0 * seqs * seqlen * seqlen * width * depth
    return {"linear": linear, "attention": attention}


def attention_cost(seqs: float, seqlen: float, width: int, kind: str, heads: int = 0, elt: int = 2):
    """``(FLOPs, bytes)`` of non-causal attention over ``seqs`` sequences of ``seqlen`` tokens, ``width`` =
    heads × head dim, inputs of ``elt`` bytes; ``kind`` ``fwd``, ``bwd`` or ``fwdbwd``. The bytes are the
    least any kernel moves, with e one ``[tokens, width]`` tensor:

    * ``fwd``: Q·Kᵀ and P·V, 4·seqs·seqlen²·width FLOPs; reads q, k, v, writes o: 4e;
    * ``bwd`` (flash: recomputes Q·Kᵀ, adds dV, dP, dQ, dK: 2.5× the forward FLOPs): reads q, k, v, o, dO
      and the fp32 logsumexp, writes dq, dk, dv: 8e + lse;
    * ``fwdbwd``: both, the forward also writing the logsumexp: 3.5× the forward FLOPs, 12e + 2·lse.

    ``heads`` sizes the logsumexp (seqs·seqlen·heads fp32); 0 leaves it out (the step floors do)."""
    fwd = 4.0 * seqs * seqlen * seqlen * width
    e = float(seqs) * seqlen * width * elt
    lse = 4.0 * seqs * seqlen * heads
    costs = {"fwd": (fwd, 4 * e), "bwd": (2.5 * fwd, 8 * e + lse), "fwdbwd": (3.5 * fwd, 12 * e + 2 * lse)}
    if kind not in costs:
        raise ValueError(f"kind: expected one of {sorted(costs)}, got {kind!r}")
    return costs[kind]


def jepa_step_flops(*, embed_dim: int, depth: int, mlp_ratio: float, pred_dim: int, pred_depth: int,
                    batch: int, num_patches: int, patch_size: int, n_ctx: float, n_tgt: float, npred: int,
                    in_chans: int = 3, noise_projection: bool = True) -> Dict[str, float]:
    """FLOPs of one training step, by component (and ``total``); ``noise_projection``: StoP's
    ``learned`` noise mode (the other modes draw no noise through the projection)."""
    patch = 2.0 * batch * num_patches * embed_dim * in_chans * patch_size ** 2
    tgt = transformer_flops(batch, num_patches, embed_dim, depth, mlp_ratio)
    ctx = transformer_flops(batch, n_ctx, embed_dim, depth, mlp_ratio)
    seqs = npred * batch
    pred = transformer_flops(seqs, n_ctx + n_tgt, pred_dim, pred_depth, 4.0)
    ctx_proj = 2.0 * batch * n_ctx * embed_dim * pred_dim           # predictor_embed on the context tokens
    out_proj = 2.0 * seqs * n_tgt * pred_dim * embed_dim            # predictor_proj on the target tokens
    noise = 2.0 * seqs * n_tgt * embed_dim * pred_dim if noise_projection else 0.0
    out = {
        "target_forward": tgt["linear"] + patch,
        "context_fwd_bwd": 3 * ctx["linear"] + 2 * patch,
        "predictor_fwd_bwd": 3 * (pred["linear"] + ctx_proj + out_proj) + 2 * noise,
        "attention": tgt["attention"] + 3 * ctx["attention"] + 3 * pred["attention"],
    }
    out["total"] = sum(out.values())
    return out


def jepa_step_floors_ms(*, trainable_params: int, ema_params: int, tflops: float, tbps: float,
                        **sizes) -> Dict[str, float]:
    """Floors (ms) of a training step's GPU time per kernel category at a card's measured ceilings
    (``tflops`` matmul TFLOP/s, ``tbps`` copy TB/s) for a step of ``sizes`` (the keyword arguments of
    :func:`jepa_step_flops`): what a profile's categories are measured against.
    The matmul rate is a measured reference (ANCHORS.md: 707 TFLOP/s for 8192³), not the datasheet's,
    so well-shaped GEMMs can come in slightly under their floor.

    * ``matmul``: the step's Linear and patch-embedding FLOPs (:func:`jepa_step_flops` without
      attention) at ``tflops``.
    * ``attention``: per model part, the larger of its FLOP time (forward Q·Kᵀ and P·V; a flash
      backward recomputes Q·Kᵀ and adds dV, dP, dQ, dK: 2.5× the forward) and its byte time (bf16 q, k,
      v, o in the forward; q, k, v, o, dO in and dq, dk, dv out in the backward).
    * ``optimizer``: fused AdamW over the trainable fp32 parameters (reads p, g, m, v, writes p, m, v:
      28 B each) plus the EMA of the target encoder (reads target and online, writes target: 12 B each).

    Elementwise work (LayerNorm, GELU, residual adds, casts) has no floor here: how much of it a
    compiler fuses away is the open question, not a constant."""
    f = jepa_step_flops(**sizes)
    batch, n_ctx, n_tgt = sizes["batch"], sizes["n_ctx"], sizes["n_tgt"]
    flop_ms = 1e3 / (tflops * 1e12)
    byte_ms = 1e3 / (tbps * 1e12)
    attn = 0.0
    # (sequences, tokens per sequence, width, depth, backward too)
    E, L = sizes["embed_dim"], sizes["depth"]
    for seqs, n, width, blocks, bwd in ((batch, sizes["num_patches"], E, L, False),
                                        (batch, n_ctx, E, L, True),
                                        (sizes["npred"] * batch, n_ctx + n_tgt, sizes["pred_dim"],
                                         sizes["pred_depth"], True)):
        flops, nbytes = attention_cost(seqs * blocks, n, width, "fwdbwd" if bwd else "fwd")
        attn += max(flops * flop_ms, nbytes * byte_ms)
    return {"matmul": (f["total"] - f["attention"]) * flop_ms, "attention": attn,
            "optimizer": (28.0 * trainable_params + 12.0 * ema_params) * byte_ms}
