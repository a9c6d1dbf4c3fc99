"""Schedules against their formulas, the EMA against its definition, and a short training run."""
import math

import pytest
import torch

from stop_kernels.training.config import TrainConfig, parse_config
from stop_kernels.training.ema import ema_update
from stop_kernels.training.schedules import lr_at, momentum_at, wd_at


def test_lr_schedule():
    kw = dict(warmup=10, total=110, start_lr=2e-4, ref_lr=1e-3, final_lr=1e-6)
    assert lr_at(0, **kw) == pytest.approx(2e-4 + 0.1 * 8e-4)
    assert lr_at(8, **kw) == pytest.approx(2e-4 + 0.9 * 8e-4)
    assert lr_at(9, **kw) == pytest.approx(1e-3)  # end of warm-up: the peak
    s = 60  # halfway through the cosine
    assert lr_at(s - 1, **kw) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(109, **kw) == pytest.approx(1e-6)
    assert all(lr_at(i, **kw) >= lr_at(i + 1, **kw) for i in range(9, 109))


def test_wd_and_momentum():
    assert wd_at(-1, total=100, ref_wd=0.04, final_wd=0.4) == pytest.approx(0.04)
    assert wd_at(49, total=100, ref_wd=0.04, final_wd=0.4) == pytest.approx(0.22)
    assert wd_at(99, total=100, ref_wd=0.04, final_wd=0.4) == pytest.approx(0.4)
    assert momentum_at(0, total=100, start=0.996, end=1.0) == pytest.approx(0.996)
    assert momentum_at(50, total=100, start=0.996, end=1.0) == pytest.approx(0.998)


def test_ema_definition():
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    o = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    want = [0.9 * a + 0.1 * b for a, b in zip(t, o)]
    ema_update(t, o, 0.9)
    for a, b in zip(t, want):
        torch.testing.assert_close(a, b)


def test_config_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: vit_small\nnoise_std: 0.2\npred_mask_scale: [0.1, 0.2]\n")
    cfg = parse_config(["--config", str(f), "--noise-std", "0.3", "--model", "vit_h", "--crop-scale", "0.5,1.0"])
    assert cfg.model == "vit_huge" and cfg.noise_std == 0.3 and cfg.pred_mask_scale == (0.1, 0.2)
    assert cfg.crop_scale == (0.5, 1.0)
    f.write_text("modle: vit_small\n")
    with pytest.raises(ValueError, match="modle"):
        parse_config(["--config", str(f)])
    with pytest.raises(ValueError, match="batch_size"):
        parse_config(["--batch-size", "many"])


@pytest.mark.parametrize("name", ["vit_b16_224", "vit_l16_224", "vit_h14_224", "vit_h16_448"])
def test_shipped_configs_parse(name):
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    cfg = parse_config(["--config", str(path)])
    assert cfg.batch_size == 2048 and cfg.npred == 4 and cfg.noise_mode == "learned"
    assert cfg.noise_std == (0.2 if cfg.model == "vit_huge" else 0.25)
    assert cfg.img_size % cfg.patch_size == 0


def test_short_training_run_lowers_the_loss(tmp_path):
    from stop_kernels.training.loop import train
    cfg = TrainConfig(steps=24, batch_size=8, synthetic_size=192, pred_depth=2, pred_emb_dim=96,
                      out=str(tmp_path), log_every=100)
    losses = train(cfg)
    assert len(losses) == 24 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == 24
