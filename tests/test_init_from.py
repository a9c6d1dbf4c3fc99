"""``init_from``: a run starts from existing weights, an official I-JEPA / StoP checkpoint or one of this project's
runs (weights only: step 0, a fresh optimizer), and refuses weights whose sizes do not fit its config."""
import os

import pytest
import torch

from stop_kernels.models import predictor_for, vit_encoder
from stop_kernels.models.official import save_official_checkpoint
from stop_kernels.training import distributed as D
from stop_kernels.training.config import ConfigError, TrainConfig, parse_config
from stop_kernels.training.loop import Trainer, train

from _train_helpers import TINY, read_log, tiny_args, trained_run


def tiny(tmp_path, **over):
    return TrainConfig(**dict(TINY, out=str(tmp_path / "new"), **over))


def official_file(tmp_path, model="vit_tiny", pred_depth=1, target=True, seed=3):
    """An official-layout checkpoint of random models with the tiny config's sizes (unless overridden)."""
    torch.manual_seed(seed)
    enc = vit_encoder(model, img_size=32, patch_size=8)
    pred = predictor_for(enc, img_size=32, patch_size=8, predictor_embed_dim=96, depth=pred_depth)
    tgt = vit_encoder(model, img_size=32, patch_size=8) if target else None
    path = tmp_path / f"{model}-{pred_depth}-{target}.pth.tar"
    save_official_checkpoint(path, enc, pred, tgt, epoch=7)
    return str(path), {"encoder": enc.state_dict(), "predictor": pred.state_dict(),
                       "target_encoder": (tgt or enc).state_dict()}


def assert_holds(tr, want):
    for name, state in want.items():
        got = getattr(tr.models, name).state_dict()
        assert set(got) == set(state), name
        for k, v in state.items():
            assert torch.equal(got[k], v), (name, k)


@pytest.mark.parametrize("with_target", [True, False], ids=["with-target", "encoder-only-target"])
def test_init_from_an_official_checkpoint(tmp_path, cpu_train, capsys, with_target):
    """All three models hold the file's weights (a file without a target encoder starts the target as a copy
    of the encoder, as a new run does); the optimizer is fresh."""
    path, want = official_file(tmp_path, target=with_target)
    tr = Trainer(tiny(tmp_path, init_from=path), D.init_distributed(tiny(tmp_path)), None)
    assert_holds(tr, want)
    assert not tr.opt.state  # weights only
    assert f"initialised the encoder, predictor and target encoder from {path} (official layout, epoch 7)" in \
        capsys.readouterr().out


def test_init_from_a_run_then_train(tmp_path, cpu_train, capsys):
    """A run of this project (its folder): the newest checkpoint's weights, then a normal run from step 0."""
    run, want = trained_run(tmp_path, steps=2)
    cfg = tiny(tmp_path, init_from=run)
    assert_holds(Trainer(cfg, D.init_distributed(cfg), None), want)
    assert "from " + run + "/checkpoints/step_00000002 (step 2)" in capsys.readouterr().out
    losses = train(tiny(tmp_path, init_from=run, steps=2, ckpt_every=0))
    assert [r["step"] for r in read_log(tmp_path / "new")] == [1, 2] and len(losses) == 2


def test_init_from_refuses_what_does_not_fit(tmp_path, cpu_train):
    with pytest.raises(ConfigError, match="^init_from: no such file or folder: "):
        parse_config(tiny_args(init_from=str(tmp_path / "missing.pth.tar")))
    cases = [(official_file(tmp_path, model="vit_small")[0], r"model: vit_tiny has width 192 and depth 12, but "
              r"the checkpoint holds width 384"),
             (official_file(tmp_path, pred_depth=2)[0], "Unexpected key.*predictor_blocks.1")]
    for path, detail in cases:
        cfg = tiny(tmp_path, init_from=path)
        with pytest.raises(ConfigError, match=r"(?s)^init_from: .* does not fit this config \(vit_tiny, img 32, patch 8, "
                                              r"predictor depth 1 width 96\): .*" + detail):
            Trainer(cfg, D.init_distributed(cfg), None)


@pytest.mark.parametrize("content", [b"hello\n", b"", bytes(range(256)) * 4], ids=["text", "empty", "binary"])
def test_init_from_a_file_that_is_no_checkpoint_names_the_key(tmp_path, cpu_train, content):
    """A file torch.load cannot read (a text file, an empty or a random one) is the same ConfigError naming
    init_from, not torch.load's KeyError / EOFError / UnpicklingError traceback."""
    path = tmp_path / "not_a_checkpoint.pth.tar"
    path.write_bytes(content)
    cfg = tiny(tmp_path, init_from=str(path))
    with pytest.raises(ConfigError, match=r"^init_from: .*cannot read .* as a torch checkpoint") as e:
        Trainer(cfg, D.init_distributed(cfg), None)
    assert "does not fit" not in str(e.value)  # (not a mismatch of sizes: no checkpoint at all; audit, session 30)


def test_a_run_started_from_a_file_that_is_gone_still_loads(tmp_path, cpu_train, capsys):
    """A run's meta.json keeps the init_from it started with; once that file is moved (or was a path relative to
    another working directory), the run must still convert to the official layout and seed another run: the
    weights are in its checkpoint, the file is not read again."""
    from stop_kernels.training import checkpoint as C
    path, _ = official_file(tmp_path)
    run, want = trained_run(tmp_path, steps=1, init_from=path)
    os.unlink(path)
    assert C.main(["to-official", run, str(tmp_path / "official.pth.tar")]) == 0
    cfg = tiny(tmp_path, init_from=run)
    assert_holds(Trainer(cfg, D.init_distributed(cfg), None), want)


def test_resume_takes_precedence_over_init_from(tmp_path, cpu_train):
    """A preempted job restarted with the same flags (init_from and resume) continues its own checkpoint: the
    same losses as resuming without init_from (CPU resumes are bitwise)."""
    import shutil
    run, _ = trained_run(tmp_path, steps=2)
    path, _ = official_file(tmp_path)
    losses = {}
    for name, extra in (("plain", {}), ("init", {"init_from": path})):
        out = tmp_path / name
        shutil.copytree(run, out)
        losses[name] = train(TrainConfig(**dict(TINY, out=str(out), steps=3, resume=True, **extra)))
    assert len(losses["plain"]) == 1 and losses["init"] == losses["plain"]


def test_a_restart_does_not_need_the_init_from_source_once_it_has_a_checkpoint(tmp_path, cpu_train, monkeypatch):
    """With --resume and a checkpoint of its own, a restarted job continues it without checking or reading
    init_from: the seed file may have been purged since (it stopped with "init_from: no such file"), and at ViT-H
    reading it again only to overwrite it costs gigabytes. Without a checkpoint, init_from still applies."""
    from stop_kernels.training import loop
    from stop_kernels.training.config import init_from_applies
    path, _ = official_file(tmp_path)
    out = tmp_path / "run"
    cfg = TrainConfig(**dict(TINY, out=str(out), steps=2, ckpt_every=1, resume=True, init_from=path))
    assert init_from_applies(cfg)  # nothing to resume yet
    train(cfg)
    os.unlink(path)
    assert not init_from_applies(cfg)
    monkeypatch.setattr(loop, "init_weights_from", lambda *a: pytest.fail("init_from read on a resume"))
    assert len(train(TrainConfig(**dict(TINY, out=str(out), steps=3, resume=True, init_from=path)))) == 1
    with pytest.raises(ConfigError, match="^init_from: no such file"):  # a fresh run in another folder needs it
        train(TrainConfig(**dict(TINY, out=str(tmp_path / "other"), steps=1, resume=True, init_from=path)))

