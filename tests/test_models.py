"""Encoder presets, predictor shapes and model-level bad input."""
import os

import pytest
import torch

from stop_kernels import reference
from stop_kernels.models import VIT_PRESETS, predictor_for, resolve_model_name, vit_encoder, vit_tiny
from stop_kernels.models.official import official_checkpoint

I_JEPA_SIZES = {  # (width, depth, heads) of the official presets
    "vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16), "vit_huge": (1280, 32, 16), "vit_giant": (1408, 40, 16),
}


def test_presets_match_ijepa():
    assert {k: (v.embed_dim, v.depth, v.num_heads) for k, v in VIT_PRESETS.items()} == I_JEPA_SIZES
    assert VIT_PRESETS["vit_giant"].mlp_ratio == pytest.approx(48 / 11)
    assert resolve_model_name("vit_h") == "vit_huge"
    with pytest.raises(ValueError, match="model"):
        resolve_model_name("vit_enormous")


@pytest.mark.parametrize("patch", [14, 16])
def test_encoder_and_predictor_shapes(patch):
    img = 4 * patch
    enc = vit_tiny(img_size=img, patch_size=patch)
    assert enc.num_patches == 16 and enc.pos_embed.shape == (16, 192)
    assert enc.blocks[0].attn.qkv.bias is not None and enc.norm.eps == 1e-6
    pred = predictor_for(enc, img_size=img, patch_size=patch, predictor_embed_dim=96, depth=2)
    assert pred.predictor_blocks[0].attn.num_heads == 3
    x = torch.randn(2, 3, img, img)
    ctx = torch.tensor([[0, 1, 2, 5], [3, 4, 8, 9]])
    tgt = [torch.tensor([[10, 11], [12, 13]]), torch.tensor([[14, 15], [6, 7]])]
    z = enc(x, [ctx])
    assert z.shape == (2, 4, 192)
    out = pred(z, [ctx], tgt, generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 2, 192) and torch.isfinite(out).all()
    assert enc(x).shape == (2, 16, 192)


def test_encoder_bad_input():
    with pytest.raises(ValueError, match="img_size"):
        vit_encoder("vit_tiny", img_size=100, patch_size=16)
    enc = vit_tiny(img_size=32, patch_size=16)
    with pytest.raises(ValueError, match="imgs"):
        enc(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="masks"):
        enc(torch.randn(1, 3, 32, 32), [torch.tensor([[0, 4]])])
    with pytest.raises(ValueError, match="masks"):
        enc(torch.randn(2, 3, 32, 32), [torch.tensor([[0, 1]])])


def test_predictor_bad_input():
    enc = vit_tiny(img_size=32, patch_size=16)
    with pytest.raises(ValueError, match="noise_mode"):
        predictor_for(enc, img_size=32, patch_size=16, noise_mode="random")
    with pytest.raises(ValueError, match="noise_std"):
        predictor_for(enc, img_size=32, patch_size=16, noise_std=-1.0)
    pred = predictor_for(enc, img_size=32, patch_size=16, predictor_embed_dim=48, depth=1)
    z = torch.randn(1, 2, 192)
    with pytest.raises(ValueError, match="masks_x"):
        pred(z, [torch.tensor([[0, 1]])] * 2, [torch.tensor([[2]])])
    with pytest.raises(ValueError, match="tgt_idx"):
        pred(z, [torch.tensor([[0, 1]])], [torch.tensor([[4]])])


def test_step_flops_match_the_anchors():
    """ANCHORS.md: ViT-H/14, batch 64, 74 context / 42 target tokens, 4 blocks ≈ 20.6 + 17.9 + 3.8 + 1.1 TFLOP."""
    from stop_kernels.models.flops import jepa_step_flops
    f = jepa_step_flops(embed_dim=1280, depth=32, mlp_ratio=4.0, pred_dim=384, pred_depth=12, batch=64,
                        num_patches=256, patch_size=14, n_ctx=74, n_tgt=42, npred=4)
    assert f["target_forward"] / 1e12 == pytest.approx(20.6, abs=0.1)
    assert f["context_fwd_bwd"] / 1e12 == pytest.approx(17.9, abs=0.1)
    assert f["predictor_fwd_bwd"] / 1e12 == pytest.approx(3.8, abs=0.1)
    assert f["attention"] / 1e12 == pytest.approx(1.1, abs=0.1)
    assert f["total"] / 1e12 == pytest.approx(43.5, abs=0.3)


def test_step_floors_at_the_card_limits():
    """The floors a profile's categories are read against (ViT-H/14, B 64, 74 / 42 tokens, H200 limits of
    ANCHORS.md: 707 TFLOP/s, 4.23 TB/s), worked by hand: the matmul FLOPs without attention; attention is
    byte-bound in every part at these lengths (target forward 4 bf16 [B·N, E] tensors per block, context and
    predictor 12 with the backward); AdamW 28 B per trainable parameter, the EMA 12 B per target parameter."""
    from stop_kernels.models.flops import jepa_step_flops, jepa_step_floors_ms
    dims = dict(embed_dim=1280, depth=32, mlp_ratio=4.0, pred_dim=384, pred_depth=12, batch=64, num_patches=256,
                patch_size=14, n_ctx=74, n_tgt=42, npred=4)
    f = jepa_step_floors_ms(**dims, trainable_params=654_000_000, ema_params=632_000_000, tflops=707.0, tbps=4.23)
    flops = jepa_step_flops(**dims)
    assert f["matmul"] == pytest.approx((flops["total"] - flops["attention"]) / 707e12 * 1e3, rel=1e-12)
    assert f["matmul"] == pytest.approx(60.0, abs=0.1)
    attn_bytes = 2 * (4 * 64 * 256 * 1280 * 32 + 12 * 64 * 74 * 1280 * 32 + 12 * 256 * 116 * 384 * 12)
    assert f["attention"] == pytest.approx(attn_bytes / 4.23e12 * 1e3, rel=1e-12)
    assert f["optimizer"] == pytest.approx((28 * 654e6 + 12 * 632e6) / 4.23e12 * 1e3, rel=1e-12)
    # the same, worked on paper: target 1.27 + context 1.10 + predictor 0.78 ms of attention bytes;
    # 18.3 GB of AdamW and 7.6 GB of EMA traffic
    assert (f["attention"], f["optimizer"]) == (pytest.approx(3.146, abs=2e-3), pytest.approx(6.122, abs=2e-3))
    # at 1 % of the matmul rate every part is FLOP-bound: forward Q·Kᵀ and P·V, 2.5× more in a flash backward
    slow = jepa_step_floors_ms(**dims, trainable_params=1, ema_params=1, tflops=7.07, tbps=4.23)
    attn_flops = 4 * (64 * 256 ** 2 * 1280 * 32 + 3.5 * 64 * 74 ** 2 * 1280 * 32 + 3.5 * 256 * 116 ** 2 * 384 * 12)
    assert slow["attention"] == pytest.approx(attn_flops / 7.07e12 * 1e3, rel=1e-12)


def test_attention_cost_of_one_predictor_call():
    """The issue's numbers at (256, 16, 116, 24) bf16: the forward moves q, k, v, o (≈ 91 MB), the backward
    alone ≈ 180 MB (q, k, v, o, dO in; dq, dk, dv out; the fp32 logsumexp), forward+backward both."""
    from stop_kernels.models.flops import attention_cost
    e = 256 * 116 * 16 * 24 * 2
    lse = 256 * 116 * 16 * 4
    fwd_flops = 4 * 256 * 16 * 116 ** 2 * 24
    assert attention_cost(256, 116, 16 * 24, "fwd", heads=16) == (fwd_flops, 4 * e)
    assert attention_cost(256, 116, 16 * 24, "bwd", heads=16) == (2.5 * fwd_flops, 8 * e + lse)
    assert attention_cost(256, 116, 16 * 24, "fwdbwd", heads=16) == (3.5 * fwd_flops, 12 * e + 2 * lse)
    assert 4 * e == pytest.approx(91.2e6, rel=1e-3) and 8 * e + lse == pytest.approx(184.4e6, rel=1e-3)
    with pytest.raises(ValueError, match="^kind"):
        attention_cost(1, 1, 8, "backward")


def test_constructor_sizes_are_checked_by_name():
    """Review findings: num_heads 0 divided by zero, depth < 0 and mlp_ratio 0 built degenerate models, a
    width not a multiple of 4 named an internal argument, and predictor_for accepted a patch grid that
    differs from the encoder's (every position placed wrong, no error)."""
    from stop_kernels.models import VisionTransformer
    from stop_kernels.models.predictor import VisionTransformerPredictor
    for kw, key in ((dict(num_heads=0), "num_heads"), (dict(depth=-1), "depth"), (dict(mlp_ratio=0.0), "mlp_ratio"),
                    (dict(embed_dim=66, num_heads=3), "embed_dim"), (dict(num_heads=5), "num_heads")):
        with pytest.raises(ValueError, match=f"^{key}"):
            VisionTransformer(img_size=32, patch_size=8, **{**dict(embed_dim=64, depth=1, num_heads=4), **kw})
    with pytest.raises(TypeError, match="^num_heads"):
        VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4.0)
    for bad, exc in ((0, ValueError), (-1, ValueError), (True, TypeError), (2.5, TypeError), ("3", TypeError)):
        with pytest.raises(exc, match="^in_chans"):  # 0 and True built a model, the rest failed unnamed in torch
            VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4, in_chans=bad)
    for kw, key in ((dict(num_patches=0), "num_patches"), (dict(num_patches=16.0), "num_patches"),
                    (dict(predictor_embed_dim=50), "predictor_embed_dim"), (dict(depth=-1), "depth")):
        with pytest.raises(ValueError, match=f"^{key}"):
            VisionTransformerPredictor(**{**dict(num_patches=16, embed_dim=64, predictor_embed_dim=48, depth=1,
                                                 num_heads=4), **kw})
    enc = vit_tiny(img_size=32, patch_size=8)  # a 4x4 grid
    with pytest.raises(ValueError, match="^img_size"):
        predictor_for(enc, img_size=64, patch_size=8)
    with pytest.raises(ValueError, match="masks"):  # an empty context mask: named, not a reshape error
        enc(torch.randn(2, 3, 32, 32), [torch.empty(2, 0, dtype=torch.long)])
    assert reference.gather_tokens(torch.randn(2, 16, 8), torch.empty(3, 2, 0, dtype=torch.long)).shape == (6, 0, 8)


def test_official_loader_takes_exact_shapes_and_hidden_sizes():
    """Review findings: the loader compared element counts only (a transposed weight loaded scrambled), and
    rebuilt the MLP width as int(E · hidden / E), one short for e.g. E = 176, hidden = 240."""
    from stop_kernels.models import VisionTransformer, load_official_checkpoint, vit_predictor
    from stop_kernels.models.official import mlp_ratio_for
    torch.manual_seed(0)
    E = 176
    enc = VisionTransformer(img_size=32, patch_size=8, embed_dim=E, depth=1, num_heads=4, mlp_ratio=mlp_ratio_for(240, E))
    pred = vit_predictor(num_patches=16, embed_dim=E, num_heads=4, predictor_embed_dim=32, depth=1)
    assert enc.blocks[0].mlp.fc1.weight.shape == (240, E)

    ck = official_checkpoint(enc, pred, enc, epoch=3)
    m = load_official_checkpoint(ck, num_heads=4)
    assert torch.equal(m.encoder.blocks[0].mlp.fc1.weight, enc.blocks[0].mlp.fc1.weight) and m.epoch == 3
    w = ck["predictor"]["module.predictor_proj.weight"]
    bad = {**ck, "predictor": {**ck["predictor"], "module.predictor_proj.weight": w.t().contiguous()}}
    with pytest.raises(ValueError, match="predictor_proj.weight"):
        load_official_checkpoint(bad, num_heads=4)
    with pytest.raises(TypeError, match="num_heads"):
        load_official_checkpoint(ck, num_heads=4.0)
    # a width of no preset has no head count to read: asked for, not guessed from a nearby preset
    with pytest.raises(ValueError, match="^num_heads: the checkpoint's width 176 matches no preset; pass num_heads"):
        load_official_checkpoint(ck)


# ------------------------------------------------------------------------------------------------ mutation audit
def test_every_alias_names_its_preset():
    """Each short alias resolves to the preset of its letter (only vit_h was checked), and full names to themselves."""
    for short, full in (("vit_t", "vit_tiny"), ("vit_s", "vit_small"), ("vit_b", "vit_base"), ("vit_l", "vit_large"),
                        ("vit_h", "vit_huge"), ("vit_g", "vit_giant")):
        assert resolve_model_name(short) == full
    assert all(resolve_model_name(n) == n for n in VIT_PRESETS)


def test_built_presets_take_the_mlp_ratio_and_channels():
    """vit_encoder builds the preset's MLP width (ViT-g: 48/11 → 6144, not 4·1408) and the given in_chans."""
    with torch.device("meta"):
        giant = vit_encoder("vit_g", img_size=28, patch_size=14)
    assert len(giant.blocks) == 40 and giant.blocks[0].mlp.fc1.out_features == 6144
    assert giant.blocks[0].attn.num_heads == 16 and giant.embed_dim == 1408
    enc = vit_tiny(img_size=16, patch_size=8, in_chans=1)
    assert enc.patch_embed.proj.in_channels == 1
    assert enc.embed(torch.randn(2, 1, 16, 16)).shape == (2, 4, 192)


def test_qkv_bias_and_layer_norm_eps():
    """qkv_bias=False builds the QKV projection without a bias (encoder and predictor); every LayerNorm
    uses eps 1e-6, as the official models do (1e-5 is within the fixtures' tolerance)."""
    from stop_kernels.models import VisionTransformer
    from stop_kernels.models.predictor import VisionTransformerPredictor
    enc = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=4, qkv_bias=False)
    pred = VisionTransformerPredictor(num_patches=4, embed_dim=32, predictor_embed_dim=16, depth=2, num_heads=4,
                                      qkv_bias=False)
    assert all(b.attn.qkv.bias is None and b.attn.proj.bias is not None
               for b in list(enc.blocks) + list(pred.predictor_blocks))
    norms = [m for model in (enc, pred) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * (2 * 2 + 1) and all(m.eps == 1e-6 for m in norms)


def _std(t):
    return t.detach().float().std().item()


def test_official_initialisation():
    """What the official trainers start from: truncated-normal weights of std 0.02 in every Linear and Conv2d,
    the blocks' attn.proj and mlp.fc2 included (the trainers' re-initialisation undoes the constructors'
    1/sqrt(2·layer) rescale), zero biases; the mask token is drawn with std 0.02 too (not left at zero); every
    LayerNorm starts as the identity map (unit weight, zero bias)."""
    from stop_kernels.models import VisionTransformer
    from stop_kernels.models.predictor import VisionTransformerPredictor
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=32, patch_size=8, embed_dim=256, depth=3, num_heads=4)
    pred = VisionTransformerPredictor(num_patches=16, embed_dim=256, predictor_embed_dim=128, depth=3, num_heads=4)
    for model in (enc, pred):
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                # ≥ 16k samples each: the std estimate is within 1 %; allow 5 % (the last block's
                # 1/sqrt(6) rescale, were it applied, would be 59 % off)
                assert _std(m.weight) == pytest.approx(0.02, rel=0.05), m
                assert m.weight.abs().max() <= 2.0  # trunc_normal_'s absolute bounds
                assert m.bias is None or torch.count_nonzero(m.bias) == 0
    # 128 samples: the std estimate is within ≈ 6 %
    assert _std(pred.mask_token) == pytest.approx(0.02, rel=0.3)
    # init_weights resets every LayerNorm (also one it meets after others set its affine parameters)
    norms = [m for model in (enc, pred) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * (2 * 3 + 1)
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) and torch.count_nonzero(m.bias) == 0 for m in norms)


def test_step_flops_by_component():
    """Every term of the step's FLOP count, worked by hand on sizes where each one shows (the ViT-H anchors
    hide terms below 0.1 TFLOP: the noise projection's backward, the patch embedding's, the context
    projection's rows, the predictor's attention backward, the predictor's fixed MLP ratio 4, in_chans)."""
    from stop_kernels.models.flops import jepa_step_flops
    E, L, r, D, Lp, B, N, p, nc, nt, k, C = 64, 2, 3.0, 32, 3, 5, 16, 4, 7, 3, 2, 1
    f = jepa_step_flops(embed_dim=E, depth=L, mlp_ratio=r, pred_dim=D, pred_depth=Lp, batch=B, num_patches=N,
                        patch_size=p, n_ctx=nc, n_tgt=nt, npred=k, in_chans=C)
    patch = 2 * B * N * E * C * p * p
    enc_lin = lambda tokens: 2 * tokens * L * (4 * E * E + 2 * r * E * E)  # noqa: E731  QKV, proj, fc1, fc2
    pred_lin = 2 * k * B * (nc + nt) * Lp * (4 * D * D + 2 * 4 * D * D)
    ctx_proj, out_proj, noise = 2 * B * nc * E * D, 2 * k * B * nt * D * E, 2 * k * B * nt * E * D
    assert f["target_forward"] == pytest.approx(enc_lin(B * N) + patch, rel=1e-12)
    assert f["context_fwd_bwd"] == pytest.approx(3 * enc_lin(B * nc) + 2 * patch, rel=1e-12)
    assert f["predictor_fwd_bwd"] == pytest.approx(3 * (pred_lin + ctx_proj + out_proj) + 2 * noise, rel=1e-12)
    attn = lambda seqs, n, w, depth: 4 * seqs * n * n * w * depth  # noqa: E731  Q·Kᵀ and P·V
    assert f["attention"] == pytest.approx(attn(B, N, E, L) + 3 * attn(B, nc, E, L) + 3 * attn(k * B, nc + nt, D, Lp),
                                           rel=1e-12)
    assert f["total"] == pytest.approx(sum(v for key, v in f.items() if key != "total"), rel=1e-12)
    # the other noise modes draw no noise through the projection: its forward and weight gradient go
    g = jepa_step_flops(embed_dim=E, depth=L, mlp_ratio=r, pred_dim=D, pred_depth=Lp, batch=B, num_patches=N,
                        patch_size=p, n_ctx=nc, n_tgt=nt, npred=k, in_chans=C, noise_projection=False)
    assert f["total"] - g["total"] == pytest.approx(2 * noise, rel=1e-12)


def test_predictor_defaults_and_its_noise_std():
    """StoP's σ defaults to 0.25 (the ViT-H recipe's 0.2 is a setting), and the predictor draws its
    masked rows with its own σ: predictor_embed = identity, no bias ⇒ masked row − ψ = n."""
    from stop_kernels.models.predictor import VisionTransformerPredictor, vit_predictor
    kw = dict(num_patches=16, embed_dim=32, num_heads=4)
    assert VisionTransformerPredictor(**kw).noise_std == 0.25 == vit_predictor(**kw).noise_std
    assert VisionTransformerPredictor(**kw).noise_mode == "learned"
    g = torch.Generator().manual_seed(3)
    B, Nc, Nt, npred = 4, 3, 8, 2
    ctx = torch.stack([torch.randperm(16, generator=g)[:Nc + Nt] for _ in range(B)])
    x = torch.randn(B, Nc, 32, generator=g)
    for backend in ("unfused", "auto"):
        pred = vit_predictor(**kw, predictor_embed_dim=32, depth=0, noise_std=0.1, input_backend=backend)
        with torch.no_grad():
            pred.predictor_embed.weight.copy_(torch.eye(32))
            pred.predictor_embed.bias.zero_()
        tgt = [ctx[:, Nc:]] * npred
        z = pred.assemble(x, [ctx[:, :Nc]], tgt, generator=torch.Generator().manual_seed(4))
        n = z[:, Nc:] - pred.predictor_pos_embed[torch.stack(tgt).reshape(npred * B, Nt)]
        # 2·4·8·32 = 2048 samples: relative error of the std ≈ 1.6 %; allow 5 sigma (0.25 is 150 % off)
        assert abs(n.std().item() / 0.1 - 1) < 5 / (2 * n.numel()) ** 0.5, backend
        # the context rows carry no noise
        torch.testing.assert_close(z[:B, :Nc], x + pred.predictor_pos_embed[ctx[:, :Nc]])


def test_unfused_predictor_is_the_reference_assembly():
    """input_backend='unfused' is the official code's path: reference.assemble_predictor_input with
    torch.randn noise from the generator (the fused op would draw Philox noise instead)."""
    from stop_kernels.models.predictor import vit_predictor
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 32, generator=g)
    ctx, tgt = torch.tensor([[0, 1, 2], [3, 4, 5]]), [torch.tensor([[6, 7], [8, 9]]), torch.tensor([[10, 11], [12, 13]])]
    for mode in ("learned", "isotropic"):
        pred = vit_predictor(num_patches=16, embed_dim=32, num_heads=4, predictor_embed_dim=16, depth=1,
                             noise_mode=mode, noise_std=0.3, input_backend="unfused")
        emb = pred.predictor_embed
        want = reference.assemble_predictor_input(x, ctx, tgt, emb.weight, emb.bias, pred.predictor_pos_embed,
                                                  noise_mode=mode, noise_std=0.3,
                                                  generator=torch.Generator().manual_seed(6))
        got = pred.assemble(x, [ctx], tgt, generator=torch.Generator().manual_seed(6))
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_predictor_stop_rows_and_explicit_noise_on_every_input_backend():
    """``stop_rows`` (the packed path's StoP rows) of an "unfused" predictor runs stop_embed's "auto" (stop_embed
    has no "unfused" backend): the same rows as an "auto" predictor for the same generator. With explicit noise
    the "cuda" input backend is the reference assembly with that noise, as every backend is (its CUDA C++ path
    draws Philox noise and would ignore it; no CUDA is needed here)."""
    from stop_kernels.models.predictor import vit_predictor
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 32, generator=g)
    ctx, tgt = torch.tensor([[0, 1, 2], [3, 4, 5]]), [torch.tensor([[6, 7], [8, 9]]), torch.tensor([[10, 11], [12, 13]])]
    preds = {}
    for backend in ("unfused", "auto", "cuda", "reference"):
        torch.manual_seed(0)  # the same initial weights
        preds[backend] = vit_predictor(num_patches=16, embed_dim=32, num_heads=4, predictor_embed_dim=16, depth=1,
                                       noise_std=0.3, input_backend=backend)
    rows = {k: preds[k].stop_rows(tgt[0], generator=torch.Generator().manual_seed(2)) for k in ("unfused", "auto")}
    assert rows["auto"].shape == (2, 2, 16) and torch.equal(rows["unfused"], rows["auto"])
    noise = torch.randn(2, 2, 2, 32, generator=g)  # [npred, B, Nt, E]
    got = preds["cuda"].assemble(x, [ctx], tgt, noise=noise)
    torch.testing.assert_close(got, preds["reference"].assemble(x, [ctx], tgt, noise=noise), rtol=0, atol=0)


def test_predictor_mask_and_noise_layouts():
    """The masks and noise layouts the predictor takes give one result: a bare [B, Nc] context and [B, Nt]
    target tensor, a stacked [npred, B, Nt] target tensor, and noise as the official per-block list."""
    from stop_kernels.models.predictor import vit_predictor
    torch.manual_seed(0)
    pred = vit_predictor(num_patches=16, embed_dim=32, num_heads=4, predictor_embed_dim=16, depth=1).double().eval()
    g = torch.Generator().manual_seed(7)
    B, Nc, Nt, npred = 3, 4, 2, 3
    perm = torch.stack([torch.randperm(16, generator=g) for _ in range(B)])
    ctx = perm[:, :Nc]
    tgt = [perm[:, Nc + i * Nt: Nc + (i + 1) * Nt] for i in range(npred)]
    x = torch.randn(B, Nc, 32, dtype=torch.float64, generator=g)
    noise = torch.randn(npred, B, Nt, 32, dtype=torch.float64, generator=g) * 0.25
    with torch.no_grad():
        want = pred(x, [ctx], tgt, noise=noise)
        torch.testing.assert_close(pred(x, ctx, torch.stack(tgt), noise=list(noise)), want, rtol=0, atol=0)
        # (one block alone: another batch size of the same float64 matmuls, equal to rounding)
        torch.testing.assert_close(pred(x, ctx, tgt[1], noise=noise[1:2]), want[B:2 * B], rtol=1e-12, atol=1e-12)


def test_encoder_takes_a_bare_mask_tensor():
    """enc(imgs, ctx[B, K]) is enc(imgs, [ctx]) (the official code passes either)."""
    from stop_kernels.models import VisionTransformer
    enc = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=4).eval()
    x = torch.randn(2, 3, 32, 32)
    ctx = torch.tensor([[0, 3], [1, 2]])
    with torch.no_grad():
        torch.testing.assert_close(enc(x, ctx), enc(x, [ctx]), rtol=0, atol=0)


def test_predictor_sizes_are_checked():
    """A patch count that is no square (no sin-cos grid) and a width < 1 are refused, named."""
    from stop_kernels.models.predictor import VisionTransformerPredictor
    kw = dict(num_patches=16, embed_dim=32, predictor_embed_dim=16, depth=1, num_heads=4)
    for over, key in ((dict(num_patches=12), "num_patches"), (dict(embed_dim=0), "embed_dim"),
                      (dict(embed_dim=32.0), "embed_dim")):
        with pytest.raises(ValueError, match=f"^{key}"):
            VisionTransformerPredictor(**{**kw, **over})


def test_residual_dtype_applies_under_autocast_only():
    """run_blocks casts the stream to residual_dtype under autocast only; outside it nothing changes."""
    from stop_kernels.models.vit import Block, run_blocks
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([Block(16, 2)])
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        torch.testing.assert_close(run_blocks(blocks, x, residual_dtype=torch.bfloat16), run_blocks(blocks, x),
                                   rtol=0, atol=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert run_blocks(blocks, x).dtype == torch.float32
            assert run_blocks(blocks, x, residual_dtype=torch.bfloat16).dtype == torch.bfloat16


def test_official_loader_reads_and_checks_every_size():
    """The predictor's MLP ratio is read from its weights (not assumed 4); a preset width gives the preset's
    heads; --model must match the depth as well as the width and img_size is checked like patch_size;
    noise_mode and noise_std reach the predictor; state dicts saved without the DDP prefix load alike."""
    from stop_kernels.models import VisionTransformer, load_official_checkpoint
    from stop_kernels.models.official import strip_prefix
    from stop_kernels.models.predictor import VisionTransformerPredictor
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=32, patch_size=16, embed_dim=192, depth=1, num_heads=3).eval()
    pred = VisionTransformerPredictor(num_patches=4, embed_dim=192, predictor_embed_dim=48, depth=1, num_heads=3,
                                      mlp_ratio=3.0).eval()
    ck = official_checkpoint(enc, pred, enc)
    m = load_official_checkpoint(ck)  # width 192: vit_tiny's 3 heads
    assert m.encoder.blocks[0].attn.num_heads == 3 and m.predictor.predictor_blocks[0].attn.num_heads == 3
    assert m.predictor.predictor_blocks[0].mlp.fc1.out_features == 144
    assert (m.predictor.noise_mode, m.predictor.noise_std, m.epoch) == ("learned", 0.25, None)
    m2 = load_official_checkpoint(ck, noise_mode="isotropic", noise_std=0.3)
    assert (m2.predictor.noise_mode, m2.predictor.noise_std) == ("isotropic", 0.3)
    # σ by default: StoP's recipe for the width, 0.2 from ViT-H's 1280 up (read on meta weights: no memory)
    from stop_kernels.models.official import stop_noise_std
    assert (stop_noise_std(768), stop_noise_std(1024), stop_noise_std(1280), stop_noise_std(1408)) == \
        (0.25, 0.25, 0.2, 0.2)
    huge = VisionTransformer(img_size=28, patch_size=14, embed_dim=1280, depth=1, num_heads=16, mlp_ratio=0.25)
    hpred = VisionTransformerPredictor(num_patches=4, embed_dim=1280, predictor_embed_dim=64, depth=1, num_heads=4)
    assert load_official_checkpoint(official_checkpoint(huge, hpred, None)).predictor.noise_std == 0.2
    x, ctx, tgt = torch.randn(2, 3, 32, 32), torch.tensor([[0, 1], [2, 3]]), [torch.tensor([[2], [0]])]
    noise = torch.randn(1, 2, 1, 192)
    with torch.no_grad():
        torch.testing.assert_close(m.encoder.eval()(x, [ctx]), enc(x, [ctx]), rtol=0, atol=0)
        z = enc(x, [ctx])
        torch.testing.assert_close(m.predictor.eval()(z, [ctx], tgt, noise=noise), pred(z, [ctx], tgt, noise=noise),
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match="^model: vit_tiny has width 192 and depth 12"):
        load_official_checkpoint(ck, model="vit_tiny")
    with pytest.raises(ValueError, match="^img_size: given 64, but the checkpoint was trained with 32"):
        load_official_checkpoint(ck, img_size=64)
    assert strip_prefix({"module.a": 1, "b": 2, "x.module.c": 3}) == {"a": 1, "b": 2, "x.module.c": 3}
    bare = {k: strip_prefix(sd) for k, sd in ck.items()}
    m3 = load_official_checkpoint(bare)
    for a, b in ((m3.encoder, enc), (m3.predictor, pred), (m3.target_encoder, enc)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # a table must be [P, D] or [1, P, D]: the same numbers in another leading shape are refused
    # (the predictor's: the encoder's table also sets the patch grid the sizes are read from)
    for bad in (torch.zeros(2, 2, 48), torch.zeros(2, 4, 48)):
        wrong = {**ck, "predictor": {**ck["predictor"], "module.predictor_pos_embed": bad}}
        with pytest.raises(ValueError, match=r"predictor_pos_embed: checkpoint \(2, "):
            load_official_checkpoint(wrong)


def test_unknown_model_names_the_flag_once():
    """Review finding: an unknown --model in the checkpoint loaders read "--model: model: expected one of …" (the
    preset check's own prefix kept behind the flag's)."""
    from stop_kernels.models.official import EncoderSizes, check_sizes
    sizes = EncoderSizes(192, 12, 3, 4.0, 16, 224, 3)
    for cli, flag in ((False, "model"), (True, "--model")):
        with pytest.raises(ValueError, match=rf"^{flag}: expected one of \('vit_tiny', .*'vit_giant'\) or an alias "
                                             r"\('vit_t', .*\), got 'vit_x'$"):
            check_sizes(sizes, model="vit_x", cli=cli)
    assert check_sizes(sizes, model="vit_t") == 3


def test_checkpoint_size_settings_of_another_type_are_type_errors():
    """Review finding: img_size='224' was refused with "img_size: given 224, but the checkpoint was trained with
    224" (a string compared unequal to the int); a size that is no integer is a TypeError naming it."""
    from stop_kernels.models.official import EncoderSizes, check_sizes
    sizes = EncoderSizes(192, 12, 3, 4.0, 16, 224, 3)
    for kw, name in ((dict(img_size="224"), "img_size"), (dict(patch_size=16.0), "patch_size"),
                     (dict(patch_size=True), "patch_size")):
        with pytest.raises(TypeError, match=rf"^{name}: expected an integer"):
            check_sizes(sizes, **kw)
    assert check_sizes(sizes, img_size=224, patch_size=16) == 3


def test_block_is_the_pre_norm_formula():
    """A block is x + proj(attn(LN1(x))), then + fc2(GELU(fc1(LN2(x)))) with the exact (erf) GELU of the official
    code: checked in float64 against that formula written out, every parameter redrawn so that no LayerNorm is
    the identity. (The tanh GELU, or a block reading norm2 for its attention, stays within the official
    fixtures' 1e-5 at their sizes.)"""
    import torch.nn.functional as F
    from stop_kernels.models.vit import Block
    torch.manual_seed(0)
    E, H = 16, 2
    blk = Block(E, H, mlp_ratio=3.0).double()
    with torch.no_grad():
        for p in blk.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    x = torch.randn(2, 5, E, dtype=torch.float64)

    def ln(norm, t):
        return F.layer_norm(t, (E,), norm.weight, norm.bias, eps=1e-6)

    qkv = F.linear(ln(blk.norm1, x), blk.attn.qkv.weight, blk.attn.qkv.bias)
    q, k, v = qkv.unflatten(-1, (3, H, E // H)).unbind(-3)
    y = x + F.linear(reference.attention(q, k, v, scale=(E // H) ** -0.5).flatten(-2), blk.attn.proj.weight,
                     blk.attn.proj.bias)
    hidden = F.gelu(F.linear(ln(blk.norm2, y), blk.mlp.fc1.weight, blk.mlp.fc1.bias), approximate="none")
    want = y + F.linear(hidden, blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), want, rtol=1e-12, atol=1e-12)


def test_encoder_stacks_several_masks_in_the_official_order():
    """enc(imgs, [m0, m1]) is [enc(imgs, [m0]); enc(imgs, [m1])]: each mask's kept patches through the encoder
    alone, stacked mask-major (the official apply_masks order). Every other test passes one mask, where an
    encoder that used the first mask only would give the same result."""
    from stop_kernels.models import VisionTransformer
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4).double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=g)
    m0, m1 = (torch.stack([torch.randperm(16, generator=g)[:5] for _ in range(2)]) for _ in range(2))
    with torch.no_grad():
        got = enc(x, [m0, m1])
        assert got.shape == (4, 5, 32)
        torch.testing.assert_close(got, torch.cat([enc(x, [m0]), enc(x, [m1])]), rtol=1e-12, atol=1e-12)


def test_num_heads_given_wins_over_the_models_preset():
    """check_sizes takes the head count from num_heads, else from --model's preset, else from the preset of the
    checkpoint's width (its docstring's order): a given num_heads is not overridden by --model."""
    from stop_kernels.models.official import EncoderSizes, check_sizes
    sizes = EncoderSizes(192, 12, 3, 4.0, 16, 224, 3)
    assert check_sizes(sizes, model="vit_t", num_heads=6) == 6
    assert check_sizes(sizes, model="vit_t") == 3 == check_sizes(sizes._replace(num_heads=None), model="vit_t")


def test_peak_tflops_per_card():
    """The MFU peak (benchmarks/profile_step.py) of the H100 and the H200 SXM: the same dense bf16 989 TFLOP/s
    (the H200 adds memory and bandwidth, not tensor-core FLOPs); a card not in the table gets the caller's default."""
    from stop_kernels.models.flops import peak_tflops
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 == peak_tflops("NVIDIA H200")
    assert (peak_tflops("NVIDIA H100 PCIe"), peak_tflops("NVIDIA H100 NVL")) == (756.0, 835.0)
    assert peak_tflops("NVIDIA A100-SXM4-80GB", default=312.0) == 312.0


def test_cuda_input_backend_runs_the_other_noise_modes_as_auto(count_calls):
    """input_backend "cuda" has a kernel for the learned StoP rows only; isotropic rows run as "auto" (the fused
    assembly where Triton runs), not as "reference" (host Philox noise and separate ops), which gives the same
    numbers and so showed in no output."""
    from stop_kernels.ops import predictor_input
    from stop_kernels.models.predictor import vit_predictor
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 32, generator=g)
    ctx, tgt = torch.tensor([[0, 1, 2], [3, 4, 5]]), [torch.tensor([[6, 7], [8, 9]])]
    out = {}
    for backend in ("cuda", "auto"):
        torch.manual_seed(0)
        pred = vit_predictor(num_patches=16, embed_dim=32, num_heads=4, predictor_embed_dim=16, depth=1,
                             noise_mode="isotropic", input_backend=backend)
        calls = count_calls(predictor_input, "launch_pos_noise")  # the fused assembly's isotropic rows, either path
        out[backend] = pred.assemble(x, [ctx], tgt, generator=torch.Generator().manual_seed(9))
        assert len(calls) == 1, backend
    torch.testing.assert_close(out["cuda"], out["auto"], rtol=0, atol=0)


@pytest.mark.parametrize("patch,chans,img", [(14, 3, 28), (16, 1, 32), (5, 2, 15)])
def test_patch_embed_is_the_strided_convolution(patch, chans, img):
    """The patch embedding's GEMM (with K padded to a multiple of 8 where C·p·p is not one: 588, 25·2) equals
    the official strided convolution in float64, forward and the kernel's and bias's gradients, on random
    weights, bias and a channels-last image; under bf16 autocast it returns bf16 within bf16 rounding of it."""
    from stop_kernels.models.vit import PatchEmbed
    torch.manual_seed(patch)
    pe = PatchEmbed(img, patch, chans, 24).double()
    with torch.no_grad():
        pe.proj.bias.normal_()
    x = torch.randn(3, chans, img, img, dtype=torch.float64).to(memory_format=torch.channels_last)
    y = pe(x)
    ref = torch.nn.functional.conv2d(x, pe.proj.weight, pe.proj.bias, stride=patch).flatten(2).transpose(1, 2)
    assert y.shape == (3, (img // patch) ** 2, 24)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [pe.proj.weight, pe.proj.bias], g)
    want = torch.autograd.grad(ref, [pe.proj.weight, pe.proj.bias], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    pe = pe.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = pe(x.float())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_public_constructors_and_forwards_name_a_bad_argument():
    """Bad values that crashed with an unnamed error (or, num_classes=2.5, gave labels like 0.5) are a
    TypeError/ValueError naming the argument: the encoder's images of another dtype outside autocast, the
    predictor's x of another width (the op's check blamed predictor_embed's weight), the datasets', transforms'
    and mask collator's arguments."""
    from stop_kernels.data import MultiBlockMaskCollator, SyntheticImages
    from stop_kernels.data.datasets import ImageFolderDataset
    from stop_kernels.data.transforms import make_transforms
    from stop_kernels.models import vit_encoder
    from stop_kernels.models.predictor import VisionTransformerPredictor
    enc = vit_encoder("vit_tiny", img_size=32, patch_size=8)
    with pytest.raises(TypeError, match="^imgs: expected the encoder's dtype float32"):
        enc(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts the patches: accepted, float64 is not
        assert enc(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)).shape == (1, 16, 192)
        with pytest.raises(TypeError, match="^imgs: expected the encoder's dtype float32"):
            enc(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    pred = VisionTransformerPredictor(num_patches=16, embed_dim=64, predictor_embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="^x: expected the encoder's width 64"):
        pred(torch.randn(2, 3, 48), torch.randint(0, 16, (2, 3)), [torch.randint(0, 16, (2, 2))])
    for kw, name in ((dict(num_classes=2.5), "num_classes"), (dict(seed=1.5), "seed"), (dict(img_size=8.0), "img_size"),
                     (dict(length="10"), "length")):
        with pytest.raises(TypeError, match=f"^{name}: expected an integer"):
            SyntheticImages(**kw)
    with pytest.raises(TypeError, match="^root: expected a folder path"):
        ImageFolderDataset(None, lambda x: x)
    with pytest.raises(ValueError, match="^root: folder .* does not exist"):
        ImageFolderDataset("/nonexistent/imagenet", lambda x: x)
    for kw, name in ((dict(color_jitter=-1), "color_jitter"), (dict(color_jitter=100), "color_jitter"),
                     (dict(crop_scale=(1.0, 0.3)), "crop_scale"), (dict(img_size=0), "img_size")):
        with pytest.raises(ValueError, match=f"^{name}: expected"):
            make_transforms(**kw)
    with pytest.raises(TypeError, match="^enc_mask_scale: expected a pair of numbers"):
        MultiBlockMaskCollator(enc_mask_scale=(0.85, "x"))



def test_constructors_name_their_bad_arguments():
    """Audit, session 30: bools were taken as image and patch sizes, a non-string preset name raised an unhashable
    TypeError naming nothing, and predictor_for(None) an AttributeError."""
    from stop_kernels.models import predictor_for, vit_encoder
    with pytest.raises(ValueError, match="img_size"):
        vit_encoder("vit_tiny", img_size=True, patch_size=1)
    with pytest.raises(ValueError, match="patch_size"):
        vit_encoder("vit_tiny", img_size=32, patch_size=True)
    with pytest.raises(TypeError, match="model"):
        vit_encoder(["vit_tiny"], img_size=32, patch_size=8)
    with pytest.raises(TypeError, match="encoder"):
        predictor_for(None, img_size=32, patch_size=8)
    enc = vit_encoder("vit_t", img_size=32, patch_size=8)  # the good calls still build
    assert predictor_for(enc, img_size=32, patch_size=8, predictor_embed_dim=48, depth=1).num_patches == 16


def test_float64_model_under_autocast_stays_float64():
    """The patch embedding built its patches in the autocast dtype for a float64 model, which autocast never
    casts: bf16 patches against a float64 weight (audit, session 30)."""
    from stop_kernels.models.vit import VisionTransformer
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = enc(x)
    assert y.dtype == torch.float64 and torch.equal(y, enc(x))
    enc32 = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a float32 model still runs its patches in bf16
        assert enc32.patch_embed(x.float()).dtype == torch.bfloat16


def test_official_round_trip_of_models_the_constructors_accept(tmp_path):
    """save/load_official_checkpoint gave back other models, or failed, for a predictor with other heads than the
    encoder's, a depth-0 encoder or predictor, and blocks without a qkv bias; a DDP-wrapped model was written with
    module.module. keys (audit, session 30)."""
    from stop_kernels.models import official
    from stop_kernels.models.predictor import VisionTransformerPredictor
    from stop_kernels.models.vit import VisionTransformer
    torch.manual_seed(0)
    h, ci, ti = torch.randn(2, 4, 32), torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]]), [torch.tensor([[8, 9], [10, 11]])]
    n = torch.randn(1, 2, 2, 32)
    for enc_kw, pred_kw, load_kw in ((dict(depth=1), dict(depth=1, num_heads=4), dict(predictor_num_heads=4)),
                                     (dict(depth=0), dict(depth=0), {}),
                                     (dict(depth=1, qkv_bias=False), dict(depth=1, qkv_bias=False), {})):
        enc = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, num_heads=2, **enc_kw)
        pred = VisionTransformerPredictor(num_patches=16, embed_dim=32, predictor_embed_dim=16, **{"num_heads": 2, **pred_kw})
        with torch.no_grad():
            for p in pred.parameters():
                p.normal_(0, 0.5)
        path = official.save_official_checkpoint(tmp_path / "c.pth.tar", enc, pred)
        m = official.load_official_checkpoint(path, num_heads=2, **load_kw)
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(m.encoder(x), enc(x))
        assert torch.equal(m.predictor(h, ci, ti, noise=n), pred(h, ci, ti, noise=n))
    with pytest.raises(ValueError, match="predictor_num_heads"):
        official.load_official_checkpoint(path, num_heads=2, predictor_num_heads=0)


def test_official_checkpoint_of_a_ddp_wrapped_model_loads(tmp_path):
    """DDP's own ``module.`` prefix was kept under the official one (``module.module.pos_embed``), a file that no
    loader reads (audit, session 30). Run in a subprocess: DDP needs a process group."""
    import subprocess
    import sys
    code = f"""
import os, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from stop_kernels.models import official
from stop_kernels.models.predictor import VisionTransformerPredictor
from stop_kernels.models.vit import VisionTransformer
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:0")
enc = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
pred = VisionTransformerPredictor(num_patches=16, embed_dim=32, predictor_embed_dim=16, depth=1, num_heads=2)
for wrap in (DDP, lambda m, **k: torch.compile(DDP(m, **k)), lambda m, **k: DDP(torch.compile(m), **k)):
    ck = official.official_checkpoint(wrap(enc), wrap(pred, find_unused_parameters=True))
    assert all(k.startswith("module.") and not k.startswith("module.module.") for k in ck["encoder"]), list(ck["encoder"])[:3]
    m = official.load_official_checkpoint(ck, num_heads=2)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(m.encoder(x), enc(x))
dist.destroy_process_group()
print("ok")
"""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


# -- an outside user's model code (audit, session 31) --------------------------------------------------------

def _small_predictor(**kw):
    from stop_kernels.models.predictor import vit_predictor
    return vit_predictor(num_patches=16, embed_dim=192, num_heads=3, predictor_embed_dim=48, depth=1, **kw)


def _pred_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 6, 192, generator=g), torch.randint(0, 16, (2, 6), generator=g),
            [torch.randint(0, 16, (2, 3), generator=g)])


def test_predictor_embed_is_refused_where_it_would_be_ignored_and_parametrizations_work():
    """The predictor reads predictor_embed's weight and bias (the fused StoP op multiplies by them in its kernels)
    and never calls it: a subclass's forward or a forward hook there was silently ignored. Both are refused by
    name; a parametrization of the weight acts through .weight and changes the output."""
    import torch.nn as nn
    from torch.nn.utils import parametrize
    x, ci, ti = _pred_inputs()
    p = _small_predictor(input_backend="reference")
    base = p(x, ci, ti, generator=torch.Generator().manual_seed(1))
    hook = p.predictor_embed.register_forward_pre_hook(lambda *a: None)
    with pytest.raises(TypeError, match="predictor_embed: forward hooks"):
        p(x, ci, ti)
    hook.remove()

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w
    parametrize.register_parametrization(p.predictor_embed, "weight", Doubled())
    doubled = p(x, ci, ti, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(doubled, base)
    with parametrize.cached():  # the same as a plain Linear holding the doubled weight
        q = _small_predictor(input_backend="reference")
        q.load_state_dict({k.replace("parametrizations.weight.original", "weight"): v
                           for k, v in p.state_dict().items()})
        with torch.no_grad():
            q.predictor_embed.weight.mul_(2)
        torch.testing.assert_close(q(x, ci, ti, generator=torch.Generator().manual_seed(1)), doubled)

    class MyLinear(nn.Linear):
        def forward(self, t):
            return super().forward(t) * 0
    p.predictor_embed = MyLinear(192, 48)
    with pytest.raises(TypeError, match="predictor_embed: expected a plain nn.Linear, got MyLinear"):
        p(x, ci, ti)


def test_models_compile_with_fullgraph_and_export_with_masks():
    """The index checks read mask values back to the host, which a traced graph cannot: an encoder given masks
    refused fullgraph=True and torch.export, and the I-JEPA predictor (mode "none", nothing random) refused
    fullgraph=True at its seed draw. Neither reads values while tracing now; the results equal eager."""
    enc = vit_tiny(img_size=32, patch_size=8)
    imgs, ci = torch.randn(2, 3, 32, 32), torch.randint(0, 16, (2, 6))
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(enc, fullgraph=True, backend="eager")(imgs, [ci]), enc(imgs, [ci]))
    exported = torch.export.export(enc, (imgs, [ci]))
    torch.testing.assert_close(exported.module()(imgs, [ci]), enc(imgs, [ci]))
    x, ci, ti = _pred_inputs()
    for kw in (dict(noise_mode="none"), dict(noise_std=0.0)):
        p = _small_predictor(**kw)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(p, fullgraph=True, backend="eager")(x, ci, ti), p(x, ci, ti))
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="masks: values must lie in"):  # eager calls still check the values
        enc(imgs, [ci + 16])


def test_calls_that_draw_no_noise_leave_the_global_generator_alone():
    """σ = 0 (and mode "none") draws no seed: the global CPU stream (a user's augmentation) is left as it was.
    A noisy call advances it, in eval() too (as the official code draws noise whatever the mode), unless it
    gets a generator."""
    import stop_kernels as sk
    x, ci, ti = _pred_inputs()
    pos, w, idx = torch.randn(16, 48), torch.randn(48, 192), torch.randint(0, 16, (2, 3))

    def advances(fn):
        state = torch.random.get_rng_state()
        fn()
        return not torch.equal(state, torch.random.get_rng_state())
    for backend in ("reference", "auto"):
        assert not advances(lambda: sk.stop_embed(pos, idx, w, noise_std=0.0, backend=backend))
        assert advances(lambda: sk.stop_embed(pos, idx, w, noise_std=0.1, backend=backend))
        assert not advances(lambda: sk.stop_embed(pos, idx, w, noise_std=0.1, backend=backend,
                                                  generator=torch.Generator().manual_seed(0)))
    for kw, draws in ((dict(noise_std=0.0), False), (dict(noise_mode="none"), False),
                      (dict(noise_mode="isotropic", noise_std=0.0), False), (dict(), True)):
        p = _small_predictor(**kw).eval()
        with torch.no_grad():
            assert advances(lambda: p(x, ci, ti)) == draws, kw
    p = _small_predictor().eval()
    with torch.no_grad():  # noise in eval: two calls differ
        assert not torch.allclose(p(x, ci, ti), p(x, ci, ti))


def test_models_built_on_the_meta_device_initialise_with_reset_parameters():
    """to_empty() gives a meta-built model storage holding whatever was there, the sin-cos tables included (nothing
    recomputed them); reset_parameters() initialises everything as the constructors do."""
    torch.manual_seed(3)
    enc, pred = vit_tiny(img_size=32, patch_size=8), _small_predictor()
    with torch.device("meta"):
        enc_m, pred_m = vit_tiny(img_size=32, patch_size=8), _small_predictor()
    enc_m.to_empty(device="cpu")
    pred_m.to_empty(device="cpu")
    for t in (enc_m.pos_embed, pred_m.predictor_pos_embed):
        t.fill_(float("nan"))  # (what to_empty may leave)
    torch.manual_seed(3)
    enc_m.reset_parameters()
    pred_m.reset_parameters()
    for a, b in ((enc, enc_m), (pred, pred_m)):  # (the constructors' default layer inits draw too: not seed-equal)
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            if k.endswith("pos_embed") or k.endswith("bias") or ".norm" in k or k.startswith("norm") \
                    or "predictor_norm" in k:
                assert torch.equal(sa[k], sb[k]), k  # the tables, zero biases, unit LayerNorms
            else:  # truncated-normal weights and mask token: std 0.02
                assert sb[k].isfinite().all() and 0.012 < sb[k].std() < 0.028, (k, sb[k].std())
