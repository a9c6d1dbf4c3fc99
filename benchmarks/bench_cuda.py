"""pytest-benchmark: the StoP op (ψ[idx] + n·Wᵀ + b) at the ViT-H/14 I-JEPA+StoP shapes, bf16.

    R = npred·B·Nt = 4·64·42 = 10752 masked tokens, E = 1280, D = 384, P = 256

Peers: the CUDA C++ extension (``stop_kernels._C``), the Triton kernel (when importable), and the
unfused PyTorch path of the official code (torch.randn + Linear + gather). Forward and forward+backward.

    pytest benchmarks/bench_cuda.py --benchmark-only

Skipped with the reason when there is no CUDA device or the extension is not built.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stop_kernels._checks import trusted_device_indices
from stop_kernels.ops import cuda_backend as cb

NPRED, B, NT, E, D, P = 4, 64, 42, 1280, 384, 256
R = NPRED * B * NT
SIGMA = 0.25
DTYPE = torch.bfloat16

if not torch.cuda.is_available():
    pytest.skip("no CUDA device visible: the CUDA benchmarks need a GPU", allow_module_level=True)
if not cb.available():
    pytest.skip(f"stop_kernels._C is not built: {cb.load_error()}", allow_module_level=True)


def _triton_fn():
    try:
        from stop_kernels.ops.stop_embed import stop_embed
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return stop_embed, ""


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator(device="cuda").manual_seed(0)
    pos = torch.randn(P, D, device="cuda", generator=g).to(DTYPE)
    w = (torch.randn(D, E, device="cuda", generator=g) / E ** 0.5).to(DTYPE)
    b = torch.randn(D, device="cuda", generator=g).to(DTYPE)
    idx = torch.randint(0, P, (NPRED * B, NT), device="cuda", generator=g)
    grad = torch.randn(NPRED * B, NT, D, device="cuda", generator=g).to(DTYPE)
    return pos, idx, w, b, grad


def _unfused(pos, idx, w, b):
    n = torch.randn(*idx.shape, w.shape[1], device=pos.device, dtype=pos.dtype) * SIGMA
    return F.linear(n, w, b) + pos[idx]


def _cuda(pos, idx, w, b):
    return cb.stop_embed_cuda(pos, idx, w, b, noise_std=SIGMA)


def _triton(pos, idx, w, b):
    fn, why = _triton_fn()
    if fn is None:
        pytest.skip(f"Triton op not importable: {why}")
    try:
        return fn(pos, idx, w, b, noise_std=SIGMA, backend="triton")
    except TypeError:
        return fn(pos, idx, w, b, noise_std=SIGMA)


IMPLS = {"cuda": _cuda, "triton": _triton, "unfused": _unfused}


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
