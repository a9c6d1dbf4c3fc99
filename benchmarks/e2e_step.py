#!/usr/bin/env python
"""End-to-end I-JEPA+StoP training step: the project's reference path against its fast path.

Both paths run in one process on one GPU, on the same masks and images, one after the other:

* ``reference``: plain PyTorch — SDPA attention, the official unfused StoP input (torch.randn +
  Linear + gather + repeat + cat), fused AdamW, one foreach EMA, per-block ``torch.compile``
  (dynamic shapes), bf16 autocast over fp32 master weights. This is the strongest baseline of
  ANCHORS.md (510 images/s on an H200), rebuilt inside the project.
* ``fast``: the same modules with the project's kernels — Triton flash attention shaped for head
  dims 24/80, the fused StoP assembly (noise generated in registers) — everything else equal.

    python benchmarks/e2e_step.py --model vit_h --batch-size 64 --steps 20 --out results/

Prints one JSON line per path (ms/step, images/s, TFLOP/s, MFU, peak GiB) and the ratio. Timing:
the wall clock over ``--steps`` steps after ``--warmup`` (synchronised before and after; no host
synchronisation inside a step: index range checks are skipped via ``trusted_device_indices``).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from stop_kernels import reference, trusted_device_indices
from stop_kernels.data import MultiBlockMaskCollator
from stop_kernels.models import VIT_PRESETS, predictor_for, resolve_model_name, vit_encoder
from stop_kernels.models.flops import jepa_step_flops, peak_tflops
from stop_kernels.ops.attention import use_attention_backend
from stop_kernels.training.ema import ema_update

PATHS = {
    "reference": dict(attention="sdpa", input_backend="unfused"),
    "fast": dict(attention="auto", input_backend="auto"),
}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_h")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--patch-size", type=int, default=14)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--npred", type=int, default=4)
    p.add_argument("--pred-depth", type=int, default=12)
    p.add_argument("--pred-emb-dim", type=int, default=384)
    p.add_argument("--noise-std", type=float, default=0.2)
    p.add_argument("--steps", type=int, default=20, help="timed steps per path")
    p.add_argument("--warmup", type=int, default=6, help="untimed steps per path (compilation happens here)")
    p.add_argument("--mask-batches", type=int, default=6, help="distinct mask batches cycled through")
    p.add_argument("--paths", default="reference,fast")
    p.add_argument("--no-compile", action="store_true", help="skip per-block torch.compile in both paths")
    p.add_argument("--out", default=None, help="folder for e2e_step.json")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu (smoke test only)")
    return p.parse_args(argv)


def build(args, path: str):
    torch.manual_seed(0)
    enc = vit_encoder(args.model, img_size=args.img_size, patch_size=args.patch_size).to(args.device)
    pred = predictor_for(enc, img_size=args.img_size, patch_size=args.patch_size,
                         predictor_embed_dim=args.pred_emb_dim, depth=args.pred_depth, noise_std=args.noise_std,
                         input_backend=PATHS[path]["input_backend"]).to(args.device)
    tgt = copy.deepcopy(enc).requires_grad_(False)
    if not args.no_compile:
        for m in (enc, tgt):
            for blk in m.blocks:
                blk.compile(dynamic=True)
        for blk in pred.predictor_blocks:
            blk.compile(dynamic=True)
    params = [p for m in (enc, pred) for p in m.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.04}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, fused=args.device.type == "cuda")
    return enc, pred, tgt, opt


def train_step(models, imgs, masks_enc, masks_pred, momentum: float = 0.999) -> torch.Tensor:
    enc, pred, tgt, opt = models
    with torch.autocast(imgs.device.type, dtype=torch.bfloat16):
        with torch.no_grad():
            h = reference.target_features(tgt(imgs), masks_pred)
        z = pred(enc(imgs, masks_enc), masks_enc, masks_pred)
        loss = F.smooth_l1_loss(z.float(), h.float())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    ema_update(tgt.parameters(), enc.parameters(), momentum)
    return loss.detach()


def make_batches(args):
    coll = MultiBlockMaskCollator(input_size=args.img_size, patch_size=args.patch_size, npred=args.npred, seed=0)
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(args.mask_batches):
        samples = [(torch.zeros(1), 0) for _ in range(args.batch_size)]
        _, menc, mpred = coll(samples)
        out.append(([m.to(args.device) for m in menc], [m.to(args.device) for m in mpred]))
    imgs = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(args.device)
    return imgs, out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_path(args, path: str, imgs, batches) -> dict:
    cuda = args.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated() if cuda else 0
    models = build(args, path)
    t0 = time.perf_counter()
    with use_attention_backend(PATHS[path]["attention"]), trusted_device_indices():
        for i in range(args.warmup):
            train_step(models, imgs, *batches[i % len(batches)])
        sync(args.device)
        warm_s = time.perf_counter() - t0
        losses = []
        t1 = time.perf_counter()
        for i in range(args.steps):
            losses.append(train_step(models, imgs, *batches[i % len(batches)]))
        sync(args.device)
    ms = (time.perf_counter() - t1) * 1e3 / args.steps
    n_ctx = sum(b[0][0].shape[1] for b in (batches[i % len(batches)] for i in range(args.steps))) / args.steps
    n_tgt = sum(b[1][0].shape[1] for b in (batches[i % len(batches)] for i in range(args.steps))) / args.steps
    spec = VIT_PRESETS[resolve_model_name(args.model)]
    g = args.img_size // args.patch_size
    flops = jepa_step_flops(embed_dim=spec.embed_dim, depth=spec.depth, mlp_ratio=spec.mlp_ratio,
                            pred_dim=args.pred_emb_dim, pred_depth=args.pred_depth, batch=args.batch_size,
                            num_patches=g * g, patch_size=args.patch_size, n_ctx=n_ctx, n_tgt=n_tgt,
                            npred=args.npred)["total"]
    tflops = flops / (ms * 1e-3) / 1e12
    res = {
        "path": path, "model": args.model, "batch": args.batch_size, "gpu": gpu_name(args.device),
        "compile": not args.no_compile, "ms_per_step": round(ms, 2),
        "images_per_s": round(args.batch_size / (ms * 1e-3), 1), "tflops": round(tflops, 1),
        "mfu": round(tflops / peak_tflops(gpu_name(args.device)), 4),
        "peak_mem_gib": round((torch.cuda.max_memory_allocated() - base_mem) / 2 ** 30, 2) if cuda else None,
        "warmup_s": round(warm_s, 1), "mean_ctx_tokens": round(n_ctx, 1), "mean_tgt_tokens": round(n_tgt, 1),
        "final_loss": round(float(torch.stack(losses[-5:]).mean()), 5),
    }
    del models
    if cuda:
        torch.cuda.empty_cache()
    return res


def gpu_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main(argv=None) -> int:
    args = parse(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type != "cuda":
        print("e2e_step: no CUDA GPU — running on the CPU as a smoke test; the timings say nothing", flush=True)
    imgs, batches = make_batches(args)
    results = []
    for path in args.paths.split(","):
        res = run_path(args, path, imgs, batches)
        print(json.dumps(res), flush=True)
        results.append(res)
    by = {r["path"]: r for r in results}
    if "reference" in by and "fast" in by:
        ratio = by["fast"]["images_per_s"] / by["reference"]["images_per_s"]
        print(json.dumps({"ratio_fast_over_reference": round(ratio, 3)}), flush=True)
    print(f"\n| path | ms/step | images/s | TFLOP/s | MFU | peak GiB |  ({results[0]['gpu']}, {args.model}, "
          f"batch {args.batch_size}, compile={not args.no_compile})")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['path']} | {r['ms_per_step']} | {r['images_per_s']} | {r['tflops']} | {r['mfu']:.1%} | "
              f"{r['peak_mem_gib']} |")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "e2e_step.json"), "w") as fh:
            json.dump({"command": " ".join(sys.argv), "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
