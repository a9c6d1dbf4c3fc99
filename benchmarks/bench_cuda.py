"""pytest-benchmark: the StoP op (ψ[idx] + n·Wᵀ + b) at the ViT-H/14 I-JEPA+StoP shapes, bf16.

    R = npred·B·Nt = 4·64·42 = 10752 masked tokens, E = 1280, D = 384, P = 256

Peers: the CUDA C++ extension (``stop_kernels._C``), the Triton kernel (when importable), and the
unfused PyTorch path of the official code (torch.randn + Linear + gather). Forward and forward+backward.

    pytest benchmarks/bench_cuda.py --benchmark-only

Skipped with the reason when there is no CUDA device or the extension is not built.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

# stop_kernels from the checkout also where it is not installed: pytest puts only this folder on the path, and
# without CUDA the module must get as far as its skip
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _official_stop import SIGMA, official_stop_embed, triton_stop_embed  # noqa: E402
from stop_kernels.devtools import VIT_H14_STOP_SIZES  # noqa: E402
from stop_kernels._checks import trusted_device_indices  # noqa: E402
from stop_kernels.ops import cuda_backend as cb  # noqa: E402

B, NPRED, _, NT, E, D, P = VIT_H14_STOP_SIZES.values()  # issue 3's ViT-H/14 sizes (CUDA only: never toy ones)
R = NPRED * B * NT
DTYPE = torch.bfloat16

if not torch.cuda.is_available():
    pytest.skip("no CUDA device visible: the CUDA benchmarks need a GPU", allow_module_level=True)
if not cb.available():
    pytest.skip(f"stop_kernels._C is not built: {cb.load_error()}", allow_module_level=True)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator(device="cuda").manual_seed(0)
    pos = torch.randn(P, D, device="cuda", generator=g).to(DTYPE)
    w = (torch.randn(D, E, device="cuda", generator=g) / E ** 0.5).to(DTYPE)
    b = torch.randn(D, device="cuda", generator=g).to(DTYPE)
    idx = torch.randint(0, P, (NPRED * B, NT), device="cuda", generator=g)
    grad = torch.randn(NPRED * B, NT, D, device="cuda", generator=g).to(DTYPE)
    return pos, idx, w, b, grad


def _cuda(pos, idx, w, b):
    return cb.stop_embed_cuda(pos, idx, w, b, noise_std=SIGMA)


# the unfused peer and the named Triton backend: benchmarks/_official_stop.py (shared with gpu_cuda.py)
IMPLS = {"cuda": _cuda, "triton": lambda pos, idx, w, b: triton_stop_embed(pos, idx, w, b, SIGMA),
         "unfused": lambda pos, idx, w, b: official_stop_embed(pos, idx, w, b, SIGMA)}


def _run(benchmark, fn, sync=True):
    def call():
        fn()
        if sync:
            torch.cuda.synchronize()

    # time the ops, not the host-syncing idx range check (the inputs are valid by construction)
    with trusted_device_indices():
        for _ in range(3):  # warm-up (Triton compiles on first call)
            call()
        benchmark.pedantic(call, rounds=50, iterations=5, warmup_rounds=2)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_forward(benchmark, inputs, impl):
    pos, idx, w, b, _ = inputs
    f = IMPLS[impl]
    f(pos, idx, w, b)  # skip early if unavailable
    benchmark.extra_info.update(shape=dict(R=R, E=E, D=D, P=P), dtype=str(DTYPE), gpu=torch.cuda.get_device_name())
    with torch.no_grad():
        _run(benchmark, lambda: f(pos, idx, w, b))


@pytest.mark.parametrize("impl", list(IMPLS))
def test_forward_backward(benchmark, inputs, impl):
    pos, idx, w, b, grad = inputs
    pos_, w_, b_ = (t.clone().requires_grad_(True) for t in (pos, w, b))
    f = IMPLS[impl]
    f(pos_, idx, w_, b_)
    benchmark.extra_info.update(shape=dict(R=R, E=E, D=D, P=P), dtype=str(DTYPE), gpu=torch.cuda.get_device_name())

    def step():
        out = f(pos_, idx, w_, b_)
        gp, gw, gb = torch.autograd.grad(out, (pos_, w_, b_), grad)
        return gp, gw, gb

    _run(benchmark, step)
