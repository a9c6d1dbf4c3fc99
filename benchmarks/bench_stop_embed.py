"""pytest-benchmark: fused StoP predictor input vs the unfused official path, ViT-H/14 shapes, bf16 autocast.

    pytest benchmarks/bench_stop_embed.py --benchmark-only

B=64, npred=4, Nc=74, Nt=42, E=1280, D=384, P=256; ctx bf16 (encoder output under autocast),
W, b, ψ fp32. Contenders in the same run: the fused Triton op (with its index range checks, and inside
trusted_device_indices() without them), the official path (benchmarks/_official_stop.py: torch.randn
noise + Linear + gather + repeat + cat) eager and under torch.compile; forward and forward+backward.
Every benchmarked callable ends with torch.cuda.synchronize(). ``extra_info`` records the GPU name
and the peak memory beyond the inputs (MiB) next to the output size.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("pytest_benchmark")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from _official_stop import B, D, NC, NPRED, NT  # noqa: E402
from _official_stop import fused, fused_trusted, make_inputs, official  # noqa: E402
from _gpu_common import peak_mib_beyond_inputs  # noqa: E402


_COMPILED = {}


def contender(name):
    if name == "fused":
        return fused
    if name == "fused-trusted":
        return fused_trusted
    if name == "eager":
        return official
    if "compiled" not in _COMPILED:
        _COMPILED["compiled"] = torch.compile(official)
    return _COMPILED["compiled"]


@pytest.mark.parametrize("impl", ["fused", "fused-trusted", "eager", "compiled"])
@pytest.mark.parametrize("with_backward", [False, True], ids=["forward", "forward+backward"])
def test_predictor_input(benchmark, impl, with_backward):
    ctx, ctx_idx, tgt, w, b, pos = make_inputs()
    fn = contender(impl)
    go = torch.randn(NPRED * B, NC + NT, D, device="cuda")
    leaves = (ctx, w, b)

    def step():
        for t in leaves:
            t.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn(ctx, ctx_idx, tgt, w, b, pos)
        if with_backward:
            out.backward(go)
        torch.cuda.synchronize()
        return out

    for _ in range(3):  # compile / autotune outside the timing
        step()
    for t in leaves:  # the warm-up's gradients would count as inputs, and step() frees them (as gpu_stop_embed)
        t.grad = None
    peak = peak_mib_beyond_inputs(lambda: (step(), [t.grad for t in leaves]))
    benchmark.extra_info.update({"gpu": torch.cuda.get_device_name(0), "peak_beyond_inputs_MiB": round(peak, 1),
                                 "output_MiB": round(go.numel() * 4 / 2 ** 20, 1)})
    benchmark.pedantic(step, rounds=50, warmup_rounds=5, iterations=1)
