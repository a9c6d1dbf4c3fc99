"""Property-based tests (hypothesis) of the Triton flash attention, ``stop_kernels.attention`` (and the
dispatcher around it): shapes, dtypes, strides, packed sequences, scales, kernel configs and bad arguments drawn
at random instead of listed. tests/test_attention.py holds the example-based tests, the tolerances and the
helpers used here (imported, not copied).

Properties (per sequence and head, ``A(q, k, v) = softmax(s · q kᵀ) v``, ``s`` default ``Dh ** -0.5``):

* float64: ``A`` and its dq, dk, dv equal the float64 reference computed from the same rounded inputs, for
  float16 / bfloat16 / float32, within test_attention.py's stated tolerances: elementwise (``TOL``)
  ``|x − ref| <= atol + rtol·|ref|``, forward atol = rtol = 1.5e-3 (fp16), 1e-2 (bf16), 1e-4 (fp32),
  gradients atol = 1e-2 / 4e-2 / 1e-4 times max|ref| and rtol the same numbers; norm-wise (``GRAD_REL_FRO``)
  ``||g − ref||_F <= r·||ref||_F`` per head-dim chunk, r = 2e-3 / 2.5e-2 / 2e-6, for dv always and for dq, dk
  where every sequence has at least ``N_FRO`` = 5 keys (below that they are ill-conditioned: see N_FRO). Also
  with the kernels' other forward configs and every backward variant forced, batched or packed.
* strides: ``A`` of strided views (the slots of one fused ``[B, N, 3, H, Dh]`` buffer, permuted storage,
  padded or skipped heads, overlapping rows, a batch, token or head broadcast with stride 0, a last-dim stride
  of 2), for a strided dO, equals ``A`` of contiguous copies bit for bit, output and gradients, batched or
  packed, on the eager path, on the custom op and without gradients; ``attention_qkv`` on the fused buffer too.
* varlen: packed sequences ``[T, H, Dh]`` with ``cu_seqlens`` (zero to four sequences of 0 … 40 tokens, int32
  or int64, max_seqlen omitted, the longest, more, or past 256) equal the float64 block-diagonal reference;
  each sequence's rows equal that sequence packed alone bit for bit (same max_seqlen, so the same launch
  config), and its batched run within ``TOL``.
* scale: ``scale=None`` is ``scale=Dh ** -0.5`` bit for bit; an explicit positive scale (float or numpy) matches
  the float64 reference with that scale (everything while the scores stay a few units in size; beyond, up to
  100, o and dv, dq and dk being ill-conditioned there: see ``C_FULL``).
* invariances: ``A(q, k[π], v[π]) = A(q, k, v)`` for a permutation π of the keys (dq unchanged, dk and dv
  permuted by π); ``A(q[π], k, v) = A(q, k, v)[π]`` (dq permuted, dk and dv unchanged); up to rounding (the
  dtype's ``TOL``: the sums over keys or queries run in another order), with the default config and with the
  forward over 16-key blocks.
* bad arguments: each is refused with ``ValueError`` / ``TypeError`` whose message starts with the argument's
  name, by :func:`attention` and by :func:`dispatch_attention` on every backend; or, where the contract
  documents a fallback (float64 inputs, an unsupported head dim, a scale the kernels do not take), the
  dispatcher's "auto" (with the interpreter's Triton branch live), "sdpa" and "reference" backends return the
  float64 reference's answer. Never a wrong result.

Sizes stay small (B, H <= 3, N <= 70, at most 192 query rows per call) because the kernels run in the Triton
interpreter on CPU; N favours 1 and the lengths just past the interpreter's block sizes (16, 32, 64), head dims
the small ones. Every kernel output is prefilled with NaN (test_attention's autouse ``poison`` fixture), so an
element the kernels never write fails the finiteness check. Inputs are fresh ``randn`` from a seed hypothesis
draws (never zeros). Examples come from the profile in ``conftest.py``: every run tries the same ones (and keeps no example database);
``pytest --hypothesis-show-statistics`` lists the kinds of example each property ran (``event``).
"""
import os
from typing import NamedTuple

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import skip_unless_installed  # noqa: E402

skip_unless_installed("hypothesis", module_level=True)
from hypothesis import event, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402

from _op_paths import assert_same_results, on_both_paths  # noqa: E402
from stop_kernels import reference  # noqa: E402
from stop_kernels.ops import attention as A  # noqa: E402
from test_attention import (BWD_VARIANTS, DEV, TOL, _bwd_cfg, _check, _close, _close_grad,  # noqa: E402
                            _kernels_usable, _qkv, _ref_grads,
                            poison)  # noqa: F401 (poison: autouse, every kernel output prefilled with NaN)

pytestmark = pytest.mark.skipif(
    not _kernels_usable(),
    reason="no CUDA and stop_kernels.ops.attention was imported before TRITON_INTERPRET=1 was set")

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = tuple(range(8, A.MAX_HEAD_DIM + 1, 8))  # the contract: a multiple of 8 in [8, 128]
# head dims: half the draws from the small ones (one head-dim chunk, fast in the interpreter), half from all
# (40, 48, 80, 88, 96 … are two chunks, 128 the widest)
head_dims = st.one_of(st.sampled_from((8, 16, 24, 32)), st.sampled_from(HEAD_DIMS))
# N: half the draws from 1 and the edges of the interpreter's tiles (blocks of 16, 32, 64 rows or keys: one
# past a block is a last block with one live row), half anywhere up to 70
EDGE_NS = (1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 70)
seq_lens = st.one_of(st.sampled_from(EDGE_NS), st.integers(1, 70))
seeds = st.integers(0, 2 ** 31 - 1)
MAX_ROWS = 192  # B·N·H per call: keeps a float32 example (16 x 16 tiles) under a second in the interpreter


class Case(NamedTuple):
    B: int
    N: int
    H: int
    D: int
    dtype: torch.dtype
    seed: int


@st.composite
def cases(draw, dtypes=KERNEL_DTYPES, N=seq_lens):
    """A batched call's sizes (B·N·H <= MAX_ROWS), dtype and input seed."""
    n = draw(N)
    b = draw(st.integers(1, max(1, min(3, MAX_ROWS // n))))
    h = draw(st.integers(1, max(1, min(3, MAX_ROWS // (b * n)))))
    return Case(b, n, h, draw(head_dims), draw(st.sampled_from(dtypes)), draw(seeds))


@st.composite
def offsets(draw, T):
    """cu_seqlens of sequences packed into T rows: ``[0, …, T]``, non-decreasing (empty sequences too)."""
    return [0, *sorted(draw(st.lists(st.integers(0, T), max_size=3))), T]


# The norm-wise gradient bounds (GRAD_REL_FRO) of dq and dk hold where every sequence has at least N_FRO keys; the
# elementwise TOL and dv's norm-wise bound hold for any N. test_attention.py measured them from N = 7 up; with
# fewer keys a row of dS = P∘(dP − δ) (it sums to 0) can be a difference of nearly equal numbers, and δ = Σ dO·O,
# which the kernels take from the stored O (rounded to the output dtype, as flash attention does), is then off by
# a rounding that dominates dS, so dq = s·dS·K and dk = s·dSᵀQ are ill-conditioned (not a kernel error: hypothesis
# found N = 2, Dh 8, bf16 with dk off by 2.66e-2 norm-wise against 2.5e-2, and a float64 computation that
# rounds only δ's O to bfloat16 is off by 2.62e-2). Measured worst error / bound over 120 draws per N (Dh 8 … 32):
# N = 2: 4.1 (bf16), 3.4 (fp16), 1.4 (fp32); N = 3 and 4: 0.87; N >= 5: 0.52 or less.
N_FRO = 5


def _norm_wise(*lengths):
    """The gradients that ``_check`` holds to GRAD_REL_FRO for sequences of these lengths (see N_FRO)."""
    return ("dq", "dk", "dv") if min((n for n in lengths if n > 0), default=N_FRO) >= N_FRO else ("dv",)


def _randn(shape, dtype, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=DEV, dtype=dtype)


def _run(q, k, v, do, **kw):
    """``A(q, k, v)`` and its gradients in q, k, v for the incoming gradient ``do``."""
    o = A.attention(q, k, v, **kw)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


def _leaves(*ts):
    return tuple(t.detach().clone().requires_grad_() for t in ts)


def _close_pair(name, x, y, dtype, grad):
    """Two kernel results that differ only in their summation order agree within the dtype's ``TOL``
    (forward, or gradient with atol relative to max|y|)."""
    fa, fr, ga, gr = TOL[dtype]
    y = y.double()
    if grad:
        _close(name, x, y, ga * max(1.0, y.abs().max().item()), gr)
    else:
        _close(name, x, y, fa, fr)


# ------------------------------------------------------------------------------------------
# against float64
# ------------------------------------------------------------------------------------------
@settings(max_examples=18)
@given(case=cases())
@example(case=Case(1, 1, 1, 8, torch.float16, 0))  # one query and one key: P = 1, dq = dk = 0 exactly
@example(case=Case(2, 17, 3, 24, torch.bfloat16, 1))  # one past a 16-row block (the predictor's head dim)
@example(case=Case(1, 65, 2, 80, torch.float32, 2))  # one past 64, head dim in two chunks (64 + 16)
def test_forward_and_gradients_match_float64(case):
    """For q, k, v the slots of one fused ``[B, N, 3, H, Dh]`` buffer (the models' layout): ``A(q, k, v)``
    and ``∂⟨A, dO⟩/∂(q, k, v)`` for a random dO equal the float64 reference within ``TOL`` (elementwise)
    and ``GRAD_REL_FRO`` (norm-wise per head-dim chunk; dq and dk from N_FRO keys up), every output finite
    (written)."""
    torch.manual_seed(case.seed)  # _qkv and _check draw from the global generator
    q, k, v, _ = _qkv(case.B, case.N, case.H, case.D, case.dtype)
    _check(q, k, v, None, case.dtype, norm_wise=_norm_wise(case.N))


# Forward configs to force (None: the plan's own pick): 16 x 16 tiles, so the online softmax loops over key
# blocks (the model's defaults take every key in one tile up to N = 128 at head dims <= 64), two heads per
# program, and the persistent form (a fixed grid of 4 "SMs" in the interpreter walking the work items).
FWD_LOOP = dict(BLOCK_M=16, BLOCK_N=16, num_warps=2, num_stages=1, HEADS=1)
FWD_CONFIGS = {"default": None, "16-key blocks": FWD_LOOP, "two heads": dict(FWD_LOOP, HEADS=2),
               "persistent": dict(FWD_LOOP, num_stages=2, PERSIST=1)}


@st.composite
def forced_cases(draw):
    """A case, packed or not (``cu``: offsets of its N rows, B = 1), a forward config and a backward variant."""
    case = draw(cases(N=st.one_of(st.sampled_from((1, 17, 33, 65)), st.integers(1, 70))))
    cu = draw(st.one_of(st.none(), offsets(case.N)))
    if cu is not None:
        case = case._replace(B=1)
    return case, cu, draw(st.sampled_from(sorted(FWD_CONFIGS))), draw(st.sampled_from(BWD_VARIANTS))


# (the persistent and key-stationary kernels compute rows or keys past a sequence's end that they never
# store, by design; the interpreter's numpy reports that arithmetic)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                            "ignore:overflow encountered:RuntimeWarning",
                            "ignore:divide by zero encountered:RuntimeWarning")
@settings(max_examples=10)
@given(args=forced_cases())
@example(args=(Case(3, 33, 2, 80, torch.float32, 11), None, "persistent", "persistent"))
@example(args=(Case(1, 40, 3, 40, torch.float16, 12), [0, 17, 17, 18, 40], "two heads", "keys"))
def test_forced_kernel_variants_match_float64(args):
    """Whichever forward config and backward kernel run (forced: the forward over 16-key blocks, with two heads
    per program, or persistent; the backward with one program per (sequence, head) over 16-key blocks, in one
    pass, persistent or key-stationary, or as the dQ + dK/dV pair), ``A`` and its gradients are one function:
    they match the float64 reference (``TOL``, ``GRAD_REL_FRO``), batched or packed."""
    case, cu, fwd, bwd = args
    event(f"fwd {fwd}, bwd {bwd}")
    torch.manual_seed(case.seed)
    q, k, v, _ = _qkv(case.B, case.N, case.H, case.D, case.dtype)
    kw = {}
    if cu is not None:
        q, k, v = (t[0] for t in (q, k, v))
        kw = dict(cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=DEV))
    lens = [case.N] if cu is None else [b - a for a, b in zip(cu[:-1], cu[1:])]
    try:
        with A._force_config(fwd=FWD_CONFIGS[fwd], bwd=_bwd_cfg(bwd, max(max(lens), 1))):
            _check(q, k, v, None, case.dtype, norm_wise=_norm_wise(*lens), **kw)
    except OutOfResources as e:  # CUDA only (the interpreter has no limits): a forced tile this GPU cannot hold
        event(f"does not fit this GPU: {type(e).__name__}")


# ------------------------------------------------------------------------------------------
# strided views
# ------------------------------------------------------------------------------------------
# How one of q, k, v (or dO) is stored, each a [B, N, H, Dh] view with these strides (what it is compared with: a
# contiguous copy):
#   permuted: a contiguous tensor of the dims in another order, permuted back (e.g. [B, H, N, Dh]
#   transposed, the layout of SDPA's inputs); padded_heads: [B, N, H, Dh + 8] cut to Dh (head and token strides
#   not multiples of Dh); every_other_head: [B, N, 2H, Dh][:, :, ::2] (head stride 2·Dh); broadcast_batch /
#   broadcast_tokens / broadcast_heads: one batch element, token or head expanded (stride 0: programs read the
#   same rows); overlapping_rows: token n, head h is row n + h of a [B, N + H - 1, Dh] tensor (token and head
#   stride Dh: the rows overlap); last_stride_2: [..., 2·Dh][..., ::2] (the wrapper copies it to a unit last stride);
#   contiguous (q contiguous and k strided: a launch plan must not be reused for k's other strides).
LAYOUTS = ("permuted", "padded_heads", "every_other_head", "broadcast_batch", "broadcast_tokens",
           "broadcast_heads", "overlapping_rows", "last_stride_2", "contiguous")


def _storage(layout, shape, dtype, gen, perm=(0, 1, 2, 3)):
    """(base, view): a fresh contiguous tensor ``base`` holding one of q, k, v as ``layout`` says, and the
    function that takes the ``[B, N, H, Dh]`` view out of it (applied to a leaf clone of ``base`` per call, so
    the gradient flows through the view)."""
    B, N, H, D = shape
    if layout == "contiguous":
        return _randn(shape, dtype, gen), lambda x: x
    if layout == "permuted":
        inv = [perm.index(i) for i in range(4)]
        return _randn([shape[p] for p in perm], dtype, gen), lambda x: x.permute(*inv)
    if layout == "padded_heads":
        return _randn((B, N, H, D + 8), dtype, gen), lambda x: x[..., :D]
    if layout == "every_other_head":
        return _randn((B, N, 2 * H, D), dtype, gen), lambda x: x[:, :, ::2]
    if layout.startswith("broadcast_"):
        dim = ("batch", "tokens", "heads").index(layout[len("broadcast_"):])
        return _randn(shape[:dim] + (1,) + shape[dim + 1:], dtype, gen), lambda x: x.expand(B, N, H, D)
    if layout == "overlapping_rows":
        return _randn((B, N + H - 1, D), dtype, gen), lambda x: x.as_strided(shape, ((N + H - 1) * D, D, D, 1))
    assert layout == "last_stride_2", layout
    return _randn((B, N, H, 2 * D), dtype, gen), lambda x: x[..., ::2]


# a dim order for "permuted" storage: any but the identity (that one is contiguous), which becomes [B, H, N, Dh]
dim_orders = st.permutations(range(4)).map(lambda p: tuple(p) if list(p) != [0, 1, 2, 3] else (0, 2, 1, 3))


@st.composite
def strided_cases(draw):
    """A case (packed: B = 1, its N rows split into sequences by drawn offsets, run as ``[T, H, Dh]``), a layout
    for each of q, k, v and dO (four different ones: every example mixes several) and their dim orders."""
    case = draw(cases(N=st.one_of(st.sampled_from((1, 17, 33)), st.integers(1, 33))))
    cu = draw(st.one_of(st.none(), offsets(case.N)))
    if cu is not None:
        case = case._replace(B=1)
    return case, cu, tuple(draw(st.permutations(LAYOUTS))[:4]), draw(st.tuples(*[dim_orders] * 4))


# (fused: q, k, v the slots of one QKV buffer, their layouts not drawn; a parameter, so that both kinds run)
@pytest.mark.parametrize("fused", [False, True], ids=["views", "fused"])
@settings(max_examples=2)
@given(args=strided_cases())
@example(args=(Case(3, 9, 2, 40, torch.bfloat16, 4), None,
               ("contiguous", "every_other_head", "permuted", "broadcast_heads"), ((0, 2, 1, 3),) * 4))
@example(args=(Case(2, 20, 2, 16, torch.float16, 5), None,
               ("overlapping_rows", "broadcast_batch", "last_stride_2", "padded_heads"), ((2, 0, 1, 3),) * 4))
@example(args=(Case(1, 20, 2, 16, torch.float16, 6), [0, 3, 3, 20],
               ("permuted", "broadcast_tokens", "contiguous", "every_other_head"), ((2, 0, 1, 3),) * 4))
def test_strided_views_equal_contiguous_copies(fused, args):
    """For q, k, v strided views (``fused``: the slots of one ``[B, N, 3, H, Dh]`` buffer, ``[T, 3, H, Dh]``
    packed; otherwise each stored as its layout says) and a strided incoming gradient dO:
    ``A(q, k, v) = A(q', k', v')`` and the gradients in q, k, v for dO equal those in q', k', v' for dO', bit for
    bit, where ' is a contiguous copy. The strides only say where the kernels read (the launch config depends
    on N or max_seqlen, Dh and the dtype, not on strides): the same values loaded, the same arithmetic. Holds on
    the eager autograd.Function path, on the custom op (what tracing runs) and without gradients (the forward
    launch alone); for a fused buffer, ``attention_qkv(qkv)`` is ``A(*qkv.unbind(-3))`` and its d(qkv) is
    ``stack(dq, dk, dv)``, bit for bit too (the same kernels, writing into one gradient)."""
    case, cu, layouts, perms = args
    event(("batched" if cu is None else "packed") + ("" if fused else ", " + "/".join(layouts[:3])))
    gen = torch.Generator().manual_seed(case.seed)
    shape = (case.B, case.N, case.H, case.D)
    kw = {} if cu is None else {"cu_seqlens": torch.tensor(cu, dtype=torch.int32, device=DEV)}
    if fused:
        bases = (_randn((case.B, case.N, 3, case.H, case.D), case.dtype, gen),)
        views = [lambda x, i=i: x[:, :, i] for i in range(3)]  # = qkv.unbind(2)
    else:
        bases, views = zip(*(_storage(lay, shape, case.dtype, gen, perm)
                             for lay, perm in zip(layouts[:3], perms[:3])))
    do_base, do_view = _storage(layouts[3], shape, case.dtype, gen, perms[3])
    do = do_view(do_base)
    if cu is not None:  # packed: the one batch element's [N, H, Dh] views, as [T, H, Dh]
        views = [lambda x, view=view: view(x)[0] for view in views]
        do = do[0]

    def qkv_views(leaves):
        return tuple(view(leaves[0 if fused else i]) for i, view in enumerate(views))

    def strided():
        return _run(*qkv_views(_leaves(*bases)), do, **kw)

    got, got_op = on_both_paths(strided)
    assert_same_results(got, got_op, ("o", "dq", "dk", "dv"))
    q, k, v = qkv_views(bases)
    want = _run(*_leaves(q.contiguous(), k.contiguous(), v.contiguous()), do.contiguous(), **kw)
    for name, x, y in zip(("o", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(x).all(), f"{name}: non-finite elements (unwritten)"
        assert torch.equal(x, y), f"{name}: strided views and contiguous copies differ, max |Δ| " \
                                  f"{(x.double() - y.double()).abs().max().item():.3e}"
    with torch.no_grad():
        assert torch.equal(A.attention(q, k, v, **kw), got[0]), "o: the no-grad forward differs"
    if fused:
        (buf,) = _leaves(*bases)
        qkv = buf[0] if cu is not None else buf
        o = A.attention_qkv(qkv, **kw)
        (dbuf,) = torch.autograd.grad(o, buf, do)
        dqkv = dbuf[0] if cu is not None else dbuf
        assert torch.equal(o, got[0]), "attention_qkv: o"
        for i, name in enumerate(("dq", "dk", "dv")):
            assert torch.equal(dqkv.select(-3, i), got[1 + i]), f"attention_qkv: {name} slot of d(qkv)"


# ------------------------------------------------------------------------------------------
# packed sequences (varlen)
# ------------------------------------------------------------------------------------------
@st.composite
def packed(draw):
    """Sequence lengths (zero to four, each 0 … 40: empty sequences, one token, block edges), H, Dh, dtype,
    the cu_seqlens dtype, max_seqlen (None, the longest, or more) and the input seed."""
    lens = draw(st.lists(st.one_of(st.sampled_from((0, 1, 16, 17, 33)), st.integers(0, 40)), min_size=0, max_size=4))
    h = draw(st.integers(1, 3 if sum(lens) <= MAX_ROWS // 3 else 2))
    longest = max(lens, default=0)
    # (257: past the fused backward's 256, so the split backward and the forward's key loop run)
    max_seqlen = draw(st.one_of(st.none(), st.just(longest), st.integers(longest, 70), st.just(257)))
    return (lens, h, draw(head_dims), draw(st.sampled_from(KERNEL_DTYPES)),
            draw(st.sampled_from((torch.int32, torch.int64))), max_seqlen, draw(seeds))


@settings(max_examples=7)
@given(args=packed())
@example(args=([5, 0, 1, 17], 2, 24, torch.float16, torch.int32, None, 5))  # an empty and a one-token sequence
@example(args=([33, 2], 1, 80, torch.bfloat16, torch.int64, 65, 6))  # max_seqlen beyond the longest
@example(args=([], 2, 16, torch.float32, torch.int32, None, 7))  # no sequence at all: T = 0, cu_seqlens = [0]
@example(args=([0, 0], 1, 8, torch.float16, torch.int32, 0, 8))  # only empty sequences
def test_packed_sequences_match_float64_and_each_run_alone(args):
    """q, k, v ``[T, H, Dh]`` holding sequences of lengths n_i at rows ``cu[i]:cu[i+1]``
    (``cu = [0, n_0, n_0 + n_1, …]``): ``A(q, k, v)`` attends within each sequence only,

        A(q, k, v)[cu[i]:cu[i+1]] = A(q[cu[i]:cu[i+1]], k[…], v[…])     (block-diagonal attention),

    so (1) output and gradients equal the float64 block-diagonal reference within ``TOL`` / ``GRAD_REL_FRO``,
    (2) each sequence's rows of the output and of dq, dk, dv equal a packed call holding that sequence alone
    (``cu = [0, n_i]``, the same max_seqlen) bit for bit: the same config and tiles (the launch config depends
    on max_seqlen, not on the other sequences), so nothing may leak between sequences, and (3) they equal the
    batched call ``[1, n_i, H, Dh]`` within ``TOL`` (its config follows n_i: other tiles, other rounding).
    An empty sequence is allowed by the contract (cu_seqlens is non-decreasing) and has no rows; T = 0 is valid
    too."""
    lens, H, D, dtype, cu_dtype, max_seqlen, seed = args
    torch.manual_seed(seed)
    T = sum(lens)
    bounds = [0]
    for n in lens:
        bounds.append(bounds[-1] + n)
    cu = torch.tensor(bounds, dtype=cu_dtype, device=DEV)
    qkv = torch.randn(T, 3, H, D, device=DEV, dtype=dtype).requires_grad_()
    q, k, v = qkv.unbind(1)
    o = A.attention(q, k, v, cu_seqlens=cu, max_seqlen=max_seqlen)
    assert o.is_contiguous() and o.shape == q.shape and o.dtype == dtype and torch.isfinite(o).all()
    do = torch.randn_like(o)
    got = (o, *torch.autograd.grad(o, (q, k, v), do)) if T > 0 else (o,)
    if T > 0:  # (_check's comparisons, on the gradients kept for the ones below)
        o_ref, *g_ref = _ref_grads(q, k, v, do, cu_seqlens=cu)
        _close("o", o, o_ref, *TOL[dtype][:2])
        for name, g, r in zip(("dq", "dk", "dv"), got[1:], g_ref):
            _close_grad(name, g, r, dtype, norm_wise=name in _norm_wise(*lens))
    ms = max(lens, default=0) if max_seqlen is None else max_seqlen
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        leaves = _leaves(q[a:b], k[a:b], v[a:b])
        alone = torch.tensor([0, b - a], dtype=cu_dtype, device=DEV)
        oi = A.attention(*leaves, cu_seqlens=alone, max_seqlen=ms)
        want = (oi, *torch.autograd.grad(oi, leaves, do[a:b])) if b > a else (oi,)
        for name, x, y in zip(("o", "dq", "dk", "dv"), got, want):
            assert torch.equal(x[a:b], y), f"sequence {i} (rows {a}:{b}) {name}: packed != alone"
        if b > a:  # (a batched call has N >= 1)
            leaves = tuple(t[None] for t in _leaves(q[a:b], k[a:b], v[a:b]))
            batched = _run(*leaves, do[None, a:b])
            for name, x, y in zip(("o", "dq", "dk", "dv"), got, batched):
                _close_pair(f"sequence {i} {name} (packed vs batched alone)", x[a:b], y[0], dtype, grad=name != "o")


# ------------------------------------------------------------------------------------------
# scale
# ------------------------------------------------------------------------------------------
# The scores' size: with unit-variance q and k, s·q·k has standard deviation c = s·sqrt(Dh) (c = 1 at the default
# scale). The stated tolerances hold for c up to a few (measured, interpreter, Dh 16 and 128: the float32 norm-wise
# dq error 1.1e-6 at c = 3 against its 2e-6 bound, 1.6e-6 at c = 6). Two errors grow with c, both from the flash
# algorithm itself (the backward recomputes P instead of storing it), not from a slip in these kernels:
# * the backward recomputes P = exp(s·q·k − lse) from float32 scores and lse of size ~c, whose rounding, ~u·c in
#   the exponent, is a relative error of P, hence of dv (float32: 9e-6 at c = 100, 5e-4 at c = 1e4, 0.1 at 1e6);
# * dq = s·Σ_j P_ij (dP_ij − δ_i) k_j: as P tends to one-hot, dP − δ cancels (δ = Σ dO·O from the stored O, rounded
#   to the output dtype) and s amplifies what is left, while the float64 answer tends to 0 (at c = 100, bfloat16:
#   dq off by 50 % norm-wise; at c = 1e5 overflow to inf, the reference being ~1e-100). Likewise dk.
# So: c <= C_FULL, everything against float64 (TOL, GRAD_REL_FRO); C_FULL < c <= 100, o and dv (TOL) and dq, dk
# finite.
C_FULL = 3.0


@settings(max_examples=5)
@given(case=cases(N=st.integers(1, 40)), c=st.one_of(st.floats(1e-3, C_FULL), st.floats(C_FULL, 100.0)),
       as_numpy=st.booleans())
@example(case=Case(1, 17, 2, 16, torch.float32, 9), c=1e-30, as_numpy=False)  # s ~ 0: uniform attention
@example(case=Case(2, 33, 1, 80, torch.bfloat16, 10), c=100.0, as_numpy=True)  # near one-hot attention
def test_scale_default_and_explicit(case, c, as_numpy):
    """``A(q, k, v; scale=None) = A(q, k, v; scale=Dh ** -0.5)`` bit for bit (the documented default); for a
    positive scale s = c·Dh^-0.5 (a float or a numpy float32), ``A(q, k, v; s) = softmax(s · q kᵀ) v`` and its
    gradients match the float64 reference with that s: all of them for c <= C_FULL (``TOL``,
    ``GRAD_REL_FRO``), o and dv beyond (``TOL``), with dq and dk finite (see C_FULL)."""
    torch.manual_seed(case.seed)
    q, k, v, _ = _qkv(case.B, case.N, case.H, case.D, case.dtype)
    do = torch.randn(q.shape, device=DEV, dtype=case.dtype)
    default, explicit = _run(q, k, v, do), _run(q, k, v, do, scale=case.D ** -0.5)
    for name, x, y in zip(("o", "dq", "dk", "dv"), default, explicit):
        assert torch.equal(x, y), f"{name}: scale=None is not scale=Dh ** -0.5"
    scale = c * case.D ** -0.5
    scale = np.float32(scale) if as_numpy else scale
    if c <= C_FULL:
        _check(q, k, v, None, case.dtype, scale=scale, norm_wise=_norm_wise(case.N))
        return
    o, dq, dk, dv = _run(q, k, v, do, scale=scale)
    o_ref, _, _, dv_ref = _ref_grads(q, k, v, do, scale=float(scale))
    _close("o", o, o_ref, *TOL[case.dtype][:2])
    _close_grad("dv", dv, dv_ref, case.dtype, norm_wise=False)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all(), "dq, dk: non-finite elements"


# ------------------------------------------------------------------------------------------
# invariances
# ------------------------------------------------------------------------------------------
@st.composite
def permuted_cases(draw):
    """A case, one permutation of its N positions per batch element, and whether to force the forward over
    16-key blocks (the default config takes every key in one tile at head dims <= 64: a permutation then
    moves keys between blocks, so the online softmax's running maximum and rescaling see another order)."""
    case = draw(cases(N=st.one_of(st.sampled_from((2, 17, 33, 65)), st.integers(2, 70))))
    perms = [draw(st.permutations(range(case.N))) for _ in range(case.B)]
    return case, torch.tensor(perms, device=DEV), draw(st.booleans())


def _gather(x, idx):
    """``x[b, idx[b]]`` for every batch element b (x ``[B, N, H, Dh]``, idx ``[B, N]``)."""
    return torch.take_along_dim(x, idx[:, :, None, None], dim=1)


def _permutation_problem(args):
    """(case, π, forward over 16-key blocks?, q, k, v, dO): fresh leaves from the case's seed."""
    case, perm, loop = args
    torch.manual_seed(case.seed)
    q, k, v, _ = _qkv(case.B, case.N, case.H, case.D, case.dtype)
    q, k, v = _leaves(q, k, v)
    return case, perm, loop, q, k, v, torch.randn(q.shape, device=DEV, dtype=case.dtype)


@settings(max_examples=5)
@given(args=permuted_cases())
def test_permuting_keys_and_values_together_changes_nothing(args):
    """Softmax attention is a weighted sum over the keys: for a permutation π of the N positions (per batch
    element), ``A(q, k[π], v[π]) = A(q, k, v)``, and the gradients follow: dq unchanged,
    ``dk' = dk[π]``, ``dv' = dv[π]``. Up to rounding: the keys meet in another order (other key blocks of the
    online softmax, another running maximum), so the dtype's ``TOL``, not bit equality."""
    case, perm, loop, q, k, v, do = _permutation_problem(args)
    with A._force_config(fwd=FWD_LOOP if loop else None):
        o, dq, dk, dv = _run(q, k, v, do)
        kp, vp = _leaves(_gather(k, perm), _gather(v, perm))
        o2, dq2, dkp, dvp = _run(q, kp, vp, do)
    _close_pair("o", o2, o, case.dtype, grad=False)
    _close_pair("dq", dq2, dq, case.dtype, grad=True)
    _close_pair("dk", dkp, _gather(dk, perm), case.dtype, grad=True)
    _close_pair("dv", dvp, _gather(dv, perm), case.dtype, grad=True)


@settings(max_examples=4)
@given(args=permuted_cases())
def test_permuting_queries_permutes_outputs(args):
    """Each query row is computed on its own: for a permutation π of the queries (per batch element),
    ``A(q[π], k, v) = A(q, k, v)[π]``; with dO permuted alike, ``dq' = dq[π]`` while dk and dv (sums over the
    queries) are unchanged. Up to rounding (query blocks hold other rows; dk, dv add them in another order)."""
    case, perm, loop, q, k, v, do = _permutation_problem(args)
    with A._force_config(fwd=FWD_LOOP if loop else None):
        o, dq, dk, dv = _run(q, k, v, do)
        (qp,) = _leaves(_gather(q, perm))
        op, dqp, dk2, dv2 = _run(qp, k, v, _gather(do, perm))
    _close_pair("o", op, _gather(o, perm), case.dtype, grad=False)
    _close_pair("dq", dqp, _gather(dq, perm), case.dtype, grad=True)
    _close_pair("dk", dk2, dk, case.dtype, grad=True)
    _close_pair("dv", dv2, dv, case.dtype, grad=True)


# ------------------------------------------------------------------------------------------
# bad arguments
# ------------------------------------------------------------------------------------------
class Bad(NamedTuple):
    """A call that breaks the contract in one way: ``kind`` (for the report), q, k, v, the keyword arguments;
    ``error``: what :func:`attention` raises, (exception class, the argument its message starts with);
    ``dispatch``: what :func:`dispatch_attention` does on each backend: "raise" (the same error), "fallback"
    (the documented fallback to SDPA: the reference's answer) or "unchecked" (a NaN or infinite scale, which
    SDPA and the reference compute with as given; only the kernels' refusal is the contract)."""
    kind: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kw: dict
    error: tuple
    dispatch: str = "raise"


BAD_KINDS = ("not_tensor", "device", "shape", "rank", "dtype_mismatch", "dtype_unsupported", "dtype_not_float",
             "head_dim", "cu_device", "cu_start", "cu_end", "cu_decreasing", "cu_dtype", "cu_ndim", "cu_empty",
             "max_seqlen_small", "max_seqlen_kind", "max_seqlen_batched", "scale_value", "scale_nonfinite",
             "scale_kind", "scale_tensor")


@st.composite
def bad_calls(draw, kind):
    """A call that breaks the contract as ``kind`` says, the rest of it valid (sizes, dtype, batched or packed
    drawn)."""
    gen = torch.Generator().manual_seed(draw(seeds))
    dtype = draw(st.sampled_from(KERNEL_DTYPES))
    B, N, H = draw(st.integers(1, 2)), draw(st.integers(1, 12)), draw(st.integers(1, 2))
    D = draw(st.sampled_from((8, 16, 24)))
    varlen = kind.startswith("cu_") or kind == "max_seqlen_small" or (
        kind not in ("max_seqlen_batched",) and draw(st.booleans()))
    if varlen:  # packed: T rows of [H, Dh], lengths summing to T
        lens = draw(st.lists(st.integers(0, 8), min_size=1, max_size=3))
        if kind == "max_seqlen_small" and max(lens) == 0:
            lens[0] = 1  # (a sequence with a row that a short max_seqlen would drop)
        bounds = [0]
        for n in lens:
            bounds.append(bounds[-1] + n)
        shape = (bounds[-1], H, D)
    else:
        shape = (B, N, H, D)

    def t(shp=shape, dt=dtype):
        return _randn(shp, torch.float32, gen).to(dt) if dt.is_floating_point else \
            torch.randint(-3, 4, shp, generator=gen).to(device=DEV, dtype=dt)

    q, k, v = t(), t(), t()
    kw = {"cu_seqlens": torch.tensor(bounds, dtype=torch.int32, device=DEV)} if varlen else {}
    which = draw(st.sampled_from(("k", "v")))
    cu = bounds if varlen else None

    if kind == "not_tensor":  # q, k or v not a tensor (a list, a numpy array, None)
        name = draw(st.sampled_from("qkv"))
        x = dict(q=q, k=k, v=v)
        x[name] = draw(st.sampled_from((None, "list", "numpy")))
        x[name] = {"list": [0.5] * 3, "numpy": np.ones(shape, np.float32)}.get(x[name], x[name])
        return Bad(kind, x["q"], x["k"], x["v"], kw, (TypeError, name))
    if kind == "device":  # k or v on another device (meta stands in for a second one)
        return Bad(kind, q, k.to("meta") if which == "k" else k, v.to("meta") if which == "v" else v, kw,
                   (ValueError, which))
    if kind == "shape":  # k or v of another shape (one size changed by 1 … 3)
        dim = draw(st.integers(0, len(shape) - 1))
        other = list(shape)
        other[dim] += draw(st.integers(1, 3)) * draw(st.sampled_from((1, -1))) if other[dim] > 3 else \
            draw(st.integers(1, 3))
        kk = t(tuple(other))
        return Bad(kind, q, kk if which == "k" else k, kk if which == "v" else v, kw, (ValueError, which))
    if kind == "rank":  # a 3-d call without cu_seqlens, a 4-d one with (or a 5-d one)
        if varlen:
            q, k, v = (x.unsqueeze(0) for x in (q, k, v))
        elif draw(st.booleans()):
            q, k, v = (x[0] for x in (q, k, v))
        else:
            q, k, v = (x.unsqueeze(0) for x in (q, k, v))
        return Bad(kind, q, k, v, kw, (ValueError, "q"))
    if kind == "dtype_mismatch":  # k or v of another floating dtype than q
        other = draw(st.sampled_from([d for d in (*KERNEL_DTYPES, torch.float64) if d != dtype]))
        kk = t(dt=other)
        return Bad(kind, q, kk if which == "k" else k, kk if which == "v" else v, kw, (TypeError, which))
    if kind == "dtype_unsupported":  # float64 q, k, v: the kernels refuse, the dispatcher falls back
        return Bad(kind, *(x.double() for x in (q, k, v)), kw, (TypeError, "q"), "fallback")
    if kind == "dtype_not_float":  # integer or bool q, k, v: no backend takes them
        dt = draw(st.sampled_from((torch.int32, torch.int64, torch.int8, torch.bool)))
        return Bad(kind, t(dt=dt), t(dt=dt), t(dt=dt), kw, (TypeError, "q"))
    if kind == "head_dim":  # a head dim outside the contract: 0 is refused by all, others fall back
        d = draw(st.one_of(st.sampled_from((0, 1, 4, 12, 20, 136, 256)),
                           st.integers(0, 200).map(lambda d: d if d % 8 else d + 1)))
        shp = (*shape[:-1], d)
        return Bad(kind, t(shp), t(shp), t(shp), kw, (ValueError, "q"), "fallback" if d > 0 else "raise")
    if kind == "cu_device":  # offsets neither on q's device nor on the CPU
        kw["cu_seqlens"] = kw["cu_seqlens"].to("meta")
        return Bad(kind, q, k, v, kw, (ValueError, "cu_seqlens"))
    if kind == "cu_start":  # every offset shifted by ±1 … 3: starts off 0 (and ends off T)
        off = draw(st.integers(1, 3)) * draw(st.sampled_from((1, -1)))
        kw["cu_seqlens"] = torch.tensor([b + off for b in cu], dtype=torch.int32, device=DEV)
        return Bad(kind, q, k, v, kw, (ValueError, "cu_seqlens"))
    if kind == "cu_end":  # the last offset is not T (short of it, past it, or negative)
        end = cu[-1] + draw(st.integers(1, 5)) * draw(st.sampled_from((1, -1)))
        kw["cu_seqlens"] = torch.tensor(cu[:-1] + [end], dtype=torch.int32, device=DEV)
        return Bad(kind, q, k, v, kw, (ValueError, "cu_seqlens"))
    if kind == "cu_decreasing":  # starts at 0 and ends at T, but two inner offsets x > y (y may be negative)
        y = draw(st.integers(-3, cu[-1] + 2))
        x = draw(st.integers(y + 1, cu[-1] + 3))
        kw["cu_seqlens"] = torch.tensor([0, x, y, cu[-1]], dtype=torch.int32, device=DEV)
        return Bad(kind, q, k, v, kw, (ValueError, "cu_seqlens"))
    if kind == "cu_dtype":  # offsets of a dtype other than int32 / int64, or a list of them
        dt = draw(st.sampled_from((torch.float32, torch.float64, torch.int16, torch.uint8, torch.bool, list)))
        kw["cu_seqlens"] = list(cu) if dt is list else torch.tensor(cu, device=DEV).to(dt)
        return Bad(kind, q, k, v, kw, (TypeError, "cu_seqlens"))
    if kind == "cu_ndim":  # [1, n + 1] or a 0-d offset
        c = torch.tensor(cu, dtype=torch.int32, device=DEV)
        kw["cu_seqlens"] = c[None] if draw(st.booleans()) else c[-1]
        return Bad(kind, q, k, v, kw, (ValueError, "cu_seqlens"))
    if kind == "cu_empty":
        kw["cu_seqlens"] = torch.zeros(0, dtype=torch.int32, device=DEV)
        return Bad(kind, q, k, v, kw, (ValueError, "cu_seqlens"))
    if kind == "max_seqlen_small":  # shorter than the longest sequence: its last rows would be dropped
        longest = max(b - a for a, b in zip(cu[:-1], cu[1:]))
        kw["max_seqlen"] = draw(st.integers(-1, longest - 1))
        return Bad(kind, q, k, v, kw, (ValueError, "max_seqlen"))
    if kind == "max_seqlen_kind":
        # not an int, packed or batched alike (True == 1, but is no length; a batched N as a float is no int)
        kw["max_seqlen"] = draw(st.sampled_from((64.0, "64", True, float(N), torch.tensor(N))))
        return Bad(kind, q, k, v, kw, (TypeError, "max_seqlen"))
    if kind == "max_seqlen_batched":  # only meaningful with cu_seqlens: a batched call takes None or N
        kw["max_seqlen"] = draw(st.sampled_from((N + 1, N - 1, 2 * N + 3)))
        return Bad(kind, q, k, v, kw, (ValueError, "max_seqlen"))
    if kind == "scale_value":  # zero or negative: the kernels refuse, the dispatcher falls back
        kw["scale"] = draw(st.one_of(st.sampled_from((0.0, -0.0, 0, -1)), st.floats(-4.0, -1e-3)))
        return Bad(kind, q, k, v, kw, (ValueError, "scale"), "fallback")
    if kind == "scale_nonfinite":  # infinite or NaN: the kernels refuse
        kw["scale"] = draw(st.sampled_from((float("inf"), -float("inf"), float("nan"))))
        return Bad(kind, q, k, v, kw, (ValueError, "scale"), "unchecked")
    if kind == "scale_kind":  # not a number: refused by every backend
        kw["scale"] = draw(st.sampled_from(("0.3", True, [0.3], torch.tensor([0.3]))))
        return Bad(kind, q, k, v, kw, (TypeError, "scale"))
    assert kind == "scale_tensor"  # a 0-d floating tensor: the kernels take a number, SDPA the tensor too
    kw["scale"] = torch.tensor(draw(st.floats(0.05, 1.0)))
    return Bad(kind, q, k, v, kw, (TypeError, "scale"), "fallback")


FALLBACK_TOL = {torch.float64: (1e-10, 1e-10), **{dt: TOL[dt][:2] for dt in KERNEL_DTYPES}}


@pytest.mark.parametrize("kind", BAD_KINDS)  # (every kind runs: hypothesis would draw some of them rarely)
@settings(max_examples=4)
@given(data=st.data())
def test_bad_arguments_are_named_or_fall_back(kind, data):
    """A call outside the contract raises ``error`` (its class, the message starting with the argument's
    name) from :func:`attention`; :func:`dispatch_attention` raises the same on every backend ("auto" with
    the interpreter's Triton branch live, "sdpa", "reference"), except where the contract documents a
    fallback (float64, an unsupported head dim, a scale the kernels refuse): there each backend returns
    ``softmax(s · q kᵀ) v`` of the float64 reference. Never a result of another meaning."""
    bad = data.draw(bad_calls(kind), label="bad")
    event(bad.dispatch)  # (pytest --hypothesis-show-statistics: how often the dispatchers raised or fell back)
    cls, arg = bad.error
    with pytest.raises(cls, match=f"^{arg}:"):
        A.attention(bad.q, bad.k, bad.v, **bad.kw)
    if bad.dispatch == "unchecked":
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STOP_KERNELS_CPU_AUTO", "triton")  # (the test hook: "auto" on CPU takes the interpreted kernels)
        for backend in ("auto", "sdpa", "reference"):
            if bad.dispatch == "raise":
                with pytest.raises(cls, match=f"^{arg}:"):
                    A.dispatch_attention(bad.q, bad.k, bad.v, backend=backend, **bad.kw)
                continue
            o = A.dispatch_attention(bad.q, bad.k, bad.v, backend=backend, **bad.kw)
            kw = dict(bad.kw)
            if isinstance(kw.get("scale"), torch.Tensor):
                kw["scale"] = kw["scale"].item()
            ref = reference.attention(bad.q.double(), bad.k.double(), bad.v.double(), **kw)
            assert o.shape == bad.q.shape and o.dtype == bad.q.dtype, backend
            atol, rtol = FALLBACK_TOL[bad.q.dtype]
            _close(f"o ({backend}, {bad.kind})", o, ref, atol, rtol)
