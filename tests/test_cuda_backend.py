"""The CUDA C++ backend (``stop_kernels._C``, sources in ``csrc/``).

Runs everywhere:
  * ``backends()`` says whether the extension is usable and why not;
  * the Philox constants / uniform mapping in ``csrc/`` are those of ``stop_kernels/ops/philox.py``;
  * host emulation: ``csrc/philox.cuh`` compiled as a small host program (g++ or nvcc) reproduces
    :func:`philox_normal`, including the tails of ln u that float32 rounding of u would spoil;
  * argument validation that happens before any device work;
  * the wrapper's host side with the ops stood in by a Python twin of csrc's contract: the checks
    after the device check, kernel and output dtypes, the seed, which gradients the backward op is
    asked for and where they land; the reasons ``backends()`` gives and the SM-count cache.

Runs on a CUDA machine with the extension built (otherwise skipped with the reason):
  * the device noise stream == ``philox_normal`` element for element (direct op and through the fused
    kernel with E = D, weight = I: fp32 within 1e-5·σ absolute, bf16 within one bf16 rounding);
  * outputs and gradients against the reference given that noise (fp32 and bf16 tolerances below);
  * CUDA vs Triton with the same seed (when the Triton op is importable);
  * statistics over 10⁵ tokens, odd shapes, non-contiguous inputs, autocast, bad inputs.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

from stop_kernels import reference as ref
from stop_kernels.devtools import cuda_autocast_flags, rel_error
from stop_kernels.ops import cuda_backend as cb
from stop_kernels.ops import philox
from stop_kernels.ops.philox import draw_seed, philox_normal

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"

HAS_GPU = torch.cuda.is_available()
GPU_REASON = ("no CUDA device visible" if not HAS_GPU else
              f"stop_kernels._C is not available: {cb.load_error()}" if not cb.available() else "")
if HAS_GPU and GPU_REASON and os.environ.get("STOP_KERNELS_REQUIRE_CUDA_EXT") == "1":
    # (set by benchmarks/gpu_all.sh in a call that builds the extension: a failed build must not turn the only
    # machine's CUDA tests into skips)
    GPU_REASON = ""
needs_cuda = pytest.mark.skipif(bool(GPU_REASON), reason=GPU_REASON or "ok")


# ================================================================================================
# CPU-runnable
# ================================================================================================
def test_backends_reports_cuda_status():
    from stop_kernels.backends import backends

    info = backends()
    assert info["reference"] is True
    assert set(info) >= {"reference", "triton", "cuda", "xformers", "reasons"}
    assert info["cuda"] == (cb.available() and torch.cuda.is_available())  # built and callable
    if cb.available() and not torch.cuda.is_available():
        assert "no CUDA device" in info["reasons"]["cuda"]
    if not cb.available():
        # here (no extension built): unavailable, with a reason that says why
        assert info["cuda"] is False
        assert info["reasons"]["cuda"], "backends() must say why cuda is unavailable"
        assert cb.load_error()
        with pytest.raises(RuntimeError, match="not available"):
            cb._ops()


@pytest.mark.parametrize("triton_v, numpy_v, broken", [
    ("3.6.0", "2.4.0", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.1", False),
    ("3.8.0", "2.4.0rc1", False), ("3.2.0", "2.10.0", True),
])
def test_triton_interpreter_problem(monkeypatch, triton_v, numpy_v, broken):
    """triton < 3.7's interpreter cannot run with numpy >= 2.4: said by name, and backends() turns
    'triton' off in interpreter mode with that reason (tests/conftest.py stops the run with it)."""
    import importlib

    import triton

    bk = importlib.import_module("stop_kernels.backends")  # the module (the package exports a function of that name)
    monkeypatch.setattr(triton, "__version__", triton_v)
    monkeypatch.setattr(np, "__version__", numpy_v)
    problem = bk.triton_interpreter_problem()
    assert bool(problem) == broken
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ok, reason = bk._triton()
    assert ok is not broken
    if broken:
        assert triton_v in problem and numpy_v in problem and "numpy<2.4" in problem
        assert problem in reason


def _cuh_constants():
    text = (CSRC / "philox.cuh").read_text()
    consts = {}
    for name in ("PHILOX_M0", "PHILOX_M1", "PHILOX_W0", "PHILOX_W1"):
        m = re.search(rf"constexpr\s+uint32_t\s+{name}\s*=\s*(0x[0-9A-Fa-f]+)u?\s*;", text)
        assert m, f"{name} not found in csrc/philox.cuh"
        consts[name] = int(m.group(1), 16)
    for name in ("PHILOX_ROUNDS", "UNIFORM_SHIFT"):
        m = re.search(rf"constexpr\s+int\s+{name}\s*=\s*([0-9]+)\s*;", text)
        assert m, f"{name} not found in csrc/philox.cuh"
        consts[name] = int(m.group(1))
    return text, consts


def test_csrc_noise_constants_match_philox_py():
    text, consts = _cuh_constants()
    assert consts["PHILOX_M0"] == philox.PHILOX_M0
    assert consts["PHILOX_M1"] == philox.PHILOX_M1
    assert consts["PHILOX_W0"] == philox.PHILOX_W0
    assert consts["PHILOX_W1"] == philox.PHILOX_W1
    assert consts["PHILOX_ROUNDS"] == philox.PHILOX_ROUNDS
    # philox.py: u = (2·(x >> 9) + 1)·2⁻²⁴ → the shift agrees with uniform_from_bits
    xs = np.array([0, 511, 512, 0x80000000, 0xFFFFFFFF, 0x12345678], dtype=np.uint64)
    shift = consts["UNIFORM_SHIFT"]
    mine = (((xs >> np.uint64(shift)) * np.uint64(2)) + np.uint64(1)).astype(np.float64) * 2.0 ** -24
    np.testing.assert_array_equal(mine, philox.uniform_from_bits(xs))
    allowed_words = {philox.PHILOX_M0, philox.PHILOX_M1, philox.PHILOX_W0, philox.PHILOX_W1, philox.MASK32}
    allowed_scales = {2.0 ** -24, 2.0 ** -23}  # u = v·2⁻²⁴, 2u = v·2⁻²³
    for path in sorted(CSRC.glob("*.cu*")) + sorted(CSRC.glob("*.cpp")) + sorted(CSRC.glob("*.h")):
        src = path.read_text()
        # every 32-bit word constant is one of philox.py's (no stray / mistyped multiplier or key bump)
        for h in re.findall(r"0x([0-9A-Fa-f]{8})(?:u|ull|ul)?\b", src):
            assert int(h, 16) in allowed_words, f"{path.name}: 32-bit constant 0x{h} is not one of philox.py's"
        # every tiny float literal (the uniform's scale, the angle's 2u scale) is 2^-24 or 2^-23
        for lit in re.findall(r"\b([0-9]+\.[0-9]+e-0?[0-9]+)f\b", src):
            if float(lit) < 1e-6:
                assert float(lit) in allowed_scales, f"{path.name}: float literal {lit} is not 2^-24 or 2^-23"
    # the quarter-column counter layout (r, q, 0, 0) and key split (lo32, hi32)
    assert re.search(r"philox4x32_10\(\s*r\s*,\s*q\s*,\s*0u\s*,\s*0u\s*,\s*k0\s*,\s*k1\s*\)", text)
    assert "seed & 0xffffffffull" in text and "seed >> 32" in text


_EMU_SRC = r"""
#include "philox.cuh"
#include <cstdio>
#include <cstdlib>
#include <cstring>
using namespace stop_kernels;
int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "noise") == 0) {          // noise seed rows E sigma row_start
    unsigned long long seed = std::strtoull(argv[2], nullptr, 10);
    long rows = std::atol(argv[3]); int E = std::atoi(argv[4]); float sigma = (float)std::atof(argv[5]);
    long row_start = std::atol(argv[6]);
    uint32_t k0, k1; seed_to_key(seed, &k0, &k1);
    const int E4 = (E + 3) / 4;
    float* row = new float[E];
    for (long r = 0; r < rows; ++r) {
      for (int q = 0; q < E4; ++q) {
        float n[4]; stop_noise4((uint32_t)(row_start + r), (uint32_t)q, k0, k1, sigma, n);
        for (int s = 0; s < 4; ++s) if (s * E4 + q < E) row[s * E4 + q] = n[s];
      }
      for (int c = 0; c < E; ++c) std::printf("%.9e\n", row[c]);
    }
    delete[] row;
  } else if (argc > 1 && std::strcmp(argv[1], "log") == 0) {     // log x...: ln u for each word
    for (int i = 2; i < argc; ++i) std::printf("%.9e\n", log_uniform((uint32_t)std::strtoul(argv[i], nullptr, 10)));
  } else if (argc > 1 && std::strcmp(argv[1], "philox") == 0) {  // philox c0 c1 k0 k1
    Philox4 w = philox4x32_10((uint32_t)std::strtoul(argv[2], nullptr, 10), (uint32_t)std::strtoul(argv[3], nullptr, 10),
                              0u, 0u, (uint32_t)std::strtoul(argv[4], nullptr, 10), (uint32_t)std::strtoul(argv[5], nullptr, 10));
    std::printf("%u %u %u %u\n", w.x0, w.x1, w.x2, w.x3);
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """csrc/philox.cuh compiled as a host program (g++, else nvcc); skip when neither is there."""
    d = tmp_path_factory.mktemp("philox_emu")
    src = d / "emu.cpp"
    src.write_text(_EMU_SRC)
    exe = d / "emu"
    for cmd in (["g++", "-O2", "-std=c++17"], ["c++", "-O2", "-std=c++17"], ["nvcc", "-O2", "-std=c++17", "-x", "cu"]):
        if shutil.which(cmd[0]) is None:
            continue
        r = subprocess.run(cmd + [str(src), f"-I{CSRC}", "-o", str(exe)], capture_output=True, text=True)
        assert r.returncode == 0, f"compiling csrc/philox.cuh for the host failed:\n{r.stderr[-3000:]}"
        return lambda *args: subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True,
                                            check=True).stdout
    pytest.skip("no host C++ compiler (g++ / c++ / nvcc) to emulate csrc/philox.cuh")


def test_host_emulation_philox_words(emulator):
    for c0, c1, k0, k1 in [(0, 0, 0, 0), (7, 3, 0xDEADBEEF, 0x12345678), (2 ** 32 - 1, 2 ** 32 - 1, 1, 2)]:
        got = tuple(int(v) for v in emulator("philox", c0, c1, k0, k1).split())
        want = tuple(int(v) for v in philox.philox4x32(c0, c1, 0, 0, k0, k1))
        assert got == want


@pytest.mark.parametrize("seed,rows,E,sigma,row_start", [
    (0, 4, 16, 1.0, 0),
    (12345678901234, 33, 200, 0.25, 0),
    (2 ** 62 - 1, 5, 7, 1.0, 1000),          # E not a multiple of 4: dropped columns
    (99, 3, 1, 2.0, 2 ** 32 - 3),           # E = 1, row counter near its 32-bit end
])
def test_host_emulation_matches_philox_normal(emulator, seed, rows, E, sigma, row_start):
    got = np.array(emulator("noise", seed, rows, E, sigma, row_start).split(), dtype=np.float64).reshape(rows, E)
    want = philox_normal(seed, rows, E, sigma, row_start).numpy()
    # float32 evaluation of a float64 formula: a few ulps of |n| (≤ 6σ) → 1e-6·σ absolute
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * sigma)


def test_host_emulation_uniform_and_log(emulator):
    """u = (2·(x >> 9) + 1)·2⁻²⁴ is exact in float32, so ln u is ≤ 1 float32 ulp from float64, tails included."""
    words = [0, 511, 1 << 9, 0x7FFFFE00, 0x80000000, 0x80000200, 0xFFFFFC00, 0xFFFFFE00, 0xFFFFFFFF,
             0xFFFFF000, 0xC0000000, 0xABCDEF12]
    got = np.array(emulator("log", *words).split(), dtype=np.float64)
    want = np.log(philox.uniform_from_bits(np.array(words, dtype=np.uint64)))
    np.testing.assert_allclose(got, want, rtol=1.2e-7, atol=0)
    # the top word: u = 1 - 2⁻²⁴, radius sqrt(-2 ln u) ≈ 2⁻¹¹·⁵ (never 0)
    assert abs(math.sqrt(-2.0 * got[words.index(0xFFFFFFFF)]) - math.sqrt(2.0 * 2.0 ** -24)) < 1e-10


def test_validation_before_device_work():
    pos = torch.randn(8, 4)
    w = torch.randn(4, 6)
    idx = torch.randint(0, 8, (2, 3))
    with pytest.raises(TypeError, match="^idx:"):
        cb.stop_embed_cuda(pos, idx.float(), w)
    with pytest.raises(TypeError, match="^weight:"):
        cb.stop_embed_cuda(pos, idx, w.long())
    with pytest.raises(ValueError, match="^noise_std:"):
        cb.stop_embed_cuda(pos, idx, w, noise_std=-1.0)
    with pytest.raises(ValueError, match="CUDA"):  # CPU tensors: the CUDA backend says so
        cb.stop_embed_cuda(pos, idx, w)
    with pytest.raises(TypeError, match="^generator:"):
        draw_seed(generator=123)


# ================================================================================================
# CUDA
# ================================================================================================
DEV = "cuda"


def _seeded(seed_base: int):
    """(seed the op will draw, a fresh generator that makes it draw exactly that seed)."""
    g = torch.Generator().manual_seed(seed_base)
    return draw_seed(g), torch.Generator().manual_seed(seed_base)


def _case(P, D, E, idx_shape, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(P, D, generator=g).to(DEV, dtype)
    w = (torch.randn(D, E, generator=g) / math.sqrt(E)).to(DEV, dtype)
    b = torch.randn(D, generator=g).to(DEV, dtype) if bias else None
    idx = torch.randint(0, P, idx_shape, generator=g).to(DEV)
    return pos, idx, w, b


def _expected(pos, idx, w, b, seed, sigma, noise_dtype):
    """Reference in float64 given the noise of `seed`, rounded to the kernel's operand dtype."""
    R = idx.numel()
    n = philox_normal(seed, R, w.shape[1], sigma)
    if noise_dtype != torch.float32:
        n = n.to(noise_dtype).double()
    n = n.to(DEV).view(*idx.shape, w.shape[1])
    return ref.stop_embed(pos.double(), idx, w.double(), b.double() if b is not None else None, n), n


@needs_cuda
@pytest.mark.parametrize("rows,E,sigma,row_start", [(1000, 200, 1.0, 0), (257, 1280, 0.25, 0), (10, 5, 1.0, 77)])
def test_cuda_noise_op_matches_philox_normal(rows, E, sigma, row_start):
    seed = 0x1234_5678_9ABC
    got = cb.stop_noise_cuda(seed, rows, E, sigma, row_start).double().cpu()
    want = philox_normal(seed, rows, E, sigma, row_start)
    # tolerance: fp32 logf / sincospif (≤ 1 ulp each), IEEE sqrtf → a few ulps of |n| ≤ 6σ
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * sigma)


@needs_cuda
@pytest.mark.parametrize("E", [72, 128, 200, 384])
def test_cuda_fused_noise_recovery_fp32(E):
    """E = D, weight = I, ψ = 0, no bias ⇒ out = n: the fused kernel's noise == philox_normal (fp32, 3xTF32)."""
    sigma = 1.0
    seed, gen = _seeded(E)
    R = 300
    pos = torch.zeros(5, E, device=DEV)
    idx = torch.randint(0, 5, (3, R // 3), device=DEV)
    w = torch.eye(E, device=DEV)
    out = cb.stop_embed_cuda(pos, idx, w, None, noise_std=sigma, generator=gen)
    assert out.shape == (3, R // 3, E) and out.dtype == torch.float32
    want = philox_normal(seed, R, E, sigma).view(3, R // 3, E)
    torch.testing.assert_close(out.double().cpu(), want, rtol=0, atol=1e-5 * sigma)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_fused_noise_recovery_half(dtype):
    E, sigma = 256, 0.5
    seed, gen = _seeded(7)
    pos = torch.zeros(3, E, device=DEV, dtype=dtype)
    idx = torch.randint(0, 3, (640,), device=DEV)
    out = cb.stop_embed_cuda(pos, idx, torch.eye(E, device=DEV, dtype=dtype), noise_std=sigma, generator=gen)
    want = philox_normal(seed, 640, E, sigma)
    # out = round(n) exactly, except where float32 n lies within an ulp of a rounding boundary
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.double().cpu(), want, rtol=eps, atol=1e-6)


@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 1.6e-2), (torch.float16, 2e-3)])
# (the last two shapes: a D between 129 and 256 and one above 384 take the wider-fragment and the
# several-column-block paths, and E = 64 the vectorised W loads of E % 32 == 0 below the ViT-H width)
@pytest.mark.parametrize("P,D,E,idx_shape", [(256, 384, 1280, (4, 2, 42)), (50, 72, 200, (3, 17)),
                                              (9, 16, 8, (1,)), (7, 1, 3, (2, 1)), (40, 200, 64, (3, 33)),
                                              (30, 400, 96, (2, 21))])
def test_cuda_matches_reference_forward_backward(dtype, tol, P, D, E, idx_shape):
    sigma = 0.25
    pos, idx, w, b = _case(P, D, E, idx_shape, dtype)
    seed, gen = _seeded(P + D + E)
    pos_, w_, b_ = (t.clone().requires_grad_(True) for t in (pos, w, b))
    out = cb.stop_embed_cuda(pos_, idx, w_, b_, noise_std=sigma, generator=gen)
    assert out.shape == idx.shape + (D,) and out.dtype == dtype
    want, n = _expected(pos, idx, w, b, seed, sigma, dtype)

    def close(a, b_, name):  # norm-relative error plus an elementwise bound of a few rounding steps
        a, b_ = a.double(), b_.double()
        rel = rel_error(a, b_)
        assert rel <= tol, f"{name}: relative error {rel:.2e} > {tol:.1e} ({dtype})"
        scale = b_.abs().max().clamp_min(1e-30)
        assert ((a - b_).abs() <= 8 * tol * scale).all(), f"{name}: elementwise error too large ({dtype})"

    close(out, want, "out")
    G = torch.randn(out.shape, device=DEV, dtype=torch.float64).to(dtype)
    out.backward(G)
    g2 = G.double().reshape(-1, D)
    n2 = n.reshape(-1, E)
    close(w_.grad, g2.t() @ n2, "dweight")
    close(b_.grad, g2.sum(0), "dbias")
    dpos = torch.zeros(P, D, dtype=torch.float64, device=DEV).index_add_(0, idx.reshape(-1), g2)
    close(pos_.grad, dpos, "dpos")


@needs_cuda
def test_cuda_grad_flags_and_no_bias():
    pos, idx, w, _ = _case(16, 24, 40, (5, 6), torch.float32)
    w_ = w.clone().requires_grad_(True)
    seed, gen = _seeded(3)
    out = cb.stop_embed_cuda(pos, idx, w_, None, noise_std=0.3, generator=gen)  # ψ without grad
    g = torch.randn(out.shape, device=DEV)
    out.backward(g)
    n = philox_normal(seed, idx.numel(), 40, 0.3).to(DEV)
    torch.testing.assert_close(w_.grad.double(), g.reshape(-1, 24).double().t() @ n, rtol=1e-5, atol=1e-5)
    pos_ = pos.clone().requires_grad_(True)  # and ψ alone (W without grad): dψ = Σ g at each row's position
    cb.stop_embed_cuda(pos_, idx, w, None, noise_std=0.3, generator=_seeded(3)[1]).backward(g)
    want = torch.zeros(pos.shape, dtype=torch.float64, device=DEV).index_add_(0, idx.reshape(-1),
                                                                             g.reshape(-1, 24).double())
    torch.testing.assert_close(pos_.grad.double(), want, rtol=1e-5, atol=1e-5)


@needs_cuda
def test_cuda_zero_noise_std_is_exact():
    pos, idx, w, b = _case(32, 40, 64, (4, 9), torch.float32)
    out = cb.stop_embed_cuda(pos, idx, w, b, noise_std=0.0)
    torch.testing.assert_close(out, pos[idx] + b, rtol=1e-6, atol=1e-6)


@needs_cuda
def test_cuda_noncontiguous_and_int32_idx():
    P, D, E = 20, 48, 96
    g = torch.Generator().manual_seed(5)
    pos_big = torch.randn(P, 2 * D, generator=g).to(DEV)
    w_t = torch.randn(E, D, generator=g).to(DEV)                 # weight = w_t.T: non-contiguous
    idx_big = torch.randint(0, P, (3, 2 * 11), generator=g).to(DEV)
    pos, w, idx = pos_big[:, ::2], w_t.t(), idx_big[:, ::2].to(torch.int32)
    seed, gen = _seeded(11)
    out = cb.stop_embed_cuda(pos, idx, w, None, noise_std=0.5, generator=gen)
    want, _ = _expected(pos, idx.long(), w, None, seed, 0.5, torch.float32)
    torch.testing.assert_close(out.double(), want, rtol=2e-5, atol=2e-5)


@needs_cuda
def test_cuda_seed_semantics():
    pos, idx, w, b = _case(16, 32, 64, (2, 10), torch.float32)
    torch.manual_seed(0)
    a = cb.stop_embed_cuda(pos, idx, w, b)
    c = cb.stop_embed_cuda(pos, idx, w, b)
    torch.manual_seed(0)
    a2 = cb.stop_embed_cuda(pos, idx, w, b)
    assert torch.equal(a, a2), "same generator state must give the same output"
    assert not torch.allclose(a, c), "consecutive calls must draw independent noise"
    # same seed, different weights: the outputs differ only through the weights
    w2 = torch.randn_like(w)
    torch.manual_seed(0)
    d = cb.stop_embed_cuda(pos, idx, w2, b)
    torch.manual_seed(0)
    seed0 = draw_seed()
    n = philox_normal(seed0, idx.numel(), 64, 0.25).to(DEV).view(2, 10, 64)
    torch.testing.assert_close(d.double(), ref.stop_embed(pos.double(), idx, w2.double(), b.double(), n),
                               rtol=2e-5, atol=2e-5)


@needs_cuda
def test_cuda_autocast():
    pos, idx, w, b = _case(16, 32, 64, (3, 7), torch.float32)
    w_ = w.clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = cb.stop_embed_cuda(pos.to(torch.bfloat16), idx, w_, b)
        out32 = cb.stop_embed_cuda(pos, idx, w_, b)  # fp32 ψ: promote(bf16 weight, fp32 ψ) = fp32
    assert out.dtype == torch.bfloat16 and out32.dtype == torch.float32
    (out.float().sum() + out32.sum()).backward()
    assert w_.grad is not None and w_.grad.dtype == torch.float32 and torch.isfinite(w_.grad).all()


@needs_cuda
def test_cuda_statistics():
    """mean ≈ 0 and covariance ≈ σ²·W·Wᵀ over N = 131072 tokens.

    Tolerances from the sample size: the sample mean of component i has standard deviation
    sqrt(Σ_ii / N); a sample covariance entry of a Gaussian has variance (Σ_ii Σ_jj + Σ_ij²) / N. We
    allow 6 standard deviations per entry (for the 16 + 136 checked entries the chance of a false
    failure is < 1e-7).
    """
    P, D, E, sigma, N = 64, 16, 96, 0.5, 131072
    pos, idx, w, b = _case(P, D, E, (N,), torch.float32, seed=1)
    torch.manual_seed(1234)
    out = cb.stop_embed_cuda(pos, idx, w, b, noise_std=sigma)
    y = (out - pos[idx] - b).double()
    Sigma = sigma ** 2 * (w.double() @ w.double().t())
    mean = y.mean(0)
    assert (mean.abs() <= 6 * (Sigma.diagonal() / N).sqrt()).all(), f"mean {mean}"
    yc = y - mean
    C = yc.t() @ yc / (N - 1)
    sd = ((Sigma.diagonal()[:, None] * Sigma.diagonal()[None, :] + Sigma ** 2) / N).sqrt()
    assert ((C - Sigma).abs() <= 6 * sd).all(), f"max |C - Σ|/sd = {((C - Sigma).abs() / sd).max():.2f}"


@needs_cuda
def test_cuda_bad_inputs():
    pos, idx, w, b = _case(10, 8, 12, (2, 3), torch.float32)
    with pytest.raises(ValueError, match="idx"):
        cb.stop_embed_cuda(pos, idx + 10, w, b)                      # out of [0, P)
    with pytest.raises(ValueError, match="idx"):
        cb.stop_embed_cuda(pos, idx - 11, w, b)
    with pytest.raises(TypeError, match="idx"):
        cb.stop_embed_cuda(pos, idx.float(), w, b)
    with pytest.raises(ValueError, match="pos_embed"):
        cb.stop_embed_cuda(pos[:, :5], idx, w, b)                    # D mismatch
    with pytest.raises(ValueError, match="bias"):
        cb.stop_embed_cuda(pos, idx, w, b[:3])
    with pytest.raises(ValueError, match="noise_std"):
        cb.stop_embed_cuda(pos, idx, w, b, noise_std=-0.1)
    with pytest.raises(ValueError, match="idx"):
        cb.stop_embed_cuda(pos, idx.cpu(), w, b)                     # device mismatch
    with pytest.raises(ValueError, match="weight"):
        cb.stop_embed_cuda(pos, idx, w[None], b)                     # wrong rank


@needs_cuda
def test_cuda_empty_and_tiny():
    pos, idx, w, b = _case(4, 8, 12, (0,), torch.float32)
    out = cb.stop_embed_cuda(pos, idx, w, b)
    assert out.shape == (0, 8)
    pos, idx, w, b = _case(4, 8, 12, (2, 0), torch.bfloat16)
    assert cb.stop_embed_cuda(pos, idx, w, b).shape == (2, 0, 8)
    for D, E in ((1, 1), (3, 5)):  # one token, widths below every tile (the kernels' masked edges)
        pos, idx, w, b = _case(4, D, E, (1,), torch.float32)
        seed, gen = _seeded(8)
        want = pos[idx] + philox_normal(seed, 1, E, 0.3).to(DEV).float() @ w.t() + b
        torch.testing.assert_close(cb.stop_embed_cuda(pos, idx, w, b, noise_std=0.3, generator=gen), want,
                                   rtol=1e-5, atol=1e-5)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_vs_triton_same_noise(dtype, count_calls):
    """The CUDA and Triton kernels draw the same noise for the same generator state (W = I recovers it). The Triton
    side is asked for by name and checked to have launched its kernel: a fallback to "auto" would pick the CUDA
    extension and compare it with itself (audit, session 31)."""
    from stop_kernels.ops import stop_embed as se
    launches = count_calls(se, "launch_project")
    E, sigma = 200, 1.0
    pos = torch.zeros(6, E, device=DEV, dtype=dtype)  # (ψ = 0 and W = I: the outputs are the noise itself)
    idx = torch.randint(0, 6, (4, 50), device=DEV)
    eye = torch.eye(E, device=DEV, dtype=dtype)
    out_c = cb.stop_embed_cuda(pos, idx, eye, noise_std=sigma, generator=torch.Generator().manual_seed(42))
    assert not launches
    out_t = se.stop_embed(pos, idx, eye, None, noise_std=sigma, generator=torch.Generator().manual_seed(42),
                          backend="triton")
    assert len(launches) == 1, "backend='triton' did not launch the Triton kernel"
    diff = (out_c.double() - out_t.double()).abs()
    if dtype == torch.bfloat16:
        # both round the same float32 noise to bf16: equal up to one bf16 step where the float32
        # values straddle a rounding boundary
        torch.testing.assert_close(out_c.double(), out_t.double(), rtol=1.01 * 2 ** -7, atol=1e-6)
    else:
        # fp32: same float32 u on both sides; they differ by the rounding of log / sqrt / trig (Triton
        # rounds θ = 2π·u to float32 and takes the SFU's cos/sin, CUDA uses sincospif(2u)): ≤ ~4e-6·σ.
        # A Triton tl.dot in tf32 would add a rounding of n to ~2⁻¹¹ relative, hence the looser bound
        # on the maximum.
        frac = (diff > 1e-5 * sigma).double().mean().item()
        print(f"cuda vs triton fp32: max |diff| {diff.max().item():.3e}, fraction > 1e-5·σ: {frac:.2e}")
        assert diff.max().item() <= 3e-3 * sigma, f"max |cuda - triton| = {diff.max().item():.3e}"


@needs_cuda
@pytest.mark.parametrize("rows,E,row_start", [(512, 1280, 0), (77, 201, 12345)])
def test_cuda_noise_equals_triton_noise(rows, E, row_start):
    """The two device implementations of the stream, element for element (both float32)."""
    fn = getattr(philox, "philox_normal_triton", None)
    if fn is None:
        pytest.skip("stop_kernels.ops.philox has no philox_normal_triton")
    seed, sigma = 0x0ABC_DEF0_1234_5678, 0.25
    got = cb.stop_noise_cuda(seed, rows, E, sigma, row_start)
    want = fn(seed, rows, E, sigma, row_start, device=DEV)
    # same float32 u, precise log / sqrt on both sides; Triton rounds θ = 2π·u to float32 and takes the SFU's
    # cos/sin (≤ 2^-20.5), CUDA uses sincospif(2u): ≤ ~4e-6·σ apart
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * sigma)


# ================================================================================================
# CPU-runnable: the host side of the wrapper, with csrc's ops stood in by a Python twin
# ================================================================================================
class _TwinOps:
    """csrc's op contract (bindings.cpp, stop_embed.cu, stop_embed_bwd.cu) in Python on CPU tensors: one
    floating dtype for pos_embed, weight and bias (the C++ ops TORCH_CHECK it), idx flattened, the noise of
    ``seed`` from philox_normal, (dweight, dbias, dpos) with None for what is not asked. Records each call."""

    def __init__(self):
        self.calls = []

    def stop_embed_fwd(self, pos_embed, idx, weight, bias, seed, noise_std):
        assert idx.dim() == 1 and pos_embed.dtype == weight.dtype and (bias is None or bias.dtype == weight.dtype)
        self.calls.append(("fwd", weight.dtype, seed))
        n = philox_normal(seed, idx.numel(), weight.shape[1], noise_std).float()
        out = pos_embed.float()[idx] + n @ weight.float().T
        return (out if bias is None else out + bias.float()).to(weight.dtype)

    def stop_embed_bwd(self, grad_out, idx, P, E, seed, noise_std, need_dweight, need_dpos, need_dbias):
        assert grad_out.is_contiguous() and grad_out.shape[0] == idx.numel()
        self.calls.append(("bwd", need_dweight, need_dpos, need_dbias))
        g = grad_out.float()
        dw = g.T @ philox_normal(seed, idx.numel(), E, noise_std).float() if need_dweight else None
        db = g.sum(0) if need_dbias else None
        dp = torch.zeros(P, g.shape[1]).index_add_(0, idx, g) if need_dpos else None
        return tuple(t if t is None else t.to(grad_out.dtype) for t in (dw, db, dp))

    def stop_noise(self, seed, rows, E, noise_std, row_start, device_index):
        self.calls.append(("noise", seed, rows, E, noise_std, row_start, device_index))
        return philox_normal(seed, rows, E, noise_std, row_start).float()


@pytest.fixture
def twin(monkeypatch):
    """stop_embed_cuda on CPU tensors: the ops are the twin and the device check reports a CUDA device, so
    the checks after it and the wrapper's dtype, seed and gradient plumbing run for real."""
    ops = _TwinOps()
    monkeypatch.setattr(cb, "_ops", lambda: ops)
    monkeypatch.setattr(cb.chk, "same_device", lambda **kw: torch.device("cuda", 0))
    return ops


_TEST_OPS = "stop_kernels_cuda_test"


def _opaque_twin_ops():
    """The twin's forward as a real (opaque) custom op, as torch.compile sees the C++ one; defined once."""
    ns = getattr(torch.ops, _TEST_OPS)
    if not hasattr(ns, "stop_embed_fwd"):
        @torch.library.custom_op(f"{_TEST_OPS}::stop_embed_fwd", mutates_args=())
        def _fwd(pos_embed: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 seed: int, noise_std: float) -> torch.Tensor:
            return _TwinOps().stop_embed_fwd(pos_embed, idx, weight, bias, seed, noise_std)

        @_fwd.register_fake
        def _(pos_embed, idx, weight, bias, seed, noise_std):
            return weight.new_empty((idx.numel(), weight.shape[0]))
    return getattr(torch.ops, _TEST_OPS)


def test_wrapper_under_torch_compile_does_not_recompile_per_seed(monkeypatch):
    """Each call draws a new seed, an int argument of the op: traced, it was a constant of the graph, so every
    call recompiled (and after torch._dynamo's recompile limit, 8, the frame fell back to eager with a
    warning). Under torch.compile the wrapper runs eagerly: one graph, no recompile, the eager results."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    ops = _opaque_twin_ops()
    monkeypatch.setattr(cb, "_ops", lambda: ops)
    monkeypatch.setattr(cb.chk, "same_device", lambda **kw: torch.device("cuda", 0))
    g = torch.Generator().manual_seed(9)
    pos, w, b = torch.randn(8, 4, generator=g), torch.randn(4, 6, generator=g), torch.randn(4, generator=g)
    idx = torch.randint(0, 8, (2, 3), generator=g)
    torch._dynamo.reset()
    counters.clear()
    f = torch.compile(lambda p, i, w_, b_: cb.stop_embed_cuda(p, i, w_, b_) * 2, backend="eager")
    torch.manual_seed(0)
    got = [f(pos, idx, w, b) for _ in range(10)]
    torch.manual_seed(0)
    want = [cb.stop_embed_cuda(pos, idx, w, b) * 2 for _ in range(10)]
    assert all(torch.equal(x, y) for x, y in zip(got, want))
    assert sum(counters["recompiles"].values()) == 0 and counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_wrapper_output_and_gradients_with_twin_ops(twin):
    """The seed is drawn from ``generator``, idx is flattened and the result reshaped to [..., M, D], and the
    backward's (dweight, dbias, dpos) reach weight, bias and pos_embed: equal to autograd of the reference
    given the same Philox noise."""
    g = torch.Generator().manual_seed(31)
    P, D, E, sigma = 9, 6, 5, 0.3
    pos, w, b = torch.randn(P, D, generator=g), torch.randn(D, E, generator=g), torch.randn(D, generator=g)
    idx = torch.randint(0, P, (2, 7), generator=g)
    leaves = [t.clone().requires_grad_() for t in (pos, w, b)]
    out = cb.stop_embed_cuda(*leaves[:1], idx, *leaves[1:], noise_std=sigma,
                             generator=torch.Generator().manual_seed(5))
    seed = draw_seed(torch.Generator().manual_seed(5))
    assert twin.calls == [("fwd", torch.float32, seed)] and out.shape == (2, 7, D)
    noise = philox_normal(seed, idx.numel(), E, sigma).float().view(2, 7, E)
    ref_leaves = [t.clone().requires_grad_() for t in (pos, w, b)]
    want = ref.stop_embed(ref_leaves[0], idx, ref_leaves[1], ref_leaves[2], noise)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)
    want.backward(grad)
    for name, got, exp in zip(("pos_embed", "weight", "bias"), leaves, ref_leaves):
        torch.testing.assert_close(got.grad, exp.grad, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("needs", [("pos",), ("weight",), ("weight", "bias"), ("pos", "bias")])
def test_wrapper_asks_the_backward_op_for_the_needed_gradients_only(twin, needs):
    """need_dweight / need_dpos / need_dbias follow which inputs require grad (the op's argument order is
    weight, pos, bias; its outputs dweight, dbias, dpos), and each gradient lands on its own input."""
    g = torch.Generator().manual_seed(4)
    pos, w, b = torch.randn(8, 4, generator=g), torch.randn(4, 3, generator=g), torch.randn(4, generator=g)
    pos.requires_grad_("pos" in needs)
    w.requires_grad_("weight" in needs)
    b.requires_grad_("bias" in needs)
    idx = torch.randint(0, 8, (5,), generator=g)
    cb.stop_embed_cuda(pos, idx, w, b, noise_std=0.5, generator=torch.Generator().manual_seed(1)).sum().backward()
    assert twin.calls[-1] == ("bwd", "weight" in needs, "pos" in needs, "bias" in needs)
    for name, t, shape in (("pos", pos, (8, 4)), ("weight", w, (4, 3)), ("bias", b, (4,))):
        assert (t.grad is not None and t.grad.shape == shape) == (name in needs), name
    if "pos" in needs:  # d(sum)/dψ counts how often each row was gathered
        torch.testing.assert_close(pos.grad, torch.bincount(idx, minlength=8).float()[:, None].expand(8, 4))
    if "bias" in needs:
        torch.testing.assert_close(b.grad, torch.full((4,), 5.0))


@pytest.mark.parametrize("dt_pos, dt_w, dt_b, autocast, kernel, out", [
    (torch.float64, torch.float64, torch.float64, None, torch.float32, torch.float64),  # no fp64 kernel
    (torch.bfloat16, torch.float32, None, None, torch.float32, torch.float32),          # promoted: ψ cast up
    (torch.float32, torch.bfloat16, torch.float32, None, torch.float32, torch.float32),  # W and b cast up
    (torch.float32, torch.float32, torch.bfloat16, None, torch.float32, torch.float32),  # b cast up
    (torch.bfloat16, torch.float32, None, torch.bfloat16, torch.bfloat16, torch.bfloat16),  # W in the amp dtype
    (torch.float32, torch.float32, torch.float32, torch.float16, torch.float32, torch.float32),  # fp32 ψ: fp32 sum
])
def test_wrapper_kernel_and_output_dtypes(twin, dt_pos, dt_w, dt_b, autocast, kernel, out):
    """The kernel runs in one dtype, promote(weight's dtype — the autocast one under autocast —, ψ's, b's;
    fp64 → fp32), with every operand cast to it; the output is promote(weight's dtype, ψ's)."""
    g = torch.Generator().manual_seed(2)
    pos, w = torch.randn(6, 4, generator=g).to(dt_pos), torch.randn(4, 3, generator=g).to(dt_w)
    b = None if dt_b is None else torch.randn(4, generator=g).to(dt_b)
    idx = torch.randint(0, 6, (2, 3), generator=g)
    with cuda_autocast_flags(autocast) if autocast else contextlib.nullcontext():
        y = cb.stop_embed_cuda(pos, idx, w, b, generator=torch.Generator().manual_seed(0))
    assert twin.calls[0][1] == kernel and y.dtype == out and y.shape == (2, 3, 4)


def test_autocast_is_the_call_with_weight_and_bias_in_the_autocast_dtype(twin):
    """Under CUDA autocast W and b are taken in the autocast dtype and nothing else changes (the contract of
    stop_embed, whose "auto" picks this backend on a GPU): an fp32 ψ is added in fp32, not rounded to bf16
    with the sum (which put the fp32 output 2e-2 away from the same call made with bf16 W and b)."""
    g = torch.Generator().manual_seed(6)
    pos, w, b = torch.randn(16, 32, generator=g), torch.randn(32, 64, generator=g) / 8, torch.randn(32, generator=g)
    idx = torch.randint(0, 16, (3, 7), generator=g)
    with cuda_autocast_flags(torch.bfloat16):
        out = cb.stop_embed_cuda(pos, idx, w, b, noise_std=0.3, generator=torch.Generator().manual_seed(2))
    want = cb.stop_embed_cuda(pos, idx, w.bfloat16(), b.bfloat16(), noise_std=0.3,
                              generator=torch.Generator().manual_seed(2))
    assert out.dtype == torch.float32 and torch.equal(out, want)
    assert twin.calls[0][1] == twin.calls[1][1] == torch.float32


F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64


@pytest.mark.parametrize("pos, w, b, amp, one", [
    (BF16, BF16, BF16, None, True), (F32, F32, None, None, True), (BF16, BF16, None, BF16, True),
    (BF16, F32, F32, BF16, True),  # W and b taken in the autocast dtype: one bf16 kernel
    (F32, F32, F32, BF16, False),  # the predictor's fp32 table under bf16 autocast: Triton, not the fp32 kernel
    (F32, BF16, None, None, False), (BF16, BF16, F32, None, False), (F16, F16, F16, BF16, False),
    (F64, F64, F64, None, False),
])
def test_auto_takes_the_cuda_kernels_only_for_one_kernel_dtype(pos, w, b, amp, one):
    """stop_embed's "auto" prefers the CUDA C++ kernels only where ψ, W and b share one dtype (W and b in the
    autocast dtype): they run in one dtype, so a mixed call would run them in fp32, where Triton mixes."""
    from stop_kernels.ops.stop_embed import _one_kernel_dtype
    assert _one_kernel_dtype(pos, w, b, amp) is one


def test_auto_asks_one_kernel_dtype_of_the_calls_own_tensors(monkeypatch):
    """_cuda_extension_preferred passes ψ's, W's and b's own dtypes to _one_kernel_dtype: a bf16 call with an
    fp32 bias goes to Triton, not to the fp32 CUDA kernel (a CUDA device faked by a tensor subclass whose
    ``device`` says cuda, the extension marked built)."""
    from stop_kernels.ops import stop_embed as se

    class OnCuda(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda", 0)
    monkeypatch.setattr(se, "_CUDA_EXT_OK", True)
    pos, w = torch.empty(8, 4, dtype=BF16), torch.empty(4, 6, dtype=BF16).as_subclass(OnCuda)
    assert se._cuda_extension_preferred(pos, w, None)
    assert se._cuda_extension_preferred(pos, w, torch.empty(4, dtype=BF16))
    assert not se._cuda_extension_preferred(pos, w, torch.empty(4, dtype=F32))
    assert not se._cuda_extension_preferred(pos.float(), w, None)
    assert not se._cuda_extension_preferred(pos, torch.empty(4, 6, dtype=BF16), None)  # a CPU weight
    # deterministic algorithms: the CUDA dW's fp32 atomics would be refused, Triton's fixed-order sums are not
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert not se._cuda_extension_preferred(pos, w, None)


@pytest.mark.parametrize("mode", ["learned", "isotropic"])
def test_predictor_cuda_input_backend_with_twin_ops(twin, monkeypatch, mode):
    """The predictor's input_backend "cuda" (the CUDA C++ kernels implement stop_embed only): learned masked
    rows from stop_embed_cuda, joined to the context rows as the reference joins them, equal in value and
    gradient to the "reference" backend under the same seed (same Philox stream); the other noise modes
    run as "auto". Failed with a RuntimeError / ValueError before (assemble_predictor_input has no CUDA kernel)."""
    from stop_kernels.models.predictor import vit_predictor
    monkeypatch.setattr(cb, "available", lambda: True)
    g = torch.Generator().manual_seed(8)
    B, Nc, Nt, npred = 3, 5, 4, 2
    order = torch.stack([torch.randperm(16, generator=g) for _ in range(B)])
    ctx, tgt = order[:, :Nc], [order[:, Nc:Nc + Nt], order[:, Nc + 1:Nc + 1 + Nt]]
    x = torch.randn(B, Nc, 24, generator=g)
    preds = {}
    for backend in ("cuda", "reference"):
        torch.manual_seed(0)  # the same initial weights
        preds[backend] = vit_predictor(num_patches=16, embed_dim=24, num_heads=4, predictor_embed_dim=8, depth=1,
                                       noise_mode=mode, noise_std=0.3, input_backend=backend)
    got, want = (preds[k].assemble(x, [ctx], tgt, generator=torch.Generator().manual_seed(4))
                 for k in ("cuda", "reference"))
    assert got.shape == (npred * B, Nc + Nt, 8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert [c[0] for c in twin.calls] == (["fwd"] if mode == "learned" else [])
    grad = torch.randn(got.shape, generator=g)
    got.backward(grad)
    want.backward(grad)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(preds["cuda"].predictor_embed, name).grad,
                                   getattr(preds["reference"].predictor_embed, name).grad, rtol=1e-5, atol=1e-5)
    if mode == "learned":  # under autocast ψ is taken in the autocast dtype: the bf16 kernel, not the fp32 one
        with cuda_autocast_flags(torch.bfloat16):
            preds["cuda"].assemble(x, [ctx], tgt, generator=torch.Generator().manual_seed(4))
            assert twin.calls[-1][:2] == ("fwd", torch.bfloat16)
            preds["cuda"].stop_rows(ctx, generator=torch.Generator().manual_seed(4))  # the packed path's call
            assert twin.calls[-1][:2] == ("fwd", torch.bfloat16)


def test_host_checks_after_the_device_check(twin, monkeypatch):
    """The shape and range checks that follow the device check (on a GPU they run before any launch)."""
    pos, w, b = torch.randn(8, 4), torch.randn(4, 6), torch.randn(4)
    idx = torch.randint(0, 8, (2, 3))
    with pytest.raises(ValueError, match=r"^pos_embed: expected size 4 at dim 1"):
        cb.stop_embed_cuda(torch.randn(8, 5), idx, w, b)
    with pytest.raises(ValueError, match=r"^bias: expected size 4 at dim 0"):
        cb.stop_embed_cuda(pos, idx, w, torch.randn(5))
    with pytest.raises(ValueError, match=r"^weight: expected shape \[D, E\] = \[4, E\].*transposed"):
        cb.stop_embed_cuda(pos, idx, w.t(), b)                       # proj.weight.t(): it blamed pos_embed
    with pytest.raises(ValueError, match=r"^idx: values must lie in \[0, 8\)"):
        cb.stop_embed_cuda(pos, torch.tensor([[0, 8]]), w, b)
    cb.stop_embed_cuda(pos, torch.tensor([[0, 7]]), w, b)  # the last row is valid
    # 2**32 tokens overflow the 32-bit Philox row counter: refused without touching the (meta) data
    monkeypatch.setattr(cb, "_ops", lambda: pytest.fail("the ops were reached"))
    meta = dict(device="meta")
    with pytest.raises(ValueError, match=r"^idx: at most 2\*\*32 tokens"):
        cb.stop_embed_cuda(torch.empty(8, 4, **meta), torch.empty(2 ** 32, dtype=torch.int32, **meta),
                           torch.empty(4, 6, **meta))


def test_validation_names_the_argument_before_the_device_check():
    """Type and rank checks of every argument, and device agreement, come before the CUDA requirement."""
    pos, w, idx = torch.randn(8, 4), torch.randn(4, 6), torch.randint(0, 8, (2, 3))
    with pytest.raises(TypeError, match="^bias:"):
        cb.stop_embed_cuda(pos, idx, w, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="^bias: expected 1 dimensions"):
        cb.stop_embed_cuda(pos, idx, w, torch.zeros(4, 1))
    with pytest.raises(ValueError, match="^idx: expected at least 1 dimensions"):
        cb.stop_embed_cuda(pos, torch.tensor(3), w)
    with pytest.raises(ValueError, match="^idx: expected device cpu"):
        cb.stop_embed_cuda(pos, idx.to("meta"), w)
    with pytest.raises(ValueError, match="^pos_embed: the CUDA backend needs CUDA tensors"):  # meta is not CUDA
        cb.stop_embed_cuda(pos.to("meta"), idx.to("meta"), w.to("meta"))


def test_noise_op_arguments(twin):
    """stop_noise_cuda passes seed, rows, E, σ, the first row and the device index through to the op."""
    got = cb.stop_noise_cuda(12345, 3, 7, 0.5, row_start=11, device="cuda:1")
    assert twin.calls == [("noise", 12345, 3, 7, 0.5, 11, 1)]
    torch.testing.assert_close(got, philox_normal(12345, 3, 7, 0.5, 11).float())


def test_noise_op_argument_checks(twin, monkeypatch):
    """stop_noise_cuda names a bad argument (it used to run a "cpu" request on the current GPU, truncate rows=2.5,
    leave negative sizes to a C++ RuntimeError), and takes any 64-bit seed as philox_normal does (the op's
    argument is int64: a seed >= 2**63 is passed as its bit pattern)."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises(ValueError, match="^device: expected a CUDA device, got cpu"):
        cb.stop_noise_cuda(1, 2, 3, device="cpu")
    with pytest.raises(ValueError, match="^rows:"):
        cb.stop_noise_cuda(1, -2, 3)
    with pytest.raises(TypeError, match="^rows:"):
        cb.stop_noise_cuda(1, 2.5, 3)
    with pytest.raises(ValueError, match="^E:"):
        cb.stop_noise_cuda(1, 2, -3)
    with pytest.raises(ValueError, match="^rows: row_start"):
        cb.stop_noise_cuda(1, 2, 3, row_start=2 ** 32 - 1)
    with pytest.raises(ValueError, match="^noise_std:"):
        cb.stop_noise_cuda(1, 2, 3, -1.0)
    assert twin.calls == []
    got = cb.stop_noise_cuda(2 ** 64 - 5, 2, 9, device="cuda")
    assert twin.calls == [("noise", -5, 2, 9, 1.0, 0, 0)]
    torch.testing.assert_close(got, philox_normal(2 ** 64 - 5, 2, 9).float())


# ------------------------------------------------------------------------------------------------
# backends(): the reasons it gives
# ------------------------------------------------------------------------------------------------
def test_cuda_backend_reasons(monkeypatch):
    """A missing extension is 'not built' with setup.py's missing conditions; one that fails to import is
    'built but fails to load' with the error; a built one without a visible device is not usable."""
    import importlib
    bk = importlib.import_module("stop_kernels.backends")
    monkeypatch.setattr(cb, "available", lambda: False)
    monkeypatch.setattr(cb, "load_error", lambda: "ModuleNotFoundError: No module named 'stop_kernels._C'")
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(bk.shutil, "which", lambda name: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for var in ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(var, raising=False)
    assert bk._cuda() == (False, "not built: torch has no CUDA / nvcc missing / no GPU at build time and "
                                 "TORCH_CUDA_ARCH_LIST unset")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setenv("CUDA_HOME", "/usr/local/cuda")  # nvcc not on PATH, but CUDA_HOME names it
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    ok, why = bk._cuda()
    assert not ok and why.startswith("not built: the package was installed without building it"), why
    monkeypatch.setattr(cb, "load_error", lambda: "ImportError: undefined symbol: _ZN3c10")
    assert bk._cuda() == (False, "built but fails to load: ImportError: undefined symbol: _ZN3c10")
    monkeypatch.setattr(cb, "available", lambda: True)
    assert bk._cuda() == (False, "built, but no CUDA device is visible")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert bk._cuda() == (True, "")


def test_backends_keeps_caveats_and_survives_a_failing_probe(monkeypatch):
    """Outside the interpreter Triton needs a visible device; a usable backend's caveat is kept as its reason;
    a probe that raises anything turns its backend off with the error instead of breaking the call."""
    import importlib
    bk = importlib.import_module("stop_kernels.backends")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ok, why = bk._triton()
    assert not ok and "no CUDA device is visible" in why

    def boom():
        raise RuntimeError("boom")
    monkeypatch.setattr(bk, "_triton", lambda: (True, "TRITON_INTERPRET=1: kernels run in the CPU interpreter"))
    monkeypatch.setattr(bk, "_xformers", boom)
    info = bk.backends()
    assert info["triton"] is True and info["reasons"]["triton"].startswith("TRITON_INTERPRET=1")
    assert info["xformers"] is False and info["reasons"]["xformers"] == "probe failed: RuntimeError: boom"


def test_sm_count_is_read_once_per_device(monkeypatch):
    """The SM count of each CUDA device (the current one for a bare 'cuda') is read once, then cached."""
    import importlib
    import types
    bk = importlib.import_module("stop_kernels.backends")
    reads = []

    def props(i):
        reads.append(i)
        return types.SimpleNamespace(multi_processor_count=100 + i)
    monkeypatch.setattr(bk, "_SM_COUNTS", {})
    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert bk.sm_count(torch.device("cuda", 1), 4) == 101
    assert bk.sm_count(torch.device("cuda"), 4) == 100
    assert bk.sm_count(torch.device("cuda", 1), 4) == 101 and bk.sm_count(torch.device("cuda", 0), 4) == 100
    assert reads == [1, 0]


# ------------------------------------------------------------------------------------------------
# setup.py: the extension's build targets
# ------------------------------------------------------------------------------------------------
def _run_setup_py(monkeypatch):
    """setup.py's globals after running it with setuptools.setup stubbed out (nothing is built)."""
    import runpy

    import setuptools
    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    monkeypatch.setenv("CUDA_HOME", os.environ.get("CUDA_HOME", "/usr/local/cuda"))  # setup.py may set it
    monkeypatch.chdir(ROOT)  # as pip runs it: setup.py finds csrc/ relative to its folder
    return runpy.run_path(str(ROOT / "setup.py"), run_name="setup_under_test")


def test_setup_sm80_arch_list(monkeypatch):
    """Only targets of compute capability >= 8.0 are kept: csrc/ does not compile for older ones (nvcc stops at
    wmma::precision::tf32), so one old entry used to fail the whole install."""
    monkeypatch.setenv("STOP_KERNELS_NO_CUDA", "1")
    split = _run_setup_py(monkeypatch)["sm80_arch_list"]
    assert split("5.2 6.0 6.1 7.0 7.5 8.0 8.6 9.0+PTX", []) == (["8.0", "8.6", "9.0+PTX"],
                                                                 ["5.2", "6.0", "6.1", "7.0", "7.5"])
    assert split("7.5;9.0a;10.0;12.0", []) == (["9.0a", "10.0", "12.0"], ["7.5"])
    assert split("Turing", []) == ([], ["Turing"])
    assert split("Volta+Tegra;Ampere;Hopper", []) == (["Ampere", "Hopper"], ["Volta+Tegra"])
    assert split(None, [(7, 5)]) == ([], ["7.5"])           # a T4: no target
    assert split("native", [(9, 0), (7, 0)]) == (["9.0"], ["7.0"])
    assert split("", [(8, 0)]) == (["8.0"], [])


@pytest.mark.skipif(torch.version.cuda is None or shutil.which("nvcc") is None,
                    reason="setup.py considers building the extension only with a CUDA torch and nvcc")
def test_setup_builds_sm80_targets_only(monkeypatch):
    """TORCH_CUDA_ARCH_LIST with a pre-sm_80 entry: the extension is built for the others (the list is
    rewritten for torch's build), and not at all when none is left, with the reason (install goes on)."""
    monkeypatch.delenv("STOP_KERNELS_NO_CUDA", raising=False)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5;9.0+PTX")
    g = _run_setup_py(monkeypatch)
    assert len(g["ext_modules"]) == 1 and g["why_not"] is None
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0+PTX"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.0 7.5")
    g = _run_setup_py(monkeypatch)
    assert g["ext_modules"] == [] and "compute capability 8.0" in g["why_not"] and "7.0;7.5" in g["why_not"]


def test_setup_skips_the_extension_when_nvcc_is_another_major_cuda(monkeypatch, tmp_path):
    """A system nvcc 12.x beside a cu13x torch: torch's BuildExtension raises on the mismatch, which failed the whole
    install (audit, session 31); setup.py now skips the extension and says why. A matching major passes."""
    check = _run_setup_py(monkeypatch)["nvcc_major_mismatch"]
    (tmp_path / "bin").mkdir()
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    nvcc.chmod(0o755)
    why = check(str(tmp_path), "13.0")
    assert why is not None and "CUDA 12.4" in why and "CUDA 13.0" in why and "CUDA_HOME" in why
    assert check(str(tmp_path), "12.8") is None
    assert check(str(tmp_path / "none"), "13.0") is None  # no nvcc there: torch's own checks decide


def test_cuda_not_built_reason_names_an_old_gpu(monkeypatch):
    """On a machine whose GPUs are all older than sm_80 setup.py skips the extension: backends() says so
    instead of telling to rerun the install."""
    import importlib
    bk = importlib.import_module("stop_kernels.backends")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setenv("CUDA_HOME", "/usr/local/cuda")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (7, 5))
    assert bk._cuda_not_built_reason() == ("not built: no GPU of compute capability 8.0 or newer (setup.py builds "
                                           "for sm_80+ only)")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))
    assert bk._cuda_not_built_reason().startswith("not built: the package was installed without building it")


@pytest.mark.parametrize("bad", ["pos_embed", "bias"])
def test_auto_names_a_non_tensor_argument_with_a_cuda_weight(monkeypatch, bad):
    """stop_embed's "auto" looks at ψ's and b's dtypes to choose the CUDA C++ kernels before the arguments are
    checked: with a CUDA weight a list for ψ or b was an AttributeError (``'list' object has no attribute
    'dtype'``), not the TypeError naming it that the same call with a CPU weight raises (a CUDA device faked by
    a tensor subclass whose ``device`` says cuda)."""
    from stop_kernels.ops import stop_embed as se

    class OnCuda(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda", 0)
    monkeypatch.setattr(se, "_CUDA_EXT_OK", True)
    pos, idx, w = torch.zeros(8, 4), torch.zeros(3, dtype=torch.int64), torch.zeros(4, 6)
    args = dict(pos_embed=pos, idx=idx, weight=w, bias=None)
    args[bad] = [0.0] * 4
    for weight in (w, w.as_subclass(OnCuda)):  # the CPU call's error, then the same with a CUDA weight
        with pytest.raises(TypeError, match=rf"^{bad}: expected a torch.Tensor"):
            se.stop_embed(**dict(args, weight=weight), noise_std=0.2)


@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_the_cuda_backend_under_a_func_transform_is_refused_by_name(twin, monkeypatch, transform):
    """The extension's ops have no functorch rules: under torch.func.grad or vmap, backend="cuda" failed with
    torch's "must override the setup_context staticmethod", which names nothing (audit, session 31). It is refused
    by name, saying that "auto" runs there (the reference op, same noise), which this checks too."""
    from stop_kernels.ops import stop_embed as se
    monkeypatch.setattr(se, "load_cuda_backend", lambda: cb)
    g = torch.Generator().manual_seed(4)
    pos, w, idx = torch.randn(8, 4, generator=g), torch.randn(4, 6, generator=g), torch.randint(0, 8, (5,), generator=g)

    def run(fn):
        if transform == "grad":
            return torch.func.grad(lambda w_: fn(w_).sum())(w)
        return torch.func.vmap(fn, randomness="same")(torch.stack([w, 2 * w]))
    for call in (lambda w_: se.stop_embed(pos, idx, w_, None, backend="cuda"),
                 lambda w_: cb.stop_embed_cuda(pos, idx, w_, None)):
        with pytest.raises(NotImplementedError, match=r"backend: torch.func transforms .* cuda backend.*'auto'"):
            run(call)
    assert twin.calls == []
    torch.manual_seed(2)
    got = run(lambda w_: se.stop_embed(pos, idx, w_, None, backend="auto"))
    torch.manual_seed(2)
    want = run(lambda w_: se.stop_embed(pos, idx, w_, None, backend="reference"))
    torch.testing.assert_close(got, want)
