"""pytest-benchmark: Triton flash attention vs every torch SDPA backend (and xformers when it loads).

    python -m pytest benchmarks/bench_attention.py --benchmark-only --benchmark-json=out.json

Shapes (B, H, N, D), bf16, q/k/v as views of a [B, N, 3, H, D] QKV buffer (``triton-qkv``: the buffer
itself, through ``attention_qkv``, whose backward writes d(qkv) without a stack): predictor
(256, 16, N, 24) for N in {100, 116, 128, 150, 160}; encoder (64, 16, 256, 80) and (64, 16, 74, 80).
Modes: forward, forward+backward. Peers measured in the same run; the math backend only at
(256, 16, 150, 24). Each benchmark's extra_info records the GPU, TFLOP/s and GB/s
(FLOPs 4·B·H·N²·D forward, 3.5× for forward+backward; bytes q, k, v, o forward, plus
do, dq, dk, dv and lse for forward+backward).

``triton-qkv-compiled`` and ``sdpa-compiled`` call the same under ``torch.compile`` (Inductor launches our
kernels itself; SDPA picks its backend inside the graph): what the compiled model blocks pay per call.
Two launch modes per case: ``eager`` (REPS back-to-back Python calls, then one sync: includes the
host's launch cost, what an eager training loop sees) and ``graph`` (the same REPS calls captured
once in a CUDA graph, each round one replay: GPU time only). Tuning / compilation happen in the
eager warm-up call, before any capture. The forward runs under no_grad.
"""
import os
import sys

import pytest
import torch

# stop_kernels from the checkout also where it is not installed: pytest puts only this folder on the path, and
# without CUDA the module must get as far as its skip
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _gpu_common import card_limits, sdpa_fn  # noqa: E402
from stop_kernels.models.flops import attention_cost  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="attention benchmarks need a CUDA GPU (Triton kernels vs cuDNN/flash SDPA)")

SHAPES = [(256, 16, n, 24) for n in (100, 116, 128, 150, 160)] + [(64, 16, 256, 80), (64, 16, 74, 80)]
REPS = 10
COMPILED_SHAPES = [(256, 16, 116, 24), (64, 16, 256, 80), (64, 16, 74, 80)]  # compiles are slow: the main shapes
_COMPILED: dict = {}  # one torch.compile'd function per impl, reused across shapes (Dynamo recompiles per shape)
IMPLS = ["triton", "triton-qkv", "triton-qkv-compiled", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa-math",
         "sdpa-compiled", "xformers"]


def _impl(name):
    if name == "triton":
        from stop_kernels.ops.attention import attention
        return attention
    if name == "triton-qkv":  # the models' call: the packed buffer in, d(qkv) written in its layout
        from stop_kernels.ops.attention import attention_qkv
        return lambda qkv: attention_qkv(qkv)
    if name in _COMPILED:
        return _COMPILED[name]
    if name == "triton-qkv-compiled":  # inside torch.compile: Inductor launches the kernels (triton_op)
        from stop_kernels.ops.attention import attention_qkv
        return _COMPILED.setdefault(name, torch.compile(attention_qkv, fullgraph=True))
    if name == "sdpa-compiled":  # SDPA on the q, k, v views inside torch.compile (the compiled blocks' peer)
        return _COMPILED.setdefault(name, torch.compile(sdpa_fn(None), fullgraph=True))
    if name == "xformers":
        try:
            import xformers.ops as xops
        except Exception as e:
            pytest.skip(f"xformers does not import: {e!r}")
        return lambda q, k, v: xops.memory_efficient_attention(q, k, v)
    return sdpa_fn(name[len("sdpa-"):])  # "sdpa-cudnn" / "-flash" / "-efficient" / "-math"


@pytest.mark.parametrize("launch", ["eager", "graph"])
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{b}-H{h}-N{n}-D{d}" for b, h, n, d in SHAPES])
def test_attention_speed(benchmark, shape, impl, mode, launch):
    if impl == "sdpa-math" and shape != (256, 16, 150, 24):
        pytest.skip("math backend measured at one shape only")
    if impl.endswith("-compiled") and shape not in COMPILED_SHAPES:
        pytest.skip("compiled peers measured at the predictor's N = 116 and the two encoder shapes only")
    B, H, N, D = shape
    f = _impl(impl)
    qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16)

    def calls():  # REPS calls (fresh views each: the same Python work in both launch modes)
        for _ in range(REPS):
            args = (qkv,) if impl.startswith("triton-qkv") else qkv.unbind(2)
            if mode == "fwd":
                with torch.no_grad():
                    f(*args)
            else:
                qkv.grad = None
                f(*args).backward(do)

    peer = not impl.startswith("triton")  # only a peer's refusal of a shape is a skip: our kernels' errors fail
    try:
        calls()  # compile / tune, and probe that the backend supports the shape
    except RuntimeError as e:
        if not peer:
            raise
        pytest.skip(f"{impl} does not run at {shape}: {str(e).splitlines()[0][:200]}")
    torch.cuda.synchronize()
    if launch == "graph":
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(s):
                calls()  # warm-up on the side stream (as torch.cuda.graph recommends)
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(g):
                calls()
        except RuntimeError as e:
            if not peer:
                raise
            pytest.skip(f"{impl} does not capture in a CUDA graph at {shape}: {str(e).splitlines()[0][:200]}")

        def run():
            g.replay()
            torch.cuda.synchronize()
    else:
        def run():
            calls()
            torch.cuda.synchronize()

    torch.cuda.synchronize()
    benchmark.pedantic(run, rounds=30, iterations=1, warmup_rounds=3)
    t = benchmark.stats.stats.median / REPS
    flops, nbytes = attention_cost(B, N, H * D, mode, heads=H)  # fwd: 4e bytes; fwdbwd: 12e + 2·lse
    gpu = torch.cuda.get_device_name(0)
    peak_tflops, peak_tbps = card_limits(gpu)  # the card's measured matmul rate and copy bandwidth
    benchmark.extra_info.update(gpu=gpu, shape=list(shape), impl=impl, mode=mode,
                                launch=launch, ms_per_call=t * 1e3, reps_per_round=REPS,
                                tflops=flops / t / 1e12, gbps=nbytes / t / 1e9, card_limits=[peak_tflops, peak_tbps],
                                frac_of_card_tflops=flops / t / (peak_tflops * 1e12),
                                frac_of_card_tbps=nbytes / t / (peak_tbps * 1e12))
