"""Schedules against their formulas, the EMA against its definition, the config, the FLOP count, and short
in-process training runs (tiny models through the reference backends: each test takes seconds)."""
import json
import math
import pathlib

import pytest
import torch

from stop_kernels.training.config import ConfigError, TrainConfig, parse_config
from stop_kernels.training.ema import ema_update
from stop_kernels.training.schedules import lr_at, momentum_at, wd_at

from _train_helpers import TINY, read_log


def tiny(tmp_path, **over):
    return TrainConfig(**dict(TINY, out=str(tmp_path), **over))


def test_lr_schedule():
    kw = dict(warmup=10, total=110, start_lr=2e-4, ref_lr=1e-3, final_lr=1e-6)
    assert lr_at(0, **kw) == pytest.approx(2e-4 + 0.1 * 8e-4)
    assert lr_at(8, **kw) == pytest.approx(2e-4 + 0.9 * 8e-4)
    assert lr_at(9, **kw) == pytest.approx(1e-3)  # end of warm-up: the peak
    s = 60  # halfway through the cosine
    assert lr_at(s - 1, **kw) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(109, **kw) == pytest.approx(1e-6)
    assert all(lr_at(i, **kw) >= lr_at(i + 1, **kw) for i in range(9, 109))


def test_lr_is_clamped_at_final_lr():
    """validate() allows final_lr above lr; the cosine then never goes below final_lr (the official max())."""
    kw = dict(warmup=0, total=10, start_lr=0.0, ref_lr=1e-3, final_lr=2e-3)
    assert all(lr_at(i, **kw) == 2e-3 for i in range(10))


def test_wd_and_momentum():
    assert wd_at(-1, total=100, ref_wd=0.04, final_wd=0.4) == pytest.approx(0.04)
    assert wd_at(49, total=100, ref_wd=0.04, final_wd=0.4) == pytest.approx(0.22)
    assert wd_at(99, total=100, ref_wd=0.04, final_wd=0.4) == pytest.approx(0.4)
    assert momentum_at(0, total=100, start=0.996, end=1.0) == pytest.approx(0.996)
    assert momentum_at(50, total=100, start=0.996, end=1.0) == pytest.approx(0.998)


def test_held_schedules_follow_the_official_fix_thres_const_strategy():
    """lr_hold / wd_hold are the official StoP schedulers' fix_lr_thres / fix_wd_thres with strategy 'const'
    (ViT-H configs: 250 of 300 epochs): after ``hold`` calls of ``.step()`` each value stays at the cosine's value
    at ``hold``. Checked at every step against those schedulers' rule, stepped as the official loop steps them."""
    total, warmup, hold = 120, 10, 100

    def official_lr(s):  # WarmupCosineSchedule.step() for the s-th time
        if s < warmup:
            return 2e-4 + s / warmup * (1e-3 - 2e-4)
        p = (min(s, hold) - warmup) / (total - warmup)
        return max(1e-6, 1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * p)))

    def official_wd(s):  # CosineWDSchedule.step() for the s-th time
        return min(0.4, 0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi * min(s, hold) / total)))
    kw = dict(warmup=warmup, total=total, start_lr=2e-4, ref_lr=1e-3, final_lr=1e-6)
    for i in range(total):
        assert lr_at(i, hold=hold, **kw) == pytest.approx(official_lr(i + 1), rel=1e-12), i
        assert wd_at(i, total=total, ref_wd=0.04, final_wd=0.4, hold=hold) == pytest.approx(official_wd(i + 1),
                                                                                          rel=1e-12), i
    assert lr_at(hold - 2, hold=hold, **kw) > lr_at(hold - 1, hold=hold, **kw) == lr_at(total - 1, hold=hold, **kw)
    assert lr_at(total - 1, hold=hold, **kw) > 2 * lr_at(total - 1, **kw)  # held well above where the cosine ends
    assert all(lr_at(i, hold=0, **kw) == lr_at(i, **kw) for i in range(total))  # 0: no hold


def test_hold_epochs_in_steps_and_their_checks():
    from stop_kernels.training.loop import schedule_lengths
    # ViT-H/14 recipe on 1251 iterations per epoch: holds at 250 epochs, as the official thres · ipe
    cfg = parse_config(["--model", "vit_h"])
    assert (cfg.lr_hold_epoch, cfg.wd_hold_epoch) == (250, 250)
    assert schedule_lengths(cfg, 1251) == (375300, 50040, 312750, 312750)
    # with steps set, the same fraction of the steps as the epochs
    assert schedule_lengths(TrainConfig(steps=60, epochs=3, lr_hold_epoch=1.5), 5)[2] == 30
    for argv, key in ((["--lr-hold-epoch", "2", "--epochs", "1"], "lr_hold_epoch"),
                      (["--wd-hold-epoch", "-1"], "wd_hold_epoch"),
                      (["--lr-hold-epoch", "0.05", "--warmup-epochs", "0.1"], "lr_hold_epoch")):
        with pytest.raises(ConfigError, match=f"^{key}: "):
            parse_config(argv)


def test_schedule_shapes_between_their_ends_and_midpoints():
    """The checks above sit at the ends and at the midpoint, where a cosine and a straight line agree: a linear
    lr decay, a linear weight-decay schedule or a cosine EMA momentum passed them. At a quarter and at three
    quarters of the way the official shapes differ from those: cosine lr and wd (½(1 + cos πp)), linear momentum."""
    c1, c3 = 0.5 * (1 + math.cos(math.pi / 4)), 0.5 * (1 + math.cos(3 * math.pi / 4))  # ≈ 0.854, 0.146
    kw = dict(warmup=10, total=110, start_lr=2e-4, ref_lr=1e-3, final_lr=1e-6)
    # cosine progress p = (step + 1 − warmup) / (total − warmup): p = ¼ at step 34, ¾ at step 84
    assert lr_at(34, **kw) == pytest.approx(1e-6 + (1e-3 - 1e-6) * c1, rel=1e-12)
    assert lr_at(84, **kw) == pytest.approx(1e-6 + (1e-3 - 1e-6) * c3, rel=1e-12)
    # weight decay p = (step + 1) / total
    assert wd_at(24, total=100, ref_wd=0.04, final_wd=0.4) == pytest.approx(0.4 + (0.04 - 0.4) * c1, rel=1e-12)
    assert wd_at(74, total=100, ref_wd=0.04, final_wd=0.4) == pytest.approx(0.4 + (0.04 - 0.4) * c3, rel=1e-12)
    # the official momentum generator: ema0 + i·(ema1 − ema0) / total at step i
    assert momentum_at(25, total=100, start=0.996, end=1.0) == pytest.approx(0.997, rel=1e-12)
    assert momentum_at(75, total=100, start=0.996, end=1.0) == pytest.approx(0.999, rel=1e-12)


def test_ema_definition():
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    o = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    want = [0.9 * a + 0.1 * b for a, b in zip(t, o)]
    ema_update(t, o, 0.9)
    for a, b in zip(t, want):
        torch.testing.assert_close(a, b)


def test_ema_on_parameters_matches_definition():
    enc = torch.nn.Linear(4, 3)
    tgt = torch.nn.Linear(4, 3)
    want = [0.99 * a.detach() + 0.01 * b.detach() for a, b in zip(tgt.parameters(), enc.parameters())]
    ema_update(tgt.parameters(), enc.parameters(), 0.99)
    for a, b in zip(tgt.parameters(), want):
        torch.testing.assert_close(a.detach(), b)


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


@pytest.mark.parametrize("content, why", [(b"lr: [\n", "ParserError"), (b"\xff\xfe", "UnicodeDecodeError"),
                                          (None, "a folder")])
def test_a_config_file_that_is_no_yaml_is_a_config_error(tmp_path, content, why):
    """A malformed recipe (or a folder given as --config) is a ConfigError naming the file: train.py prints it and
    exits 2, where a YAML parser's or decoder's traceback came out before."""
    f = tmp_path / "c.yaml"
    if content is None:
        f.mkdir()
    else:
        f.write_bytes(content)
    with pytest.raises(ConfigError, match=f"^config: .*{why}"):
        parse_config(["--config", str(f)])


@pytest.mark.parametrize("flag", ["--wd", "--warmup", "--grad"])
def test_a_prefix_of_a_flag_is_not_taken_for_it(flag, capsys):
    """argparse's prefix matching took --wd for --wd-hold-epoch (the progress line calls weight decay "wd"),
    --warmup for --warmup-epochs and --grad for --grad-accum, silently; a flag must be spelled out."""
    with pytest.raises(SystemExit) as e:
        parse_config([flag, "1"])
    assert e.value.code == 2 and f"unrecognized arguments: {flag} 1" in capsys.readouterr().err


def test_model_name_picks_its_recipe():
    cfg = parse_config(["--model", "vit_h", "--batch-size", "64", "--benchmark", "20"])
    assert (cfg.model, cfg.img_size, cfg.patch_size, cfg.pred_depth, cfg.pred_emb_dim) == ("vit_huge", 224, 14, 12, 384)
    assert cfg.noise_std == 0.2 and cfg.npred == 4 and cfg.batch_size == 64 and cfg.precision == "bf16"
    cfg = parse_config(["--model", "vit_h", "--img-size", "448", "--patch-size", "16"])
    assert (cfg.img_size, cfg.patch_size, cfg.pred_depth) == (448, 16, 12)
    cfg = parse_config(["--model", "vit_b"])
    assert (cfg.patch_size, cfg.noise_std, cfg.epochs) == (16, 0.25, 600)
    cfg = parse_config(["--model", "vit_g"])  # the official I-JEPA ViT-g/16 predictor (in22k_vitg16_ep44.yaml)
    assert (cfg.model, cfg.patch_size, cfg.pred_depth, cfg.pred_emb_dim) == ("vit_giant", 16, 16, 384)
    default = parse_config([])
    assert default == TrainConfig(sharding="auto")  # the embedded default is untouched


def test_the_command_lines_model_picks_the_recipe_over_a_config_files(tmp_path):
    """``--config f.yaml --model vit_h`` where the file names another model: the command line's model picks the
    recipe whose values fill the keys the file leaves unset (mutation run, session 31: the file's model picking
    it passed every test)."""
    f = tmp_path / "mine.yaml"
    f.write_text("model: vit_small\nlr: 0.0005\n")
    cfg = parse_config(["--config", str(f), "--model", "vit_h"])
    assert (cfg.model, cfg.patch_size, cfg.noise_std, cfg.lr) == ("vit_huge", 14, 0.2, 0.0005)
    cfg = parse_config(["--config", str(f)])
    assert (cfg.model, cfg.patch_size, cfg.noise_std, cfg.lr) == ("vit_small", TrainConfig.patch_size,
                                                                  TrainConfig.noise_std, 0.0005)


def test_bool_flags_and_validation():
    cfg = parse_config(["--compile", "--resume", "--export", "false", "--attention-policy", "compiled:24=triton"])
    assert cfg.compile and cfg.resume and not cfg.export and cfg.attention_policy == "compiled:24=triton"
    for argv, key in ((["--sharding", "zero3"], "sharding"), (["--ac", "full"], "ac"),
                      (["--img-size", "30"], "img_size"), (["--pred-emb-dim", "98"], "pred_emb_dim"),
                      (["--ema-start", "1.5"], "ema_start"), (["--compile", "maybe"], "compile"),
                      (["--model", "vit_x"], "model"), (["--crop-scale", "0,1"], "crop_scale"),
                      (["--attention-policy", "compiled:24=cudnn"], "attention_policy"),
                      (["--attention-policy", "compiled:x=triton"], "attention_policy")):
        with pytest.raises(ConfigError, match=key):
            parse_config(argv)


@pytest.mark.parametrize("key, value", [
    ("compile", "false"),        # a truthy string: compile would be on
    ("steps", 2.5),              # would run 3 steps
    ("batch_size", 16.0), ("ckpt_every", True),
    ("lr", "1e-3"), ("lr", float("inf")), ("noise_std", float("nan")), ("weight_decay", float("inf")),
    ("crop_scale", (0.3,)), ("crop_scale", (0.3, float("inf"))),
    ("out", ""), ("out", None), ("seed", 2 ** 64), ("seed", -1),
    ("peak_tflops", -1.0), ("pred_emb_dim", 100),  # vit_tiny has 3 heads: 100 is not a multiple
])
def test_python_built_configs_are_type_and_range_checked(key, value):
    """TrainConfig(...) from Python skips the command line's parsing: validate() checks every value."""
    from stop_kernels.training.config import validate
    with pytest.raises(ConfigError, match=f"^{key}:"):
        validate(TrainConfig(**{key: value}))


@pytest.mark.parametrize("line, key", [("out:", "out"), ("out: null", "out"), ("batch_size: true", "batch_size"),
                                       ("compile: 2", "compile"), ("lr: .inf", "lr")])
def test_yaml_values_are_not_coerced_silently(tmp_path, line, key):
    f = tmp_path / "c.yaml"
    f.write_text(line + "\n")
    with pytest.raises(ConfigError, match=f"^{key}:"):
        parse_config(["--config", str(f)])


@pytest.mark.parametrize("value, want", [("", 30.0), ("1.5", 1.5), ("x", None), ("0", None), ("nan", None)])
def test_collective_timeout_from_the_environment(monkeypatch, value, want):
    from stop_kernels.training import distributed
    monkeypatch.setenv("STOP_KERNELS_DIST_TIMEOUT_MIN", value)
    if want is None:
        with pytest.raises(ConfigError, match="^STOP_KERNELS_DIST_TIMEOUT_MIN:"):
            distributed._env_timeout_min()
    else:
        assert distributed._env_timeout_min() == want


# Each shipped recipe: model, img_size, patch_size, pred_depth, epochs, noise_std, the augmentations (hflip,
# gaussian_blur, grayscale) and warm-up epochs, start / peak / final lr. The StoP recipes hold the settings of the
# official StoP code's configs/pretrain/vit-{b16,l16,h14,h16}.yaml (github.com/amirbar/StoP): flip, blur and
# use_color_distortion at jitter strength 0 (= RandomGrayscale(0.2) alone) on; ViT-B/L lr 8e-4 → 1e-4 after 15
# warm-up epochs, ViT-B predictor depth 6; ViT-H the I-JEPA schedule, σ 0.2. vit_g: the official I-JEPA ViT-g/16
# predictor with the I-JEPA ViT-H settings (no flip, blur or grayscale), as its file says.
RECIPES = {
    "vit_b16_224": (("vit_base", 224, 16, 6, 600, 0.25), True, (15, 2e-4, 8e-4, 1e-4)),
    "vit_l16_224": (("vit_large", 224, 16, 12, 600, 0.25), True, (15, 2e-4, 8e-4, 1e-4)),
    "vit_h14_224": (("vit_huge", 224, 14, 12, 300, 0.2), True, (40, 2e-4, 1e-3, 1e-6)),
    "vit_h16_448": (("vit_huge", 448, 16, 12, 300, 0.2), True, (40, 2e-4, 1e-3, 1e-6)),
    "vit_g16_224": (("vit_giant", 224, 16, 16, 300, 0.2), False, (40, 2e-4, 1e-3, 1e-6)),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_shipped_configs_parse(name):
    """Every recipe holds its official settings (see RECIPES) and the ones all of them share: masks, crops,
    weight decay, EMA, batch 2048, bf16."""
    assert sorted(p.stem for p in (pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")) \
        == sorted(RECIPES)
    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    cfg = parse_config(["--config", str(path)])
    sizes, augment, schedule = RECIPES[name]
    assert (cfg.model, cfg.img_size, cfg.patch_size, cfg.pred_depth, cfg.epochs, cfg.noise_std) == sizes
    assert cfg.batch_size == 2048 and cfg.noise_mode == "learned" and cfg.pred_emb_dim == 384
    assert (cfg.npred, cfg.enc_mask_scale, cfg.pred_mask_scale, cfg.aspect_ratio, cfg.min_keep) == (
        4, (0.85, 1.0), (0.15, 0.2), (0.75, 1.5), 10)
    assert cfg.crop_scale == (0.3, 1.0) and cfg.color_jitter == 0.0
    assert (cfg.hflip, cfg.gaussian_blur, cfg.grayscale) == (augment,) * 3
    assert cfg.steps == 0 and (cfg.warmup_epochs, cfg.start_lr, cfg.lr, cfg.final_lr) == schedule
    assert (cfg.weight_decay, cfg.final_weight_decay, cfg.ema_start, cfg.ema_end) == (0.04, 0.4, 0.996, 1.0)
    # official ViT-H/14 and ViT-H/16: fix_lr_thres = fix_wd_thres = 250 ('const'); no hold elsewhere
    assert (cfg.lr_hold_epoch, cfg.wd_hold_epoch) == ((250, 250) if name.startswith("vit_h") else (0, 0))
    assert cfg.precision == "bf16"


def test_flop_count_matches_the_anchor():
    """ViT-H/14, B 64, 74 context and 42 target tokens: ≈ 43 TFLOP per step (ANCHORS.md)."""
    from stop_kernels.training.metrics import step_flops
    cfg = parse_config(["--model", "vit_h"])
    total = step_flops(cfg, 64, 74, 42)
    assert total == pytest.approx(43e12, rel=0.04)
    # the training metric is the per-component count of models.flops (whose components test_models checks
    # against the anchors), with the recipe's sizes; without StoP's noise projection it drops by 2·R·E·D
    from stop_kernels.models.flops import jepa_step_flops
    parts = jepa_step_flops(embed_dim=1280, depth=32, mlp_ratio=4.0, pred_dim=384, pred_depth=12, batch=64,
                            num_patches=256, patch_size=14, n_ctx=74, n_tgt=42, npred=4)
    assert total == parts["total"]
    plain = step_flops(parse_config(["--model", "vit_h", "--noise-mode", "none"]), 64, 74, 42)
    assert total - plain == pytest.approx(2 * (2.0 * 4 * 64 * 42 * 1280 * 384), rel=1e-12)  # forward + dW


def test_short_training_run_lowers_the_loss(tmp_path, cpu_train):
    from stop_kernels.training.loop import train
    cfg = tiny(tmp_path, steps=30, batch_size=8, pred_depth=2, warmup_epochs=0.1)
    losses = train(cfg)
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    recs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 31))  # steps completed, as the checkpoint
    for key in ("step", "epoch", "loss", "lr", "wd", "momentum", "images_per_s", "tflops", "mfu", "peak_mem_gib"):
        assert key in recs[0]
    assert [r["loss"] for r in recs] == losses
    assert (tmp_path / "checkpoints" / "step_00000030" / "meta.json").is_file()


def test_activation_checkpointing_gives_the_same_losses(tmp_path, cpu_train):
    from stop_kernels.training.loop import train
    a = train(tiny(tmp_path / "a", steps=3))
    b = train(tiny(tmp_path / "b", steps=3, ac="block"))
    assert a == b


@pytest.mark.needs("safetensors")
def test_export_loads_into_an_encoder(tmp_path, cpu_train):
    from safetensors.torch import load_file
    from stop_kernels.models import vit_encoder
    from stop_kernels.training.loop import train
    train(tiny(tmp_path, steps=2, export=True))
    for name in ("encoder", "target_encoder"):
        sd = load_file(str(tmp_path / "export" / f"{name}.safetensors"))
        enc = vit_encoder("vit_tiny", img_size=32, patch_size=8)
        enc.load_state_dict(sd, strict=True)


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, cpu_train, monkeypatch, bad):
    from stop_kernels.training import loop
    from stop_kernels.training.checkpoint import list_checkpoints
    real, calls = loop.jepa_step_loss, []

    def poisoned(*args, **kw):
        calls.append(1)
        loss = real(*args, **kw)
        return loss + float(bad) if len(calls) == 4 else loss  # step 4 diverges (an infinite loss too)

    monkeypatch.setattr(loop, "jepa_step_loss", poisoned)
    with pytest.raises(loop.TrainingDiverged, match=rf"loss is {bad} at step 4.*step_00000002"):
        loop.train(tiny(tmp_path, steps=8, ckpt_every=2))
    assert [s for s, _ in list_checkpoints(str(tmp_path / "checkpoints"))] == [2]
    recs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in recs)
    # the kept checkpoint resumes and trains on
    monkeypatch.setattr(loop, "jepa_step_loss", real)
    losses = loop.train(tiny(tmp_path, steps=4, ckpt_every=2, resume=True))
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


class _InfiniteGradient(torch.autograd.Function):
    """The identity forward; its backward multiplies the gradient by inf: every gradient upstream is inf or NaN."""
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def _poison_step(loop, monkeypatch, poisoned_calls):
    """jepa_step_loss whose loss, at the calls in ``poisoned_calls`` (1-based), keeps its finite value and gets
    non-finite gradients (the weights are not touched, so this works on FSDP2's sharded parameters too)."""
    real, calls = loop.jepa_step_loss, []

    def poisoned(models, *args, **kw):
        calls.append(1)
        loss = real(models, *args, **kw)
        return _InfiniteGradient.apply(loss) if len(calls) in poisoned_calls else loss
    monkeypatch.setattr(loop, "jepa_step_loss", poisoned)


def test_non_finite_gradient_with_a_finite_loss_writes_no_checkpoint(tmp_path, cpu_train, monkeypatch):
    """A finite loss with infinite gradients (review repro: a term of value 0 whose gradient is inf): AdamW writes
    NaN weights, and the next save must refuse them and name the previous checkpoint."""
    from stop_kernels.training import loop
    from stop_kernels.training.checkpoint import list_checkpoints
    _poison_step(loop, monkeypatch, {4})
    with pytest.raises(loop.TrainingDiverged, match=r"parameters are not finite after step 4.*step_00000002"):
        loop.train(tiny(tmp_path, steps=8, ckpt_every=2))
    assert [s for s, _ in list_checkpoints(str(tmp_path / "checkpoints"))] == [2]


def _check_a_skipped_step(tmp_path, monkeypatch, device):
    from stop_kernels.training import distributed as D
    from stop_kernels.training import loop
    from stop_kernels.training.loop import Trainer, synthetic_batches
    _poison_step(loop, monkeypatch, {2})
    cfg = TrainConfig(**dict(TINY, out=str(tmp_path / "run"), steps=3, skip_nonfinite_grads=True, device=device))
    tr = Trainer(cfg, D.init_distributed(cfg), None)
    assert tr.opt.defaults["fused"], "only the fused AdamW takes found_inf"
    batches = synthetic_batches(cfg, 3, cfg.batch_size, torch.device(device), 0)
    sched = (cfg.lr, cfg.weight_decay, 0.5)  # a momentum that visibly moves the target
    assert tr.step(*batches[0], sched)[-1].item() == 0.0

    def snapshot():
        online = {n: p.detach().clone() for m in (tr.models.encoder, tr.models.predictor)
                  for n, p in m.named_parameters()}
        state = {id(p): {k: v.clone() for k, v in st.items()} for p, st in tr.opt.state.items()}
        target = [p.detach().clone() for p in tr.models.target_encoder.parameters()]
        return online, state, target
    online, state, target = snapshot()
    stats = tr.step(*batches[1], sched)
    assert stats[-1].item() == 1.0 and torch.isfinite(stats[0])
    online2, state2, target2 = snapshot()
    assert all(torch.equal(online[n], online2[n]) for n in online)
    assert state.keys() == state2.keys() and all(torch.equal(state[i][k], state2[i][k]) for i in state for k in state[i])
    assert any(not torch.equal(a, b) for a, b in zip(target, target2)), "the EMA goes on"
    assert tr.step(*batches[2], sched)[-1].item() == 0.0
    online3, state3, _ = snapshot()
    assert any(not torch.equal(online2[n], online3[n]) for n in online2)
    assert all(torch.isfinite(p).all() for p in online3.values())
    assert all(torch.equal(st["step"], state[i]["step"] + 1) for i, st in state3.items())


def test_skip_nonfinite_grads_leaves_weights_and_adamw_state_as_they_were(tmp_path, cpu_train, monkeypatch):
    """skip_nonfinite_grads: the poisoned step changes no online weight and no AdamW state (moments, step count),
    reports itself in the step's stats, and the EMA still moves the target; the next clean step updates as usual."""
    _check_a_skipped_step(tmp_path, monkeypatch, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="AdamW's fused CUDA kernel and its found_inf need a GPU")
def test_skip_nonfinite_grads_on_cuda(tmp_path, monkeypatch):
    """The same on the GPU: the fused CUDA AdamW under bf16 autocast, the flag never read on the host."""
    _check_a_skipped_step(tmp_path, monkeypatch, "cuda")


def test_skip_nonfinite_grads_trains_through_and_reports_the_step(tmp_path, cpu_train, monkeypatch, capsys):
    """The run that stops without the key (the test above it) trains to its end with it: the skipped step is
    reported, its count is in the checkpoint's metadata and the done line, and every checkpoint is written."""
    from stop_kernels.training import loop
    from stop_kernels.training.checkpoint import list_checkpoints
    real = loop.jepa_step_loss
    _poison_step(loop, monkeypatch, {4})
    losses = loop.train(tiny(tmp_path, steps=6, ckpt_every=2, skip_nonfinite_grads=True))
    out = capsys.readouterr().out
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert "step 4: a gradient is not finite" in out and "AdamW skipped the step" in out
    assert "1 steps skipped for non-finite gradients" in out
    steps = [s for s, _ in list_checkpoints(str(tmp_path / "checkpoints"))]
    assert steps[-1] == 6
    meta = json.loads((tmp_path / "checkpoints" / "step_00000006" / "meta.json").read_text())
    assert meta["nonfinite_steps_skipped"] == 1
    assert [r["nonfinite_steps_skipped"] for r in read_log(tmp_path)] == [0, 0, 0, 1, 1, 1]  # cumulative, per step
    # the count is cumulative across a resume (a clean continuation keeps the earlier skip)
    monkeypatch.setattr(loop, "jepa_step_loss", real)
    loop.train(tiny(tmp_path, steps=8, ckpt_every=2, skip_nonfinite_grads=True, resume=True))
    meta = json.loads((tmp_path / "checkpoints" / "step_00000008" / "meta.json").read_text())
    assert meta["nonfinite_steps_skipped"] == 1
    assert json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])["nonfinite_steps_skipped"] == 1


def test_skip_nonfinite_grads_sees_a_non_finite_gradient_in_any_parameter_group(tmp_path, cpu_train):
    """found_inf is taken over every parameter group's gradients: an infinite gradient in the last group's last
    parameter alone skips the step (mutation run, session 31: reading the first group only passed the tests,
    whose poisoned loss made every gradient infinite)."""
    from stop_kernels.training import distributed as D
    from stop_kernels.training.loop import Trainer, synthetic_batches
    cfg = TrainConfig(**dict(TINY, out=str(tmp_path / "run"), steps=2, skip_nonfinite_grads=True, device="cpu"))
    tr = Trainer(cfg, D.init_distributed(cfg), None)
    assert len(tr.opt.param_groups) > 1
    last = tr.opt.param_groups[-1]["params"][-1]
    batches = synthetic_batches(cfg, 2, cfg.batch_size, torch.device("cpu"), 0)
    sched = (cfg.lr, cfg.weight_decay, cfg.ema_start)
    assert tr.step(*batches[0], sched)[-1].item() == 0.0
    before = [p.detach().clone() for g in tr.opt.param_groups for p in g["params"]]
    hook = last.register_hook(lambda g: g * float("inf"))
    assert tr.step(*batches[1], sched)[-1].item() == 1.0
    hook.remove()
    after = [p.detach() for g in tr.opt.param_groups for p in g["params"]]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_resume_in_one_process_is_bitwise(tmp_path, cpu_train, monkeypatch, grad_accum):
    """Also with gradient accumulation: the data position counts micro-batches, so a resumed run loads the
    micro-batches the uninterrupted one would have. Three steps per epoch (12 images, batch 4): the resumed
    checkpoint, step 4, lies inside the second epoch (a resume inside the first one passed with a loop that
    restarted every later epoch at its first batch). And the uninterrupted run trains on each epoch's own
    batches (a loop that fed every epoch the first one's order resumed bitwise just as well)."""
    from stop_kernels.data.datasets import TrainData
    from stop_kernels.training.loop import Trainer, train
    small = dict(steps=6, synthetic_size=12, grad_accum=grad_accum)
    fed, step_micro = [], Trainer.step_micro

    def recording(self, micro, *a, **kw):
        fed.append([imgs for imgs, _, _ in micro])
        return step_micro(self, micro, *a, **kw)
    monkeypatch.setattr(Trainer, "step_micro", recording)
    full = train(tiny(tmp_path / "full", **small))
    data = TrainData(tiny(tmp_path / "full", **small))
    want = [[imgs for imgs, _, _ in micro] for epoch in (0, 1) for micro, _ in data.steps(epoch)]
    assert len(fed) == len(want) == 6
    assert all(torch.equal(g, w) for got, exp in zip(fed, want) for g, w in zip(got, exp))
    train(tiny(tmp_path / "part", ckpt_every=2, keep_ckpts=5, **small))
    import shutil
    for d in (tmp_path / "part" / "checkpoints").iterdir():
        if d.name != "step_00000004":
            shutil.rmtree(d)
    rest = train(tiny(tmp_path / "part", resume=True, **small))
    assert rest == full[4:]


@pytest.mark.parametrize("mode, shown", [("none", "noise none (mask token)) on"), ("isotropic", "noise isotropic σ=0.5) on")])
def test_start_line_shows_sigma_only_where_noise_is_drawn(tmp_path, cpu_train, capsys, mode, shown):
    """noise_mode none (plain I-JEPA) draws no noise: the start line does not print a σ beside it."""
    from stop_kernels.training.loop import train
    train(tiny(tmp_path, steps=1, noise_mode=mode, noise_std=0.5))
    start = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("training "))
    assert shown in start and start.count("σ") == (mode != "none"), start


def test_benchmark_prints_one_json_line(tmp_path, cpu_train, capsys):
    from stop_kernels.training.loop import train
    train(tiny(tmp_path, benchmark=2, benchmark_warmup=1))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1
    rec = json.loads(lines[0])
    for key in ("images_per_s", "ms_per_step", "tflops", "mfu", "peak_mem_gib", "peak_reserved_gib", "model", "batch",
                "gpu"):
        assert key in rec
    assert rec["model"] == "vit_tiny" and rec["batch"] == 4 and rec["gpu"] == "cpu" and rec["images_per_s"] > 0
    assert rec["peak_mem_gib"] is None and rec["peak_reserved_gib"] is None  # a CPU has no allocator peaks to read
    assert json.loads((tmp_path / "benchmark.json").read_text()) == rec


def test_fsdp2_on_one_rank_matches_no_fsdp(tmp_path, cpu_train):
    """FSDP2 on a one-rank mesh (blocks kept gathered between forward and backward) trains exactly like the
    plain modules in fp32: no stale gathered weights across steps, the EMA reaches the sharded target."""
    from stop_kernels.training.loop import train
    plain = train(tiny(tmp_path / "plain", steps=4, sharding="none"))
    fsdp = train(tiny(tmp_path / "fsdp", steps=4, sharding="full"))
    assert fsdp == pytest.approx(plain, rel=1e-5, abs=1e-6)


def test_skip_nonfinite_grads_under_fsdp2_matches_no_fsdp(tmp_path, cpu_train, monkeypatch):
    """skip_nonfinite_grads with FSDP2's DTensor parameters and gradients (one-rank mesh): the fused AdamW takes
    the plain found_inf flag beside them, and the run with a skipped step trains as the plain modules do."""
    from stop_kernels.training import loop
    real, runs = loop.jepa_step_loss, {}
    for sharding in ("none", "full"):  # (not monkeypatch.undo(): it would also undo cpu_train's patches)
        monkeypatch.setattr(loop, "jepa_step_loss", real)
        _poison_step(loop, monkeypatch, {2})
        runs[sharding] = loop.train(tiny(tmp_path / sharding, steps=4, sharding=sharding, skip_nonfinite_grads=True))
    assert len(runs["full"]) == 4 and runs["full"] == pytest.approx(runs["none"], rel=1e-5, abs=1e-6)


def test_skip_nonfinite_grads_can_be_turned_on_or_off_at_a_resume(tmp_path, cpu_train, monkeypatch):
    """The optimizer's kernel choice is the resumed run's, not the checkpoint's: a CPU run saved with the foreach
    AdamW resumes with the key on (the fused AdamW, which alone takes found_inf; the checkpoint's groups made it
    foreach and its first step failed) and skips a poisoned step; resumed with the key off again, it is foreach."""
    from stop_kernels.training import loop
    seen = []
    real_build = loop.build_optimizer

    def build(*a, **k):
        seen.append(real_build(*a, **k))
        return seen[-1]
    monkeypatch.setattr(loop, "build_optimizer", build)
    loop.train(tiny(tmp_path, steps=2))
    _poison_step(loop, monkeypatch, {1})
    losses = loop.train(tiny(tmp_path, steps=4, resume=True, skip_nonfinite_grads=True))
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert all(g["fused"] and not g["foreach"] for g in seen[-1].param_groups)
    loop.train(tiny(tmp_path, steps=5, resume=True))
    assert all(g["foreach"] and not g["fused"] for g in seen[-1].param_groups)


def test_packed_training_keeps_every_patch(tmp_path, cpu_train):
    """--packed: ragged masks through packed attention; a short run trains and logs the untruncated sizes."""
    from stop_kernels.training.loop import train
    cfg = tiny(tmp_path, steps=4, packed=True, img_size=64, min_keep=2)
    losses = train(cfg)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    recs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    # token counts are means over images of ragged masks: with truncation they would all be whole numbers
    assert any(r["ctx_tokens"] != int(r["ctx_tokens"]) or r["tgt_tokens"] != int(r["tgt_tokens"]) for r in recs)


def test_every_config_key_has_a_help_line(capsys, monkeypatch):
    """train.py --help describes every key, from the comment beside its field in TrainConfig (one source),
    with its default and, where the text does not list them, its choices."""
    import dataclasses
    from stop_kernels.training.config import CHOICES, TrainConfig, build_parser, field_help
    helps = field_help()
    missing = [f.name for f in dataclasses.fields(TrainConfig) if len(helps.get(f.name, "")) < 8]
    assert not missing, f"TrainConfig fields without a comment: {missing}"
    monkeypatch.setenv("COLUMNS", "10000")  # argparse wraps help text (at hyphens too) to the terminal width
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split()).split(" options: ", 1)[1]  # past the usage
    assert "--grad-accum GRAD_ACCUM micro-batches per optimizer step and rank" in text
    assert ("--crop-scale CROP_SCALE RandomResizedCrop area range (image folders; synthetic images take no "
            "augmentation) (default '0.3,1.0')") in text
    assert "--hflip [BOOL] random horizontal flip (image folders) (default false)" in text
    for key in CHOICES:  # each choice is named in the key's help
        line = text.split("--" + key.replace("_", "-") + " ", 1)[1].split(" --", 1)[0]
        assert all(c in line for c in CHOICES[key]), key


def test_readme_lists_every_config_key_with_its_default():
    """The README's configuration table is the users' reference: one row per TrainConfig field, with the
    field's default (numbers compared as numbers, pairs written `a,b`)."""
    import dataclasses
    import re
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]*) \|", readme, re.M))
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert sorted(rows) == sorted(fields), set(rows) ^ set(fields)
    cfg = TrainConfig()
    for name in fields:
        want, doc = getattr(cfg, name), rows[name].strip()
        m = re.fullmatch(r"`(.*)`", doc)
        assert m, (name, doc)
        doc = m.group(1)
        if isinstance(want, bool):
            assert doc == str(want).lower(), (name, doc)
        elif isinstance(want, (int, float)):
            assert float(doc) == want, (name, doc)
        elif isinstance(want, (tuple, list)):
            assert [float(x) for x in doc.split(",")] == list(want), (name, doc)
        else:
            assert doc == (want if want != "" else '""'), (name, doc)


def test_epoch_based_warmup_is_truncated_as_the_official_schedule_does():
    from stop_kernels.training.loop import schedule_lengths
    cfg = TrainConfig(steps=0, epochs=3, warmup_epochs=0.7)
    assert schedule_lengths(cfg, 5)[:2] == (15, 3)       # int(0.7 * 5) = 3; round() gave 4
    assert schedule_lengths(TrainConfig(steps=0, epochs=300, warmup_epochs=40), 1251)[:2] == (375300, 50040)


def test_step_applies_adamw_with_the_schedule_then_the_ema(tmp_path, cpu_train):
    """Trainer.step with set_schedules' values: the decay group gets the scheduled weight decay, the
    no-decay group (every 1-D parameter: biases, norms) none; after AdamW the EMA moves the target
    towards the *updated* online weights, t ← m·t + (1 − m)·o, with the scheduled momentum."""
    from stop_kernels.training import distributed as D
    from stop_kernels.training.loop import Trainer, set_schedules, synthetic_batches
    cfg = tiny(tmp_path)
    tr = Trainer(cfg, D.init_distributed(cfg), None)
    decay, no_decay = tr.opt.param_groups
    ids = {id(p) for p in no_decay["params"]}
    for m in (tr.models.encoder, tr.models.predictor):
        for name, p in m.named_parameters():
            if any(p is q for q in decay["params"]) or id(p) in ids:
                assert (id(p) in ids) == (p.ndim <= 1), name
    total, warmup, step = 10, 2, 3
    sched = lr, wd, mom = set_schedules(tr.opt, cfg, step, total, warmup)
    assert (lr, wd, mom) == (
        lr_at(step, warmup=warmup, total=total, start_lr=cfg.start_lr, ref_lr=cfg.lr, final_lr=cfg.final_lr),
        wd_at(step, total=total, ref_wd=cfg.weight_decay, final_wd=cfg.final_weight_decay),
        momentum_at(step, total=total, start=cfg.ema_start, end=cfg.ema_end))
    assert (decay["lr"], decay["weight_decay"], no_decay["lr"], no_decay["weight_decay"]) == (lr, wd, lr, 0.0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a target apart from the online weights, so every EMA mix-up shows
        for t in tr.ema_target:
            t.add_(torch.randn(t.shape, generator=g), alpha=0.01)
    target0 = [t.detach().clone() for t in tr.ema_target]
    online0 = [o.detach().clone() for o in tr.ema_online]
    target_calls = []
    tr.models.target_encoder.register_forward_hook(lambda *_: target_calls.append(1))
    tr.step(*synthetic_batches(cfg, 1, cfg.batch_size, torch.device("cpu"), 0)[0], sched)
    assert target_calls == [1]  # the targets come from the EMA encoder
    assert all(not p.requires_grad and p.grad is None for p in tr.models.target_encoder.parameters())
    assert any(not torch.equal(o, o0) for o, o0 in zip(tr.ema_online, online0))  # AdamW moved the online weights
    for t, t0, o in zip(tr.ema_target, target0, tr.ema_online):
        torch.testing.assert_close(t, mom * t0 + (1 - mom) * o, rtol=1e-6, atol=1e-7)
    # and the pairs cover every parameter of the target encoder, each with the encoder's of its name (as the
    # official loop zips all parameters): one left out of the pairs would keep its initial value for ever
    online = dict(tr.models.encoder.named_parameters())
    by_id = {id(t): t0 for t, t0 in zip(tr.ema_target, target0)}
    assert len(by_id) == len(tr.ema_target)
    for name, t in tr.models.target_encoder.named_parameters():
        assert id(t) in by_id, name
        torch.testing.assert_close(t, mom * by_id[id(t)] + (1 - mom) * online[name], rtol=1e-6, atol=1e-7)


def test_step_averages_the_loss_over_ranks(tmp_path, cpu_train, monkeypatch):
    """On W ranks the step's all-reduce sums [loss, skipped images]: the loss is then divided by W, the
    count is not. Two identical ranks stand in as an all-reduce that doubles; the loss must equal one rank's."""
    import dataclasses
    from stop_kernels.training import distributed as D
    from stop_kernels.training.loop import Trainer, synthetic_batches
    cfg = tiny(tmp_path)
    losses = []
    for world in (1, 2):
        tr = Trainer(cfg, D.init_distributed(cfg), None)
        if world == 2:
            tr.info = dataclasses.replace(tr.info, world_size=2)
            monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
            monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, *a, **k: t.mul_(2))
        torch.manual_seed(1)  # the StoP noise
        stats = tr.step(*synthetic_batches(cfg, 1, cfg.batch_size, torch.device("cpu"), 0)[0],
                        (cfg.lr, cfg.weight_decay, cfg.ema_start), skipped=3)
        assert stats[1].item() == 3.0 * world
        losses.append(stats[0].item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)


def test_logged_schedules_follow_the_step(tmp_path, cpu_train):
    """The JSONL log's lr, wd and momentum of step s (1-based) are the schedules of its index s - 1 (warm-up
    and the holds counted in steps: warmup_epochs, lr_hold_epoch and wd_hold_epoch / epochs of the steps).
    The holds are checked here, through train(), as well: the schedule functions' own tests pass ``hold``
    themselves, so a loop that dropped lr_hold_epoch (or handed the weight decay the lr's hold) passed them."""
    from stop_kernels.training.loop import train
    from _train_helpers import read_log
    # warm-up round(6 · 1 / 3) = 2 steps; lr held from step count 4, wd from 2 (two different holds: swapped, or
    # one handed to both, they show)
    cfg = tiny(tmp_path, steps=6, epochs=3, warmup_epochs=1.0, lr_hold_epoch=2.0, wd_hold_epoch=1.0)
    train(cfg)
    recs = [r for r in read_log(tmp_path) if "lr" in r]
    assert [r["step"] for r in recs] == list(range(1, 7))
    lr_kw = dict(warmup=2, total=6, start_lr=cfg.start_lr, ref_lr=cfg.lr, final_lr=cfg.final_lr)
    wd_kw = dict(total=6, ref_wd=cfg.weight_decay, final_wd=cfg.final_weight_decay)
    for r in recs:
        s = r["step"] - 1
        assert r["lr"] == pytest.approx(lr_at(s, hold=4, **lr_kw), rel=1e-12), s
        assert r["wd"] == pytest.approx(wd_at(s, hold=2, **wd_kw), rel=1e-12), s
        assert r["momentum"] == pytest.approx(momentum_at(s, total=6, start=cfg.ema_start, end=cfg.ema_end),
                                              rel=1e-12), s
    # the holds changed the last steps' values (else the checks above could not tell a dropped hold)
    assert recs[-1]["lr"] != pytest.approx(lr_at(5, **lr_kw), rel=1e-3)
    assert recs[-1]["wd"] != pytest.approx(wd_at(5, **wd_kw), rel=1e-3)


def test_train_py_exit_codes(tmp_path, cpu_train, capsys, monkeypatch):
    """train.py's main(): 2 and one 'train.py: error: <key>: …' line for a bad setting, 1 for a run that
    diverged or ran out of GPU memory, 0 for a run that finished (what schedulers and shell scripts branch on)."""
    import importlib.util
    from stop_kernels.training import loop
    from _train_helpers import REPO, tiny_args
    spec = importlib.util.spec_from_file_location("train_entry", REPO / "train.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    assert entry.main(tiny_args(out=tmp_path / "bad", lr=-1)) == 2
    assert capsys.readouterr().err.startswith("train.py: error: lr: expected a value >= 0")
    assert entry.main(tiny_args(out=tmp_path / "ok", steps=1)) == 0
    real = loop.jepa_step_loss
    monkeypatch.setattr(loop, "jepa_step_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    assert entry.main(tiny_args(out=tmp_path / "nan", steps=2)) == 1
    assert "train.py: training diverged: loss is nan at step 1 " in capsys.readouterr().err

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(loop.Trainer, "step_micro", oom)
    assert entry.main(tiny_args(out=tmp_path / "oom", steps=1)) == 1
    err = capsys.readouterr().err
    assert err.startswith("train.py: out of GPU memory with 4 images per micro-batch") and "Tried to allocate" in err


def test_cpu_runs_report_no_mfu_unless_a_peak_is_given(tmp_path, cpu_train, capsys, monkeypatch):
    """MFU divides by a GPU's peak (989 TFLOP/s by default): on the CPU it printed "MFU 0.0%" and logged ~1e-6,
    a fraction of a peak the machine does not have. With peak_tflops left at 0 (auto) a CPU run prints "MFU n/a"
    and logs null (TFLOP/s still measured), as does --benchmark; a peak given explicitly is used on the CPU too."""
    from stop_kernels.training.loop import train
    from stop_kernels.training.metrics import mfu_peak_tflops
    from _train_helpers import read_log
    assert TrainConfig().peak_tflops == 0.0
    assert mfu_peak_tflops(TrainConfig(), torch.device("cpu")) is None
    assert mfu_peak_tflops(TrainConfig(), torch.device("cuda")) == 989.0  # auto on a GPU: the H100/H200 peak
    with monkeypatch.context() as m:  # by the card's name: an H100 PCIe's own peak
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
        assert mfu_peak_tflops(TrainConfig(), torch.device("cuda")) == 756.0
    assert mfu_peak_tflops(TrainConfig(peak_tflops=2.5), torch.device("cpu")) == 2.5

    train(tiny(tmp_path / "auto", steps=3, log_every=1))
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(progress) == 3 and all(line.endswith("MFU n/a") for line in progress), progress
    recs = read_log(tmp_path / "auto")
    assert all(r["mfu"] is None for r in recs) and any(r["tflops"] for r in recs)

    train(tiny(tmp_path / "given", steps=3, log_every=1, peak_tflops=1e-3))
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    timed = [r for r in read_log(tmp_path / "given") if r["tflops"] is not None]
    assert timed and all(r["mfu"] == pytest.approx(r["tflops"] / 1e-3) for r in timed)
    assert progress[-1].endswith(f"MFU {100 * timed[-1]['mfu']:.1f}%"), progress[-1]

    train(tiny(tmp_path / "bench", benchmark=1, benchmark_warmup=1))
    assert json.loads((tmp_path / "bench" / "benchmark.json").read_text())["mfu"] is None


def test_config_parsing_keeps_large_ints_and_refuses_bools_in_pairs(tmp_path):
    """Audit, session 30: an int flag went through a float, so a seed above 2**53 was silently another seed; a YAML
    bool inside a pair (crop_scale: [0.3, true]) was read as 1.0."""
    from stop_kernels.training.config import ConfigError, parse_config
    assert parse_config(["--seed", "9007199254740993"]).seed == 9007199254740993
    assert parse_config(["--steps", "1e3"]).steps == 1000
    assert parse_config(["--seed", "1e16"]).seed == 10 ** 16  # (exact: the decimal number written)
    for bad in ("2.5", "0x10", "ten", "nan", "inf", ""):
        with pytest.raises(ConfigError, match="steps: cannot read"):
            parse_config(["--steps", bad])
    (tmp_path / "c.yaml").write_text("crop_scale: [0.3, true]\n")
    with pytest.raises(ConfigError, match="crop_scale: cannot read"):
        parse_config(["--config", str(tmp_path / "c.yaml")])


def test_data_keys_a_run_does_not_read_are_named():
    """Audit, session 30: augmentation keys on synthetic data (and synthetic_size with a folder) were ignored
    without a word; the run now names them at its start."""
    from stop_kernels.training.config import TrainConfig, unused_data_keys
    assert unused_data_keys(TrainConfig()) == []
    assert unused_data_keys(TrainConfig(hflip=True, grayscale=True, synthetic_size=64)) == ["hflip", "grayscale"]
    assert unused_data_keys(TrainConfig(data="/some/folder", hflip=True, synthetic_size=64)) == ["synthetic_size"]
