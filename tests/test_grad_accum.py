"""Gradient accumulation (config key ``grad_accum``): each optimizer step runs k micro-batches per rank, each
loaded and collated on its own (its own mask sizes and truncation), and averages their losses as data
parallelism averages ranks: k micro-batches on N ranks train like one on each of N·k ranks, with 1/k of the
activation memory.

Exact comparisons need the same numbers on both sides, so these tests take the StoP noise out (noise mode
``none``, or ``learned`` at σ = 0); the noise is drawn per micro-batch like everything else."""
import contextlib
import dataclasses

import pytest
import torch

from stop_kernels.data.datasets import TrainData
from stop_kernels.devtools import rel_error
from stop_kernels.training import distributed as D
from stop_kernels.training.config import ConfigError, TrainConfig, parse_config
from stop_kernels.training.loop import (Trainer, jepa_step_loss, micro_batches, synthetic_batches,
                                        train)

from _train_helpers import TINY

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


def step_with_grads(cfg, run):
    """``run(trainer)`` (one step); returns (loss, the gradients AdamW saw, the step's update of each parameter)."""
    with trainer(cfg) as tr:
        seen = []
        adamw_step = tr.opt.step

        def step(*a, **kw):
            seen.extend(p.grad.detach().clone() for g in tr.opt.param_groups for p in g["params"])
            return adamw_step(*a, **kw)
        tr.opt.step = step
        before = [p.detach().clone() for g in tr.opt.param_groups for p in g["params"]]
        torch.manual_seed(1)
        loss = float(run(tr)[0])
        after = [p.detach() for g in tr.opt.param_groups for p in g["params"]]
        updates = [p - p0 for p, p0 in zip(after, before)]
    return loss, seen, updates


def assert_same_step(a, b, k):
    (loss_a, grads_a, updates_a), (loss_b, grads_b, updates_b) = a, b
    assert loss_a == pytest.approx(loss_b, rel=1e-6), k
    assert len(grads_a) == len(grads_b) and all(g.abs().max() > 0 for g in grads_b)
    assert max(rel_error(x, y) for x, y in zip(grads_a, grads_b)) < 4e-6, k
    # The updates are compared to 3e-4, not to fp32 rounding: AdamW's first step lr·g/(|g| + eps) turns a
    # gradient that is zero in exact arithmetic (the key third of the qkv bias: softmax ignores a shift shared by
    # all keys), fp32 noise of ~1e-13, into steps of up to ~lr·1e-4 that depend on the summation order: ≤ 1.5e-4
    # of that bias's update norm, 5e-5 measured on some CPUs (the weights after the step: 1.7e-5 of theirs).
    # A step taken twice, with another lr or on other gradients is off by O(1).
    assert max(rel_error(x, y) for x, y in zip(updates_a, updates_b)) < 3e-4, k


def test_micro_batches_are_averaged_like_ranks(tmp_path, cpu_train):
    """Two micro-batches with masks of their own (different target lengths: a token-weighted mean would
    differ): the step's loss and gradients are the plain mean of each micro-batch's, as two ranks' would be."""
    cfg = tiny(tmp_path, noise_mode="none", batch_size=8, grad_accum=2)
    pool = synthetic_batches(cfg, 12, 4, torch.device("cpu"), 0)
    pair = next([a, b] for a in pool for b in pool if a[2][0].shape[1] != b[2][0].shape[1])
    got = step_with_grads(cfg, lambda tr: tr.step_micro(pair, SCHED))

    def by_hand(tr):  # the definition, on the same fresh models: (loss(a) + loss(b)) / 2
        loss = sum(jepa_step_loss(tr.models, *m, tr.autocast) for m in pair) / 2
        loss.backward()
        tr.opt.step()
        return loss.detach()[None]
    assert_same_step(got, step_with_grads(dataclasses.replace(cfg, grad_accum=1), by_hand), 2)


@pytest.mark.parametrize("over", [dict(noise_mode="none"), dict(noise_mode="none", packed=True),
                                  dict(noise_mode="learned", noise_std=0.0), dict(noise_mode="none", sharding="full")],
                         ids=["rectangular", "packed", "learned-sigma0", "fsdp2-one-rank"])
def test_a_whole_batch_cut_into_micro_batches_steps_like_the_whole_batch(tmp_path, cpu_train, over):
    """``Trainer.step`` on one batch (the benchmarks' and profilers' call) with k = 2 and 4: equal slices that
    keep the batch's masks, so the same loss and gradients as the whole batch to fp32 rounding (measured
    ≤ 5e-7 relative) and the same AdamW update (see assert_same_step). Under FSDP2 (a one-rank mesh here) the slices before the last accumulate
    unreduced gradients."""
    cfg = tiny(tmp_path, batch_size=8, **over)
    batch = synthetic_batches(cfg, 1, 8, torch.device("cpu"), 0)[0]
    per_image = [sum(len(block[b]) for block in batch[2]) for b in range(8)]  # target tokens (ragged or not)
    assert len(set(per_image)) == 1  # every image has as many: equal slices weigh the same
    whole = step_with_grads(cfg, lambda tr: tr.step(*batch, SCHED))
    for k in (2, 4):
        assert_same_step(step_with_grads(dataclasses.replace(cfg, grad_accum=k), lambda tr: tr.step(*batch, SCHED)),
                         whole, k)


@pytest.mark.parametrize("batch, world, grad_accum, micro, want", [
    (2048, 8, 1, 64, 4),    # the ViT-H recipe on one node: 4 micro-batches of 64 per rank
    (2048, 1, 1, 64, 32),
    (64, 1, 1, 64, 1),      # issue 8's benchmark setting: one micro-batch
    (32, 1, 1, 64, 1),      # a rank's batch below micro_batch: one
    (96, 1, 1, 64, 2),      # 96 = 2 × 48: the smallest count whose micro-batches hold at most 64
    (256, 1, 8, 64, 8),     # an explicit larger grad_accum (memory) is kept
    (256, 1, 2, 0, 2),      # micro_batch 0: off
])
def test_micro_batch_raises_grad_accum_to_fit(batch, world, grad_accum, micro, want):
    """micro_batch caps the images per micro-batch: the mask collator truncates over each micro-batch, and the
    official StoP code truncates over each GPU's 64 images, so a recipe's global batch on fewer GPUs would keep
    less context. grad_accum becomes the smallest count >= its own that splits the rank's batch evenly."""
    from stop_kernels.training.config import with_micro_batch
    cfg = TrainConfig(**dict(TINY, batch_size=batch, grad_accum=grad_accum, micro_batch=micro))
    assert with_micro_batch(cfg, world).grad_accum == want


def test_the_recipes_collate_as_the_official_code_and_train_runs_the_micro_batches(tmp_path, cpu_train, capsys):
    """The StoP recipes cap micro-batches at the official 64 images per GPU (vit_g at I-JEPA's 128), and train()
    applies it: a tiny run with micro_batch 4 and batch 8 takes 2 micro-batches per step, as --grad-accum 2 does."""
    from stop_kernels.training.loop import train
    assert [parse_config(["--model", m]).micro_batch for m in ("vit_b", "vit_l", "vit_h", "vit_g")] == [64, 64, 64, 128]
    from _train_helpers import REPO
    assert parse_config(["--config", str(REPO / "configs" / "vit_h16_448.yaml")]).micro_batch == 64
    capped = train(tiny(tmp_path / "capped", steps=2, batch_size=8, micro_batch=4))
    explicit = train(tiny(tmp_path / "explicit", steps=2, batch_size=8, grad_accum=2))
    assert capped == explicit
    assert "global batch 8 (2 micro-batches of 4 per rank)" in capsys.readouterr().out


def test_training_loads_each_micro_batch_with_its_own_masks(tmp_path):
    """TrainData with k = 2 and a per-rank batch of 8: each step is two loader batches of 4, exactly the
    batches (images and masks) of a k = 1 run with batch 4, paired; a resumed epoch starts at the right pair."""
    acc = TrainData(TrainConfig(**dict(TINY, synthetic_size=48, batch_size=8, grad_accum=2)))
    plain = TrainData(TrainConfig(**dict(TINY, synthetic_size=48, batch_size=4)))
    assert (acc.batch_size, acc.micro_batch, acc.iters_per_epoch) == (8, 4, 6)
    loader = list(plain.epoch(1))
    steps = list(acc.steps(1))
    assert len(steps) == 6 and all(len(micro) == 2 for micro, _ in steps)
    for s, (micro, skipped) in enumerate(steps):
        assert skipped == 0
        for j, (imgs, me, mp) in enumerate(micro):
            want = loader[2 * s + j]
            assert torch.equal(imgs, want[0])
            assert all(torch.equal(x, y) for x, y in zip(me + mp, want[1] + want[2]))
    assert len({m[2][0].shape[1] for micro, _ in steps for m in micro}) > 1  # mask sizes drawn per micro-batch
    tail = list(acc.steps(1, first_step=4))
    assert len(tail) == 2 and all(torch.equal(a[0], b[0]) for x, y in zip(tail, steps[4:]) for a, b in zip(x[0], y[0]))


def test_micro_batches_slice_images_and_masks_in_order():
    imgs = torch.randn(6, 3, 8, 8)
    me = [torch.randint(0, 16, (6, 5))]
    mp = [torch.randint(0, 16, (6, 2)), torch.randint(0, 16, (6, 2))]
    assert micro_batches(imgs, me, mp, 1) == [(imgs, me, mp)]  # the whole batch, untouched
    parts = micro_batches(imgs, me, mp, 3)
    assert len(parts) == 3 and all(p[0].shape[0] == 2 for p in parts)
    assert torch.equal(torch.cat([p[0] for p in parts]), imgs)
    assert torch.equal(torch.cat([p[1][0] for p in parts]), me[0])
    for j in range(2):
        assert torch.equal(torch.cat([p[2][j] for p in parts]), mp[j])
    ragged = [[torch.arange(n) for n in (3, 1, 4, 2, 5, 1)]]
    assert [len(t) for p in micro_batches(imgs, ragged, ragged, 2) for t in p[1][0]] == [3, 1, 4, 2, 5, 1]
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
    with pytest.raises(ConfigError, match=r"^grad_accum: the per-rank batch 4"):
        TrainData(cfg)
    # train() says so before it reads any data or builds a model
    monkeypatch.setattr("stop_kernels.training.loop.TrainData", lambda *a, **k: pytest.fail("data read first"))
    with pytest.raises(ConfigError, match=r"^grad_accum: the per-rank batch 4"):
        train(cfg)


def test_training_and_benchmark_report_the_micro_batches(tmp_path, cpu_train, capsys):
    """The start-up lines name the micro-batches; a step's logged token counts are means over all of its
    micro-batches (their mask lengths differ); the benchmark JSON carries grad_accum."""
    from _train_helpers import read_log
    from stop_kernels.models.packing import mean_tokens
    cfg = tiny(tmp_path / "train", steps=2, batch_size=8, grad_accum=4)
    losses = train(cfg)
    assert len(losses) == 2
    assert "global batch 8 (4 micro-batches of 2 per rank)" in capsys.readouterr().out
    steps = list(TrainData(cfg).steps(0))[:2]
    for rec, (micro, _) in zip(read_log(tmp_path / "train"), steps):
        assert rec["ctx_tokens"] == pytest.approx(sum(mean_tokens(m[1]) for m in micro) / 4)
        assert rec["tgt_tokens"] == pytest.approx(sum(mean_tokens(m[2]) for m in micro) / 4)
    assert len({mean_tokens(m[1]) for micro, _ in steps for m in micro}) > 1
    train(tiny(tmp_path / "bench", benchmark=1, benchmark_warmup=1, benchmark_batches=1, batch_size=4,
               grad_accum=4))
    out = capsys.readouterr()
    assert "global batch 4 (4 micro-batches of 1 per rank)" in out.err
    assert '"grad_accum": 4' in out.out


def test_out_of_memory_says_which_settings_fit(tmp_path, cpu_train, monkeypatch):
    """A step that runs out of GPU memory ends with the settings that lower the memory per step: the next
    grad_accum values that divide the rank's batch, AC, more GPUs (and the original error kept)."""
    from stop_kernels.training import loop

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(loop.Trainer, "step_micro", oom)
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


def test_batch_text_names_micro_batches_only_when_there_are_several(tmp_path):
    """The start-up line says "global batch N" alone for k = 1 (no "1 micro-batches of ..."), and the per-rank
    micro-batch size (the rank's batch over k, not the global batch over k) for k > 1."""
    from stop_kernels.training.loop import batch_text
    assert batch_text(tiny(tmp_path, batch_size=8), 2) == "global batch 8"
    assert batch_text(tiny(tmp_path, batch_size=8, grad_accum=2), 2) == "global batch 8 (2 micro-batches of 2 per rank)"


def test_benchmark_steps_are_k_micro_batches_of_the_micro_batch_size(tmp_path, cpu_train, monkeypatch):
    """--benchmark with grad_accum k: every timed and warm-up step is k micro-batches of batch/k images per rank
    (not k whole batches: k times the work, timed as one step), and the FLOPs behind its TFLOP/s are counted per
    micro-batch of batch/k images, k of them per step."""
    from stop_kernels.training import loop
    seen, counted = [], []
    real_step = loop.Trainer.step_micro

    def step_micro(self, micro, *a, **k):
        seen.append([m[0].shape[0] for m in micro])
        return real_step(self, micro, *a, **k)

    def step_flops(cfg, batch, ctx, tgt):
        counted.append(batch)
        return 1.0
    monkeypatch.setattr(loop.Trainer, "step_micro", step_micro)
    monkeypatch.setattr(loop, "step_flops", step_flops)
    train(tiny(tmp_path, benchmark=2, benchmark_warmup=1, benchmark_batches=1, batch_size=8, grad_accum=4))
    assert seen and all(s == [2, 2, 2, 2] for s in seen), seen
    assert counted == [2, 2, 2, 2]  # one pooled step: its 4 micro-batches of 2 images
