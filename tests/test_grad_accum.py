"""Gradient accumulation (config key ``grad_accum``): a rank's batch runs as k equal micro-batches whose
loss-weighted gradients add up to the whole batch's, so the optimizer step is the same (up to float
rounding) with a fraction of the activation memory.

Exact comparisons need the same numbers in both runs, so these tests take the StoP noise out (noise mode
``none``, or ``learned`` at σ = 0); the noise itself is the one thing drawn per micro-batch."""
import contextlib
import dataclasses

import pytest
import torch

from stop_kernels.devtools import rel_error
from stop_kernels.training import distributed as D
from stop_kernels.training.config import ConfigError, TrainConfig, parse_config
from stop_kernels.training.loop import (Trainer, build_models, jepa_step_loss, micro_batches, synthetic_batches,
                                        target_tokens, train)

from _train_helpers import TINY, tiny_args

SCHED = (TrainConfig.lr, TrainConfig.weight_decay, TrainConfig.ema_start)  # (lr, wd, EMA momentum)


def tiny(tmp_path, **over):
    return TrainConfig(**dict(TINY, out=str(tmp_path), **over))


@contextlib.contextmanager
def trainer(cfg):
    """A Trainer, and the one-rank process group that FSDP2 settings start in this process, destroyed after
    (a group left behind would change the later tests' distributed setup)."""
    info = D.init_distributed(cfg)
    try:
        yield Trainer(cfg, info, None)
    finally:
        D.shutdown(info)


def step_with_grads(cfg, batch):
    """One Trainer step on ``batch``; returns (loss, the gradients AdamW saw, the parameters after it)."""
    with trainer(cfg) as tr:
        seen = []
        adamw_step = tr.opt.step

        def step(*a, **kw):
            seen.extend(p.grad.detach().clone() for g in tr.opt.param_groups for p in g["params"])
            return adamw_step(*a, **kw)
        tr.opt.step = step
        torch.manual_seed(1)
        loss = float(tr.step(*batch, SCHED)[0])
        params = [p.detach().clone() for g in tr.opt.param_groups for p in g["params"]]
    return loss, seen, params


@pytest.mark.parametrize("over", [dict(noise_mode="none"), dict(noise_mode="none", packed=True),
                                  dict(noise_mode="learned", noise_std=0.0), dict(noise_mode="none", sharding="full")],
                         ids=["rectangular", "packed", "learned-sigma0", "fsdp2-one-rank"])
def test_accumulated_step_equals_the_whole_batch(tmp_path, cpu_train, over):
    """k = 2 and 4 micro-batches: the same loss, the same gradients into AdamW and the same weights after
    it as the whole batch of 8, to fp32 rounding (measured ≤ 5e-7 relative; the tolerance is 4e-6). Under
    FSDP2 (a one-rank mesh here) the micro-batches before the last accumulate unreduced gradients."""
    cfg = tiny(tmp_path, batch_size=8, **over)
    batch = synthetic_batches(cfg, 1, 8, torch.device("cpu"), 0)[0]
    loss1, grads1, params1 = step_with_grads(cfg, batch)
    assert all(g.abs().max() > 0 for g in grads1)  # every trained tensor has a gradient to compare
    for k in (2, 4):
        loss_k, grads_k, params_k = step_with_grads(dataclasses.replace(cfg, grad_accum=k), batch)
        assert loss_k == pytest.approx(loss1, rel=1e-6), k
        assert len(grads_k) == len(grads1)
        assert max(rel_error(a, b) for a, b in zip(grads_k, grads1)) < 4e-6, k
        assert max(rel_error(a, b) for a, b in zip(params_k, params1)) < 4e-6, k


def test_ragged_micro_batches_are_weighted_by_their_target_tokens(cpu_train):
    """With ragged masks the micro-batches hold different numbers of target tokens, and the loss is a mean
    over tokens: Σ share·loss(part) is the whole batch's loss, where the plain mean of the parts is not."""
    cfg = parse_config(tiny_args(noise_mode="none"))  # a 4x4 patch grid
    torch.manual_seed(0)
    models = build_models(cfg)
    imgs = torch.randn(4, 3, 32, 32)
    g = torch.Generator().manual_seed(3)

    def ragged(lengths):
        return [torch.randperm(16, generator=g)[:n].sort().values for n in lengths]
    masks_enc = [ragged([9, 11, 8, 12])]
    masks_pred = [ragged([1, 2, 4, 5]), ragged([2, 1, 6, 3])]  # parts of 2 images: 6 and 18 target tokens
    parts = micro_batches(imgs, masks_enc, masks_pred, 2)
    assert [share for *_, share in parts] == [0.25, 0.75]
    autocast = torch.autocast("cpu", enabled=False)
    with torch.no_grad():
        whole = jepa_step_loss(models, imgs, masks_enc, masks_pred, autocast)
        losses = [jepa_step_loss(models, *p[:3], autocast) for p in parts]
    weighted = sum(share * loss for (*_, share), loss in zip(parts, losses))
    assert float(weighted) == pytest.approx(float(whole), rel=1e-6)
    # equal weights would be wrong here, by far more than the tolerance above (measured 3e-4 with torch 2.11,
    # 1.2e-3 with 2.14: the parts' token losses differ little in a fresh model, their weights a lot)
    assert abs(float(sum(losses)) / 2 / float(whole) - 1) > 3e-5


def test_micro_batches_slice_images_and_masks_in_order():
    imgs = torch.randn(6, 3, 8, 8)
    me = [torch.randint(0, 16, (6, 5))]
    mp = [torch.randint(0, 16, (6, 2)), torch.randint(0, 16, (6, 2))]
    assert micro_batches(imgs, me, mp, 1) == [(imgs, me, mp, 1.0)]  # the whole batch, untouched
    parts = micro_batches(imgs, me, mp, 3)
    assert [share for *_, share in parts] == [pytest.approx(1 / 3)] * 3
    assert torch.equal(torch.cat([p[0] for p in parts]), imgs)
    assert torch.equal(torch.cat([p[1][0] for p in parts]), me[0])
    for j in range(2):
        assert torch.equal(torch.cat([p[2][j] for p in parts]), mp[j])
    assert target_tokens(mp) == 24 and target_tokens([[torch.arange(3), torch.arange(5)]]) == 8
    with pytest.raises(ValueError, match=r"^grad_accum: a batch of 6 images cannot be split into 4"):
        micro_batches(imgs, me, mp, 4)


def test_gradient_sync_only_after_the_last_micro_batch(tmp_path, cpu_train):
    """Under FSDP2 the micro-batches before the last skip the gradient reduction (one reduce-scatter per
    step, not k): the flag is set off, off, on for k = 3 on both trained models, and never touched for k = 1."""
    for k, want in ((3, [False, False, True]), (1, [])):
        cfg = tiny(tmp_path / str(k), batch_size=6, grad_accum=k, noise_mode="none", sharding="full")
        calls = {"encoder": [], "predictor": []}
        with trainer(cfg) as tr:
            for name in calls:
                module = getattr(tr.models, name)
                module.set_requires_gradient_sync = lambda on, name=name: calls[name].append(on)
            tr.step(*synthetic_batches(cfg, 1, 6, torch.device("cpu"), 0)[0], SCHED)
        assert calls == {"encoder": want, "predictor": want}, k


def test_grad_accum_must_divide_each_ranks_batch(tmp_path, cpu_train, monkeypatch):
    with pytest.raises(ConfigError, match=r"^grad_accum: expected an integer >= 1, got 0"):
        parse_config(["--grad-accum", "0"])
    cfg = tiny(tmp_path, batch_size=4, grad_accum=3)
    with pytest.raises(ConfigError, match=r"^grad_accum: the per-rank batch 4 \(batch_size 4 over 1 rank\(s\)\) "
                                          r"must be a multiple of grad_accum=3"):
        Trainer(cfg, D.init_distributed(cfg), None)
    # train() says so before it reads any data or builds a model
    monkeypatch.setattr("stop_kernels.training.loop.TrainData", lambda *a, **k: pytest.fail("data read first"))
    with pytest.raises(ConfigError, match=r"^grad_accum: the per-rank batch 4"):
        train(cfg)


def test_training_and_benchmark_report_the_micro_batches(tmp_path, cpu_train, capsys):
    losses = train(tiny(tmp_path / "train", steps=2, batch_size=4, grad_accum=2))
    assert len(losses) == 2
    assert "global batch 4 (2 micro-batches of 2 per rank)" in capsys.readouterr().out
    train(tiny(tmp_path / "bench", benchmark=1, benchmark_warmup=1, benchmark_batches=1, batch_size=4,
               grad_accum=4))
    out = capsys.readouterr()
    assert "global batch 4 (4 micro-batches of 1 per rank)" in out.err
    assert '"grad_accum": 4' in out.out


def test_out_of_memory_says_which_settings_fit(tmp_path, cpu_train, monkeypatch):
    """A step that runs out of GPU memory ends with the settings that lower the memory per step: the next
    grad_accum that divides the rank's batch, AC, more GPUs (and the original error kept)."""
    from stop_kernels.training import loop

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(loop.Trainer, "step", oom)
    with pytest.raises(loop.TrainingOutOfMemory) as e:
        train(tiny(tmp_path, batch_size=12, grad_accum=2, steps=1))
    msg = str(e.value)
    assert msg.startswith("out of GPU memory with 6 images per micro-batch on each of 1 rank(s) (batch_size 12, "
                          "grad_accum 2, ac none); try --grad-accum 3, 4, 6 or 12 (4, 3, 2 or 1 instead of 6 images "
                          "per micro-batch; the same optimizer step), or --ac block")
    assert "CUDA out of memory. Tried to allocate 2.00 GiB" in msg
    assert isinstance(e.value, torch.cuda.OutOfMemoryError)  # existing handlers still catch it
    # nothing left to split and AC already on: only what is left is offered
    msg = loop.out_of_memory_advice(tiny(tmp_path, batch_size=4, grad_accum=4, ac="block"), 1)
    assert "--grad-accum" not in msg and "--ac" not in msg and "more GPUs" in msg
    # the recipe's batch on one GPU: the choices reach a micro-batch that fits (ViT-H/14 took 23.9 GiB at 64)
    assert "--grad-accum 2, 4, 8, 16 or 32 (1024, 512, 256, 128 or 64 instead of 2048 images" in \
        loop.out_of_memory_advice(tiny(tmp_path, batch_size=2048), 1)
    assert "--grad-accum 2 (1 instead of 2 images" in loop.out_of_memory_advice(tiny(tmp_path, batch_size=4), 2)
