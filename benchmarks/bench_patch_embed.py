"""pytest-benchmark: the encoders' patch embedding as one GEMM (the model's) vs cuDNN's strided convolution
(the official code's), ViT-H/14 at 224 px, batch 64, bf16 autocast.

    pytest benchmarks/bench_patch_embed.py --benchmark-only

Both contenders use the same ``PatchEmbed`` parameters (an ``nn.Conv2d`` of 1280 kernels of 3×14×14):
"gemm" is ``PatchEmbed.forward`` (the patches gathered into rows, K padded 588 → 592, one ``linear``),
"conv" is the official ``proj(x).flatten(2).transpose(1, 2)``. Forward (both encoders) and forward+backward
(the context encoder: the kernel's and bias's gradients; the images need none). GPU run 5 profiled the
convolution at 0.59 ms per call in the ViT-H step, for 2·16384·588·1280 = 24.7 GFLOP. Every benchmarked
callable ends with ``torch.cuda.synchronize()``; ``extra_info`` records the GPU and the TFLOP/s.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

pytest.importorskip("pytest_benchmark")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from stop_kernels.models.vit import PatchEmbed  # noqa: E402

BATCH, IMG, PATCH, CHANS, WIDTH = 64, 224, 14, 3, 1280


def _conv(pe: PatchEmbed, x: torch.Tensor) -> torch.Tensor:
    return pe.proj(x).flatten(2).transpose(1, 2)


@pytest.mark.parametrize("impl", ["gemm", "conv"])
@pytest.mark.parametrize("with_backward", [False, True], ids=["forward", "forward+backward"])
def test_patch_embed(benchmark, impl, with_backward):
    torch.manual_seed(0)
    pe = PatchEmbed(IMG, PATCH, CHANS, WIDTH).cuda()
    x = torch.randn(BATCH, CHANS, IMG, IMG, device="cuda")
    fn = pe if impl == "gemm" else (lambda t: _conv(pe, t))
    go = torch.randn(BATCH, (IMG // PATCH) ** 2, WIDTH, device="cuda", dtype=torch.bfloat16)

    def step():
        pe.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16), torch.set_grad_enabled(with_backward):
            out = fn(x)
        if with_backward:
            out.backward(go)
        torch.cuda.synchronize()
        return out

    for _ in range(3):  # cuDNN's algorithm choice and cuBLAS's heuristics outside the timing
        step()
    flop = 2 * BATCH * (IMG // PATCH) ** 2 * CHANS * PATCH * PATCH * WIDTH * (2 if with_backward else 1)
    benchmark.extra_info.update({"gpu": torch.cuda.get_device_name(0), "gflop": round(flop / 1e9, 1)})
    benchmark.pedantic(step, rounds=50, warmup_rounds=5, iterations=1)
    benchmark.extra_info["tflops_at_median"] = round(flop / benchmark.stats.stats.median / 1e12, 1)
