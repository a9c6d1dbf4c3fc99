"""Encoder presets, predictor shapes and model-level bad input."""
import pytest
import torch

from stop_kernels import reference

from stop_kernels.models import VIT_PRESETS, predictor_for, resolve_model_name, vit_encoder, vit_tiny

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

    def official(m):  # the official layout: DDP prefix, position tables [1, P, D]
        return {"module." + k: (v[None] if "pos_embed" in k else v) for k, v in m.state_dict().items()}
    ck = {"encoder": official(enc), "predictor": official(pred), "target_encoder": official(enc), "epoch": 3}
    m = load_official_checkpoint(ck, num_heads=4)
    assert torch.equal(m.encoder.blocks[0].mlp.fc1.weight, enc.blocks[0].mlp.fc1.weight) and m.epoch == 3
    w = ck["predictor"]["module.predictor_proj.weight"]
    bad = {**ck, "predictor": {**ck["predictor"], "module.predictor_proj.weight": w.t().contiguous()}}
    with pytest.raises(ValueError, match="predictor_proj.weight"):
        load_official_checkpoint(bad, num_heads=4)
    with pytest.raises(TypeError, match="num_heads"):
        load_official_checkpoint(ck, num_heads=4.0)

