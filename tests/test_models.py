"""Encoder presets, predictor shapes and model-level bad input."""
import pytest
import torch

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
