"""Property-based tests (hypothesis) of the two fused StoP ops, ``stop_embed`` and ``assemble_predictor_input``,
against their pure-PyTorch twins in ``stop_kernels/reference.py``: shapes, memory layouts, index repeats, σ and
generator seeds drawn at random instead of listed. tests/test_stop_embed.py and tests/test_predictor_input.py hold
the example-based tests and the helpers used here (imported, not copied).

Notation as the ops': ψ ``[P, D]``, W ``[D, E]``, b ``[D]``, n the Philox noise of the seed a call draws from its
generator (``seed_of``), ``n = philox_normal(seed, rows, width, σ)``, g the output gradient.

Properties:

* stop_embed, forward and backward: ``out = ψ[idx] + n·Wᵀ + b``; ``dψ = Σ_{r: idx[r]=p} g[r]`` (a scatter-add:
  idx repeats its values), ``dW = Σ_r g[r]ᵀ n[r]``, ``db = Σ_r g[r]``, against the float64 twin given the same
  noise, for P ≤ 64, D, E ≤ 96 (odd, 1), idx of rank 1-3 with M ≤ 40 (M = 1), int32 / int64, ψ, W, b, idx and
  g transposed, column-strided or expanded (stride 0), b None or not, σ = 0 or not, the interpreter's own tiles
  or any autotune config pinned; the op's float64 "reference" backend is that twin, bit for bit.
* assemble_predictor_input, forward and backward, every noise mode, npred 1-4, the mask token given or not
  where the mode allows: row ``k·B + β`` is ``[ctx[β]·Wᵀ + b + ψ[ctx_idx[β]] ; masked_k,β]`` with masked
  ``ψ[tgt] + n·Wᵀ + b`` (learned, n in width E), ``ψ[tgt] + n`` (isotropic, width D), ``ψ[tgt] + m`` (none);
  the gradients of ctx, W, b, ψ and m against the float64 twin given the same noise (rows of n over
  ``[npred, B, Nt]`` row-major), same layouts and sizes as above (Nc, Nt ∈ [0, 10]).
* determinism: the noise is a function of the generator state only. With the noise n recovered from one call
  (E = D, W = I: ``recover_noise``), every call from that state satisfies ``out − ψ[idx] − b = n·Wᵀ``, whatever its
  W, D and W's dtype (float32, bfloat16, float16); hence two calls that differ only in W differ by ``n·(W₁ − W₂)ᵀ``.
  The predictor input's learned rows carry the same n; its isotropic rows are bit for bit independent of ctx, W,
  b and E; its context rows of the generator; mode "none" and σ = 0 leave the generator untouched.
* the eager path (the ops' plain autograd.Function) and the custom op (what tracing gets) agree bit for bit.
* bad arguments: one defect drawn per example (idx / ctx_idx / tgt_idx out of range or of a float dtype,
  σ negative, non-finite or not a number, a shape that does not fit, …) raises ValueError / TypeError whose
  message starts with the name of the argument at fault, on the triton and the reference backend alike, while the
  same call without the defect runs.

Error bound. The Triton kernels take float32 at most, so they run in float32 against a float64 twin, and errors
are bounded element-wise, not norm-wise: with a few tokens of a few columns (M = 1, E = 1) a norm-wise relative
error is an element-wise one, which cancellation (ψ + n·Wᵀ + b ≈ 0, a dW entry Σ_r g·n ≈ 0) makes arbitrarily
large without any bug. Every output and gradient is a sum of products of the inputs; its float32 error is at most
γ_K times the same sum of the products' magnitudes (Higham's bound for a dot product, K the longest sum), plus
what the noise brings: the kernels' float32 Box–Muller lies within 1e-5·(σ + |n|) of the twin's (test_philox).
Both fit in

    |got − want| ≤ 2·(ε + 1e-5 + (K + 4)·2⁻²⁴) · mag

where ``mag`` is the twin evaluated on |inputs|, |g| and noise |n| + σ (a sum of products over magnitudes) and ε
the machine epsilon of the operands the kernels round to (0 for float32, torch.finfo otherwise). A wrong index,
row, column, stride or a missing term errs by O(mag), thousands of times the bound; an element the kernels never
write is NaN (``NanEmpty``).

Sizes stay small (at most 360 rows per call) since the kernels run in the Triton interpreter on the CPU (an example
takes 0.05–2 s). Inputs are fresh ``randn`` / ``randint`` from a seed hypothesis draws (never zeros).
Examples come from the profile in ``conftest.py``: every run tries the same ones (and keeps no example database).
"""
import dataclasses
import os
from typing import Optional, Tuple

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from conftest import skip_unless_installed  # noqa: E402

skip_unless_installed("hypothesis", module_level=True)
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

from _op_paths import assert_same_results, on_both_paths  # noqa: E402
from test_predictor_input import MODES, run  # noqa: E402
from test_stop_embed import DEVICES, INTERP, gen, recover_noise, seed_of  # noqa: E402

from stop_kernels import reference  # noqa: E402
from stop_kernels.ops import stop_embed as se  # noqa: E402
from stop_kernels.ops.philox import draw_seed, philox_normal  # noqa: E402
from stop_kernels.ops.predictor_input import assemble_predictor_input  # noqa: E402
from stop_kernels.ops.stop_embed import stop_embed  # noqa: E402

pytestmark = pytest.mark.skipif(not DEVICES, reason="needs a CUDA GPU or TRITON_INTERPRET=1")

SIGMA_REC = 0.3  # the σ of recover_noise (test_stop_embed): the determinism properties call at that σ
LAYOUTS = ("contiguous", "transposed", "strided", "expanded")
# autotune configs pinned by the draws (se.pin_configs), or None: the interpreter's tiles sized to the problem. On a
# GPU the float32 lists only (the property's W is float32; a 16-bit config's fp32 tiles may not fit shared memory)
FWD_PINS = (se._FWD_CONFIGS if INTERP else []) + se._FWD_CONFIGS_FP32
DW_PINS = (se._DW_CONFIGS if INTERP else []) + se._DW_CONFIGS_FP32
POS_PINS = se._POS_CONFIGS

seeds = st.integers(0, 2 ** 31 - 1)
# σ = 0 (no noise, no seed drawn) in about a quarter of the draws (hypothesis's one_of favours its first branch)
noise_stds = st.one_of(st.floats(0.05, 2.0), st.just(0.0))
layouts = st.sampled_from(LAYOUTS)
index_dtypes = st.sampled_from((torch.int32, torch.int64))
# a bias's layout or None (no bias), the last choice: hypothesis favours the first ones
optional_layouts = st.sampled_from(LAYOUTS + (None,))


def _pin(draw, pins):
    """An index into ``pins`` or None (the interpreter's own tiles; None first, so a failure shrinks towards it)."""
    return draw(st.sampled_from((None,) + tuple(range(len(pins)))))


def _pinned(case):
    """``se.pin_configs`` for the configs a case drew (those it drew None for are left to the launcher)."""
    return se.pin_configs(fwd=None if case.fwd_pin is None else FWD_PINS[case.fwd_pin],
                          dw=None if case.dw_pin is None else DW_PINS[case.dw_pin],
                          pos=None if getattr(case, "pos_pin", None) is None else POS_PINS[case.pos_pin])


# ----------------------------------------------------------------------------------------------
# layouts, tensors, the error bound
# ----------------------------------------------------------------------------------------------
def base_shape(shape, layout) -> Tuple[int, ...]:
    """The shape of the buffer that a tensor of ``shape`` in ``layout`` is a view of (:func:`laid_out`)."""
    shape = tuple(shape)
    if layout == "transposed":
        return shape[::-1]
    if layout == "strided":
        return shape[:-1] + (2 * shape[-1],)
    if layout == "expanded":
        return (1,) + shape[1:]
    return shape


def laid_out(base: torch.Tensor, shape, layout) -> torch.Tensor:
    """The view of ``base`` of the given ``shape``: ``base`` itself ("contiguous"), its axes reversed ("transposed":
    strides increasing), every other column from the second ("strided": a column stride of 2 and a storage offset)
    or its first axis expanded ("expanded": stride 0 there, the same values at every index of that axis)."""
    if layout == "transposed":
        return base.permute(*reversed(range(base.dim())))
    if layout == "strided":
        return base[..., 1::2]
    if layout == "expanded":
        return base.expand(tuple(shape))
    return base


def positions(rng: torch.Generator, shape, layout, P: int, distinct: int, dtype) -> torch.Tensor:
    """Indices in [0, P) of ``shape`` in ``layout``, taking at most ``distinct`` different values, so that
    positions repeat (dψ is a scatter-add: each repeat adds a row)."""
    pool = torch.randperm(P, generator=rng)[:distinct]
    base = pool[torch.randint(0, len(pool), base_shape(shape, layout), generator=rng)].to(dtype)
    return laid_out(base, shape, layout)


def bases_of(rng: torch.Generator, specs) -> dict:
    """Fresh ``randn`` buffers (float32, CPU) for ``specs``: name → (logical shape, layout or None: no tensor)."""
    return {name: torch.randn(base_shape(shape, layout), generator=rng)
            for name, (shape, layout) in specs.items() if layout is not None}


def views_of(bases: dict, specs) -> dict:
    """The logical tensors (name → view, None where ``specs`` has no layout) of ``bases`` (any dtype, leaves or not)."""
    return {name: None if layout is None else laid_out(bases[name], shape, layout)
            for name, (shape, layout) in specs.items()}


def leaves(bases: dict, convert, device) -> dict:
    """``convert(base)`` of every buffer as a leaf that requires grad, on ``device``."""
    return {k: convert(v.detach().to(device)).detach().requires_grad_() for k, v in bases.items()}


def as_float64(t: torch.Tensor) -> torch.Tensor:
    return t.double()


def magnitude(t: torch.Tensor) -> torch.Tensor:
    return t.double().abs()


def assert_within(name: str, got: Optional[torch.Tensor], want: Optional[torch.Tensor],
                  mag: Optional[torch.Tensor], K: int, eps: float = 0.0) -> None:
    """``|got − want| ≤ 2·(eps + 1e-5 + (K + 4)·2⁻²⁴)·mag`` element-wise (the module docstring's bound); ``got``
    None exactly where ``want`` is (a gradient that does not exist)."""
    assert (got is None) == (want is None), f"{name}: got {'None' if got is None else 'a tensor'}, the twin " \
                                            f"{'None' if want is None else 'a tensor'}"
    if want is None:
        return
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, want {tuple(want.shape)}"
    err = (got.detach().double() - want.detach()).abs().cpu()
    bound = 2 * (eps + 1e-5 + (K + 4) * 2.0 ** -24) * mag.detach().cpu()
    ok = err <= bound  # (NaN: an element never written, or overflow, fails too)
    if not bool(ok.all()):
        score = torch.where(ok, torch.full_like(err, -1.0), (err / bound).nan_to_num(nan=float("inf")))
        i = int(score.reshape(-1).argmax())
        flat = lambda t: t.detach().double().cpu().reshape(-1)[i].item()  # noqa: E731
        raise AssertionError(f"{name}: {int((~ok).sum())} of {ok.numel()} elements off the bound; worst (flat index "
                             f"{i} of shape {tuple(err.shape)}): got {flat(got):.9g}, want {flat(want):.9g}, bound "
                             f"{flat(bound):.3g} (mag {flat(mag):.3g}, K {K}, eps {eps:.3g})")


class NanEmpty(TorchFunctionMode):
    """``torch.empty`` of a floating dtype comes back filled with NaN inside the block: the fused ops allocate their
    outputs with it, so an element their kernels never write is NaN (not the stale bytes of a freed tensor, which
    may well be a previous example's right answer) and fails :func:`assert_within`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.empty and out.is_floating_point():
            out.fill_(float("nan"))
        return out


def grads_of(out: torch.Tensor, inputs: dict, go: torch.Tensor) -> dict:
    """name → d⟨out, go⟩/d input (None where the input does not reach ``out``)."""
    got = torch.autograd.grad(out, list(inputs.values()), go, allow_unused=True)
    return dict(zip(inputs, got))


# ----------------------------------------------------------------------------------------------
# stop_embed
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Draws:
    """What both ops' cases draw alike: σ, the seeds of the data and of the noise's generator, pinned configs."""
    noise_std: float
    data_seed: int
    gen_seed: int
    fwd_pin: Optional[int]
    dw_pin: Optional[int]


def _draws(draw) -> dict:
    return dict(noise_std=draw(noise_stds), data_seed=draw(seeds), gen_seed=draw(seeds),
                fwd_pin=_pin(draw, FWD_PINS), dw_pin=_pin(draw, DW_PINS))


@dataclasses.dataclass(frozen=True)
class StopCase(_Draws):
    P: int
    D: int
    E: int
    idx_shape: Tuple[int, ...]
    distinct: int  # different positions in idx (≤ P): the rest repeat
    idx_dtype: torch.dtype
    idx_layout: str
    pos_layout: str
    weight_layout: str
    bias_layout: Optional[str]  # None: no bias
    grad_layout: str

    @property
    def rows(self) -> int:
        return int(torch.Size(self.idx_shape).numel())

    def specs(self) -> dict:
        return {"pos_embed": ((self.P, self.D), self.pos_layout), "weight": ((self.D, self.E), self.weight_layout),
                "bias": ((self.D,), self.bias_layout)}


@st.composite
def stop_cases(draw) -> StopCase:
    P = draw(st.integers(1, 64))
    # batch rank 0-2 (idx of rank 1-3), M ≤ 40 tokens: at most 9·40 = 360 rows
    idx_shape = tuple(draw(st.lists(st.integers(1, 3), max_size=2))) + (draw(st.integers(1, 40)),)
    return StopCase(P=P, D=draw(st.integers(1, 96)), E=draw(st.integers(1, 96)), idx_shape=idx_shape,
                    distinct=draw(st.integers(1, P)), idx_dtype=draw(index_dtypes), idx_layout=draw(layouts),
                    pos_layout=draw(layouts), weight_layout=draw(layouts),
                    bias_layout=draw(optional_layouts), grad_layout=draw(layouts), **_draws(draw))


def stop_problem(case: StopCase, device):
    """(float32 buffers of ψ, W, b; idx; output gradient g) of a case, all fresh random values."""
    rng = torch.Generator().manual_seed(case.data_seed)
    bases = bases_of(rng, case.specs())
    idx = positions(rng, case.idx_shape, case.idx_layout, case.P, case.distinct, case.idx_dtype).to(device)
    out_shape = case.idx_shape + (case.D,)
    go = laid_out(torch.randn(base_shape(out_shape, case.grad_layout), generator=rng), out_shape,
                  case.grad_layout).to(device)
    return bases, idx, go


def run_stop_triton(case: StopCase, bases: dict, idx, go, device):
    """The Triton op on float32 leaves laid out as the case says: (output, name → gradient)."""
    inputs = leaves(bases, lambda t: t, device)
    v = views_of(inputs, case.specs())
    with _pinned(case), NanEmpty():
        out = stop_embed(v["pos_embed"], idx, v["weight"], v["bias"], noise_std=case.noise_std,
                         generator=gen(case.gen_seed), backend="triton")
    with _pinned(case):
        return out, grads_of(out, inputs, go)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60)
@given(case=stop_cases())
def test_stop_embed_forward_and_backward_match_the_float64_twin(device, case):
    """Given the noise n = philox_normal(seed, R, E, σ) of the seed the call draws (R = idx.numel(), rows row-major
    over idx), the float32 kernels compute ``out = ψ[idx] + n·Wᵀ + b``, ``dψ = scatter-add of g by idx``,
    ``dW = gᵀ·n``, ``db = Σ_r g[r]`` of :func:`reference.stop_embed` (float64, same noise), within the module's
    element-wise bound; the op's float64 reference backend is that twin bit for bit."""
    bases, idx, go = stop_problem(case, device)
    out, got = run_stop_triton(case, bases, idx, go, device)
    assert out.shape == idx.shape + (case.D,) and out.dtype == torch.float32

    n = philox_normal(seed_of(case.gen_seed), case.rows, case.E, case.noise_std).to(device)
    n = n.reshape(idx.shape + (case.E,))

    def twin(convert, noise, g):
        inputs = leaves(bases, convert, device)
        v = views_of(inputs, case.specs())
        ref = reference.stop_embed(v["pos_embed"], idx, v["weight"], v["bias"], noise)
        return ref, grads_of(ref, inputs, g)

    want, want_grads = twin(as_float64, n, go.double())
    # the magnitudes: the same sums over |ψ|, |W|, |b|, |g| and |n| + σ (the noise's own error, 1e-5·(σ + |n|))
    mag, mag_grads = twin(magnitude, n.abs() + case.noise_std, go.double().abs())
    # the longest float32 sum: an output's E products (+ b, ψ), or a dW / db / dψ entry's R rows
    K = case.E + case.rows
    assert_within("out", out, want, mag, K)
    for name in want_grads:
        assert got[name].dtype == torch.float32, name  # in the parameter's own dtype
        assert_within(f"d{name}", got[name], want_grads[name], mag_grads[name], K)

    # (on float64 leaves as the twin's: ATen's matmul folds a non-contiguous batch of rows differently when an operand
    # requires grad, so the same sum in another order would differ in the last bit)
    v64 = views_of(leaves(bases, as_float64, device), case.specs())
    ref_backend = stop_embed(v64["pos_embed"], idx, v64["weight"], v64["bias"], noise_std=case.noise_std,
                             generator=gen(case.gen_seed), backend="reference")
    assert torch.equal(ref_backend, want.detach())


# ----------------------------------------------------------------------------------------------
# assemble_predictor_input
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AssemblyCase(_Draws):
    mode: str
    npred: int
    B: int
    Nc: int
    Nt: int
    E: int
    D: int
    P: int
    distinct: int
    idx_dtype: torch.dtype
    ctx_idx_layout: str
    tgt_layout: str
    tgt_as_list: bool  # the official layout: npred tensors [B, Nt]; else one [npred, B, Nt]
    ctx_layout: str
    weight_layout: str
    bias_layout: Optional[str]
    pos_layout: str
    mask_shape: Optional[Tuple[int, ...]]  # None: no mask token ([D] or the official [1, 1, D])
    mask_layout: str
    grad_layout: str
    pos_pin: Optional[int]

    @property
    def masked_rows(self) -> int:
        return self.npred * self.B * self.Nt

    @property
    def out_shape(self) -> Tuple[int, int, int]:
        return self.npred * self.B, self.Nc + self.Nt, self.D

    def specs(self) -> dict:
        return {"ctx": ((self.B, self.Nc, self.E), self.ctx_layout), "weight": ((self.D, self.E), self.weight_layout),
                "bias": ((self.D,), self.bias_layout), "pos_embed": ((self.P, self.D), self.pos_layout),
                "mask_token": (self.mask_shape, None if self.mask_shape is None else self.mask_layout)}


@st.composite
def assembly_cases(draw, mode: str) -> AssemblyCase:
    P, D = draw(st.integers(1, 64)), draw(st.integers(1, 96))
    # mode "none" needs the mask token; the StoP modes take one or not (and ignore it)
    mask = st.sampled_from([(D,), (1, 1, D)])
    return AssemblyCase(
        # (npred 4 first: hypothesis favours the first choice, and integers(1, 4) gave npred = 4 in 2 of 75 draws)
        mode=mode, npred=draw(st.sampled_from((4, 1, 3, 2))), B=draw(st.integers(1, 3)), Nc=draw(st.integers(0, 10)),
        Nt=draw(st.integers(0, 10)), E=draw(st.integers(1, 96)), D=D, P=P, distinct=draw(st.integers(1, P)),
        idx_dtype=draw(index_dtypes), ctx_idx_layout=draw(layouts), tgt_layout=draw(layouts),
        tgt_as_list=draw(st.booleans()), ctx_layout=draw(layouts), weight_layout=draw(layouts),
        bias_layout=draw(optional_layouts), pos_layout=draw(layouts),
        mask_shape=draw(mask) if mode == "none" or not draw(st.booleans()) else None,
        mask_layout=draw(st.sampled_from(("contiguous", "strided", "expanded"))), grad_layout=draw(layouts),
        **_draws(draw), pos_pin=_pin(draw, POS_PINS))


def assembly_problem(case: AssemblyCase, device):
    """(float32 buffers of ctx, W, b, ψ, m; ctx_idx; tgt_idx as the case lays it out; output gradient g)."""
    rng = torch.Generator().manual_seed(case.data_seed)
    bases = bases_of(rng, case.specs())
    ctx_idx = positions(rng, (case.B, case.Nc), case.ctx_idx_layout, case.P, case.distinct, case.idx_dtype)
    tgt = positions(rng, (case.npred, case.B, case.Nt), case.tgt_layout, case.P, case.distinct,
                    case.idx_dtype).to(device)
    go = laid_out(torch.randn(base_shape(case.out_shape, case.grad_layout), generator=rng), case.out_shape,
                  case.grad_layout).to(device)
    return bases, ctx_idx.to(device), list(tgt.unbind(0)) if case.tgt_as_list else tgt, go


def assembly_args(case: AssemblyCase, inputs: dict, ctx_idx, tgt):
    """The 7-tuple of test_predictor_input's ``run`` (ctx, ctx_idx, tgt, W, b, ψ, m) of the case's views."""
    v = views_of(inputs, case.specs())
    return v["ctx"], ctx_idx, tgt, v["weight"], v["bias"], v["pos_embed"], v["mask_token"]


def run_assembly_triton(case: AssemblyCase, bases: dict, ctx_idx, tgt, go, device):
    inputs = leaves(bases, lambda t: t, device)
    args = assembly_args(case, inputs, ctx_idx, tgt)
    with _pinned(case), NanEmpty():
        out = run(args, "triton", case.mode, s=case.gen_seed, sigma=case.noise_std)
    with _pinned(case):
        return out, grads_of(out, inputs, go)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)  # (each mode its own examples: a drawn mode came out skewed)
@settings(max_examples=25)
@given(data=st.data())
def test_predictor_input_forward_and_backward_match_the_float64_twin(device, mode, data):
    """Given the noise of the call's seed (``n = philox_normal(seed, npred·B·Nt, E or D, σ)``, rows row-major over
    ``[npred, B, Nt]``), the float32 kernels compute :func:`reference.assemble_predictor_input` (float64, same
    noise): rows ``k·B + β`` = [ctx[β]·Wᵀ + b + ψ[ctx_idx[β]] ; masked rows of block k] and the gradients of ctx
    (``Σ_k g_ctx,k·W``), W (``Σ_k g_ctx,kᵀ·ctx + g_maskedᵀ·n`` learned), b, ψ (scatter-add over both row kinds) and
    the mask token (``Σ g_masked``, mode "none"), within the module's element-wise bound; the op's float64 reference
    backend is that twin bit for bit."""
    case = data.draw(assembly_cases(mode), label="case")
    bases, ctx_idx, tgt, go = assembly_problem(case, device)
    out, got = run_assembly_triton(case, bases, ctx_idx, tgt, go, device)
    assert out.shape == case.out_shape and out.dtype == torch.float32

    if case.mode == "none":
        n = None
    else:
        width = case.E if case.mode == "learned" else case.D
        n = philox_normal(seed_of(case.gen_seed), case.masked_rows, width, case.noise_std).to(device)
        n = n.reshape(case.npred, case.B, case.Nt, width)

    def twin(convert, noise, g):
        inputs = leaves(bases, convert, device)
        ctx, ci, tg, w, b, pos, mask = assembly_args(case, inputs, ctx_idx, tgt)
        ref = reference.assemble_predictor_input(ctx, ci, tg, w, b, pos, noise_mode=case.mode,
                                                 noise_std=case.noise_std, mask_token=mask, noise=noise)
        return ref, grads_of(ref, inputs, g)

    want, want_grads = twin(as_float64, n, go.double())
    mag, mag_grads = twin(magnitude, None if n is None else n.abs() + case.noise_std, go.double().abs())
    # the longest float32 sum: a row's E products (+ b, ψ), dctx's D products after the npred context groups are
    # summed, or a dW / db / dψ entry's rows (all npred·B·(Nc + Nt) of them at most)
    K = case.E + case.D + case.npred * case.B * (case.Nc + case.Nt) + case.npred
    assert_within("out", out, want, mag, K)
    for name in want_grads:
        if got[name] is not None:
            assert got[name].dtype == torch.float32, name
        assert_within(f"d{name}", got[name], want_grads[name], mag_grads[name], K)

    args64 = assembly_args(case, leaves(bases, as_float64, device), ctx_idx, tgt)  # (leaves: as above)
    assert torch.equal(run(args64, "reference", case.mode, s=case.gen_seed, sigma=case.noise_std), want.detach())


# ----------------------------------------------------------------------------------------------
# determinism: the noise depends on the generator state only
# ----------------------------------------------------------------------------------------------
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def eps_of(dtype) -> float:
    """The operands' rounding the kernels add in ``dtype`` (the noise is rounded to W's dtype before the products:
    one ulp, ≤ eps·|n|, covers round-to-nearest and the interpreter's coarser bf16 conversion); none in float32."""
    return 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps


@st.composite
def determinism_cases(draw):
    P = draw(st.integers(1, 64))
    idx_shape = tuple(draw(st.lists(st.integers(1, 3), max_size=2))) + (draw(st.integers(1, 40)),)
    calls = draw(st.lists(st.tuples(st.integers(1, 96), st.sampled_from(KERNEL_DTYPES), st.booleans()),
                          min_size=2, max_size=2))  # (D, W's dtype, with a bias)
    return dict(P=P, E=draw(st.integers(1, 96)), idx_shape=idx_shape, calls=calls, data_seed=draw(seeds),
                gen_seed=draw(seeds))


def explained_by_noise(name, y, n, sigma, w, mag_rest, eps):
    """``y = n·Wᵀ`` (y ``[..., D]``, n ``[R, E]`` float64 of std σ, W in its dtype) within the module's bound, with
    mag = (|n| + σ)·|W|ᵀ + ``mag_rest``, the magnitudes of what was subtracted from the output to get y."""
    E = n.shape[1]
    w64 = w.double()
    want = (n @ w64.T).reshape(y.shape)
    mag = ((n.abs() + sigma) @ w64.abs().T).reshape(y.shape) + mag_rest
    # (n recovered from a float32 output has the rounding of ψ + n in it, 2⁻²⁴·|ψ + n| ≤ 1e-5·σ per element for
    # |ψ| < 50: the bound's noise term, which the kernels' own noise does not need here, both calls sharing it)
    assert_within(name, y, want, mag, E, eps)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=20)
@given(case=determinism_cases())
def test_stop_embed_noise_is_a_function_of_the_generator_state_only(device, case):
    """Same generator state ⇒ same noise, whatever W, D and W's dtype: with n recovered from a call with E = D,
    W = I (``recover_noise``), each call from that state has ``out − ψ[idx] − b = n·Wᵀ`` (so two calls differing
    only in W differ by n·(W₁ − W₂)ᵀ), and repeating it gives the same bits; the call draws one seed from the
    generator (σ > 0), none at σ = 0 (the generator is left as it was)."""
    P, E, shape = case["P"], case["E"], case["idx_shape"]
    s = case["gen_seed"]
    n = recover_noise(device, P, E, shape, s)  # [R, E] float64, σ = SIGMA_REC
    rng = torch.Generator().manual_seed(case["data_seed"])
    idx = torch.randint(0, P, shape, generator=rng).to(device)  # (the noise rows do not depend on idx's values)
    for D, dtype, with_bias in case["calls"]:
        pos = torch.randn(P, D, generator=rng).to(device)
        w = torch.randn(D, E, generator=rng).to(device, dtype)
        b = torch.randn(D, generator=rng).to(device, dtype) if with_bias else None
        g = gen(s)
        with NanEmpty():
            out = stop_embed(pos, idx, w, b, noise_std=SIGMA_REC, generator=g, backend="triton")
        assert out.dtype == torch.float32  # promote(W's dtype, ψ's float32)
        after_one = gen(s)
        draw_seed(after_one)
        assert torch.equal(g.get_state(), after_one.get_state())  # one seed drawn
        b64 = b.double() if b is not None else torch.zeros(D, dtype=torch.float64, device=device)
        y = out.double() - pos.double()[idx] - b64
        rest = pos.double().abs()[idx] + b64.abs()
        explained_by_noise(f"D={D} {dtype}", y, n, SIGMA_REC, w, rest, eps_of(dtype))
        assert torch.equal(stop_embed(pos, idx, w, b, noise_std=SIGMA_REC, generator=gen(s), backend="triton"), out)
        # σ = 0: ψ[idx] + b, and the generator untouched
        g0 = gen(s)
        zero = stop_embed(pos, idx, w, b, noise_std=0.0, generator=g0, backend="triton")
        assert torch.equal(g0.get_state(), gen(s).get_state())
        explained_by_noise(f"D={D} {dtype} σ=0", zero.double() - pos.double()[idx] - b64, torch.zeros_like(n), 0.0,
                           w, rest, eps_of(dtype))


@st.composite
def assembly_determinism_cases(draw):
    P = draw(st.integers(1, 64))
    return dict(P=P, npred=draw(st.integers(1, 4)), B=draw(st.integers(1, 3)), Nc=draw(st.integers(0, 10)),
                Nt=draw(st.integers(1, 10)), E=draw(st.integers(1, 96)), E2=draw(st.integers(1, 96)),
                D=draw(st.integers(1, 96)), D2=draw(st.integers(1, 96)),
                dtypes=draw(st.lists(st.sampled_from(KERNEL_DTYPES), min_size=2, max_size=2)),
                data_seed=draw(seeds), gen_seed=draw(seeds))


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=15)
@given(case=assembly_determinism_cases())
def test_predictor_input_noise_is_a_function_of_the_generator_state_only(device, case):
    """From one generator state: the learned rows are ``ψ[tgt] + n·Wᵀ + b`` with the n of stop_embed (rows over
    ``[npred, B, Nt]``) for any D and W's dtype; the isotropic rows ``ψ[tgt] + n_D`` are the same bits whatever ctx,
    W, b and E; the context rows are the same bits from any generator state; mode "none" and σ = 0 draw no seed (the
    generator is left as it was), and the output of mode "none" does not depend on the generator."""
    c = case
    s = c["gen_seed"]
    rng = torch.Generator().manual_seed(c["data_seed"])
    tgt = torch.randint(0, c["P"], (c["npred"], c["B"], c["Nt"]), generator=rng).to(device)
    ctx_idx = torch.randint(0, c["P"], (c["B"], c["Nc"]), generator=rng).to(device)

    def inputs(E, D, dtype, pos=None):
        ctx = torch.randn(c["B"], c["Nc"], E, generator=rng).to(device, dtype)
        w = torch.randn(D, E, generator=rng).to(device, dtype)
        b = torch.randn(D, generator=rng).to(device, dtype)
        pos = torch.randn(c["P"], D, generator=rng).to(device) if pos is None else pos
        return ctx, ctx_idx, tgt, w, b, pos, torch.randn(D, generator=rng).to(device, dtype)

    n = recover_noise(device, c["P"], c["E"], tuple(tgt.shape), s)  # the learned noise rows [npred·B·Nt, E]
    Nc = c["Nc"]
    for D, dtype in zip((c["D"], c["D2"]), c["dtypes"]):
        args = inputs(c["E"], D, dtype)
        _, _, _, w, b, pos, _ = args
        out = run(args, "triton", "learned", s=s, sigma=SIGMA_REC).view(c["npred"], c["B"], Nc + c["Nt"], D)
        y = out[:, :, Nc:].double() - pos.double()[tgt] - b.double()
        explained_by_noise(f"learned D={D} {dtype}", y, n, SIGMA_REC, w, pos.double().abs()[tgt] + b.double().abs(),
                           eps_of(dtype))
        other = run(args, "triton", "learned", s=s + 1, sigma=SIGMA_REC).view(out.shape)
        assert torch.equal(other[:, :, :Nc], out[:, :, :Nc])
    # isotropic: one ψ (width D), two projections of other widths E and dtypes
    pos = torch.randn(c["P"], c["D"], generator=rng).to(device)
    iso = [run(inputs(E, c["D"], dtype, pos=pos), "triton", "isotropic", s=s, sigma=SIGMA_REC)
           for E, dtype in zip((c["E"], c["E2"]), c["dtypes"])]
    assert torch.equal(iso[0][:, Nc:], iso[1][:, Nc:])
    # none: no seed drawn, the same output from any generator state
    args = inputs(c["E"], c["D"], c["dtypes"][0])
    g = gen(s + 1)
    none = run(args, "triton", "none", s=s)
    assert torch.equal(none, assemble_predictor_input(*args[:6], noise_mode="none", mask_token=args[6],
                                                      generator=g, backend="triton"))
    assert torch.equal(g.get_state(), gen(s + 1).get_state())
    for mode in ("learned", "isotropic"):  # σ = 0: zero noise, no seed drawn
        g = gen(s)
        assemble_predictor_input(*args[:6], noise_mode=mode, noise_std=0.0, generator=g, backend="triton")
        assert torch.equal(g.get_state(), gen(s).get_state())


# ----------------------------------------------------------------------------------------------
# the eager path and the custom op agree
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=10)
@given(case=stop_cases())
def test_stop_embed_eager_path_equals_the_custom_op(device, case):
    """The eager autograd.Function and the torch.library custom op (what tracing gets) give the same output and
    gradients bit for bit (dψ on CUDA: ``assert_same_results``), for any drawn problem."""
    bases, idx, go = stop_problem(case, device)

    def call():
        out, grads = run_stop_triton(case, bases, idx, go, device)
        return out, tuple(grads.values())
    (o1, g1), (o2, g2) = on_both_paths(call)
    assert_same_results((o1, *g1), (o2, *g2), ("out",) + tuple(bases))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=5)
@given(data=st.data())
def test_predictor_input_eager_path_equals_the_custom_op(device, mode, data):
    """As above, for assemble_predictor_input in every noise mode."""
    case = data.draw(assembly_cases(mode), label="case")
    bases, ctx_idx, tgt, go = assembly_problem(case, device)

    def call():
        out, grads = run_assembly_triton(case, bases, ctx_idx, tgt, go, device)
        return out, tuple(grads.values())
    (o1, g1), (o2, g2) = on_both_paths(call)
    assert_same_results((o1, *g1), (o2, *g2), ("out",) + tuple(bases))


# ----------------------------------------------------------------------------------------------
# bad arguments are named
# ----------------------------------------------------------------------------------------------
# (max_value -5e-324, the largest negative float: hypothesis counts -0.0 below 0.0, and σ = -0.0 is a valid 0)
BAD_FLOATS = st.one_of(st.floats(max_value=-5e-324), st.sampled_from((float("nan"), float("inf"))))
NOT_NUMBERS = st.sampled_from((None, "0.25", True, [0.25]))
NON_INDEX_DTYPES = st.sampled_from((torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int16,
                                    torch.uint8, torch.bool))


def _other_than(draw, *taken, hi=96):
    """A width in [1, hi] that is none of ``taken``."""
    return draw(st.integers(1, hi).filter(lambda v: v not in taken))


def _out_of_range(draw, t: torch.Tensor, P: int) -> torch.Tensor:
    """A copy of the index tensor ``t`` with one element (drawn) set to a value drawn outside [0, P)."""
    bad = t.clone()
    flat = bad.view(-1)
    flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.one_of(st.integers(P, P + 10 ** 6),
                                                                  st.integers(-10 ** 6, -1)))
    return bad


@st.composite
def bad_stop_calls(draw):
    """(arguments of a valid call, the same with one defect, the exception, the argument its message names)."""
    P, D, E, M = draw(st.integers(1, 20)), draw(st.integers(1, 24)), draw(st.integers(1, 24)), draw(st.integers(1, 6))
    rng = torch.Generator().manual_seed(draw(seeds))
    good = dict(pos_embed=torch.randn(P, D, generator=rng), idx=torch.randint(0, P, (2, M), generator=rng),
                weight=torch.randn(D, E, generator=rng),
                bias=torch.randn(D, generator=rng) if draw(st.booleans()) else None,
                noise_std=draw(noise_stds), generator=gen(draw(seeds)), backend=draw(st.sampled_from(("triton",
                                                                                                    "reference"))))
    defect = draw(st.sampled_from(("idx-range", "idx-dtype", "idx-rank", "noise_std-value", "noise_std-type",
                                   "pos_embed-width", "pos_embed-rank", "weight-transposed", "weight-rank",
                                   "weight-dtype", "bias-width", "generator")))
    name = defect.split("-")[0]
    change, exc = {}, ValueError
    if defect == "idx-range":
        change = dict(idx=_out_of_range(draw, good["idx"], P))
    elif defect == "idx-dtype":
        change, exc = dict(idx=good["idx"].to(draw(NON_INDEX_DTYPES))), TypeError
    elif defect == "idx-rank":  # a 0-d index (positions are [..., M])
        change = dict(idx=good["idx"][0, 0])
    elif defect == "noise_std-value":
        change = dict(noise_std=draw(BAD_FLOATS))
    elif defect == "noise_std-type":
        change, exc = dict(noise_std=draw(NOT_NUMBERS)), TypeError
    elif defect == "pos_embed-width":
        # (a width equal to E without a bias would make W look transposed: the check then names weight, by design)
        change = dict(pos_embed=torch.randn(P, _other_than(draw, D, E), generator=rng))
    elif defect == "pos_embed-rank":  # [1, P, D] (the official parameter) or [P·D]
        change = dict(pos_embed=draw(st.sampled_from((good["pos_embed"][None], good["pos_embed"].reshape(-1)))))
    elif defect == "weight-transposed":  # [E, D]: proj.weight.t() by mistake
        if E == D:
            E = _other_than(draw, D, hi=24)
            good["weight"] = torch.randn(D, E, generator=rng)
        change = dict(weight=good["weight"].t())
    elif defect == "weight-rank":
        change = dict(weight=draw(st.sampled_from((good["weight"][0], good["weight"][None]))))
    elif defect == "weight-dtype":
        change, exc = dict(weight=good["weight"].to(draw(st.sampled_from((torch.int32, torch.int64))))), TypeError
    elif defect == "bias-width":
        change = dict(bias=torch.randn(_other_than(draw, D), generator=rng))
    else:
        change, exc = dict(generator=draw(st.sampled_from((3, "seed", torch.tensor(3))))), TypeError
    return good, {**good, **change}, exc, name


@settings(max_examples=200)
@given(call=bad_stop_calls())
def test_stop_embed_bad_arguments_are_named(call):
    """One defect per call (an index outside [0, P) or of another dtype or rank, σ < 0, NaN, ∞ or not a number, ψ,
    W or b of a shape that does not fit, a generator that is not one): ValueError / TypeError whose message starts
    with the argument's name, on either backend; the same call without the defect runs."""
    good, bad, exc, name = call
    with pytest.raises(exc, match=rf"^{name}:"):
        stop_embed(bad.pop("pos_embed"), bad.pop("idx"), bad.pop("weight"), bad.pop("bias"), **bad)
    good = dict(good, backend="reference")  # (the valid call on the reference path: no kernel to wait for)
    out = stop_embed(good.pop("pos_embed"), good.pop("idx"), good.pop("weight"), good.pop("bias"), **good)
    assert torch.isfinite(out).all()


@st.composite
def bad_assembly_calls(draw):
    """(arguments of a valid call, the same with one defect, the exception, the argument its message names)."""
    npred, B = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    Nc, Nt = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    P, D, E = draw(st.integers(1, 20)), draw(st.integers(1, 24)), draw(st.integers(1, 24))
    mode = draw(st.sampled_from(MODES))
    rng = torch.Generator().manual_seed(draw(seeds))
    tgt = torch.randint(0, P, (npred, B, Nt), generator=rng)
    good = dict(ctx=torch.randn(B, Nc, E, generator=rng), ctx_idx=torch.randint(0, P, (B, Nc), generator=rng),
                tgt_idx=list(tgt.unbind(0)) if draw(st.booleans()) else tgt, weight=torch.randn(D, E, generator=rng),
                bias=torch.randn(D, generator=rng) if draw(st.booleans()) else None,
                pos_embed=torch.randn(P, D, generator=rng), noise_mode=mode, noise_std=draw(noise_stds),
                mask_token=torch.randn(1, 1, D, generator=rng) if mode == "none" or draw(st.booleans()) else None,
                generator=gen(draw(seeds)), backend=draw(st.sampled_from(("triton", "reference"))))
    defect = draw(st.sampled_from(("ctx_idx-range", "ctx_idx-dtype", "ctx_idx-shape", "tgt_idx-range",
                                   "tgt_idx-dtype", "tgt_idx-batch", "tgt_idx-blocks", "noise_std-value",
                                   "noise_std-type", "noise_mode-value", "mask_token-missing", "mask_token-width",
                                   "weight-width", "pos_embed-width", "bias-width", "ctx-rank", "ctx-dtype",
                                   "generator")))
    name = defect.split("-")[0]
    stacked = isinstance(good["tgt_idx"], torch.Tensor)
    change, exc = {}, ValueError
    if defect == "ctx_idx-range":
        change = dict(ctx_idx=_out_of_range(draw, good["ctx_idx"], P))
    elif defect == "ctx_idx-dtype":
        change, exc = dict(ctx_idx=good["ctx_idx"].to(draw(NON_INDEX_DTYPES))), TypeError
    elif defect == "ctx_idx-shape":  # not [B, Nc]: a token more or less, or another batch
        shape = draw(st.sampled_from(((B, Nc + 1), (B, Nc - 1), (B + 1, Nc), (B * Nc,))))
        change = dict(ctx_idx=torch.randint(0, P, shape, generator=rng))
    elif defect == "tgt_idx-range":
        bad = _out_of_range(draw, tgt, P)
        change = dict(tgt_idx=bad if stacked else list(bad.unbind(0)))
    elif defect == "tgt_idx-dtype":
        dtype = draw(NON_INDEX_DTYPES)
        change, exc = dict(tgt_idx=tgt.to(dtype) if stacked else [t.to(dtype) for t in tgt]), TypeError
    elif defect == "tgt_idx-batch":  # [npred, B', Nt] with B' ≠ B
        bad = torch.randint(0, P, (npred, _other_than(draw, B, hi=4), Nt), generator=rng)
        change = dict(tgt_idx=bad if stacked else list(bad.unbind(0)))
    elif defect == "tgt_idx-blocks":  # a list whose blocks differ in length (or an empty list)
        blocks = list(tgt.unbind(0)) + [torch.randint(0, P, (B, _other_than(draw, Nt, hi=6)), generator=rng)]
        change = dict(tgt_idx=draw(st.sampled_from((blocks, []))))
        exc = ValueError if change["tgt_idx"] else TypeError
    elif defect == "noise_std-value":
        change = dict(noise_std=draw(BAD_FLOATS))
    elif defect == "noise_std-type":
        change, exc = dict(noise_std=draw(NOT_NUMBERS)), TypeError
    elif defect == "noise_mode-value":
        change = dict(noise_mode=draw(st.sampled_from(("gaussian", "Learned", "", None))))
    elif defect == "mask_token-missing":
        change = dict(noise_mode="none", mask_token=None)
    elif defect == "mask_token-width":
        change = dict(mask_token=torch.randn(_other_than(draw, D), generator=rng))
    elif defect == "weight-width":  # [D, E'] with E' ≠ ctx's E
        change = dict(weight=torch.randn(D, _other_than(draw, E), generator=rng))
    elif defect == "pos_embed-width":
        change = dict(pos_embed=torch.randn(P, _other_than(draw, D), generator=rng))
    elif defect == "bias-width":
        change = dict(bias=torch.randn(_other_than(draw, D), generator=rng))
    elif defect == "ctx-rank":
        change = dict(ctx=good["ctx"][0])
    elif defect == "ctx-dtype":  # W is float32 (no autocast): the context projection needs ctx in W's dtype
        change, exc = dict(ctx=good["ctx"].to(draw(st.sampled_from((torch.float64, torch.bfloat16))))), TypeError
    else:
        change, exc = dict(generator=draw(st.sampled_from((3, "seed", torch.tensor(3))))), TypeError
    return good, {**good, **change}, exc, name


POSITIONAL = ("ctx", "ctx_idx", "tgt_idx", "weight", "bias", "pos_embed")  # assemble_predictor_input's


@settings(max_examples=200)
@given(call=bad_assembly_calls())
def test_predictor_input_bad_arguments_are_named(call):
    """One defect per call (indices outside [0, P) or of another dtype, ctx_idx / tgt_idx / W / ψ / b / m / ctx of a
    shape or dtype that does not fit, σ < 0, NaN, ∞ or not a number, an unknown noise mode, mode "none" without its
    mask token, a generator that is not one): ValueError / TypeError whose message starts with the argument's name
    (``tgt_idx[i]`` for one block of the list), on either backend; the same call without the defect runs."""
    good, bad, exc, name = call
    with pytest.raises(exc, match=rf"^{name}(\[\d+\])?:"):
        assemble_predictor_input(*[bad.pop(k) for k in POSITIONAL], **bad)
    good = dict(good, backend="reference")  # (the valid call on the reference path: no kernel to wait for)
    out = assemble_predictor_input(*[good.pop(k) for k in POSITIONAL], **good)
    assert torch.isfinite(out).all()
