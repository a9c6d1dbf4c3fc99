"""stop_kernels.ops.linear_gelu: the forward-only fc1 + bias + GELU (tanh form) of one GEMM, its reference twin,
its wiring into the target encoder's MLPs (config key ``fused_target_gelu``), and why the tanh form is allowed."""
import math

import pytest
import torch
import torch.nn.functional as F

from stop_kernels.models.vit import MLP, use_gelu_epilogue, vit_encoder
from stop_kernels.ops.linear_gelu import linear_gelu, linear_gelu_reference
from stop_kernels.training import distributed as D
from stop_kernels.training.config import TrainConfig
from stop_kernels.training.loop import Trainer, build_models, synthetic_batches

from _train_helpers import TINY, cuda_step_losses, trained_run

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLASLt's epilogue needs a CUDA GPU")


def gelu_tanh_f64(h: torch.Tensor) -> torch.Tensor:
    """The tanh form written out (float64), independent of F.gelu."""
    return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))


def expected(x, w, b):
    h = x.double() @ w.double().t() + (0 if b is None else b.double())
    return gelu_tanh_f64(h)


# ------------------------------------------------------------------------------------------------
# the math: the twin against the written-out formula, and the CPU path (which is the twin)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lead, E, D, with_bias", [((5,), 16, 24, True), ((2, 3, 7), 200, 72, True), ((1,), 3, 1, False),
                                                   ((4, 0), 8, 8, True), ((), 9, 5, True)])
def test_twin_and_cpu_path_equal_the_tanh_formula(lead, E, D, with_bias):
    g = torch.Generator().manual_seed(sum(lead) + E + D)
    x = torch.randn(*lead, E, generator=g, dtype=torch.float64) * 2
    w = torch.randn(D, E, generator=g, dtype=torch.float64) / math.sqrt(E)
    b = torch.randn(D, generator=g, dtype=torch.float64) if with_bias else None
    want = expected(x, w, b)
    for fn in (linear_gelu_reference, linear_gelu):
        got = fn(x, w, b)
        assert got.shape == (*lead, D) and got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the exact GELU is another function: the check above could tell them apart
    if want.numel():
        exact = F.gelu(x @ w.t() + (0 if b is None else b))
        assert (exact - want).abs().max() > 1e-6


def test_meta_tensors_give_the_shape():
    """A model on the meta device (shape inference) runs the MLP's epilogue path too: the twin's shapes."""
    x, w, b = (torch.empty(*s, device="meta") for s in ((3, 4, 8), (5, 8), (5,)))
    out = linear_gelu(x, w, b)
    assert out.shape == (3, 4, 5) and out.device.type == "meta"


def test_non_contiguous_input_and_cpu_autocast():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 40, generator=g)[:, ::2]  # strided view, E = 20
    w, b = torch.randn(12, 20, generator=g) / 5, torch.randn(12, generator=g)
    torch.testing.assert_close(linear_gelu(x, w, b), expected(x, w, b).float(), rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 parameters, as the models keep them
        out = linear_gelu(x, w, b)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected(x, w, b), rtol=2e-2, atol=2e-2)


def test_tanh_form_is_below_bf16_rounding():
    """Why the epilogue's tanh form may stand in for the exact GELU: on a ViT-H MLP (hidden 5120, fp64), the change
    it makes to fc2's output is ≈ 2e-4 of the output's norm, several times less than what rounding the activation
    to bf16 (what autocast does to it in every path) changes. Measured: 2.0e-4 against 1.7e-3."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(256, 5120, generator=g, dtype=torch.float64)  # fc1 outputs, LayerNorm-scaled inputs
    w2 = torch.randn(384, 5120, generator=g, dtype=torch.float64) / math.sqrt(5120)
    exact = F.gelu(h) @ w2.t()
    tanh = gelu_tanh_f64(h) @ w2.t()
    bf16 = F.gelu(h).bfloat16().double() @ w2.t()
    tanh_err = ((tanh - exact).norm() / exact.norm()).item()
    bf16_err = ((bf16 - exact).norm() / exact.norm()).item()
    assert 0 < tanh_err < bf16_err / 4, (tanh_err, bf16_err)
    assert (F.gelu(h) - gelu_tanh_f64(h)).abs().max() < 5e-4  # pointwise: at most 4.7e-4, at |h| ≈ 2.7


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
def test_bad_input_names_the_argument():
    x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
    with pytest.raises(TypeError, match=r"^x: expected dtype"):
        linear_gelu(x.long(), w, b)
    with pytest.raises(TypeError, match=r"^x: expected a torch.Tensor"):
        linear_gelu([1.0], w, b)
    with pytest.raises(ValueError, match=r"^weight: expected 2 dimensions"):
        linear_gelu(x, w[0], b)
    with pytest.raises(ValueError, match=r"^bias: expected shape \[5\]"):
        linear_gelu(x, w, torch.randn(4))
    with pytest.raises(ValueError, match=r"^x: expected last dim 8"):
        linear_gelu(torch.randn(3, 7), w, b)
    with pytest.raises(TypeError, match=r"^weight: expected dtype float32 \(that of x"):
        linear_gelu(x, w.double(), b)
    with pytest.raises(TypeError, match=r"^bias: expected dtype float32"):
        linear_gelu(x, w, b.half())
    with pytest.raises(ValueError, match=r"^weight: expected device cpu"):
        linear_gelu(x, w.to("meta"), b)
    for name, args in (("x", (x.requires_grad_(), w, b)), ("weight", (x.detach(), w.requires_grad_(), b))):
        with pytest.raises(ValueError, match=rf"^{name}: requires grad, and linear_gelu is forward only"):
            linear_gelu(*args)
    with torch.no_grad():  # what the target encoder does: no graph recorded, so nothing to refuse
        linear_gelu(x, w, b)


# ------------------------------------------------------------------------------------------------
# the MLP and the training loop (config key fused_target_gelu)
# ------------------------------------------------------------------------------------------------
def test_mlp_takes_the_epilogue_only_where_autograd_records_nothing():
    torch.manual_seed(0)
    mlp = MLP(16, 64)
    x = torch.randn(2, 5, 16)
    exact = mlp(x)
    mlp.gelu_epilogue = True
    torch.testing.assert_close(exact, mlp(x))  # parameters require grad: the exact path, and differentiable
    mlp(x).sum().backward()
    assert mlp.fc1.weight.grad is not None
    with torch.no_grad():
        fused = mlp(x)
    want = F.linear(gelu_tanh_f64(F.linear(x.double(), mlp.fc1.weight.double(), mlp.fc1.bias.double())),
                    mlp.fc2.weight.double(), mlp.fc2.bias.double())
    torch.testing.assert_close(fused.double(), want, rtol=1e-5, atol=1e-6)
    assert not torch.equal(fused, exact)
    mlp.requires_grad_(False)  # the target encoder's parameters: grad mode on, still nothing recorded
    torch.testing.assert_close(mlp(x), fused)


def test_the_epilogue_path_compiles_in_one_graph():
    """The target encoder's blocks are torch.compile'd: the path (its checks, the autocast queries) must trace
    without a graph break (torch 2.11's Dynamo could not trace torch.amp.is_autocast_available, so the op reads
    the device types once at import), under autocast too."""
    torch.manual_seed(0)
    mlp = MLP(8, 32).requires_grad_(False)
    mlp.gelu_epilogue = True
    x = torch.randn(2, 3, 8)
    compiled = torch.compile(mlp, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), mlp(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compiled(x).dtype == torch.bfloat16


def test_config_key_sets_the_target_encoders_mlps_only(tmp_path):
    plain = build_models(TrainConfig(**dict(TINY, out=str(tmp_path))))
    models = build_models(TrainConfig(**dict(TINY, out=str(tmp_path), fused_target_gelu=True)))
    flags = {name: {m.gelu_epilogue for m in getattr(models, name).modules() if isinstance(m, MLP)}
             for name in ("encoder", "predictor", "target_encoder")}
    assert flags == {"encoder": {False}, "predictor": {False}, "target_encoder": {True}}
    assert {m.gelu_epilogue for m in plain.target_encoder.modules() if isinstance(m, MLP)} == {False}
    assert TrainConfig().fused_target_gelu is False
    enc = use_gelu_epilogue(vit_encoder("vit_tiny", img_size=32, patch_size=8))
    assert all(blk.mlp.gelu_epilogue for blk in enc.blocks)
    assert not any(blk.mlp.gelu_epilogue for blk in use_gelu_epilogue(enc, False).blocks)


def test_training_with_the_key_takes_the_epilogue_and_trains_alike(tmp_path, cpu_train, count_calls):
    """vit_tiny on the CPU, 4 steps: with the key every target block's MLP runs linear_gelu (counted) and the losses
    stay within the tanh form's difference of the exact GELU's."""
    import stop_kernels.models.vit as vit

    def run(out, **over):
        cfg = TrainConfig(**dict(TINY, out=str(out), pred_depth=2, **over))
        tr = Trainer(cfg, D.init_distributed(cfg), None)
        batches = synthetic_batches(cfg, 2, cfg.batch_size, torch.device("cpu"), seed=2)
        torch.manual_seed(6)
        sched = (cfg.lr, cfg.weight_decay, cfg.ema_start)
        return [float(tr.step(*batches[i % 2], sched)[0]) for i in range(4)], tr

    calls = count_calls(vit, "linear_gelu")
    plain, _ = run(tmp_path / "exact")
    assert not calls
    fused, tr = run(tmp_path / "fused", fused_target_gelu=True)
    assert len(calls) == 4 * len(tr.models.target_encoder.blocks)
    assert fused != plain
    for a, b in zip(fused, plain):
        assert abs(a - b) <= 5e-3 * abs(b), (fused, plain)


def test_a_runs_models_loaded_from_its_checkpoint_compute_exactly(tmp_path, cpu_train):
    """The key is a setting of the run's steps, not of its weights: the models a checkpoint gives to evaluation, to
    the official export or to another run's init_from keep the exact GELU (and the fp32 residual stream)."""
    from stop_kernels.training.checkpoint import load_run_models
    run, _ = trained_run(tmp_path, steps=1, fused_target_gelu=True, bf16_residual=True, precision="bf16")
    models, _ = load_run_models(run)
    assert not any(m.gelu_epilogue for m in models.target_encoder.modules() if isinstance(m, MLP))
    assert models.encoder.residual_dtype is None and models.predictor.residual_dtype is None


# ------------------------------------------------------------------------------------------------
# CUDA: the epilogue itself
# ------------------------------------------------------------------------------------------------
@cuda
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3), (torch.float32, 1e-4)])
@pytest.mark.parametrize("T, E, D", [(1024, 256, 1024), (77, 200, 72), (1, 64, 48), (5, 24, 16)])
def test_cuda_epilogue_against_float64(dtype, tol, T, E, D):
    g = torch.Generator(device="cuda").manual_seed(T + E + D)
    x = torch.randn(T, E, device="cuda", generator=g).to(dtype) * 2
    w = (torch.randn(D, E, device="cuda", generator=g) / math.sqrt(E)).to(dtype)
    b = torch.randn(D, device="cuda", generator=g).to(dtype)
    x[0].fill_(float("nan"))  # poisoned row: its output must be NaN, and no other row's
    got = linear_gelu(x, w, b)
    assert got.dtype == dtype and got.shape == (T, D)
    assert got[0].isnan().all()
    want = expected(x[1:], w, b)
    torch.testing.assert_close(got[1:].double(), want, rtol=tol, atol=tol)


@cuda
def test_cuda_autocast_casts_like_linear_and_runs_one_kernel():
    """Under bf16 autocast with fp32 parameters (the target encoder's): bf16 out, equal to the unfused bf16 tanh path
    up to the epilogue's rounding; and at ViT-H's target shape the call launches one GPU kernel besides the casts
    (the GEMM with bias and GELU in its epilogue), not a GEMM and an elementwise GELU."""
    torch.manual_seed(0)
    x = torch.randn(2048, 1280, device="cuda")
    w, b = torch.randn(5120, 1280, device="cuda") / 36, torch.randn(5120, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = linear_gelu(x, w, b)
        ref = F.gelu(F.linear(x, w, b), approximate="tanh")
    assert got.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    linear_gelu(xb, wb, bb)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        linear_gelu(xb, wb, bb)
        torch.cuda.synchronize()
    # cuBLASLt may clear its workspace first (a "Memset (Device)" record in GPU run 7): a memset, not a kernel
    kernels = [e.name for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("Memset")]
    assert len(kernels) == 1, kernels


@cuda
def test_fused_target_gelu_losses_match_the_exact_gelus_on_cuda(tmp_path):
    """The GPU twin of the CPU check above, under bf16 autocast (the default precision there)."""
    plain, _ = cuda_step_losses(tmp_path / "exact")
    fused, tr = cuda_step_losses(tmp_path / "fused", fused_target_gelu=True)
    assert all(blk.mlp.gelu_epilogue for blk in tr.models.target_encoder.blocks)
    for a, b in zip(fused, plain):
        assert abs(a - b) <= 5e-3 * abs(b), (fused, plain)
