"""stop_embed: ψ[idx] + n·Wᵀ + b with Philox noise generated in the kernel (Triton; CPU via the interpreter).

On CPU the sizes are small (the interpreter runs every program in NumPy); on CUDA they are ViT-like.
"""
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from stop_kernels.backends import triton_interpreting  # noqa: E402

from stop_kernels import reference  # noqa: E402
from stop_kernels.ops import stop_embed as se  # noqa: E402
from stop_kernels.ops.philox import draw_seed, philox_normal  # noqa: E402
from stop_kernels.ops.stop_embed import stop_embed  # noqa: E402
from stop_kernels.devtools import rel_error as rel  # noqa: E402

INTERP = triton_interpreting()  # read as Triton reads it (1/true/on/yes/y)
DEVICES = (["cpu"] if INTERP else []) + (["cuda"] if torch.cuda.is_available() else [])
pytestmark = pytest.mark.skipif(not DEVICES, reason="needs a CUDA GPU or TRITON_INTERPRET=1")


def sizes(device):
    """(P, D, E, idx shape): small for the interpreter, ViT-H-like on the GPU."""
    return (30, 24, 40, (3, 7)) if device == "cpu" else (256, 384, 1280, (8, 4, 42))


def gen(s):
    return torch.Generator().manual_seed(s)


def seed_of(s):
    """The Philox seed a call with generator ``gen(s)`` uses."""
    return draw_seed(gen(s))


def inputs(device, P, D, E, idx_shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(P, D, generator=g).to(device, dtype)
    w = (torch.randn(D, E, generator=g) / math.sqrt(E)).to(device, dtype)
    b = torch.randn(D, generator=g).to(device, dtype)
    idx = torch.randint(0, P, idx_shape, generator=g).to(device)
    return pos, idx, w, b


# ----------------------------------------------------------------------------------------------
# exactness against the reference
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
# (the output's rounding: ≤ 2**-9 relative in bf16, 2**-12 in fp16, in norm at most that; the bounds are 5x and 8x it)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_zero_noise_equals_reference(device, dtype, tol):
    P, D, E, shape = sizes(device)
    pos, idx, w, b = inputs(device, P, D, E, shape, dtype)
    out = stop_embed(pos, idx, w, b, noise_std=0.0, backend="triton")
    assert out.shape == shape + (D,) and out.dtype == dtype
    # reference in float64 on the same (rounded) inputs
    zeros = torch.zeros(shape + (E,), dtype=torch.float64, device=device)
    ref = reference.stop_embed(pos.double(), idx, w.double(), b.double(), zeros)
    assert rel(out, ref) <= tol


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_promote_like_reference(device):
    P, D, E, shape = sizes(device)
    pos, idx, w, b = inputs(device, P, D, E, shape)
    out = stop_embed(pos, idx, w.bfloat16(), b.bfloat16(), noise_std=0.0, backend="triton")
    assert out.dtype == torch.float32  # bf16 projection + fp32 ψ, as in the official code
    ref = reference.stop_embed(pos, idx, w.bfloat16().float(), b.bfloat16().float(),
                               torch.zeros(shape + (E,), device=device))
    # ψ[idx] + b in float32 on both sides (b exact in bf16): measured 2.6e-8. A bf16 rounding of the sum (of the
    # projection before ψ is added) would be ≈ 2e-3 (audit, session 31: 1e-2 let it through)
    assert rel(out, ref) <= 1e-5


def recover_noise(device, P, E, shape, s, dtype=torch.float32):
    """n from a run with E = D, W = I, b = 0 under generator seed s: n = out − ψ[idx]."""
    g = torch.Generator().manual_seed(100 + s)
    pos = torch.randn(P, E, generator=g).to(device, dtype)
    idx = torch.randint(0, P, shape, generator=g).to(device)
    eye = torch.eye(E, device=device, dtype=dtype)
    out = stop_embed(pos, idx, eye, None, noise_std=0.3, generator=gen(s), backend="triton")
    return (out.double() - pos[idx].double()).reshape(-1, E)


@pytest.mark.parametrize("device", DEVICES)
def test_noise_recovery_then_formula_for_random_weight(device):
    P, D, E, shape = sizes(device)
    n = recover_noise(device, P, E, shape, s=11)
    twin = philox_normal(seed_of(11), n.shape[0], E, 0.3)
    assert (n.cpu() - twin).abs().max().item() <= 1e-5 * 0.3 + 1e-5 * 4  # float32 stream (see test_philox)
    # a random W of another width D under the same seed: out = ψ[idx] + n·Wᵀ + b (float64 check)
    pos, idx, w, b = inputs(device, P, D, E, shape, seed=3)
    out = stop_embed(pos, idx, w, b, noise_std=0.3, generator=gen(11), backend="triton")
    want = pos.double()[idx] + (n @ w.double().T).reshape(shape + (D,)) + b.double()
    assert rel(out, want) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_noise_independent_of_dtype(device):
    P, D, E, shape = sizes(device)
    n32 = recover_noise(device, P, E, shape, s=12)
    n16 = recover_noise(device, P, E, shape, s=12, dtype=torch.bfloat16)
    # bf16: noise and ψ are rounded to 8 bits of mantissa, ψ + n is rounded once more on store
    assert rel(n16, n32) <= 2e-2


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_match_reference_given_noise(device):
    P, D, E, shape = sizes(device)
    n = recover_noise(device, P, E, shape, s=21).reshape(shape + (E,))
    pos, idx, w, b = inputs(device, P, D, E, shape, seed=4)
    leaves = [t.clone().requires_grad_() for t in (pos, w, b)]
    out = stop_embed(leaves[0], idx, leaves[1], leaves[2], noise_std=0.3, generator=gen(21), backend="triton")
    go = torch.randn(out.shape, generator=gen(5)).to(device)
    grads = torch.autograd.grad(out, leaves, go)
    ref_leaves = [t.double().requires_grad_() for t in (pos, w, b)]
    ref = reference.stop_embed(ref_leaves[0], idx, ref_leaves[1], ref_leaves[2], n)
    ref_grads = torch.autograd.grad(ref, ref_leaves, go.double())
    for name, got, want in zip(("pos_embed", "weight", "bias"), grads, ref_grads):
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert rel(got, want) <= 1e-5, name


@pytest.mark.parametrize("device", DEVICES)
def test_pos_embed_gradient_only_when_required(device, count_calls):
    P, D, E, shape = sizes(device)
    pos, idx, w, b = inputs(device, P, D, E, shape)
    w.requires_grad_()
    scatters = count_calls(se, "scatter_rows")
    out = stop_embed(pos, idx, w, b, generator=gen(1), backend="triton")
    out.sum().backward()
    assert pos.grad is None and b.grad is None and w.grad is not None and torch.isfinite(w.grad).all()
    assert not scatters  # no dψ scatter computed and thrown away


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("leaf", ["pos_embed", "weight", "bias"])
def test_each_gradient_alone_matches_reference_backend(device, leaf):
    """Only one leaf requires grad: its gradient must not hang on another leaf's needs_input_grad flag."""
    P, D, E, shape = sizes(device)
    pos, idx, w, b = inputs(device, P, D, E, shape, seed=6)
    grads = {}
    for be in ("triton", "reference"):
        args = dict(pos_embed=pos.clone(), weight=w.clone(), bias=b.clone())
        args[leaf].requires_grad_()
        out = stop_embed(args["pos_embed"], idx, args["weight"], args["bias"], noise_std=0.3, generator=gen(6), backend=be)
        go = torch.randn(out.shape, generator=gen(7)).to(device)
        (grads[be],) = torch.autograd.grad(out, args[leaf], go)
    assert rel(grads["triton"], grads["reference"]) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["column-strided", "broadcast-over-D"])
def test_gradients_for_an_output_gradient_of_any_strides(device, layout):
    """The output gradient reaches backward as autograd made it: a view with a column stride of 2, or expanded
    over D (stride 0, as from a per-row broadcast). The dW kernel must read it with its D stride."""
    P, D, E, shape = sizes(device)
    pos, idx, w, b = inputs(device, P, D, E, shape, seed=8)
    g = gen(9)
    if layout == "column-strided":
        go = torch.randn(shape + (2 * D,), generator=g)[..., ::2].to(device)
    else:
        go = torch.randn(shape + (1,), generator=g).to(device).expand(shape + (D,))
    assert go.stride(-1) != 1
    grads = {}
    for be in ("triton", "reference"):
        leaves = [t.clone().requires_grad_() for t in (pos, w, b)]
        out = stop_embed(leaves[0], idx, leaves[1], leaves[2], noise_std=0.3, generator=gen(10), backend=be)
        grads[be] = torch.autograd.grad(out, leaves, go)
    for name, got, want in zip(("pos_embed", "weight", "bias"), grads["triton"], grads["reference"]):
        assert rel(got, want) <= 1e-5, name


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_gradients(device):
    P, D, E, shape = sizes(device)
    pos, idx, w, b = inputs(device, P, D, E, shape)
    n = recover_noise(device, P, E, shape, s=8)
    wb = w.bfloat16().requires_grad_()
    bb = b.bfloat16().requires_grad_()
    out = stop_embed(pos, idx, wb, bb, noise_std=0.3, generator=gen(8), backend="triton")
    go = torch.randn(out.shape, generator=gen(2)).to(device)
    gw, gb = torch.autograd.grad(out, (wb, bb), go)
    assert gw.dtype == torch.bfloat16 and gb.dtype == torch.bfloat16
    g2 = go.double().reshape(-1, D)
    assert rel(gw, g2.T @ n) <= 2e-2 and rel(gb, g2.sum(0)) <= 1e-2
    # the dW kernel reduces into fp32 (its fake kernel says so); the cast to W's dtype happens once, after
    assert se.noise_weight_grad(go.reshape(1, -1, D).bfloat16(), wb, seed_of(8), 0.3).dtype == torch.float32
    # all-bf16, ψ included: dψ is scattered in fp32 (index_add_ into the fp32 buffer), then cast
    pb = pos.bfloat16().requires_grad_()
    out = stop_embed(pb, idx, wb, bb, noise_std=0.3, generator=gen(8), backend="triton")
    (gp,) = torch.autograd.grad(out, (pb,), go)
    want = torch.zeros(P, D, dtype=torch.float64, device=device).index_add_(0, idx.reshape(-1), g2)
    assert gp.dtype == torch.bfloat16 and rel(gp, want) <= 2e-2


# ----------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_statistics_of_learned_noise(device):
    """Over N ≥ 10⁵ tokens, y = out − ψ[idx] − b = n·Wᵀ has mean 0 and covariance C = σ²·W·Wᵀ.

    For Gaussian samples the sample mean of y_i has standard error sqrt(C_ii/N) and the sample
    covariance Ĉ_ij has standard error sqrt((C_ii·C_jj + C_ij²)/N). Every entry must lie within
    5 standard errors (two-sided 5σ: ~6e-7 per entry, < 1e-4 for all entries together).
    """
    N, D, E, sigma = 100_000, 8, 16, 0.4
    g = torch.Generator().manual_seed(9)
    pos = torch.randn(4, D, generator=g).to(device)
    w = torch.randn(D, E, generator=g).to(device)
    b = torch.randn(D, generator=g).to(device)
    idx = torch.randint(0, 4, (N,), generator=g).to(device)
    out = stop_embed(pos, idx, w, b, noise_std=sigma, generator=gen(9), backend="triton")
    y = (out.double() - pos.double()[idx] - b.double()).cpu()
    C = sigma ** 2 * (w.double() @ w.double().T).cpu()
    mean = y.mean(0)
    assert (mean.abs() <= 5 * (C.diagonal() / N).sqrt()).all(), mean
    Chat = (y - mean).T @ (y - mean) / (N - 1)
    se_cov = ((C.diagonal()[:, None] * C.diagonal()[None, :] + C ** 2) / N).sqrt()
    assert ((Chat - C).abs() <= 5 * se_cov).all(), (Chat - C).abs().max()


# ----------------------------------------------------------------------------------------------
# shapes, layouts, block sizes
# ----------------------------------------------------------------------------------------------
def odd_case(device, case):
    g = torch.Generator().manual_seed(7)
    P, D, E = (17, 72, 200) if device == "cpu" else (256, 384, 1280)
    pos = torch.randn(P, D, generator=g).to(device)
    w = torch.randn(D, E, generator=g).to(device)
    b = torch.randn(D, generator=g).to(device)
    if case == "M=1":
        idx = torch.randint(0, P, (1,), generator=g)
    elif case == "rank1":
        idx = torch.randint(0, P, (13,), generator=g)
    elif case == "rank3":
        idx = torch.randint(0, P, (2, 3, 5), generator=g)
    elif case == "rank4-int32":
        idx = torch.randint(0, P, (2, 1, 3, 2), generator=g).int()
    elif case == "noncontig-idx":
        idx = torch.randint(0, P, (6, 9), generator=g).T[::2]
    elif case == "noncontig-weight-pos":
        w = torch.randn(E, 2 * D, generator=g).T[::2].to(device)  # [D, E], strides (2, 2D)
        pos = torch.randn(P, 2 * D, generator=g)[:, 1::2].to(device)
        idx = torch.randint(0, P, (4, 5), generator=g)
    elif case == "strided-idx":  # flattens to a stride-2 view
        idx = torch.randint(0, P, (4, 10), generator=g)[:, ::2]
    elif case == "no-bias":
        b = None
        idx = torch.randint(0, P, (3, 4), generator=g)
    elif case == "strided-bias":  # every other element of a buffer: the kernels read b[d] at unit stride
        b = torch.randn(2 * D, generator=g)[::2].to(device)
        idx = torch.randint(0, P, (3, 4), generator=g)
    return pos, idx.to(device), w, b


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["M=1", "rank1", "rank3", "rank4-int32", "noncontig-idx", "noncontig-weight-pos",
                                  "strided-idx", "no-bias", "strided-bias"])
def test_odd_shapes_match_reference_backend(device, case):
    pos, idx, w, b = odd_case(device, case)
    out = stop_embed(pos, idx, w, b, noise_std=0.5, generator=gen(3), backend="triton")
    ref = stop_embed(pos, idx, w, b, noise_std=0.5, generator=gen(3), backend="reference")
    assert out.shape == idx.shape + (w.shape[0],)
    assert rel(out, ref) <= 1e-5


def test_empty_idx():
    pos, idx, w, b = inputs("cpu" if INTERP else "cuda", 5, 16, 16, (0,))
    out = stop_embed(pos, idx, w, b, backend="triton")
    assert out.shape == (0, 16)


@pytest.mark.parametrize("D,E", [(0, 16), (16, 0)])
def test_zero_width_forward_and_backward_match_reference_backend(D, E):
    device = "cpu" if INTERP else "cuda"
    pos, idx, w, b = inputs(device, 7, D, E, (2, 3))
    leaves = [t.requires_grad_() for t in (pos, w, b)]
    outs = {be: stop_embed(pos, idx, w, b, noise_std=0.3, generator=gen(2), backend=be) for be in ("triton", "reference")}
    grads = {be: torch.autograd.grad(o, leaves, torch.ones_like(o)) for be, o in outs.items()}
    assert outs["triton"].shape == (2, 3, D)
    for got, want in zip(grads["triton"], grads["reference"]):
        assert got.shape == want.shape and torch.equal(got, want)


@pytest.mark.skipif(not INTERP, reason="forces interpreter tile sizes")
def test_block_sizes_and_row_splits_do_not_change_the_noise(monkeypatch):
    pos, _, w, b = inputs("cpu", 17, 24, 40, (1,))
    idx = torch.randint(0, 17, (20, 30), generator=gen(1))  # 600 rows: 3 row splits of the dW reduction
    w.requires_grad_()
    out = stop_embed(pos, idx, w, b, generator=gen(4), backend="triton")
    (gw,) = torch.autograd.grad(out, w, out.detach())
    monkeypatch.setattr(se, "_pow2", lambda n, lo, hi: lo)  # smallest tiles: 16 everywhere
    monkeypatch.setattr(se, "_num_sms", lambda device: 64)  # many row splits in the dW kernel
    out2 = stop_embed(pos, idx, w, b, generator=gen(4), backend="triton")
    (gw2,) = torch.autograd.grad(out2, w, out.detach())
    assert rel(out2, out) <= 1e-6 and rel(gw2, gw) <= 1e-6


# ----------------------------------------------------------------------------------------------
# seeds
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_manual_seed_reproduces_and_consecutive_calls_differ(device):
    P, D, E, shape = sizes(device)
    pos, idx, w, b = inputs(device, P, D, E, shape)
    torch.manual_seed(0)
    a1, a2 = stop_embed(pos, idx, w, b, backend="triton"), stop_embed(pos, idx, w, b, backend="triton")
    torch.manual_seed(0)
    b1 = stop_embed(pos, idx, w, b, backend="triton")
    assert torch.equal(a1, b1)
    # consecutive calls: independent noise (the two noise parts are nearly uncorrelated)
    y1 = (a1 - pos[idx] - b).double().flatten()
    y2 = (a2 - pos[idx] - b).double().flatten()
    assert torch.corrcoef(torch.stack([y1, y2]))[0, 1].abs() < 0.2


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_different_weights_differ_only_through_weights(device):
    P, D, E, shape = sizes(device)
    pos, idx, w1, b = inputs(device, P, D, E, shape, seed=1)
    w2 = w1 + 0.1 * torch.randn(w1.shape, generator=gen(2)).to(device)
    o1 = stop_embed(pos, idx, w1, b, noise_std=0.3, generator=gen(5), backend="triton")
    o2 = stop_embed(pos, idx, w2, b, noise_std=0.3, generator=gen(5), backend="triton")
    n = philox_normal(seed_of(5), idx.numel(), E, 0.3).to(device)
    diff = (o1.double() - o2.double()).reshape(-1, D)
    assert rel(diff, n @ (w1 - w2).double().T) <= 1e-4


# ----------------------------------------------------------------------------------------------
# errors, backends, torch.compile, autocast
# ----------------------------------------------------------------------------------------------
def _bad_cases():
    pos, idx, w, b = inputs("cpu", 10, 16, 24, (2, 3))
    return {
        "idx-out-of-range": (dict(idx=idx + 10), ValueError, "idx"),
        "idx-negative": (dict(idx=idx - 11), ValueError, "idx"),
        # the bounds themselves: P would read one row past ψ, -1 one row before it
        "idx-equals-P": (dict(idx=torch.tensor([[3, 10, 0], [9, 1, 2]])), ValueError, "idx"),
        "idx-minus-one": (dict(idx=torch.tensor([[3, -1, 0], [9, 1, 2]])), ValueError, "idx"),
        "idx-float": (dict(idx=idx.float()), TypeError, "idx"),
        "idx-scalar": (dict(idx=torch.tensor(1)), ValueError, "idx"),
        "weight-1d": (dict(weight=w[0]), ValueError, "weight"),
        "weight-int": (dict(weight=w.long()), TypeError, "weight"),
        "pos-width": (dict(pos_embed=pos[:, :8]), ValueError, "pos_embed"),
        "bias-width": (dict(bias=b[:5]), ValueError, "bias"),
        "noise-std-negative": (dict(noise_std=-0.1), ValueError, "noise_std"),
        "noise-std-nan": (dict(noise_std=float("nan")), ValueError, "noise_std"),
        "generator-type": (dict(generator=3), TypeError, "generator"),
        "backend": (dict(backend="cudnn"), ValueError, "backend"),
    }, dict(pos_embed=pos, idx=idx, weight=w, bias=b)


@pytest.mark.parametrize("case", list(_bad_cases()[0]))
def test_bad_inputs_raise_naming_the_argument(case):
    cases, good = _bad_cases()
    change, exc, name = cases[case]
    kw = {**good, **change}
    with pytest.raises(exc, match=f"^{name}:"):
        stop_embed(kw.pop("pos_embed"), kw.pop("idx"), kw.pop("weight"), kw.pop("bias"), **kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_mismatch_and_cuda_generator():
    pos, idx, w, b = inputs("cuda", 10, 16, 24, (2, 3))
    with pytest.raises(ValueError, match="idx"):
        stop_embed(pos, idx.cpu(), w, b)
    with pytest.raises(ValueError, match="weight"):
        stop_embed(pos, idx, w.cpu(), b)
    with pytest.raises(ValueError, match="generator"):
        stop_embed(pos, idx, w, b, generator=torch.Generator(device="cuda"))


def test_device_mismatch_meta():
    """Device mismatches without a second real device: each meta argument is named."""
    pos, idx, w, b = inputs("cpu", 10, 16, 24, (2, 3))
    with pytest.raises(ValueError, match="^bias: expected device"):
        stop_embed(pos, idx, w, b.to("meta"))
    with pytest.raises(ValueError, match="^idx: expected device"):
        stop_embed(pos, idx.to("meta"), w, b)
    with pytest.raises(ValueError, match="^weight: expected device"):
        stop_embed(pos, idx, w.to("meta"), b)


def test_reference_backend_runs_without_triton_and_float64():
    pos, idx, w, b = (t.double() if t.is_floating_point() else t for t in inputs("cpu", 10, 16, 24, (2, 3)))
    out = stop_embed(pos, idx, w, b, noise_std=0.2, generator=gen(1), backend="auto")
    n = philox_normal(seed_of(1), 6, 24, 0.2).reshape(2, 3, 24)
    assert torch.allclose(out, reference.stop_embed(pos, idx, w, b, n), rtol=0, atol=1e-12)
    with pytest.raises(TypeError, match="^pos_embed: the triton backend takes"):  # the first fp64 argument
        stop_embed(pos, idx, w, b, backend="triton")
    with pytest.raises(TypeError, match="^bias: the triton backend takes"):
        stop_embed(pos.float(), idx, w.float(), b, backend="triton")


def test_cuda_backend_is_optional():
    pos, idx, w, b = inputs("cpu", 10, 16, 24, (2, 3))
    try:
        from stop_kernels.ops import cuda_backend
        usable = cuda_backend.available()
    except Exception:
        usable = False
    if usable:
        pytest.skip("the CUDA backend loads here: its own tests cover it")
    with pytest.raises(RuntimeError, match="cuda"):
        stop_embed(pos, idx, w, b, backend="cuda")


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    pos, idx, w, b = inputs(device, 10, 16, 24, (2, 3))
    args = (pos, idx, w.requires_grad_(), b, torch.tensor(seed_of(1)), 0.3)
    torch.library.opcheck(torch.ops.stop_kernels.stop_embed.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_matches_eager(device):
    P, D, E, shape = sizes(device)
    pos, idx, w, b = inputs(device, P, D, E, shape)
    w.requires_grad_()

    def f(g):
        return stop_embed(pos, idx, w, b, noise_std=0.3, generator=g).square().sum()

    compiled = torch.compile(f, backend="aot_eager" if device == "cpu" else "inductor")
    eager = f(gen(6))
    (ge,) = torch.autograd.grad(eager, w)
    for _ in range(2):  # the second call reuses the graph with a new seed tensor
        got = compiled(gen(6))
        (gc,) = torch.autograd.grad(got, w)
        assert rel(got, eager) <= 1e-5 and rel(gc, ge) <= 1e-5


@pytest.mark.parametrize("op", ["stop_embed", "learned", "isotropic"])
def test_torch_compile_of_the_reference_backend_matches_eager(op):
    """The CPU fallback (what "auto" runs on a CPU without TRITON_INTERPRET) builds the noise with NumPy
    (philox_normal): inside torch.compile that must run eagerly, not be traced (Dynamo failed on its uint64
    ops with a KeyError(torch.uint64)), and give the eager noise."""
    from stop_kernels.ops.predictor_input import assemble_predictor_input
    pos, idx, w, b = inputs("cpu", 10, 16, 24, (2, 2, 3))
    ctx, ctx_idx = torch.randn(2, 4, 24), torch.randint(0, 10, (2, 4))
    w.requires_grad_()

    def f(g):
        if op == "stop_embed":
            out = stop_embed(pos, idx, w, b, noise_std=0.3, generator=g, backend="reference")
        else:
            out = assemble_predictor_input(ctx, ctx_idx, idx, w, b, pos, noise_mode=op, noise_std=0.3,
                                           generator=g, backend="reference")
        return out.square().sum()

    compiled = torch.compile(f, backend="aot_eager")
    eager = f(gen(6))
    (ge,) = torch.autograd.grad(eager, w)
    got = compiled(gen(6))
    (gc,) = torch.autograd.grad(got, w)
    assert rel(got, eager) <= 1e-6 and rel(gc, ge) <= 1e-6


def test_auto_runs_the_reference_path_inside_torch_func_transforms():
    """torch.func.grad refuses the fused custom ops (a RuntimeError about an autograd.Function's
    setup_context): inside a torch.func transform "auto" takes the reference path, with the same noise."""
    from stop_kernels.ops.predictor_input import assemble_predictor_input
    pos, idx, w, b = inputs("cpu", 10, 16, 24, (2, 2, 3))
    ctx, ctx_idx = torch.randn(2, 4, 24), torch.randint(0, 10, (2, 4))
    for op in (lambda w_, be: stop_embed(pos, idx, w_, b, noise_std=0.3, generator=gen(2), backend=be),
               lambda w_, be: assemble_predictor_input(ctx, ctx_idx, idx, w_, b, pos, noise_std=0.3, generator=gen(2),
                                                       backend=be)):
        got = torch.func.grad(lambda w_: op(w_, "auto").square().sum())(w)
        w_ref = w.detach().requires_grad_()
        (want,) = torch.autograd.grad(op(w_ref, "reference").square().sum(), w_ref)
        assert rel(got, want) <= 1e-6


def test_vmap_randomness_different_is_refused_by_name():
    """One Philox seed per call cannot give vmapped samples noise of their own: randomness='different' is refused
    with an error that says so (it was vmap's opaque ".item()" RuntimeError from the seed draw), at any nesting."""
    from stop_kernels.ops.predictor_input import assemble_predictor_input
    pos, idx, w, b = inputs("cpu", 10, 16, 24, (2, 3))
    ctx, ctx_idx = torch.randn(2, 4, 24), torch.randint(0, 10, (2, 4))
    calls = [
        lambda ws: torch.func.vmap(lambda w_: stop_embed(pos, idx, w_, b), randomness="different")(ws),
        lambda ws: torch.func.vmap(torch.func.grad(lambda w_: stop_embed(pos, idx, w_, b).sum()),
                                   randomness="different")(ws),
        lambda ws: torch.func.vmap(lambda w_: assemble_predictor_input(ctx, ctx_idx, idx[None], w_, b, pos),
                                   randomness="different")(ws),
    ]
    for call in calls:
        with pytest.raises(NotImplementedError, match="randomness='different'"):
            call(torch.stack([w, 2 * w]))


def test_vmap_over_idx_with_randomness_same_matches_a_loop():
    """Under vmap the range check of idx read a batched min() (vmap's ".item()" error even with randomness='same');
    it checks every sample's values: results equal one call per sample with the same seed, and a bad value in
    any sample is still named."""
    pos, idx, w, b = inputs("cpu", 10, 16, 24, (3, 4))
    got = torch.func.vmap(lambda i: stop_embed(pos, i, w, b, noise_std=0.3, generator=gen(5)), randomness="same")(idx)
    want = torch.stack([stop_embed(pos, i, w, b, noise_std=0.3, generator=gen(5), backend="reference") for i in idx])
    assert rel(got, want) <= 1e-6
    bad = idx.clone()
    bad[2, 1] = 10
    with pytest.raises(ValueError, match=r"idx: values must lie in \[0, 10\)"):
        torch.func.vmap(lambda i: stop_embed(pos, i, w, b), randomness="same")(bad)


def test_torch_compile_fullgraph_is_refused_as_documented():
    """The documented limitation (stop_embed's docstring, README): the seed is drawn eagerly, one graph break
    per call, so fullgraph=True refuses the op. If this ever compiles in one graph, the docs must change."""
    pos, idx, w, b = inputs("cpu", 10, 16, 24, (2, 3))
    with pytest.raises(Exception, match="torch.compiler.disable"):
        torch.compile(lambda: stop_embed(pos, idx, w, b, noise_std=0.3), backend="eager", fullgraph=True)()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_autocast_takes_bf16():
    P, D, E, shape = sizes("cuda")
    pos, idx, w, b = inputs("cuda", P, D, E, shape)
    w.requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = stop_embed(pos, idx, w, b, noise_std=0.3, generator=gen(2))
    want = stop_embed(pos, idx, w.detach().bfloat16(), b.bfloat16(), noise_std=0.3, generator=gen(2))
    assert out.dtype == torch.float32 and torch.equal(out, want)
    out.sum().backward()
    assert w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_autocast_takes_weight_and_bias_in_its_dtype_on_every_backend(device, backend):
    """Under autocast (CUDA, or CPU: the interpreter and the reference path alike; the reference's Linear
    followed CPU autocast and the kernels ignored it) the call equals one with W and b in bf16 and ψ as
    given, in promote(bf16, ψ's dtype)."""
    P, D, E, shape = sizes(device)
    pos, idx, w, b = inputs(device, P, D, E, shape)
    w.requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        out = stop_embed(pos, idx, w, b, noise_std=0.3, generator=gen(2), backend=backend)
    want = stop_embed(pos, idx, w.detach().bfloat16(), b.bfloat16(), noise_std=0.3, generator=gen(2), backend=backend)
    assert out.dtype == torch.float32 and torch.equal(out, want)
    out.sum().backward()
    assert w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()
    with torch.autocast(device, dtype=torch.bfloat16):  # a bf16 ψ: promote(bf16, bf16)
        low = stop_embed(pos.bfloat16(), idx, w, b, noise_std=0.3, generator=gen(2), backend=backend)
    assert low.dtype == torch.bfloat16 and rel(low, want) <= 1e-2


# ----------------------------------------------------------------------------------------------
# every autotune config computes the same result (pinned one by one; CPU via the interpreter)
# ----------------------------------------------------------------------------------------------
def _config_problem(device):
    """D = 420 spans 4 tiles of 128 (the last one partial, so the D_TILES = 4 configs' last tile is live),
    E = 198 (not a multiple of 4: the last of the E4 = 50 quarter columns is partial; partial K steps), R = 150 rows.

    W is fp32 under the interpreter (exact up to fp32 rounding) and bf16 on the GPU (every config fits
    the shared memory in bf16; the fp32 ones that do not are pruned from autotuning).
    """
    g = gen(11)
    P, D, E, R = 40, 420, 198, 150
    pos = torch.randn(P, D, generator=g).to(device)
    w = (torch.randn(D, E, generator=g) / math.sqrt(E)).to(device, torch.bfloat16 if device == "cuda" else None)
    b = torch.randn(D, generator=g).to(device)
    idx = torch.randint(0, P, (R,), generator=g).to(device)
    a = torch.randn(R, E, generator=g).to(device)
    go = torch.randn(R, D, generator=g).to(device)
    return pos, idx, w, b, a, go


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("i", range(len(se._FWD_CONFIGS + se._FWD_CONFIGS_FP32)))
def test_every_forward_config_matches_reference(device, i):
    cfg = (se._FWD_CONFIGS + se._FWD_CONFIGS_FP32)[i]  # (W is fp32 off CUDA: every list runs as tiles of the same math)
    pos, idx, w, b, a, _ = _config_problem(device)
    R, (D, E) = idx.numel(), w.shape
    seed, sigma = 77, 0.3
    n = philox_normal(seed, R, E, sigma).to(device)
    tol = 1e-5 if w.dtype == torch.float32 else 1e-2
    ref_noise = (n @ w.double().T + b.double() + pos.double()[idx]).float()
    ref_mem = (a.double() @ w.double().T + b.double() + pos.double()[idx]).float()
    out = torch.full((2, R, D), float("nan"), device=device)
    with se.pin_configs(fwd=cfg):
        se.launch_project(out[0].view(1, R, D), idx, pos, w, b, seed=seed, noise_std=sigma)
        # memory A, 2 row groups of 75 rows, written twice (copies) into [2, R, D]
        mem = torch.full((2, R, D), float("nan"), device=device)
        se.launch_project(mem[0].view(2, R // 2, D), idx, pos, w, b, a=a, copies=2, stride_copy=R * D)
    assert rel(out[0], ref_noise) <= tol, cfg
    assert rel(mem[0], ref_mem) <= tol and torch.equal(mem[0], mem[1]), cfg
    # both in one launch: the memory rows (R - 13 of them, 2 copies) and then R noise rows (the predictor input's
    # context and masked rows), every slot of a poisoned output written; the noise rows are the stream's rows 0..R
    both = torch.full((2, R, D), float("nan"), device=device)
    noise_out = torch.full((R, D), float("nan"), device=device)
    with se.pin_configs(fwd=cfg):
        se.launch_project(both[0, :R - 13].view(1, R - 13, D), idx[:R - 13], pos, w, b, a=a[:R - 13], copies=2,
                          stride_copy=R * D, seed=seed, noise_std=sigma, noise_rows=(noise_out.view(3, R // 3, D), idx))
    assert rel(both[:, :R - 13], ref_mem[None, :R - 13].expand(2, -1, -1)) <= tol, cfg
    assert torch.isnan(both[:, R - 13:]).all(), cfg  # nothing written past the memory rows
    assert rel(noise_out, ref_noise) <= tol, cfg


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("i", range(len(se._DW_CONFIGS + se._DW_CONFIGS_FP32)))
def test_every_weight_grad_config_matches_reference(device, i, monkeypatch):
    cfg = (se._DW_CONFIGS + se._DW_CONFIGS_FP32)[i]
    pos, idx, w, b, a, go = _config_problem(device)
    R, (D, E) = idx.numel(), w.shape
    seed, sigma = 78, 0.3
    n = philox_normal(seed, R, E, sigma).to(device)
    want = go.double().T @ n
    monkeypatch.setattr(se, "_num_sms", lambda device: 1)  # 1 split: rows_per_split = R (several row blocks)
    with se.pin_configs(dw=cfg):
        got = se.noise_weight_grad(go.view(1, R, D), w, seed, sigma)
    monkeypatch.setattr(se, "_dw_splits", lambda *a, **k: 4)  # several row splits, the last one short
    with se.pin_configs(dw=cfg):
        got2 = se.noise_weight_grad(go.view(3, R // 3, D), w, seed, sigma)
    tol = 1e-5 if w.dtype == torch.float32 else 1e-2
    assert rel(got, want) <= tol and rel(got2, want) <= tol, cfg
    # context rows read from memory in the same launch (RC = 37: 4 splits of 10, 10, 10, 7 rows), x a strided
    # column slice; alone (σ = 0: the noise rows add nothing) and with the noise rows
    g = gen(12)
    RC = 37
    gc = torch.randn(RC, D, generator=g).to(device, w.dtype)
    x = torch.randn(RC, 2 * E, generator=g).to(device, w.dtype)[:, ::2]
    ctx_part = gc.double().T @ x.double()
    with se.pin_configs(dw=cfg):
        got_ctx = se.noise_weight_grad(go.view(3, R // 3, D), w, seed, 0.0, ctx_grad=gc, ctx=x)
        got_both = se.noise_weight_grad(go.view(3, R // 3, D), w, seed, sigma, ctx_grad=gc, ctx=x)
    assert rel(got_ctx, ctx_part) <= tol and rel(got_both, want + ctx_part) <= tol, cfg


@pytest.mark.parametrize("device", DEVICES)
def test_weight_grad_kernel_reads_the_gradient_in_the_weight_dtype(device, monkeypatch):
    """Under autocast the dW kernel gets the fp32 gradient of an fp32 output with a bf16 weight (the predictor
    input's rows, a strided slice). The kernel multiplies in the weight's dtype either way. With fp32 g tiles its
    main loop was 3x longer in SASS and ran 3.5x slower on an H200, so the launcher casts g first (contiguously).
    Checked here: the launch sees a bf16 contiguous g; dW is the float64 product of the bf16 operands and equals,
    bit for bit, the dW of the gradient cast by the caller."""
    g = gen(31)
    groups, G, Nc, D, E, seed, sigma = 3, 5, 4, 40, 72, 77, 0.3
    w = (torch.randn(D, E, generator=g) * 0.1).to(device=device, dtype=torch.bfloat16)
    full = torch.randn(groups, Nc + G, D, generator=g).to(device)  # fp32, like the predictor input's gradient
    gmask = full[:, Nc:]                                             # the masked rows: a strided [groups, G, D] view
    seen = []
    real = se._launch

    def spy(kernel, grid, args, kwargs, interp_meta, name):
        seen.append((args[0].dtype, args[0].is_contiguous()))
        return real(kernel, grid, args, kwargs, interp_meta, name)

    monkeypatch.setattr(se, "_launch", spy)
    got = se.noise_weight_grad(gmask, w, seed, sigma)
    assert seen == [(torch.bfloat16, True)]
    n = philox_normal(seed, groups * G, E, sigma).double().to(device)
    want = gmask.bfloat16().double().reshape(-1, D).T @ n.bfloat16().double()
    assert rel(got, want) <= 1e-2  # bf16 operands (the interpreter's in-kernel bf16 rounding is coarser than torch's)
    assert torch.equal(got, se.noise_weight_grad(gmask.bfloat16(), w, seed, sigma))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("i", range(len(se._POS_CONFIGS)))
def test_every_pos_config_matches_reference(device, i):
    """The ψ[idx] + σ·n kernel (isotropic rows) with each config pinned: D = 200 (D4 = 50) needs two column
    programs of BLOCK_K = 32, whose out-of-range quarter columns must not store over the next program's."""
    g = gen(12)
    P, D, R, seed, sigma = 30, 200, 40, 5, 0.4
    pos = torch.randn(P, D, generator=g).to(device)
    idx = torch.randint(0, P, (R,), generator=g).to(device)
    out = torch.full((1, R, D), float("nan"), device=device)
    with se.pin_configs(pos=se._POS_CONFIGS[i]):
        se.launch_pos_noise(out, idx, pos, None, seed=seed, noise_std=sigma)
    want = pos.double()[idx] + philox_normal(seed, R, D, sigma).double().to(device)
    assert rel(out[0], want) <= 1e-5  # the GPU's SFU sin/cos: within 1e-5·σ of the twin (test_philox)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
def test_eager_path_equals_the_custom_op_bit_for_bit(device, deterministic, monkeypatch):
    """Eager calls run the op's plain autograd.Function (no torch.library dispatch: its host cost), traced calls the
    custom op: same output, dW, db and dψ bit for bit (dψ on CUDA: see ``assert_same_results``), each call on the
    path it should take."""
    if deterministic and device == "cpu":
        pytest.skip("deterministic mode changes CUDA kernels only (dψ's index_add_ atomics); the CPU case is the default's")
    from _op_paths import assert_same_results, deterministic_algorithms, on_both_paths
    calls = []
    real_op, real_fn = se._stop_embed_op, se._StopEmbedFn.apply
    monkeypatch.setattr(se, "_stop_embed_op", lambda *a: calls.append("op") or real_op(*a))
    monkeypatch.setattr(se._StopEmbedFn, "apply", lambda *a: calls.append("fn") or real_fn(*a))
    pos, idx, w, b = inputs(device, 30, 24, 40, (2, 7))

    def call():
        leaves = [t.detach().requires_grad_() for t in (pos, w, b)]
        out = stop_embed(leaves[0], idx, leaves[1], leaves[2], noise_std=0.3, generator=gen(3), backend="triton")
        go = torch.randn(out.shape, generator=gen(4)).to(device)
        return out, torch.autograd.grad(out, leaves, go)
    with deterministic_algorithms(deterministic, monkeypatch):  # (dψ's scatter then bit for bit on CUDA too)
        (o1, g1), (o2, g2) = on_both_paths(call)
        assert_same_results((o1, *g1), (o2, *g2), ("out", "pos_embed", "weight", "bias"))
    assert calls == ["fn", "op"], calls


def test_gpu_autotuning_is_cached_on_disk():
    """Each StoP kernel's autotuner keeps its timings in Triton's on-disk cache on the GPU, so a new process (a
    resumed run, each e2e_step.py path) does not time every config again. The interpreter turns the cache off, so
    this reads the autotuners of a fresh import without TRITON_INTERPRET."""
    import subprocess
    import sys
    # (without TRITON_CACHE_AUTOTUNING, which would turn the cache on for every autotuner whatever the kernels say)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_AUTOTUNING")}
    code = ("from stop_kernels.ops import stop_embed as se; "
            "print([k.cache_results for k in (se._project_kernel, se._noise_weight_grad_kernel, se._pos_noise_kernel)])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[True, True, True]", r.stdout + r.stderr


def test_config_pruning_keeps_shared_memory_in_budget():
    class _W:  # only the element size is read
        def __init__(self, n):
            self.n = n

        def element_size(self):
            return self.n
    # the kernels' autotune lists (16-bit and fp32 configs), as their prunes see them on the GPU
    fwd_all, dw_all = list(se._project_kernel.configs), list(se._noise_weight_grad_kernel.configs)
    bf16 = se._prune_fwd(fwd_all, {"w_ptr": _W(2), "D": 384})
    assert any(c.kwargs["D_TILES"] == 3 for c in bf16)
    assert not any(c.kwargs["D_TILES"] == 4 for c in bf16)  # a whole wasted tile at D = 384
    assert any(c.kwargs["D_TILES"] == 4 for c in se._prune_fwd(fwd_all, {"w_ptr": _W(2), "D": 512}))
    assert _ids(bf16) <= _ids(se._FWD_CONFIGS)
    assert _ids(se._prune_dw(dw_all, {"w_ptr": _W(2), "D": 384})) <= _ids(se._DW_CONFIGS)
    # float32 W: only (and all of) its own lists, whose tiles do not spill registers with fp32 operands
    # (benchmarks/compile_check.py); the 16-bit tiles spilled 0.8–10 KB per thread
    assert _ids(se._prune_fwd(fwd_all, {"w_ptr": _W(4), "D": 384})) == _ids(se._FWD_CONFIGS_FP32)
    assert _ids(se._prune_dw(dw_all, {"w_ptr": _W(4), "D": 384})) == _ids(se._DW_CONFIGS_FP32)
    assert _ids(se._prune_fwd(fwd_all, {"w_ptr": _W(4), "D": 512})) == _ids(se._FWD_CONFIGS_FP32)
    assert not _ids(se._FWD_CONFIGS) & _ids(se._FWD_CONFIGS_FP32) and not _ids(se._DW_CONFIGS) & _ids(se._DW_CONFIGS_FP32)


def _ids(configs):
    return {se._config_id(c) for c in configs}


def test_dw_row_splits_fill_whole_waves():
    from stop_kernels.ops.stop_embed import _dw_splits
    # ViT-H/14: 20 programs per split, 168 row blocks: 6 splits = 120 programs = 1 wave of 28 blocks, within
    # 10 % of 13 splits (2 full waves of 13) at half the partials; the former fixed 8: 2 waves of 21
    assert _dw_splits(10752, 384, 320, sms=132) == 6
    for R in (1, 100, 255, 256, 300, 5000):
        s = _dw_splits(R, 72, 50, sms=132)
        assert 1 <= s <= max(1, -(-R // 256)), (R, s)    # at least 256 rows per split
    assert _dw_splits(10 ** 7, 384, 320, sms=132) <= 16   # the fp32 partials stay bounded


def test_gpu_launches_reuse_the_autotuners_pick_per_key(monkeypatch):
    """On the GPU path _launch asks the autotuner once per key (its key's values and the tensor arguments'
    dtypes, as the autotuner's own key) and then launches the JIT function with the picked config itself:
    Autotuner.run rebuilds its key from every argument on every call (~11 µs per launch on this CPU). Checked with
    a stand-in autotuner (no GPU here): a repeated key skips it, a new dtype or key value asks it again."""
    import triton

    calls = []

    class Jit:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append(("jit", args[0].dtype, args[1], kwargs))

    class Tuner:
        arg_names, keys, fn = ["x", "E", "NOISE"], ["E", "NOISE"], Jit()
        best_config = None

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                calls.append(("tuner", args[0].dtype, args[1], kwargs))
                self.best_config = triton.Config({"BLOCK": 16 if args[0].dtype == torch.float32 else 32},
                                                 num_warps=4, num_stages=2)
            return run

    monkeypatch.setattr(se, "interpreting", lambda: False)
    monkeypatch.setattr(se, "_PICKED", {})
    k = Tuner()
    x32, x16 = torch.empty(3), torch.empty(3, dtype=torch.bfloat16)
    for x, E, noise in [(x32, 8, True), (x32, 8, True), (x32, 8, True), (x16, 8, True), (x16, 8, True),
                        (x32, 9, True), (x32, 8, False)]:
        se._launch(k, None, (x, E), dict(NOISE=noise), None, "fwd")
    assert [c[0] for c in calls] == ["tuner", "jit", "jit", "tuner", "jit", "tuner", "tuner"], calls
    jit32, jit16 = calls[1][3], calls[4][3]
    assert jit32["BLOCK"] == 16 and jit16["BLOCK"] == 32 and jit32["num_warps"] == 4 and jit32["NOISE"] is True
