"""Argument checks shared by the ops: strided bias, layout and cu_seqlens checks of every attention backend, dtype
checks of the explicit-noise assembly, mixed dtypes on the reference path, unused arguments still checked."""

import contextlib

import pytest
import torch

import stop_kernels as sk

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _gen():
    return torch.Generator().manual_seed(3)


def test_stop_embed_non_contiguous_bias():
    """The Triton kernel reads bias at ``b_ptr + dcol`` (unit stride assumed, stop_embed.py:204), so a
    strided bias view gives wrong values (off by ~1 here); the reference backend and a contiguous copy agree."""
    torch.manual_seed(0)
    P, D, E = 10, 6, 5
    pos = torch.randn(P, D, device=DEV)
    w = torch.randn(D, E, device=DEV)
    bias = torch.randn(2 * D, device=DEV)[::2]  # non-contiguous [D]
    idx = torch.randint(0, P, (2, 3), device=DEV)
    ref = sk.stop_embed(pos, idx, w, bias, noise_std=0.5, generator=_gen(), backend="reference")
    out = sk.stop_embed(pos, idx, w, bias, noise_std=0.5, generator=_gen(), backend="triton")
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["learned", "isotropic"])
def test_assemble_non_contiguous_bias(mode):
    """Same unit-stride bias read in the context-projection launch of assemble_predictor_input."""
    torch.manual_seed(0)
    B, Nc, Nt, E, D, P, npred = 2, 3, 2, 5, 6, 12, 3
    ctx = torch.randn(B, Nc, E, device=DEV)
    w = torch.randn(D, E, device=DEV)
    bias = torch.randn(D, 2, device=DEV)[:, 0]  # non-contiguous [D]
    pos = torch.randn(P, D, device=DEV)
    ci = torch.randint(0, P, (B, Nc), device=DEV)
    ti = torch.randint(0, P, (npred, B, Nt), device=DEV)
    ref = sk.assemble_predictor_input(ctx, ci, ti, w, bias, pos, noise_mode=mode, generator=_gen(),
                                      backend="reference")
    out = sk.assemble_predictor_input(ctx, ci, ti, w, bias, pos, noise_mode=mode, generator=_gen(),
                                      backend="triton")
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cu", [[0, 6, 4, 10], [0, 4, 8], [1, 4, 10]])
def test_dispatch_reference_rejects_bad_cu_seqlens(cu):
    """dispatch_attention(backend="reference") hands cu_seqlens to reference.attention unchecked: a
    decreasing / short / non-zero-start cu_seqlens returns 12, 8 or 9 rows for T = 10 instead of ValueError."""
    q = torch.randn(10, 2, 16, device=DEV)
    with pytest.raises(ValueError, match="cu_seqlens"):
        sk.dispatch_attention(q, q, q, cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=DEV),
                              backend="reference")


@pytest.mark.parametrize("backend", ["sdpa", "auto"])
@pytest.mark.parametrize("case", ["packed-without-cu_seqlens", "5d", "k-batch-mismatch", "k-heads-mismatch"])
def test_dispatch_sdpa_checks_layout(backend, case):
    """Without cu_seqlens the SDPA branch of dispatch_attention checks nothing: a [T, H, Dh] input is
    transposed to [T, Dh, H] and attends over the head dim (a same-shaped, meaningless result), a 5-D
    input attends over H, and k/v with batch or heads 1 are broadcast; backend="triton" raises ValueError."""
    q = torch.randn(2, 5, 2, 16, device=DEV)
    k = v = q
    if case == "packed-without-cu_seqlens":
        q = k = v = q.reshape(10, 2, 16)
    elif case == "5d":
        q = k = v = q[None]
    elif case == "k-batch-mismatch":
        k = v = q[:1]
    else:
        k = v = q[:, :, :1]
    with pytest.raises(ValueError):
        sk.dispatch_attention(q, k, v, backend=backend)


def test_assemble_explicit_noise_dtype_mismatch_is_type_error():
    """With ``noise=`` the call skips the ctx/weight dtype check of the fused path (predictor_input.py:174)
    and F.linear raises an unnamed RuntimeError ("mat1 and mat2 must have the same dtype")."""
    B, Nc, Nt, E, D, P, npred = 1, 2, 2, 4, 4, 8, 1
    ctx = torch.randn(B, Nc, E, dtype=torch.float64)
    w = torch.randn(D, E)
    pos = torch.randn(P, D)
    ci = torch.randint(0, P, (B, Nc))
    ti = torch.randint(0, P, (npred, B, Nt))
    with pytest.raises(TypeError, match="ctx"):
        sk.assemble_predictor_input(ctx, ci, ti, w, None, pos, noise=torch.randn(npred, B, Nt, E))


def _assembly_inputs(dtype_w=torch.float32, dtype_pos=torch.float32, dtype_b=None):
    torch.manual_seed(5)
    B, Nc, Nt, E, D, P, npred = 2, 3, 2, 6, 8, 10, 2
    w = torch.randn(D, E, dtype=dtype_w)
    b = torch.randn(D, dtype=dtype_b or dtype_w)
    return (torch.randn(B, Nc, E, dtype=dtype_w), torch.randint(0, P, (B, Nc)), torch.randint(0, P, (npred, B, Nt)),
            w, b, torch.randn(P, D, dtype=dtype_pos))


@pytest.mark.parametrize("mode", ["learned", "isotropic"])
def test_reference_assembly_with_bf16_weights_and_fp32_positions(mode):
    """The mixed precision of the official code (bf16 projection, fp32 ψ): the reference twin drew the
    learned noise in the promoted dtype (fp32) and n·Wᵀ failed; it now draws it in the weight's dtype,
    as the fused op does, and both backends agree on the output dtype."""
    args = _assembly_inputs(torch.bfloat16, torch.float32)
    ref = sk.reference.assemble_predictor_input(*args, noise_mode=mode, generator=_gen())
    out = sk.assemble_predictor_input(*args, noise_mode=mode, generator=_gen(), backend="reference")
    assert ref.dtype == out.dtype == torch.float32 and ref.shape == out.shape
    # the context rows draw no noise: the two paths agree exactly, and with the formula (the projection in
    # bf16, ψ added in fp32) to bf16's rounding of the projection
    ctx, ci, ti, w, b, pos = args
    npred, B, Nc = ti.shape[0], ci.shape[0], ci.shape[1]
    rows = lambda t: t.view(npred, B, -1, w.shape[0])[:, :, :Nc]  # noqa: E731
    assert torch.equal(rows(ref), rows(out))
    proj = ctx.double() @ w.double().T + b.double()
    want = (proj + pos[ci].double()).expand(npred, *proj.shape)
    torch.testing.assert_close(rows(out).double(), want, rtol=0, atol=float(proj.abs().max()) * 2 ** -8)


# (no float64 bias on the triton backend: the Triton kernels take 16/32-bit floats, float64 goes to the reference)
@pytest.mark.parametrize("backend, dtype_b", [("reference", torch.float64), ("reference", torch.bfloat16),
                                              ("triton", torch.bfloat16)])
def test_assembly_bias_of_another_dtype_is_cast_on_every_backend(backend, dtype_b):
    """A bias whose dtype differs from the weight's is cast to it (as stop_embed does), on the
    reference path too (it raised an unnamed RuntimeError there while Triton accepted it)."""
    args = _assembly_inputs(dtype_b=dtype_b)
    cast = args[:4] + (args[4].to(torch.float32),) + args[5:]
    out = sk.assemble_predictor_input(*args, generator=_gen(), backend=backend)
    want = sk.assemble_predictor_input(*cast, generator=_gen(), backend=backend)
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bias_is_taken_in_the_weights_dtype(backend):
    """An fp32 bias beside a bf16 weight is rounded to bf16 on every backend, as the reference twin takes it.
    ψ in fp32 makes the output fp32, and σ = 0 leaves ψ[idx] + b: the kernels add the bias in fp32, so
    before the launcher cast it they kept the unrounded bias (up to 0.25 off at |b| ≈ 100) while the
    reference rounded it. The masked rows of the assembly come from the same launch."""
    torch.manual_seed(7)
    P, D, E = 12, 8, 6
    pos = torch.randn(P, D)
    w = torch.randn(D, E).bfloat16()
    b = torch.randn(D) * 100  # not representable in bf16
    assert not torch.equal(b.bfloat16().float(), b)
    idx = torch.randint(0, P, (2, 5))
    want = pos[idx] + b.bfloat16().float()
    out = sk.stop_embed(pos, idx, w, b, noise_std=0.0, generator=_gen(), backend=backend)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
    ctx, ci, ti = torch.randn(2, 3, E).bfloat16(), torch.randint(0, P, (2, 3)), torch.randint(0, P, (3, 2, 4))
    got = sk.assemble_predictor_input(ctx, ci, ti, w, b, pos, noise_std=0.0, generator=_gen(), backend=backend)
    torch.testing.assert_close(got.view(3, 2, 7, D)[:, :, 3:], pos[ti] + b.bfloat16().float(), rtol=0, atol=1e-5)


def test_triton_dtype_refusal_names_the_argument_and_meta_tensors_are_named():
    """A dtype the Triton kernels do not take is a TypeError naming that tensor (not ``backend``); the mask token
    counts only where it is used (noise_mode 'none'). Meta tensors: 'auto' takes the reference path (shapes only),
    'triton' is a ValueError naming the device; the assembly's autocast query no longer raises for them."""
    ctx, ci, ti, w, b, pos = _assembly_inputs()
    with pytest.raises(TypeError, match="^mask_token: the triton backend takes"):
        sk.assemble_predictor_input(ctx, ci, ti, w, b, pos, noise_mode="none", mask_token=torch.randn(w.shape[0]).double(),
                                    generator=_gen(), backend="triton")
    out = sk.assemble_predictor_input(ctx, ci, ti, w, b, pos, mask_token=torch.randn(w.shape[0]).double(),
                                      generator=_gen(), backend="triton")  # learned: the mask token is unused
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    meta = [t.to("meta") for t in (ctx, ci, ti, w, b, pos)]
    out = sk.assemble_predictor_input(*meta, generator=_gen())
    assert out.device.type == "meta" and out.shape == (ti.shape[0] * ti.shape[1], ci.shape[1] + ti.shape[2], w.shape[0])
    with pytest.raises(ValueError, match="backend: 'triton' needs CUDA tensors"):
        sk.assemble_predictor_input(*meta, generator=_gen(), backend="triton")
    assert sk.stop_embed(meta[5], meta[2][0], meta[3], meta[4], generator=_gen()).shape == (ti.shape[1], ti.shape[2],
                                                                                          w.shape[0])
    q = torch.randn(1, 5, 2, 16, device="meta")
    with pytest.raises(ValueError, match="^q: the Triton attention kernel needs CUDA tensors"):
        sk.attention(q, q, q)


def test_packed_reference_attention_refuses_another_key_count():
    """reference.attention with cu_seqlens sliced k and v by q's bounds: keys of another token count were
    silently dropped or ignored. One cu_seqlens bounds both, so the counts must agree."""
    q = torch.randn(10, 2, 16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    for T in (8, 12):
        kv = torch.randn(T, 2, 16)
        with pytest.raises(ValueError, match="^k, v: packed sequences share q's token count"):
            sk.reference.attention(q, kv, kv, cu_seqlens=cu)
    with pytest.raises(TypeError, match="^generator"):
        sk.reference.assemble_predictor_input(*_assembly_inputs(), generator=3)


def test_explicit_noise_and_generator_arguments_are_checked():
    ctx, ci, ti, w, b, pos = _assembly_inputs()
    npred, B, Nt = ti.shape
    with pytest.raises(TypeError, match="noise"):  # n·Wᵀ needs the weight's dtype
        sk.assemble_predictor_input(ctx, ci, ti, w, b, pos, noise=torch.randn(npred, B, Nt, w.shape[1]).bfloat16())
    with pytest.raises(TypeError, match="noise"):
        sk.reference.stop_embed(pos, ti[0], w, b, torch.randn(B, Nt, w.shape[1], dtype=torch.float64))
    with pytest.raises(ValueError, match="noise"):  # "none" uses the mask token, never noise
        sk.assemble_predictor_input(ctx, ci, ti, w, b, pos, noise_mode="none", mask_token=torch.randn(w.shape[0]),
                                    noise=torch.randn(npred, B, Nt, w.shape[0]))
    with pytest.raises(TypeError, match="generator"):  # unused with explicit noise, but still checked
        sk.assemble_predictor_input(ctx, ci, ti, w, b, pos, noise=torch.randn(npred, B, Nt, w.shape[1]),
                                    generator="seed")
    with pytest.raises(TypeError, match="generator"):  # "none" draws no seed, but the argument is checked
        sk.assemble_predictor_input(ctx, ci, ti, w, b, pos, noise_mode="none", mask_token=torch.randn(w.shape[0]),
                                    generator="seed")
    with pytest.raises(TypeError, match="bias"):
        sk.reference.stop_embed(pos, ti[0], w, [0.0] * w.shape[0], torch.randn(B, Nt, w.shape[1]))
    with pytest.raises(TypeError, match="mask_token"):  # checked whenever it is given
        sk.assemble_predictor_input(ctx, ci, ti, w, b, pos, mask_token=[0.0] * w.shape[0], generator=_gen())
    with pytest.raises(ValueError, match=r"tgt_idx\[1\]"):
        sk.assemble_predictor_input(ctx, ci, [ti[0], ti[1].to("meta")], w, b, pos, generator=_gen())


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_zero_width_output(backend):
    """D = 0 (a zero-width projection): an empty [..., M, 0] result, not a reshape error."""
    pos, w, idx = torch.randn(10, 0), torch.randn(0, 6), torch.randint(0, 10, (2, 3))
    assert sk.stop_embed(pos, idx, w, None, generator=_gen(), backend=backend).shape == (2, 3, 0)
    w.requires_grad_()
    sk.stop_embed(pos, idx, w, None, generator=_gen(), backend=backend).sum().backward()
    assert w.grad.shape == (0, 6)


@pytest.mark.parametrize("value", ["1", "true", "On", "yes", "y", "0", "false", "", " 1", "t"])
def test_interpreter_flag_is_read_as_triton_reads_it(value, monkeypatch):
    from triton import knobs
    from stop_kernels.backends import interpret_flag
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interpret_flag() == bool(knobs.runtime.interpret)


def test_the_interpreter_flag_set_after_import_is_said_and_not_followed(monkeypatch):
    """Triton makes a kernel interpreted when it is defined, at import: TRITON_INTERPRET set afterwards left the
    kernels compiled ones, yet backends() reported triton usable and stop_embed's "auto" launched them on CPU
    tensors ("0 active drivers"; audit, session 31). Now "auto" takes the reference and "triton" says why."""
    import importlib
    bk = importlib.import_module("stop_kernels.backends")  # the module (the package exports a function of that name)
    monkeypatch.setattr(bk, "_INTERPRETED_AT_IMPORT", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not bk.triton_interpreting() and bk.interpreter_set_after_import()
    ok, why = bk._triton()
    assert not ok and "before importing stop_kernels" in why
    pos, w, idx = torch.randn(6, 4), torch.randn(4, 5), torch.tensor([[1, 5, 0]])
    got = sk.stop_embed(pos, idx, w, generator=_gen())
    torch.testing.assert_close(got, sk.stop_embed(pos, idx, w, generator=_gen(), backend="reference"))
    with pytest.raises(ValueError, match="backend: 'triton' needs CUDA tensors.*before importing stop_kernels"):
        sk.stop_embed(pos, idx, w, generator=_gen(), backend="triton")
    monkeypatch.setattr(bk, "_INTERPRETED_AT_IMPORT", True)
    assert bk.triton_interpreting() and not bk.interpreter_set_after_import()


@pytest.mark.parametrize("scale,exc", [(0.0, ValueError), (-0.5, ValueError), (float("inf"), ValueError),
                                       (float("nan"), ValueError), (True, TypeError)])
def test_attention_kernel_needs_a_positive_scale_and_auto_falls_back(scale, exc, monkeypatch):
    """The Triton forward takes the running max of the unscaled scores, valid for a positive scale only:
    attention() refuses other scales by name (a bool is no number: TypeError, as the other backends say);
    dispatch_attention("auto") routes them to SDPA (on the CPU with the interpreter's Triton branch live, else
    "auto" would take SDPA there whatever the scale)."""
    from stop_kernels.backends import triton_interpreting
    from stop_kernels.ops import attention as A
    q = torch.randn(1, 5, 2, 16, device=DEV, dtype=torch.float16 if DEV == "cuda" else torch.float32)
    if DEV == "cuda" or triton_interpreting():  # where the kernel path can run at all (CI: the interpreter)
        with pytest.raises(exc, match="^scale: "):
            sk.attention(q, q, q, scale=scale)
    if DEV == "cpu":
        monkeypatch.setenv("STOP_KERNELS_CPU_AUTO", "triton")
        monkeypatch.setattr(A, "_INTERPRET", True)
    assert A._resolve_auto(q, q, q) == "triton"  # the branch under test is live
    assert A._resolve_auto(q, q, q, scale) == "sdpa"


def test_launches_go_to_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: the ops make the tensors' device current when it is
    not (tensors on cuda:1 with cuda:0 current), and change nothing otherwise."""
    import contextlib
    import types
    from stop_kernels.backends import on_device
    assert isinstance(on_device(torch.zeros(1)), contextlib.nullcontext)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    guard = on_device(types.SimpleNamespace(device=torch.device("cuda:1")))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(on_device(types.SimpleNamespace(device=torch.device("cuda:0"))), contextlib.nullcontext)


def test_argument_of_too_many_dimensions_is_named():
    """A 2-D argument given with an extra leading dimension is refused by name, not broadcast."""
    pos, w, idx = torch.randn(10, 6), torch.randn(6, 5), torch.randint(0, 10, (2, 3))
    with pytest.raises(ValueError, match=r"^pos_embed: expected the \[P, D\] table, got shape \(1, 10, 6\)"):
        sk.stop_embed(pos[None], idx, w, None, generator=_gen(), backend="reference")
    with pytest.raises(ValueError, match=r"^pos_embed: expected 2 dimensions, got shape \(2, 10, 6\)"):
        sk.stop_embed(pos.expand(2, 10, 6), idx, w, None, generator=_gen(), backend="reference")
    with pytest.raises(ValueError, match=r"^weight: expected 2 dimensions, got shape \(1, 6, 5\)"):
        sk.stop_embed(pos, idx, w[None], None, generator=_gen(), backend="reference")


def test_out_of_range_index_message_names_the_offending_value():
    """The message quotes the value that is out of range: the negative minimum, else the maximum."""
    from stop_kernels import _checks as chk
    with pytest.raises(ValueError, match=r"^idx: values must lie in \[0, 10\) \(ψ rows\), got -3$"):
        chk.index_tensor("idx", torch.tensor([4, -3, 12]), upper=10, what="ψ rows")
    with pytest.raises(ValueError, match=r"^idx: values must lie in \[0, 10\), got 12$"):
        chk.index_tensor("idx", torch.tensor([4, 0, 12]), upper=10)
    meta = torch.empty(3, dtype=torch.int64, device="meta")  # no values to read: shape and dtype checks only
    assert chk.index_tensor("idx", meta, upper=10) is meta


def test_noise_std_must_be_finite():
    with pytest.raises(ValueError, match="^noise_std: expected a finite value >= 0, got inf"):
        sk.stop_embed(torch.randn(10, 6), torch.randint(0, 10, (3,)), torch.randn(6, 5), None, noise_std=float("inf"),
                      generator=_gen(), backend="reference")
    from stop_kernels import _checks as chk
    assert chk.non_negative("noise_std", 0) == 0.0  # σ = 0 (no noise) is allowed


def test_nested_trusted_device_indices_restore_the_outer_setting():
    """Leaving an inner trusted_device_indices() keeps the outer one in force; leaving the outer restores checks."""
    from stop_kernels import _checks as chk
    assert chk._DEVICE_RANGE_CHECKS
    with chk.trusted_device_indices():
        with chk.trusted_device_indices():
            assert not chk._DEVICE_RANGE_CHECKS
        assert not chk._DEVICE_RANGE_CHECKS
    assert chk._DEVICE_RANGE_CHECKS


def test_atomic_json_write_that_fails_leaves_the_previous_file_and_no_temporary(tmp_path):
    from stop_kernels import _checks as chk
    path = tmp_path / "configs.json"
    chk.write_json_atomic(str(path), {"a": 1})
    with pytest.raises(TypeError):
        chk.write_json_atomic(str(path), {"a": object()})  # not serialisable: fails part-way
    assert chk.read_json(str(path), "configs") == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["configs.json"]


@pytest.mark.parametrize("built", [False, True])
def test_assembly_refuses_the_cuda_backend_by_name(built, monkeypatch):
    """The CUDA C++ backend implements stop_embed only: backend="cuda" of assemble_predictor_input (listed by
    its docstring) raised RuntimeError on every machine, "not built" where the extension is missing and "has
    no assemble_predictor_input" where it is built. Refused as a bad argument, whether or not it is built."""
    from stop_kernels.ops import cuda_backend
    monkeypatch.setattr(cuda_backend, "available", lambda: built)
    args = _assembly_inputs()
    with pytest.raises(ValueError, match="^backend: "):
        sk.assemble_predictor_input(*args, generator=_gen(), backend="cuda")


def test_official_position_table_layout_gets_the_hint():
    """The official code keeps ψ as a [1, P, D] parameter; passed as it is, the ops say to pass pos_embed[0] (a
    view: its gradient reaches the parameter) instead of only 'expected 2 dimensions'."""
    ctx, ctx_idx, tgt_idx, w, b, pos = _assembly_inputs()
    official = pos[None].clone().requires_grad_()
    calls = {"stop_embed": lambda t: sk.stop_embed(t, tgt_idx, w, b, generator=_gen()),
             "assemble_predictor_input": lambda t: sk.assemble_predictor_input(ctx, ctx_idx, tgt_idx, w, b, t,
                                                                               generator=_gen()),
             "reference.stop_embed": lambda t: sk.reference.stop_embed(t, tgt_idx, w, b, torch.randn(*tgt_idx.shape, 6))}
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"^pos_embed: expected the \[P, D\] table, .*pass pos_embed\[0\]"):
            call(official)
        official.grad = None
        call(official[0]).sum().backward()
        assert official.grad is not None and official.grad.abs().sum() > 0, name


def _projection_case():
    torch.manual_seed(0)
    P, D, E = 10, 6, 5  # D != E: a transposed [E, D] weight is told apart by its shape
    return torch.randn(P, D), torch.randn(D, E), torch.randn(D), torch.randint(0, P, (2, 3))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_stop_embed_transposed_weight_is_named(backend, with_bias):
    """``proj.weight.t()`` (or any [E, D] tensor) passed as ``weight`` is refused naming ``weight`` and the expected
    [D, E], with D from pos_embed; it used to blame ``bias`` ("expected size 5 ... got shape (6,)") or, without a
    bias, ``pos_embed``. The reference twin (called directly, with its noise) says the same."""
    from stop_kernels import reference
    pos, w, b, idx = _projection_case()
    bias = b if with_bias else None
    want = r"^weight: expected shape \[D, E\] = \[6, E\] \(D = pos_embed.shape\[1\]\), got shape \(5, 6\).*transposed"
    for wt in (w.t(), w.t().contiguous()):
        with pytest.raises(ValueError, match=want):
            sk.stop_embed(pos, idx, wt, bias, generator=_gen(), backend=backend)
        with pytest.raises(ValueError, match=want):
            reference.stop_embed(pos, idx, wt, bias, torch.randn(2, 3, 5))
    # pos_embed and bias agree on D = 6, the weight has another D (not transposed): the weight is named too
    with pytest.raises(ValueError, match=r"^weight: expected shape \[D, E\] = \[6, E\] .*got shape \(4, 5\)$"):
        sk.stop_embed(pos, idx, torch.randn(4, 5), b, generator=_gen(), backend=backend)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_stop_embed_other_width_mismatches_still_name_their_argument(backend):
    """Where the weight agrees with one other argument, the odd one out is named, as before."""
    pos, w, b, idx = _projection_case()
    with pytest.raises(ValueError, match="^bias: expected size 6 at dim 0"):
        sk.stop_embed(pos, idx, w, b[:4], generator=_gen(), backend=backend)
    with pytest.raises(ValueError, match="^pos_embed: expected size 6 at dim 1"):
        sk.stop_embed(pos[:, :4], idx, w, b, generator=_gen(), backend=backend)
    with pytest.raises(ValueError, match="^pos_embed: expected size 6 at dim 1"):
        sk.stop_embed(pos[:, :4], idx, w, None, generator=_gen(), backend=backend)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_stop_embed_non_contiguous_weight_of_the_right_shape_works(backend):
    """A correctly shaped but strided [D, E] weight (a transposed [E, D] buffer, e.g. weights shared with another
    layer) gives what its contiguous copy gives, forward and dW."""
    pos, w, b, idx = _projection_case()
    strided = w.t().contiguous().t().requires_grad_()
    dense = w.clone().requires_grad_()
    assert not strided.is_contiguous() and strided.shape == dense.shape
    a = sk.stop_embed(pos, idx, strided, b, noise_std=0.5, generator=_gen(), backend=backend)
    r = sk.stop_embed(pos, idx, dense, b, noise_std=0.5, generator=_gen(), backend=backend)
    torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(a)
    a.backward(g)
    r.backward(g)
    torch.testing.assert_close(strided.grad, dense.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_assembly_transposed_weight_is_named_with_its_shape(backend):
    """assemble_predictor_input: a transposed weight is named with the expected [D, E] (D from pos_embed, E from
    ctx), not only "expected size 5 at dim 1"."""
    pos, w, b, _ = _projection_case()
    B, Nc, Nt, npred = 2, 3, 2, 2
    ctx = torch.randn(B, Nc, 5)
    ci = torch.randint(0, 10, (B, Nc))
    ti = torch.randint(0, 10, (npred, B, Nt))
    want = (r"^weight: expected shape \[D, E\] = \[6, 5\] \(D = pos_embed.shape\[1\], E = ctx.shape\[-1\]\), "
            r"got shape \(5, 6\).*transposed")
    for bias in (b, None):
        with pytest.raises(ValueError, match=want):
            sk.assemble_predictor_input(ctx, ci, ti, w.t(), bias, pos, generator=_gen(), backend=backend)
    with pytest.raises(ValueError, match=r"^weight: expected shape \[D, E\] = \[6, 5\] .*got shape \(6, 4\)$"):
        sk.assemble_predictor_input(ctx, ci, ti, torch.randn(6, 4), b, pos, generator=_gen(), backend=backend)
    with pytest.raises(ValueError, match="^pos_embed: expected size 6 at dim 1"):  # the weight agrees with bias
        sk.assemble_predictor_input(ctx, ci, ti, w, b, pos[:, :4], generator=_gen(), backend=backend)
    strided = w.t().contiguous().t()  # the right shape, strided: works
    a = sk.assemble_predictor_input(ctx, ci, ti, strided, b, pos, generator=_gen(), backend=backend)
    r = sk.assemble_predictor_input(ctx, ci, ti, w, b, pos, generator=_gen(), backend=backend)
    torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)


def _second_order_cases():
    """(name, build) of every fused op: ``build()`` gives (output, the input to differentiate, the other leaf)."""
    def attn():
        q, k, v = (torch.randn(1, 5, 2, 8, device=DEV, requires_grad=True) for _ in range(3))
        return sk.attention(q, k, v), q, v

    def attn_qkv():
        qkv = torch.randn(1, 5, 3, 2, 8, device=DEV, requires_grad=True)
        return sk.attention_qkv(qkv), qkv, qkv

    def assemble():
        ctx = torch.randn(2, 3, 6, device=DEV, requires_grad=True)
        W = torch.randn(8, 6, device=DEV, requires_grad=True)
        out = sk.assemble_predictor_input(ctx, torch.randint(0, 16, (2, 3), device=DEV),
                                          torch.randint(0, 16, (2, 2, 4), device=DEV), W, None,
                                          torch.randn(16, 8, device=DEV), noise_std=0.3, backend="triton")
        return out, ctx, W

    def stop():
        pos = torch.randn(16, 8, device=DEV, requires_grad=True)
        W = torch.randn(8, 6, device=DEV, requires_grad=True)
        return sk.stop_embed(pos, torch.randint(0, 16, (2, 5), device=DEV), W, None, backend="triton"), W, pos
    return [("attention", attn), ("attention_qkv", attn_qkv), ("assemble_predictor_input", assemble),
            ("stop_embed", stop)]


@pytest.mark.parametrize("path", ["eager", "custom_op"])
@pytest.mark.parametrize("name,build", _second_order_cases(), ids=[c[0] for c in _second_order_cases()])
def test_second_derivative_through_a_fused_op_raises_instead_of_being_dropped(name, build, path):
    """The kernels' gradients are first order. With a loss linear in the op's output, the incoming gradient is a
    constant and torch's once_differentiable let the gradients through as constants, although dq depends on k and
    v and the predictor input's dctx on W: a gradient penalty through them came out silently zero (audit, session
    30). Under create_graph=True the gradients must now raise when differentiated, on the eager twin and on the
    custom op (what tracing or a dispatch mode gets); create_graph without differentiating them still works."""
    from _op_paths import PassThrough
    mode = PassThrough() if path == "custom_op" else contextlib.nullcontext()
    with mode:
        torch.manual_seed(0)
        out, x, other = build()
        g, = torch.autograd.grad(out.sum(), x, create_graph=True)
        assert g.requires_grad, "the gradient must carry the node that refuses differentiation"
        with pytest.raises(RuntimeError, match="first order"):  # a penalty term's backward
            (g.pow(2).sum() + other.sum()).backward()
        # the values are the first-order backward's (same inputs, same noise seed)
        torch.manual_seed(0)
        out, x, other = build()
        g1, = torch.autograd.grad(out.sum(), x)
        assert torch.equal(g.detach(), g1)


def _func_grad_cases():
    pos, idx = torch.randn(16, 8, device=DEV), torch.tensor([1, 2], device=DEV)
    return [("attention", "q, k, v", lambda a: sk.attention(a, a, a), (1, 4, 2, 8)),
            ("dispatch_attention", "q, k, v", lambda a: sk.dispatch_attention(a, a, a, backend="triton"), (1, 4, 2, 8)),
            ("attention_qkv", "qkv", lambda a: sk.attention_qkv(a), (1, 4, 3, 2, 8)),
            ("stop_embed", "backend", lambda w: sk.stop_embed(pos, idx, w, None, backend="triton"), (8, 6)),
            ("assemble_predictor_input", "backend",
             lambda w: sk.assemble_predictor_input(torch.randn(1, 2, 6, device=DEV), torch.tensor([[0, 1]], device=DEV),
                                                   torch.tensor([[[2, 3]]], device=DEV), w, None, pos, backend="triton"),
             (8, 6))]


@pytest.mark.parametrize("name,arg,fn,shape", _func_grad_cases(), ids=[c[0] for c in _func_grad_cases()])
def test_explicit_kernel_backend_under_func_grad_is_refused_by_name(name, arg, fn, shape):
    """torch.func.grad (and vjp, jacrev, jvp …) cannot run the kernels' autograd registrations; an explicitly asked-for
    kernel backend used to fail with torch's internal 'must override the setup_context staticmethod' (audit, session
    30). It is refused by name now, saying what runs instead; "auto" still takes the PyTorch paths and vmap the
    kernels."""
    x = torch.randn(shape, device=DEV)
    with pytest.raises(NotImplementedError, match=f"{arg}.*torch.func.*'auto'"):
        torch.func.grad(lambda a: fn(a).sum())(x)
    with pytest.raises(NotImplementedError, match=f"{arg}.*torch.func"):
        torch.func.jvp(lambda a: fn(a).sum(), (x,), (torch.ones_like(x),))
    auto = {"attention": lambda a: sk.dispatch_attention(a, a, a), "dispatch_attention": lambda a: sk.dispatch_attention(a, a, a),
            "attention_qkv": lambda a: sk.dispatch_attention_qkv(a)}.get(name)
    if auto is not None:  # the same call with "auto" differentiates (SDPA under the transform), as autograd does
        want = x.double().requires_grad_()
        auto(want).sum().backward()
        torch.testing.assert_close(torch.func.grad(lambda a: auto(a).sum())(x.double()), want.grad)
    batched = torch.randn(2, *shape, device=DEV)
    torch.manual_seed(1)
    mapped = torch.func.vmap(fn, randomness="same")(batched)[0]  # (one noise seed per call: the StoP ops)
    torch.manual_seed(1)
    torch.testing.assert_close(mapped, fn(batched[0]))


@pytest.mark.parametrize("backend", ["auto", "sdpa", "reference", "triton"])
def test_empty_head_dim_is_refused_by_every_backend(backend):
    """A head dim of 0 was an empty result on sdpa/"auto" and an error on the reference and Triton (audit, session
    30): every backend refuses it now, naming q."""
    q = torch.randn(2, 5, 2, 0)
    with pytest.raises(ValueError, match=r"q: .*Dh >= 1"):
        sk.dispatch_attention(q, q, q, backend=backend)
    with pytest.raises(TypeError, match=r"^max_seqlen"):  # (True == 1 == N: a bool is not a length)
        sk.dispatch_attention(*(torch.randn(1, 1, 2, 8, device=DEV, dtype=torch.float16) for _ in range(3)),
                              max_seqlen=True, backend=backend)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("mode", ["learned", "isotropic", "none"])
def test_the_mask_token_is_an_input_only_where_it_is_read(backend, mode):
    """The StoP modes ignore the mask token; the Triton path still handed it to autograd, so its output required
    grad where the reference's did not (audit, session 30)."""
    mt = torch.randn(1, 1, 8, device=DEV, requires_grad=True)
    out = sk.assemble_predictor_input(torch.randn(1, 2, 6, device=DEV), torch.tensor([[0, 1]], device=DEV),
                                      torch.tensor([[[2, 3]]], device=DEV), torch.randn(8, 6, device=DEV), None,
                                      torch.randn(16, 8, device=DEV), noise_mode=mode, mask_token=mt, backend=backend)
    assert out.requires_grad == (mode == "none")


def test_a_launch_past_cudas_grid_limit_is_refused_by_name():
    """131 072 one-token packed sequences beside one of 65 536 tokens (16 heads) gave the backward a grid of
    2 147 500 032 programs, which Triton's launcher refused with a bare OverflowError (audit, session 30)."""
    from stop_kernels.ops import attention as A
    with pytest.raises(ValueError, match=r"cu_seqlens \(or q.s batch\): 131073 sequences of up to 65536 tokens need 2147500032"):
        A._grid_size(16 * 1024 * 131073, 131073, 65536)
    assert A._grid_size(2 ** 31 - 1, 1, 1) == 2 ** 31 - 1


@pytest.mark.parametrize("wide", ["D", "E"])
@pytest.mark.parametrize("backend", ["auto", "triton", "reference"])
def test_a_weight_wider_than_the_kernels_launch_grids_is_refused_by_name(backend, wide):
    """D or E past 2**20: the kernels tile them on CUDA's grid.y (at most 65535 blocks), so a launch failed with
    "invalid configuration argument", naming nothing (the CUDA extension from D ≈ 2.5e7, the Triton dW from E ≈ 2**21;
    audit, session 31). Every backend refuses it by name, the assembly too; 2**20 itself is accepted."""
    from stop_kernels import _checks as chk
    big = chk.MAX_KERNEL_WIDTH + 1
    D, E = (big, 2) if wide == "D" else (2, big)
    w = torch.randn(D, E, device=DEV)
    with pytest.raises(ValueError, match=r"weight: D and E at most 2\*\*20"):
        sk.stop_embed(torch.randn(4, D, device=DEV), torch.tensor([1, 3], device=DEV), w, backend=backend)
    with pytest.raises(ValueError, match=r"weight: D and E at most 2\*\*20"):
        sk.assemble_predictor_input(torch.randn(1, 2, E, device=DEV), torch.tensor([[0, 1]], device=DEV),
                                    torch.tensor([[[2, 3]]], device=DEV), w, None, torch.randn(4, D, device=DEV),
                                    backend=backend)
    chk.kernel_widths(torch.empty(chk.MAX_KERNEL_WIDTH, 1, device="meta"))  # the limit itself passes
