"""The StoP noise stream: the Triton generator equals the float64 NumPy twin, seeds follow torch's RNG.

Tolerance of Triton vs twin: both start from the same float32-exact uniform u = (2·(x>>9)+1)·2⁻²⁴;
the twin evaluates Box–Muller in float64, the kernel in float32. The radius sqrt(-2 ln u0) for u0
near 1 (ln u0 ≈ -(1-u0) ≥ -2⁻²⁴·…) is computed from a log with ~1 ulp relative error, and the angle
2πu ≤ 2π carries ≤ 2⁻²¹ absolute error into cos/sin, so |Δn| ≤ 2e-6·σ + 2e-6·|n| per element with
margin; we allow 1e-5·σ + 1e-5·|n|.
"""
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from stop_kernels.backends import triton_interpreting  # noqa: E402

from stop_kernels.ops.philox import (SEED_BITS, draw_seed, philox4x32, philox_normal,  # noqa: E402
                                     philox_normal_triton, quarter_width, seed_key_args)

DEVICES = (["cpu"] if triton_interpreting() else []) + \
          (["cuda"] if torch.cuda.is_available() else [])


def assert_stream_close(got: torch.Tensor, want: torch.Tensor, sigma: float):
    want = want.to(torch.float64)
    err = (got.double().cpu() - want).abs()
    bound = 1e-5 * sigma + 1e-5 * want.abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


def test_philox_known_answer():
    # Random123's published known-answer vectors for Philox4x32-10 (kat_vectors: counter, key → output)
    x = philox4x32(0, 0, 0, 0, 0, 0)
    assert [int(v) for v in x] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    x = philox4x32(0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
    assert [int(v) for v in x] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    x = philox4x32(0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0)
    assert [int(v) for v in x] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed,rows,E,row_start", [(0, 5, 4, 0), (1, 70, 201, 3), (2 ** 62 - 1, 33, 17, 1000),
                                                   (0xDEADBEEFCAFE, 1, 1, 7), (12345, 40, 64, 0)])
def test_triton_noise_equals_twin(device, seed, rows, E, row_start):
    sigma = 0.37
    got = philox_normal_triton(seed, rows, E, sigma, row_start, device=device)
    assert got.shape == (rows, E) and got.dtype == torch.float32
    assert_stream_close(got, philox_normal(seed, rows, E, sigma, row_start), sigma)


def test_twin_quarter_layout_and_row_offset():
    seed = 99
    full = philox_normal(seed, 12, 10)
    assert torch.equal(philox_normal(seed, 5, 10, row_start=7), full[7:])
    # the first E columns of a wider call agree quarter by quarter: column j·E4+q depends only on (r, q, j)
    E4 = quarter_width(10)
    wide = philox_normal(seed, 12, 4 * E4)
    assert torch.equal(wide[:, :10], full)
    # σ only scales
    assert torch.allclose(philox_normal(seed, 12, 10, 0.25), 0.25 * full)


def test_twin_statistics():
    # 2·10⁵ × 8 samples of N(0, σ²): mean within 5 standard errors σ/√N, variance within 5·σ²·√(2/N),
    # excess kurtosis within 5·√(24/N); neighbouring columns uncorrelated within 5/√N.
    sigma, rows, E = 0.5, 200_000, 8
    n = philox_normal(7, rows, E, sigma)
    N = n.numel()
    flat = n.reshape(-1)
    assert abs(flat.mean().item()) <= 5 * sigma / math.sqrt(N)
    assert abs(flat.var().item() - sigma ** 2) <= 5 * sigma ** 2 * math.sqrt(2 / N)
    kurt = ((flat / sigma) ** 4).mean().item() - 3
    assert abs(kurt) <= 5 * math.sqrt(24 / N)
    corr = torch.corrcoef(n.T)
    off = corr - torch.eye(E, dtype=corr.dtype)
    assert off.abs().max().item() <= 5 / math.sqrt(rows)


def test_draw_seed_follows_torch_rng():
    torch.manual_seed(1234)
    a, b = draw_seed(), draw_seed()
    torch.manual_seed(1234)
    assert (draw_seed(), draw_seed()) == (a, b)
    assert a != b and 0 <= a < 2 ** SEED_BITS
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert draw_seed(g1) == draw_seed(g2)
    # both key words are drawn: with only 2^31 streams, two calls would share their noise after ~5·10^4
    # draws (birthday bound); with 2^62, never in practice
    assert max(draw_seed(torch.Generator().manual_seed(s)) for s in range(64)) >= 2 ** 32


def test_draw_seed_draws_on_the_host_whatever_the_default_device():
    """A CUDA default device (torch.set_default_device) must not move the draw to the CUDA generator, which
    would also synchronise every call; "meta" stands in for it on the CPU (.item() fails there)."""
    torch.manual_seed(77)
    want = (draw_seed(), draw_seed(torch.Generator().manual_seed(3)))
    torch.manual_seed(77)
    with torch.device("meta"):
        assert (draw_seed(), draw_seed(torch.Generator().manual_seed(3))) == want


def test_draw_seed_rejects_bad_generators():
    with pytest.raises(TypeError, match="generator"):
        draw_seed(123)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="generator"):
            draw_seed(torch.Generator(device="cuda"))


@pytest.mark.parametrize("seed", [0, 1, 2 ** 31, 2 ** 32 - 1, 2 ** 62 - 1, 0x1234_5678_9ABC])
def test_seed_key_args_are_int32_bit_patterns(seed):
    k0, k1 = seed_key_args(seed)
    assert -2 ** 31 <= k0 < 2 ** 31 and -2 ** 31 <= k1 < 2 ** 31
    assert k0 & 0xFFFFFFFF == seed & 0xFFFFFFFF and k1 & 0xFFFFFFFF == (seed >> 32) & 0xFFFFFFFF


def test_row_counter_limits_are_kept_by_every_path():
    """The row counter is 32-bit: the Triton test helper failed to compile a start past 2**31 (audit, session 30),
    and the Triton / reference StoP ops accepted 2**32 rows, past which the noise repeats from row 0, and 2**31,
    where the Triton kernels' int32 row index wraps. Every backend refuses more than chk.MAX_NOISE_ROWS, and a W
    the kernels cannot address."""
    import stop_kernels as sk
    from stop_kernels.ops.philox import philox_normal, philox_normal_triton
    for device in DEVICES:  # (the Triton kernel: the interpreter's CPU tensors, or CUDA ones)
        for start in (2 ** 31 - 1, 2 ** 31 + 5, 2 ** 32 - 2):
            torch.testing.assert_close(philox_normal_triton(77, 3, 5, row_start=start, device=device).double().cpu(),
                                       philox_normal(77, 3, 5, row_start=start), atol=1e-6, rtol=0)
    huge = torch.zeros(1, dtype=torch.int64).expand(2 ** 31)  # (no memory: one element, stride 0)
    with pytest.raises(ValueError, match=r"idx: at most 2147418112 positions"):
        sk.stop_embed(torch.randn(4, 8), huge, torch.randn(8, 6), backend="reference")
    tgt = torch.zeros(1, dtype=torch.int64).expand(1, 1, 2 ** 31)
    with pytest.raises(ValueError, match=r"tgt_idx: at most 2147418112 masked tokens"):
        sk.assemble_predictor_input(torch.randn(1, 2, 6), torch.tensor([[0, 1]]), tgt, torch.randn(8, 6), None,
                                    torch.randn(4, 8), backend="reference")
    wide = torch.zeros(1).expand(2, 2 ** 30)  # (2**31 elements, stride 0)
    with pytest.raises(ValueError, match=r"weight: at most 2\*\*31 - 1 elements"):
        sk.stop_embed(torch.randn(4, 2), torch.tensor([0]), wide, backend="reference")
