#!/usr/bin/env python
"""End-to-end I-JEPA+StoP training step: the project's reference path against its fast path (issue 8).

Both paths are the training pipeline's own :class:`~stop_kernels.training.loop.Trainer` (fused AdamW,
one foreach EMA, bf16 autocast over fp32 master weights, no FSDP on one GPU), run on one GPU one after
the other, each in a fresh process (``--no-isolate``: all in one), on the same synthetic images and
mask batches:

* ``reference``: plain PyTorch — SDPA attention, the official unfused StoP input (torch.randn +
  Linear + gather + repeat + cat), per-block ``torch.compile`` with Inductor's Python host code. The
  strongest baseline of ANCHORS.md (510 images/s on an H200 for the official code), rebuilt inside the
  project.
* ``fast``: ``train.py``'s defaults — the fused StoP assembly (noise generated in registers), the
  attention backend "auto" picks (see ``stop_kernels.ops.attention.DEFAULT_AUTO_POLICY``: inside the
  compiled blocks the Triton kernels at the predictor's head dim 24, SDPA at the encoders' 80; GPU run 6),
  per-block ``torch.compile``; at ViT-H the recipe's C++ host code of the compiled blocks
  (``cpp_wrapper``: GPU run 5 measured the step host-bound, 121.5 ms/step with it against 141.5 ms
  without).
* ``fast_py``: ``fast`` with Inductor's Python host code (``cpp_wrapper`` off: the default before run 5),
  so the C++ host code's share stays measured side by side.
* ``fast_stack``: ``fast_py`` with each model's block stack compiled as one graph (``compile_scope:
  stack``): the per-block Dynamo guards and AOTAutograd wrappers (76 forward and 44 backward block calls
  per ViT-H step) become one call per model pass. The other host lever, apart: Inductor's C++ host code
  cannot call the stack's nested block region (torch 2.14), so the config refuses the two together.
  Compiled only.
* ``fast_unrolled``: ``fast`` with each model's block stack one graph of every block inlined (``compile_scope:
  unrolled``): both host levers at once, the C++ host code included. It compiles for longer (≈ 2 s per block
  forward+backward on this CPU, linear in the depth: minutes at ViT-H, once). Compiled only.
* ``fast_triton``: ``fast`` with the Triton attention kernels forced inside the compiled blocks
  (``attention=triton``: Inductor launches them itself, see ``stop_kernels.ops.attention``), the
  candidate for the next "auto" default; run it with ``--paths reference,fast,fast_triton``.
* ``fast_sdpa``: ``fast`` with SDPA at every head dim inside the compiled blocks (``attention_policy:
  compiled:24=sdpa``), the default before GPU run 6, kept as the check of the current one. Run 6 (as
  ``fast_mixed``, the present default then named apart): 118.3 ms/step with the Triton kernels at head dim
  24 against 120.0 with SDPA everywhere, side by side.
* ``fast_levers``: ``fast`` with the step levers that are opt-in until measured, all at once:
  combo kernels (a block's weight casts share launches; pointwise kernels only since run 6, where combos
  of the backward's reductions cost 35 ms a step), multi-kernel reductions (ViT-H's LayerNorms one-pass
  where that is faster), the residual stream in bf16, the target encoder replayed from a CUDA graph and
  run on a second stream, its GELU in its fc1 GEMM (``combo_kernels``, ``multi_kernel``, ``bf16_residual``,
  ``cuda_graph_target``, ``overlap_target``, ``fused_target_gelu``; the last one since the twenty-fourth session),
  and the Triton attention kernels for the context encoder's head dim 80, which trains (``attention_policy:
  compiled_train:80=triton``; GPU run 7 timed them at N = 74 on the QKV buffer at 0.107 ms forward+backward against
  cuDNN's 0.146 on q, k, v, while their forward alone, all the target encoder runs, is slower: 0.80× at N = 256;
  the step's attention category shows it). Their sum in one path; ``profile_step.py`` (gpu_all.sh ``profile``) splits it by
  lever. CUDA only: on the CPU the path reports the trainer's refusal.
* ``fast_cg``: ``fast`` with every compiled block replayed from CUDA graphs (``compile_mode: reduce-overhead``,
  Inductor's CUDA-graph trees; the C++ host code off, which a replay never runs): the host work of the
  trained blocks too, not only the target encoder's, leaves the step — run 6 measured every path host-bound.
  Its warm-up runs each mask batch three times (warm-up, recording, replay). ``fast_cg_levers``: with the
  levers that act on GPU time and combine with it (``combo_kernels``, ``multi_kernel``, ``bf16_residual``,
  ``fused_target_gelu``, the context encoder's Triton attention), which a host-bound step cannot show. ``fast_cg_stack``: ``fast_cg`` with each model's block stack one graph
  (``compile_scope: stack``): 5 replayed graph calls per step instead of ≈ 120, the least host work the pipeline
  offers. Compiled only.
* ``fast_overlap``: ``fast`` with the target encoder's forward on a second CUDA stream (``overlap_target``), the
  lever alone. Run 7's defaults were GPU-bound with ≈ 10 ms of gaps per step between kernels
  (``benchmarks/NOTES.md``); a second stream's kernels can run in the first one's gaps and partial last waves.
  CUDA only: on the CPU the path reports the trainer's refusal.
* ``fast_tgelu``: ``fast`` with the target encoder's fc1, bias and GELU as one cuBLASLt GEMM (``fused_target_gelu``:
  the tanh form of GELU, which differs from the exact one far below bf16 rounding; see
  ``stop_kernels.ops.linear_gelu``): the lever alone, its GELU kernels gone from 32 of the step's 76 MLPs.

    python benchmarks/e2e_step.py --model vit_h --batch-size 64 --steps 20 --out DIR

Timing follows ``train.py --benchmark``: a pool of ``--mask-batches`` mask batches is cycled
through and each is run in the warm-up, so the timed steps are the steady state (no first-time
Triton JIT, cuDNN plan or torch.compile graph). Prints one JSON line per path, the ratio and a
table (ms/step, images/s, TFLOP/s, MFU, peak GiB); ``<out>/e2e_step.json`` keeps them. With
``--profile-steps N`` each path also profiles N more steps after the timed ones (GPU time per kernel
category, top kernels and host ops, as ``profile_step.py`` prints them; they do not touch the timing).
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import profile_step  # noqa: E402  (benchmarks/profile_step.py: runs Trainer variants)
from _gpu_common import md_cell, write_json  # noqa: E402


PATHS = {
    "reference": "attention=sdpa+input=unfused+cppwrap=0",
    "fast": "attention=auto+input=auto",
    "fast_py": "attention=auto+input=auto+cppwrap=0",
    "fast_stack": "attention=auto+input=auto+scope=stack+cppwrap=0",
    "fast_unrolled": "attention=auto+input=auto+scope=unrolled",
    "fast_triton": "attention=triton+input=auto",
    "fast_sdpa": "attention=auto+input=auto+policy=compiled:24=sdpa",
    "fast_levers": "attention=auto+input=auto+combo=1+mk=1+bf16res=1+graph=1+overlap=1+tgelu=1"
                   "+policy=compiled_train:80=triton",
    "fast_cg": "attention=auto+input=auto+mode=reduce-overhead+cppwrap=0",
    "fast_cg_levers": "attention=auto+input=auto+mode=reduce-overhead+cppwrap=0+combo=1+mk=1+bf16res=1+tgelu=1"
                      "+policy=compiled_train:80=triton",
    "fast_cg_stack": "attention=auto+input=auto+mode=reduce-overhead+cppwrap=0+scope=stack",
    "fast_tgelu": "attention=auto+input=auto+tgelu=1",
    "fast_overlap": "attention=auto+input=auto+overlap=1",
}


def graphs_cell(r: dict) -> str:
    """The table's CUDA-graph cell of a path: recorded / skipped, empty where the path does not use the trees."""
    if "cudagraph_skips" not in r:
        return ""
    return f"{r.get('cudagraph_recordings')} / {r['cudagraph_skips']}"


def clocks_cell(r: dict) -> str:
    """The table's clock cell of a path: the SM clock's mean (min) and the mean power while its steps were timed."""
    c = r.get("gpu_clocks") or {}
    if "sm_mhz_mean" not in c:
        return c.get("error", "")
    return f"{c['sm_mhz_mean']:.0f} ({c['sm_mhz_min']:.0f}), {c['power_w_mean']:.0f}"


def main(argv=None) -> int:
    p = profile_step.build_parser()
    p.description = __doc__.split("\n\n")[0]
    p.set_defaults(variants=None, profile_steps=0, steps=20, warmup=8, mask_batches=6, out="/tmp/e2e_step")
    p.add_argument("--paths", default="reference,fast")
    p.add_argument("--no-compile", action="store_true", help="eager blocks in every path")
    args = p.parse_args(argv)
    if args.variants is not None:  # (profile_step's flag, inherited with its parser) was silently replaced by --paths
        p.error("--variants: e2e_step.py runs the paths that --paths names (profile_step.py takes --variants)")
    compile_flag = "0" if args.no_compile else "1"
    names = args.paths.split(",")
    for n in names:
        if n not in PATHS:
            p.error(f"--paths: unknown path {n!r}; choose from {sorted(PATHS)}")
    args.variants = ",".join(f"{n}:{PATHS[n]}+compile={compile_flag}" for n in names)
    gpu, results = profile_step.run_variants(args, json_name="e2e_step.json")
    by = {r["name"]: r for r in results if "error" not in r}
    ratio = None  # fast / reference (images/s); the other paths' ratios are printed too
    if "reference" in by:
        for name, r in by.items():
            if name != "reference":
                x = round(r["images_per_s"] / by["reference"]["images_per_s"], 3)
                r["ratio_over_reference"] = x
                print(json.dumps({f"ratio_{name}_over_reference": x}), flush=True)
        ratio = by.get("fast", {}).get("ratio_over_reference")
    if args.profile_steps:  # where each path's GPU and host time goes
        profile_step.print_report(gpu, args, results)
    write_json(os.path.join(args.out, "e2e_step.json"), {**profile_step.run_header(gpu), "results": results, "ratio": ratio})
    # CUDA graphs: under compile_mode reduce-overhead, the graphs recorded / the compiled graphs run without them
    print(f"\n| path | ms/step | images/s | TFLOP/s | MFU | peak GiB (reserved) | last loss (vs reference) | "
          f"CUDA graphs / skipped | SM MHz mean (min), W mean |  ({gpu}, {args.model}, batch {args.batch_size}, "
          f"compile={not args.no_compile})")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        if "error" in r:
            print(f"| {r['name']} | error: {md_cell(r['error'], 150)} | | | | | | | |")
        else:
            print(f"| {r['name']} | {r['ms_per_step']} | {r['images_per_s']} | {r['tflops']} | {r['mfu']:.1%} | "
                  f"{r['peak_gib']} ({r.get('peak_reserved_gib')}) | {loss_cell(r, by.get('reference'))} | "
                  f"{graphs_cell(r)} | {clocks_cell(r)} |")
    return 0


# Every path trains the same seeds and batches, so after as many steps the last losses agree up to bf16 rounding (run 7:
# 0.03867 against the reference's 0.03864, 8e-4); a path whose kernels compute wrong shows as a larger difference.
LOSS_AGREEMENT = 2e-3


def loss_cell(r: dict, ref) -> str:
    """A path's last loss and its relative difference from the reference path's, flagged past :data:`LOSS_AGREEMENT`
    ("n/a" where the two warmed up for different step counts: the CUDA-graph trees take three passes per batch)."""
    if not ref or r is ref or r.get("final_loss") is None or not ref.get("final_loss"):
        return str(r.get("final_loss"))
    if r.get("warmup_steps") != ref.get("warmup_steps"):
        return f"{r['final_loss']} (n/a: {r.get('warmup_steps')} warm-up steps against {ref.get('warmup_steps')})"
    rel = (r["final_loss"] - ref["final_loss"]) / abs(ref["final_loss"])
    return f"{r['final_loss']} ({rel:+.1e}{' **differs**' if abs(rel) > LOSS_AGREEMENT else ''})"


if __name__ == "__main__":
    sys.exit(main())
