#!/usr/bin/env python
"""Registers, spills and shared memory of every autotune / candidate config, no GPU needed.

    python benchmarks/ptxas_report.py [--kernels stop,attention] [--out DIR]

Compiles each config of the StoP kernels (``_project_kernel`` with Philox noise, the noise weight
gradient ``_noise_weight_grad_kernel``) and of the attention kernels (forward and backward
candidates) for sm_90a at the ViT-H/14 I-JEPA+StoP sizes, in bf16, through Triton's own JIT
specialisation (``stop_kernels.devtools``: an offline sm_90 driver, nothing launched), and prints
ptxas's verdict per config. A config that spills registers (local-memory traffic in the inner
loop) or needs more shared memory than an SM has (227 KB) is slow or unlaunchable whatever the
timer says later; this is the check to run before spending GPU time on a kernel change.
Occupancy: CTAs per SM limited by registers (65536 per SM) and shared memory. The last column is the
main loop's size in SASS (one iteration, per warp): instructions, barriers, local-memory accesses.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # the real JITFunctions

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from stop_kernels.devtools import ptxas_report  # noqa: E402

SMEM_PER_SM = 227 * 1024
REGS_PER_SM = 65536
# ViT-H/14 I-JEPA+StoP: batch 64, 4 target blocks of ~42 tokens, E = 1280 (encoder), D = 384 (predictor)
R, E, D, P = 64 * 4 * 42, 1280, 384, 256
ATTN_SHAPES = [("predictor", 256, 116, 16, 24), ("predictor", 256, 150, 16, 24), ("encoder ctx", 64, 74, 16, 80),
               ("encoder", 64, 256, 16, 80)]


def _occupancy(r):
    by_regs = REGS_PER_SM // max(1, r["regs"] * 32 * r["num_warps"])
    by_smem = SMEM_PER_SM // r["smem"] if r["smem"] else 32
    return min(by_regs, by_smem)


def stop_rows():
    from stop_kernels.ops import stop_embed as S
    captured = {}

    def capture(kernel, grid, args, kwargs, interp_meta, name):  # stands in for S._launch
        captured[name] = (kernel, args, kwargs)

    S._launch, real = capture, S._launch
    try:
        dt = torch.bfloat16
        w, b = torch.empty(D, E, dtype=dt), torch.empty(D, dtype=dt)
        pos, idx = torch.empty(P, D, dtype=dt), torch.zeros(R, dtype=torch.int64)
        S.launch_project(torch.empty(1, R, D, dtype=dt), idx, pos, w, b, seed=1234, noise_std=0.2)
        S.noise_weight_grad(torch.empty(1, R, D, dtype=dt), w, 1234, 0.2)
    finally:
        S._launch = real
    rows = []
    for name, configs in (("fwd", S._FWD_CONFIGS), ("dw", S._DW_CONFIGS)):
        kernel, args, kwargs = captured[name]
        for c in configs:
            kw = dict(kwargs, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
            rows.append(dict(kernel=f"stop {name}", config=dict(c.kwargs, w=c.num_warps, s=c.num_stages),
                             **ptxas_report(kernel, args, kw)))
    return rows


def attention_rows():
    from stop_kernels.ops import attention as A
    rows = []
    dt = torch.bfloat16
    for label, B, N, H, Dh in ATTN_SHAPES:
        qkv = torch.empty(B, N, 3, H, Dh, dtype=dt)
        q, k, v = qkv.unbind(2)
        o, do = torch.empty(B, N, H, Dh, dtype=dt), torch.empty(B, N, H, Dh, dtype=dt)
        lse = torch.empty(B, H, N, dtype=torch.float32)
        for cfg in A._fwd_candidates(N, Dh):
            with A._force_config(fwd=cfg):
                p, _ = A._make_plan(q, k, v, None, False, N, Dh ** -0.5)
            rows.append(dict(kernel=f"attn fwd {label} N={N} Dh={Dh}", config=cfg,
                             **ptxas_report(A._attn_fwd_kernel, (q, k, v, o, lse, q, *p.fwd_args), p.fwd_kw)))
        for cfg in A._bwd_candidates(N, Dh):
            with A._force_config(bwd=cfg):
                bp, _ = A._make_bwd_plan(q, k, v, None, False, N, Dh ** -0.5, o, lse, do)
            dqkv = torch.empty_like(qkv)
            kw = dict(bp.kw, GRAD_GROUP=3)
            if bp.fused:
                launches = [("fused", A._attn_bwd_fused_kernel, (q, k, v, o, do, dqkv, q, q, lse, q, *bp.args1))]
            else:
                delta = torch.empty_like(lse)
                launches = [("dq", A._attn_bwd_dq_kernel, (q, k, v, o, do, dqkv, lse, delta, q, *bp.args1)),
                            ("dkdv", A._attn_bwd_dkdv_kernel, (q, k, v, do, dqkv, q, lse, delta, q, *bp.args2))]
            for part, kern, args in launches:
                rows.append(dict(kernel=f"attn bwd-{part} {label} N={N} Dh={Dh}", config=cfg,
                                 **ptxas_report(kern, args, kw)))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernels", default="stop,attention")
    ap.add_argument("--out", default=None, help="write ptxas_report.json and ptxas_report.md here")
    args = ap.parse_args(argv)
    kinds = {"stop": stop_rows, "attention": attention_rows}
    names = args.kernels.split(",")
    bad = [n for n in names if n not in kinds]
    if bad:  # before any compile: a typo after "stop" once cost the StoP kernels' minutes, then a KeyError
        ap.error(f"--kernels: unknown {bad}; choose from {sorted(kinds)}")
    rows = []
    for name in names:
        rows += kinds[name]()
    lines = ["| kernel | config | regs | spill st/ld (B) | smem KB | CTAs/SM | wgmma | cp.async | loop instrs / BAR / LDL+STL |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        r["ctas_per_sm"] = _occupancy(r)
        cfg = ", ".join(f"{k}={v}" for k, v in r["config"].items())
        flag = " **spills**" if r["spill_stores"] or r["spill_loads"] else ""
        lines.append(f"| {r['kernel']} | {cfg} | {r['regs']} | {r['spill_stores']}/{r['spill_loads']}{flag} | "
                     f"{r['smem'] / 1024:.0f} | {r['ctas_per_sm']} | {r['wgmma']} | {r['cp_async']} | "
                     f"{r['loop_instrs']}{'' if r.get('has_loop', True) else ' (no loop: whole kernel)'} / "
                     f"{r['loop_bar']} / {r['loop_local']} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "ptxas_report.json"), "w") as fh:
            json.dump(rows, fh, indent=1)
        with open(os.path.join(args.out, "ptxas_report.md"), "w") as fh:
            fh.write(f"# ptxas report, sm_90a, bf16, ViT-H/14 sizes (R={R}, E={E}, D={D})\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
