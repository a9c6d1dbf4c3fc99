"""pytest-benchmark: the target encoder's fc1 + bias + GELU as one cuBLASLt GEMM (``stop_kernels.ops.linear_gelu``,
config key ``fused_target_gelu``) against its unfused peers, ViT-H/14's target shape: T = 64·256 = 16384 tokens,
1280 → 5120, bf16 (the weights cast beforehand, as the compiled blocks cast them once per call).

    pytest benchmarks/bench_linear_gelu.py --benchmark-only

Contenders, forward only (the target encoder keeps no graph):
* ``fused``: :func:`~stop_kernels.ops.linear_gelu.linear_gelu`, the GELU (tanh form) in the GEMM's epilogue;
* ``unfused_exact``: ``F.gelu(F.linear(x, w, b))``, what every other path runs (GEMM, then an elementwise GELU that
  reads and writes the [T, 5120] activation: 2 × 168 MB);
* ``unfused_tanh``: the same with the tanh form (the fused op's twin), to separate the fusion from the formula.

Work per call: 2·T·1280·5120 = 214.7 GFLOP (≈ 0.30 ms at the 707 TFLOP/s ANCHORS measured for a large bf16 GEMM);
the separate GELU moves 336 MB (≈ 0.08 ms at 4.23 TB/s). Every benchmarked callable ends with
``torch.cuda.synchronize()``; ``extra_info`` records the GPU and the TFLOP/s at the median.
"""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

pytest.importorskip("pytest_benchmark")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from stop_kernels.ops.linear_gelu import linear_gelu, linear_gelu_reference  # noqa: E402

TOKENS, WIDTH, HIDDEN = 64 * 256, 1280, 5120
IMPLS = {"fused": linear_gelu, "unfused_tanh": linear_gelu_reference,
         "unfused_exact": lambda x, w, b: F.gelu(F.linear(x, w, b))}


@pytest.mark.parametrize("impl", list(IMPLS))
def test_linear_gelu(benchmark, impl):
    torch.manual_seed(0)
    x = torch.randn(TOKENS, WIDTH, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(HIDDEN, WIDTH, device="cuda") / WIDTH ** 0.5).bfloat16()
    b = torch.randn(HIDDEN, device="cuda", dtype=torch.bfloat16)
    fn = IMPLS[impl]

    @torch.no_grad()
    def step():
        out = fn(x, w, b)
        torch.cuda.synchronize()
        return out

    for _ in range(3):  # cuBLASLt's heuristics outside the timing
        step()
    flop = 2 * TOKENS * WIDTH * HIDDEN
    benchmark.extra_info.update({"gpu": torch.cuda.get_device_name(0), "gflop": round(flop / 1e9, 1)})
    benchmark.pedantic(step, rounds=50, warmup_rounds=5, iterations=1)
    benchmark.extra_info["tflops_at_median"] = round(flop / benchmark.stats.stats.median / 1e12, 1)
