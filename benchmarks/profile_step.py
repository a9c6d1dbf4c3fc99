#!/usr/bin/env python
"""Where does a training step's time go? Times and profiles ``Trainer.step`` in several set-ups.

Each variant builds the full pipeline (:class:`stop_kernels.training.loop.Trainer`: encoder, StoP
predictor, target encoder, fused AdamW, EMA) at the given model and batch, runs warm-up steps, and times
``--steps`` steps (wall clock, synchronised at both ends). The host time to *queue* them is reported too: the
host's lead over the GPU when the steps end is ``--steps`` × the difference, and a full launch queue keeps the two
close in a GPU-bound step as well, so read them with the profile's waits. Meanwhile ``nvidia-smi`` samples the
GPU's SM clock and power. Then ``--profile-steps`` steps run under ``torch.profiler``, which prints the GPU time
per step by kernel category, the top kernels and host ops, and how long the GPU waited for the work of each phase
of the step (the phases marked as ranges: ``stop_kernels.training.metrics.step_phase``; each gap charged to the phase
that launched the kernel ending it, and the part where that kernel was not yet queued, the GPU waiting for the
host, apart), with the host's waits for the GPU in each phase (synchronisations, a full launch queue). One step
runs unprofiled between the timed ones (which end synchronised) and the profiled ones, so that these start with
the launch queue as full as in the steady state.
Each variant runs in a fresh Python process (``--no-isolate``: all in this one), so none inherits another's
torch.compile caches and guards.

    python benchmarks/profile_step.py --model vit_h --batch-size 64 --out DIR \
        --variants fsdp:sharding=full,none:sharding=none,sdpa:sharding=none+attention=sdpa

A variant is ``name:key=value+key=value``; keys: ``sharding`` (auto|full|none; auto = none on one
GPU), ``attention`` (auto|triton|sdpa), ``input`` (the predictor input backend:
auto|triton|cuda|unfused), ``compile`` (0|1), ``mode`` (the blocks' torch.compile mode:
default|max-autotune-no-cudagraphs|reduce-overhead), ``scope`` (block|stack: one compiled graph per block or per
model's block stack, ``compile_scope``), ``combo`` (0|1: Inductor's horizontal fusion of small kernels in
the compiled blocks, ``combo_kernels``), ``bf16res`` (0|1: the blocks' residual stream in bf16,
``bf16_residual``), ``graph`` (0|1: the target encoder replayed from a CUDA graph,
``cuda_graph_target``), ``overlap`` (0|1: the target encoder on a second CUDA stream,
``overlap_target``), ``cppwrap`` (0|1: Inductor's host code of the compiled blocks in C++,
``cpp_wrapper``; the ViT-H recipe turns it on), ``mk`` (0|1: Inductor's multi-kernel reductions, LayerNorms
over more than 1024 features compiled one-pass too and timed, ``multi_kernel``), ``tgelu`` (0|1: the target
encoder's fc1, bias and GELU (tanh form) as one cuBLASLt GEMM, ``fused_target_gelu``), ``policy`` (overrides of the "auto" attention policy, items separated by ``;``,
e.g. ``policy=compiled:24=triton``: config key ``attention_policy``; given twice, as a base's and a lever's, both apply).
Any other key given twice is refused. Results: ``<out>/profile_step.json``
and a markdown table printed last. A 0|1 key left out takes the config's value (the model's recipe, else
the default); the results record the values each variant ran with.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import os
import re
import subprocess
import sys
import time
import traceback

# the start of the script, before torch and the pipeline are imported (seconds of a GPU session's section
# limit, which --budget-s is sized against: gpu_all.sh's e2e section)
T_START = time.perf_counter()

# set in a variant's process by the script that started it (``_run_isolated``): its pid
PARENT_PID_ENV = "PROFILE_STEP_PARENT_PID"


def die_with_parent() -> None:
    """In a variant's process: have Linux kill it (SIGKILL) when the script that started it ends, however
    that ends. The parent's own ``proc.kill()`` on an exception cannot cover it all: a SIGINT landing inside
    ``Popen()`` or just after it (the child exec'd, ``proc`` not yet in the ``try``) skips it, and a SIGKILL
    (``timeout -s KILL``) skips any Python. A child left alive there holds the GPU into the next section for
    all its ``--steps``. Called before torch is imported, so the import is covered too."""
    parent = os.environ.pop(PARENT_PID_ENV, None)
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal
    PR_SET_PDEATHSIG = 1
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        print("profile_step: prctl(PR_SET_PDEATHSIG) failed; this variant may outlive its parent",
              file=sys.stderr)
    if os.getppid() != int(parent):  # the parent ended before the signal was armed
        os._exit(1)


die_with_parent()

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stop_kernels.training import distributed as D  # noqa: E402
from stop_kernels.training.config import parse_config  # noqa: E402
from stop_kernels.training.loop import Trainer, synthetic_batches, warmup_steps  # noqa: E402
from stop_kernels.models.flops import peak_tflops  # noqa: E402
from stop_kernels.models.predictor import INPUT_BACKENDS  # noqa: E402
from stop_kernels.models.packing import mean_tokens  # noqa: E402
from stop_kernels.training.metrics import (STEP_PHASE_PREFIX, annotate_step_phases, step_flops,  # noqa: E402
                                           step_floors_ms)
from stop_kernels.training.parallelize import cudagraph_recordings, cudagraph_skips  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _gpu_common import (card_limits, gpu_busy_ms, gpu_clocks, gpu_idle_by_phase, host_op_times,  # noqa: E402
                         kernel_times, md_cell, write_json)

# kernel name -> category, first match wins
CATEGORIES = [
    # the fused StoP input: CUDA C++ stop_embed_* kernels, the Triton _project/_noise_weight_grad/_pos_noise
    # ones (before attention, whose "_fwd_kernel" also matches stop_embed_fwd_kernel)
    ("stop_input", r"stop_embed|stop_noise|predictor_input|_ctx_|philox|_project_kernel|_noise_weight_grad|_pos_noise"),
    # cuDNN's convolution kernels (the patch embedding before it became a GEMM, run 5: 1.19 ms per step),
    # before attention, whose "cudnn" matches them too; not "conv" alone (Inductor's convert_element_type)
    ("conv", r"cutlass\w*(fprop|dgrad|wgrad)|implicit_gemm|convolution|conv2d|nchwToNhwc|nhwcToNchw"),
    ("attention", r"attn|flash|fmha|cudnn|sdpa|_fwd_kernel|_bwd_kernel|softmax"),
    ("matmul", r"gemm|xmma|cutlass|nvjet|sm90_|wgmma|matmul|_mm_"),
    ("layernorm", r"layer_norm|layernorm|LayerNorm"),
    ("optimizer", r"adam|Adam|multi_tensor|foreach"),
    ("nccl", r"nccl"),
    ("copy_cast", r"copy|Copy|cat|index|gather|scatter|Memcpy|Memset|to_copy|chunk|split"),
    ("elementwise", r"elementwise|vectorized|reduce|gelu|Gelu|triton_"),
]


def category(name: str) -> str:
    for cat, pat in CATEGORIES:
        if re.search(pat, name):
            return cat
    return "other"


# the variant keys that take 0 or 1, and the train.py flag of each ("compile" is passed either way). A lever the
# variant leaves out ("") is not passed: the config decides (vit_huge's recipe turns cpp_wrapper on)
LEVER_FLAGS = {"graph": "--cuda-graph-target", "combo": "--combo-kernels", "bf16res": "--bf16-residual",
               "overlap": "--overlap-target", "cppwrap": "--cpp-wrapper", "mk": "--multi-kernel",
               "tgelu": "--fused-target-gelu"}
SWITCHES = ("compile",) + tuple(LEVER_FLAGS)


def lever_field(key: str) -> str:
    """The config key of a lever's variant key (``cppwrap`` -> ``cpp_wrapper``)."""
    return LEVER_FLAGS[key][2:].replace("-", "_")


def parse_variant(spec: str) -> dict:
    name, _, body = spec.partition(":")
    v = {"name": name, "sharding": "auto", "attention": "auto", "input": "auto", "compile": "0",
         "mode": "default", "scope": "block", "policy": "", **{k: "" for k in LEVER_FLAGS}}
    seen = set()
    for kv in filter(None, body.split("+")):
        k, _, val = kv.partition("=")
        if k not in v or k == "name":
            raise ValueError(f"--variants: unknown key {k!r} in {spec!r}")
        if k == "policy" and v["policy"] and val:  # a base's policy and a lever's: both apply (a key set in
            val = f"{v['policy']};{val}"            # both is refused when the trainer reads the policy)
        elif k in seen:  # a later value would silently replace the base's
            raise ValueError(f"--variants: {k} is set twice in {spec!r}")
        seen.add(k)
        # a switch only reaches the trainer as "1" (variant_argv): "true" or "yes" would silently run it off
        if k in SWITCHES and val not in ("0", "1"):
            raise ValueError(f"--variants: {k} takes 0 or 1, got {val!r} in {spec!r}")
        if k == "input" and val not in INPUT_BACKENDS:  # set on the model after the config checks ran
            raise ValueError(f"--variants: input takes one of {INPUT_BACKENDS}, got {val!r} in {spec!r}")
        v[k] = val
    return v


def _cuda(info) -> bool:
    return info.device.type == "cuda"


def gpu_of(info) -> str:
    return torch.cuda.get_device_name(info.device) if _cuda(info) else "cpu"


def _sync(info) -> None:
    if _cuda(info):
        torch.cuda.synchronize()


def variant_argv(v: dict, model: str, batch_size: int, out: str) -> list:
    """The train.py flags of a parsed variant (the predictor's ``input`` backend is set on the model)."""
    return (["--model", model, "--batch-size", str(batch_size), "--sharding", v["sharding"],
             "--attention", v["attention"], "--attention-policy", v["policy"], "--compile-mode", v["mode"],
             "--compile-scope", v["scope"],
             "--compile", "true" if v["compile"] == "1" else "false", "--out", out]
            + [a for k, flag in LEVER_FLAGS.items() if v[k] for a in (flag, "true" if v[k] == "1" else "false")])


def run_variant(v: dict, args, info) -> dict:
    cfg = parse_config(variant_argv(v, args.model, args.batch_size, os.path.join(args.out, "run_" + v["name"]))
                       + args.extra.split())
    cuda = _cuda(info)
    from torch._dynamo.utils import counters
    counters.clear()  # process-wide: the variant's dynamo stats are its own, not the sum of those before it
    gc.collect()  # a variant that failed part-way leaves its trainer in reference cycles
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    base_reserved = torch.cuda.memory_reserved() if cuda else 0
    t_build = time.perf_counter()
    tr = Trainer(cfg, info, None, sys.stderr)
    tr.models.predictor.input_backend = v["input"]
    build_s = time.perf_counter() - t_build
    # a pool of mask batches cycled through, each seen in the warm-up: the timed steps measure the
    # steady state (no first-time Triton JIT or torch.compile cost), as train.py --benchmark does
    pool = max(1, args.mask_batches)
    warm = warmup_steps(cfg, args.warmup, pool)
    lead_in = 1 if args.profile_steps else 0  # (an unprofiled step: the profiled ones start with the queue filled)
    n_all = warm + args.steps + lead_in + args.profile_steps
    batches = synthetic_batches(cfg, pool, cfg.batch_size, info.device, cfg.seed)
    batches = [batches[i % pool] for i in range(n_all)]
    sched = (cfg.lr, cfg.weight_decay, cfg.ema_start)
    res = {**v, **{k: str(int(getattr(cfg, lever_field(k)))) for k in LEVER_FLAGS},  # what ran (the recipe's too)
           "build_s": round(build_s, 1)}
    t0 = time.perf_counter()
    for i in range(warm):
        tr.step(*batches[i], sched)
    _sync(info)
    res["warmup_s"] = round(time.perf_counter() - t0, 1)
    res["warmup_steps"] = warm
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    # the GPU's clocks and power while the timed steps run (nvidia-smi in the background): whether a path that keeps
    # the GPU busier (CUDA graphs: no gaps between kernels) runs them at lower clocks, at its power limit
    with (gpu_clocks(info.device.index or 0) if cuda else contextlib.nullcontext({})) as clocks:
        t0 = time.perf_counter()
        flops = 0.0
        n_ctx = n_tgt = 0.0
        stats = None
        for i in range(warm, warm + args.steps):
            imgs, me, mp = batches[i]
            stats = tr.step(imgs, me, mp, sched)
            c_len, t_len = mean_tokens(me), mean_tokens(mp)
            flops += step_flops(cfg, cfg.batch_size, c_len, t_len)
            n_ctx, n_tgt = n_ctx + c_len / args.steps, n_tgt + t_len / args.steps
        t_queued = time.perf_counter() - t0
        _sync(info)
        dt = time.perf_counter() - t0
    res["gpu_clocks"] = clocks
    # the last timed step's loss (read after the clock stops): every variant runs the same seeds and
    # batches, so the paths' losses agree up to bf16 noise and the StoP noise stream they draw from
    res["final_loss"] = round(float(stats[0]), 5) if stats is not None else None
    res.update(ms_per_step=round(1e3 * dt / args.steps, 2), host_ms_per_step=round(1e3 * t_queued / args.steps, 2),
               images_per_s=round(cfg.batch_size * args.steps / dt, 1), tflops=round(flops / dt / 1e12, 1),
               mfu=round(flops / dt / 1e12 / peak_tflops(gpu_of(info)), 4),
               peak_gib=round((torch.cuda.max_memory_allocated() - base) / 2 ** 30, 2) if cuda else None,
               # CUDA-graph replays allocate nothing: their buffers (the graphs' pool) show in the reserved peak only
               peak_reserved_gib=round((torch.cuda.max_memory_reserved() - base_reserved) / 2 ** 30, 2) if cuda else None)
    # what the profile's categories are measured against (the card's ceilings; no floor for elementwise work)
    m = tr.models
    # (the floors use the timed steps' mean lengths; the profiled steps cycle the same pool of batches)
    tflops_lim, tbps_lim = card_limits(gpu_of(info) if cuda else "H200 (CPU run)")
    res["floors_ms"] = {k: float(f"{x:.4g}") for k, x in step_floors_ms(
        cfg, cfg.batch_size, n_ctx, n_tgt, tflops=tflops_lim, tbps=tbps_lim,
        trainable_params=sum(p.numel() for mod in (m.encoder, m.predictor) for p in mod.parameters() if p.requires_grad),
        ema_params=sum(p.numel() for p in m.target_encoder.parameters())).items()}
    if tr.target_forward is not None:  # whether the graphed target replayed (it falls back to eager without a word)
        res["target_graph"] = {"captures": tr.target_forward.captures, "replays": tr.target_forward.replays}
    if args.profile_steps:
        try:
            res.update(profiled(tr, batches, sched, warm, args, info, cuda))
        except Exception as exc:  # the timing above stands: a failing profile costs its own rows only
            res["profile_error"] = _clip(f"{type(exc).__name__}: {exc}")
    if v["compile"] == "1":
        from torch._dynamo.utils import counters
        res["dynamo"] = {k: dict(counters[k]) for k in ("stats", "recompiles") if k in counters}
        if tr.cuda_graph_trees:  # skips 0 when every compiled graph ran from CUDA graphs; recordings > 0 on a GPU
            res["cudagraph_skips"] = cudagraph_skips()
            res["cudagraph_recordings"] = cudagraph_recordings(info.device)
    del tr, batches
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return res


def profiled(tr, batches, sched, warm: int, args, info, cuda: bool) -> dict:
    """The profiled steps (after one unprofiled step): GPU ms per step by kernel category and its sum, the GPU's busy
    ms per step (the union of the kernels' intervals: two streams' overlapping kernels count once), the top kernels
    and host ops, and the GPU's idle time by step phase."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    n_all = len(batches)
    annotate_step_phases(True)  # the phases as ranges, for the profiled steps only (a few µs of host each)
    try:
        # the timed steps ended with a synchronisation: one step unprofiled, so that the profiled ones find the
        # host as far ahead of the GPU as in the steady state, not an empty launch queue
        tr.step(*batches[warm + args.steps], sched)
        with profile(activities=acts) as prof:
            for i in range(warm + args.steps + 1, n_all):
                tr.step(*batches[i], sched)
            _sync(info)
    finally:
        annotate_step_phases(False)
    cats, kernels = {}, []
    for name, (t, n) in kernel_times(prof, args.profile_steps).items():
        c = category(name)
        cats[c] = cats.get(c, 0.0) + t
        kernels.append((t, n, c, name[:110]))
    kernels.sort(reverse=True)
    host = host_op_times(prof, args.profile_steps)
    return {"gpu_ms_per_step": round(sum(cats.values()), 2),
            "gpu_busy_ms_per_step": round(gpu_busy_ms(prof, args.profile_steps), 2),
            "categories_ms": {k: round(x, 2) for k, x in sorted(cats.items(), key=lambda kv: -kv[1])},
            "top_kernels": [[round(t, 3), n, c, k] for t, n, c, k in kernels[:args.top]],
            "top_host_ops": [[round(t, 3), n, k] for t, n, k in host[:args.top]],
            "gpu_idle_ms": gpu_idle_by_phase(prof, args.profile_steps, STEP_PHASE_PREFIX)}


def _count(minimum: int):
    """argparse type: an integer >= ``minimum`` (a bad count is refused before any model is built: ``--steps 0``
    divided by zero in every variant, after its build and warm-up)."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {n}")
        return n
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_h")
    p.add_argument("--batch-size", type=_count(1), default=64)
    p.add_argument("--variants", default="fsdp:sharding=full,none:sharding=none")
    p.add_argument("--warmup", type=_count(0), default=4, help="untimed steps (at least --mask-batches are used)")
    p.add_argument("--mask-batches", type=_count(1), default=4, help="distinct mask batches cycled through")
    p.add_argument("--steps", type=_count(1), default=6)
    p.add_argument("--profile-steps", type=_count(0), default=2)
    p.add_argument("--top", type=int, default=14)
    p.add_argument("--budget-s", type=float, default=1e9,
                   help="skip the remaining variants once this many seconds have passed since the script started")
    p.add_argument("--out", default="/tmp/profile_step")
    p.add_argument("--extra", default="", help="more train.py flags for every variant, e.g. '--img-size 64'")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                   help="run each variant in a fresh Python process (default). In one process a later variant "
                        "inherits the earlier ones' torch.compile caches, guards and garbage: GPU run 4 timed "
                        "the same configuration 163 ms third in one process and 135 ms alone, on the same GPU time")
    return p


def run_header(gpu: str) -> dict:
    """What a results JSON of these scripts starts with: the command, the GPU, torch's version and the
    ``STOP_KERNELS_*`` environment (the attention configs file, policy overrides ...)."""
    return {"command": " ".join(sys.argv), "gpu": gpu, "torch": torch.__version__,
            "env": {k: v for k, v in os.environ.items() if k.startswith("STOP_KERNELS_")}}


def _clip(text: str, head: int = 400, tail: int = 1600) -> str:
    """An error message short enough for a JSON record, keeping its start (the exception) and its end:
    a compiler error (Inductor, Triton) names its cause in its last lines."""
    if len(text) <= head + tail:
        return text
    return f"{text[:head]} [... {len(text) - head - tail} characters ...] {text[-tail:]}"


def _run_isolated(spec: str, v: dict, args) -> tuple:
    """One variant in a child process (this script with ``--no-isolate``, the same flags, ``--out
    <out>/variant_<name>``), its output echoed line by line; returns (device name or None, result).
    A child that dies (a crash, an OOM kill) leaves an error result with the end of its output."""
    out = os.path.join(args.out, "variant_" + re.sub(r"[^\w.-]", "_", v["name"]))
    cmd = [sys.executable, os.path.abspath(__file__), "--no-isolate", f"--model={args.model}",
           f"--batch-size={args.batch_size}", f"--variants={spec}", f"--warmup={args.warmup}",
           f"--mask-batches={args.mask_batches}", f"--steps={args.steps}", f"--profile-steps={args.profile_steps}",
           f"--top={args.top}", f"--out={out}", f"--extra={args.extra}"]
    tail = collections.deque(maxlen=80)
    env = {**os.environ, PARENT_PID_ENV: str(os.getpid())}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                          env=env) as proc:
        try:
            for line in proc.stdout:
                sys.stdout.write(f"  [{v['name']}] {line}")
                tail.append(line)
        except BaseException:  # the caller's time limit (gpu_all.sh: SIGINT to this process) or an error:
            proc.kill()  # the variant must not outlive it and hold the GPU during the next section
            raise
    try:
        with open(os.path.join(out, "profile_step.json")) as fh:
            data = json.load(fh)
        return data["gpu"], data["results"][0]
    except (OSError, ValueError, KeyError, IndexError):
        return None, {**v, "error": _clip(f"variant process exited with {proc.returncode}: " + "".join(tail))}


def run_variants(args, json_name: str = "profile_step.json"):
    """Run every variant of ``args.variants``, each in its own process unless ``--no-isolate``;
    returns (device name, results), also written to ``<out>/<json_name>`` after each variant."""
    os.makedirs(args.out, exist_ok=True)
    specs = args.variants.split(",")
    variants = [parse_variant(s) for s in specs]
    isolate = getattr(args, "isolate", False)
    info, gpu = None, None  # isolated: the children's process groups; the device name from their records
    if not isolate:
        if not torch.cuda.is_available():
            print("no CUDA GPU: a CPU smoke run (timings say nothing about the GPU)", file=sys.stderr)
        # one process group for every variant (a one-rank group serves FSDP2 and the unsharded runs alike)
        info = D.init_distributed(parse_config(["--model", args.model, "--sharding", "full"] + args.extra.split()))
        gpu = gpu_of(info)
    results = []
    try:
        for spec, v in zip(specs, variants):
            # counted from the script's start: its imports and the process group are part of the time the
            # caller's limit gives it (gpu_all.sh: a path starts only while 140 s of the section are left)
            if time.perf_counter() - T_START > args.budget_s:
                print(f"[skip {v['name']}: budget]", flush=True)
                continue
            if isolate:
                child_gpu, r = _run_isolated(spec, v, args)
                gpu = gpu or child_gpu
            else:
                try:
                    r = run_variant(v, args, info)
                except Exception as e:  # keep the other variants' numbers
                    traceback.print_exc()  # the whole of it in the log; the record keeps its two ends
                    r = {**v, "error": _clip(f"{type(e).__name__}: {e}")}
            results.append(r)
            print(json.dumps(r), flush=True)
            write_json(os.path.join(args.out, json_name), {**run_header(gpu or "unknown"), "results": results})
    finally:
        if info is not None:
            D.shutdown(info)
    return gpu or "unknown", results


def print_report(gpu: str, args, results) -> None:
    """Per variant: its top kernels and host ops (when profiled), then one table of every variant with
    the GPU time per kernel category."""
    for r in results:
        if "top_kernels" in r:
            print(f"\n--- {r['name']}: top kernels (ms/step, calls/step, category)")
            for t, n, c, k in r["top_kernels"]:
                print(f"{t:8.3f} {n:5d} {c:11s} {k}")
            print(f"--- {r['name']}: top host ops (self CPU ms/step)")
            for t, n, k in r["top_host_ops"][:8]:
                print(f"{t:8.3f} {n:5d} {k}")
            idle = r.get("gpu_idle_ms", {})
            print(f"--- {r['name']}: GPU idle before the work of each step phase (ms/step; of which waiting for the "
                  f"host), {round(sum(x['idle_ms'] for x in idle.values()), 2)} in all")
            for name, x in idle.items():
                waits = ", ".join(f"{k} {n:g}x {ms} ms" for k, (n, ms) in x["waits"].items())
                host = "?" if x["host_ms"] is None else f"{x['host_ms']:.3f}"
                print(f"{x['idle_ms']:8.3f} {host:>8s} {name}" + (f" (host waits: {waits})" if waits else ""))
    cats = sorted({c for r in results for c in r.get("categories_ms", {})})
    print(f"\n{gpu}, {args.model}, batch {args.batch_size}")
    print("| variant | ms/step | host ms | img/s | TFLOP/s | peak GiB | GPU ms (busy) | " + " | ".join(cats) + " |")
    print("| --- " * (7 + len(cats)) + "|")
    for r in results:
        if "error" in r:
            print(f"| {r['name']} | error: {md_cell(r['error'], 150)} |")
            continue
        c = r.get("categories_ms", {})
        # the kernels' summed time, and in brackets the time the GPU ran any (kernels on two streams at once count
        # once there: the figure to set against ms/step for overlap_target)
        gpu_ms = (f"{r['gpu_ms_per_step']} ({r.get('gpu_busy_ms_per_step')})" if "gpu_ms_per_step" in r
                  else f"profile error: {md_cell(r['profile_error'], 120)}" if "profile_error" in r else "")
        print(f"| {r['name']} | {r['ms_per_step']} | {r['host_ms_per_step']} | {r['images_per_s']} | {r['tflops']} | "
              f"{r['peak_gib']} | {gpu_ms} | " + " | ".join(str(c.get(k, 0)) for k in cats) + " |")
        floors = r.get("floors_ms", {})
        if floors and c:  # the card's floor of each category that has one, and how far the variant is from it
            print(f"| {r['name']}: floor (×) | | | | | | {round(sum(floors.values()), 2)} | " + " | ".join(
                f"{floors[k]} ({c.get(k, 0) / floors[k]:.1f}×)" if floors.get(k) else "" for k in cats) + " |")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    gpu, results = run_variants(args)
    print_report(gpu, args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
