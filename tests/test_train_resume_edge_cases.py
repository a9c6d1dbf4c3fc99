"""Edge cases of runs that stop, restart or share a folder (each was a bug):

1. A run that does not resume, writing into an --out that holds checkpoints of a longer earlier run,
   must keep its own checkpoints (the earlier run's are moved aside, not deleted) and --resume must
   continue the new run.
2. A step saved again whose two renames were interrupted (step_N.old left, no step_N) is still found.
3. Mask settings (pred_mask_scale, enc_mask_scale, aspect_ratio, min_keep) are range-checked by
   ``validate`` with the key named (train.py prints ``train.py: error: <key>…``, exit 2).
4. A run killed after its final checkpoint but before the export writes the export on --resume, also
   when an earlier run left its own export in the folder (the export carries its step).
5. ``skipped_images`` is cumulative across a resume.
6. ``--benchmark`` honours ``--packed`` (ragged masks).
7. The first step after a checkpoint (and the very first step) is logged untimed: its only time stamp
   is the host's enqueue time.
8. A second run started in an --out that a run is training in stops before it touches anything.
9. One step number everywhere: the progress line, log.jsonl, TensorBoard and the checkpoint count the steps
   completed (progress printed "step 59/60" before the checkpoint step_00000060).
"""
import json
import math

import pytest
import torch

from stop_kernels.training.checkpoint import latest_checkpoint, list_checkpoints
from stop_kernels.training.config import ConfigError, TrainConfig, parse_config

from _train_helpers import TINY, read_log


def tiny(out, **over):
    return TrainConfig(**dict(TINY, out=str(out), **over))


def test_fresh_run_in_an_out_folder_with_checkpoints_keeps_its_own_checkpoint(tmp_path, cpu_train):
    from stop_kernels.training import loop
    loop.train(tiny(tmp_path, steps=6, ckpt_every=3))            # an earlier run: step_3, step_6
    loop.train(tiny(tmp_path, steps=2, lr=5e-4))                  # a new run (no --resume), same --out
    ck = tmp_path / "checkpoints"
    # the new run printed "checkpoint .../step_00000002" but prune() deleted it (keeps steps 3 and 6)
    assert [s for s, _ in list_checkpoints(str(ck))] == [2], sorted(p.name for p in ck.iterdir())
    # and --resume must continue the run that wrote the folder last, not the earlier one
    assert latest_checkpoint(str(ck)).endswith("step_00000002")
    # the earlier run's checkpoints are moved aside, not deleted (module docstring, item 1)
    (kept,) = tmp_path.glob("checkpoints.replaced-*")
    assert [s for s, _ in list_checkpoints(str(kept))] == [3, 6]


@pytest.mark.parametrize("argv, key", [
    (["--pred-mask-scale", "0.3,0.2"], "pred_mask_scale"),   # min > max
    (["--enc-mask-scale", "0.5,1.5"], "enc_mask_scale"),     # max > 1
    (["--aspect-ratio", "0,1"], "aspect_ratio"),             # ratio 0
    (["--min-keep", "64"], "min_keep"),                      # 8x8 grid: the collator needs min_keep < 64
    (["--min-keep", "9"], "min_keep"),                       # the smallest target block (3x3) keeps 9 <= 9
    (["--img-size", "8", "--patch-size", "8"], "img_size"),  # a 1x1 grid has no room to place a block
    (["--warmup-epochs", "5", "--epochs", "2"], "warmup_epochs"),  # lr would never reach its peak
    (["--color-jitter", "3"], "color_jitter"),                # torchvision's hue jitter must stay <= 0.5
])
def test_mask_settings_are_validated_with_the_key_named(argv, key):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        parse_config(argv)


@pytest.mark.needs("safetensors")
def test_resume_after_a_kill_during_the_export_still_exports(tmp_path, cpu_train, monkeypatch):
    from stop_kernels.training import loop
    real_export = loop.export

    def killed(*a, **k):
        raise KeyboardInterrupt("killed while exporting")

    monkeypatch.setattr(loop, "export", killed)
    with pytest.raises(KeyboardInterrupt):
        loop.train(tiny(tmp_path, steps=2, export=True))
    monkeypatch.setattr(loop, "export", real_export)
    loop.train(tiny(tmp_path, steps=2, export=True, resume=True))  # the requeued job
    assert (tmp_path / "export" / "encoder.safetensors").is_file()
    assert (tmp_path / "export" / "target_encoder.safetensors").is_file()


@pytest.mark.needs("safetensors")
def test_a_finished_runs_export_is_kept_on_resume(tmp_path, cpu_train):
    """The export carries its training step in the safetensors metadata: a requeued job of a run that already
    exported finds it complete and leaves it as it is (no second write of the encoders)."""
    from safetensors import safe_open
    from stop_kernels.training import loop
    loop.train(tiny(tmp_path, steps=2, export=True))
    files = [tmp_path / "export" / f"{n}.safetensors" for n in ("encoder", "target_encoder")]
    for f in files:
        with safe_open(str(f), "pt") as fh:
            assert fh.metadata()["step"] == "2" and fh.metadata()["model"] == "vit_tiny"
    written = [f.stat().st_mtime_ns for f in files]
    assert loop.train(tiny(tmp_path, steps=2, export=True, resume=True)) == []  # nothing left to train
    assert [f.stat().st_mtime_ns for f in files] == written


@pytest.mark.needs("PIL", "torchvision")
def test_skipped_images_count_survives_a_resume(tmp_path, cpu_train):
    from stop_kernels.training.loop import train
    from test_train_data import make_folder
    root = make_folder(tmp_path / "imgs")        # 4 readable images + 1 broken: 1 skip per step at batch 5
    kw = dict(data=str(root), batch_size=5)
    train(tiny(tmp_path / "full", steps=2, **kw))
    assert read_log(tmp_path / "full")[-1]["skipped_images"] == 2
    train(tiny(tmp_path / "part", steps=1, **kw))
    train(tiny(tmp_path / "part", steps=2, resume=True, **kw))
    recs = read_log(tmp_path / "part")
    assert [r["step"] for r in recs] == [1, 2]
    assert recs[-1]["skipped_images"] == 2, recs[-1]["skipped_images"]   # 1: the count restarted at 0
    meta = json.loads((tmp_path / "part" / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert meta["skipped_images"] == 2, meta["skipped_images"]


def test_benchmark_honours_packed(tmp_path, cpu_train, monkeypatch):
    from stop_kernels.models.packing import is_ragged
    from stop_kernels.training import loop
    seen = []

    def fake_step(self, micro, lr_wd_mom, skipped=0):
        seen.extend(is_ragged(masks_enc) and is_ragged(masks_pred) for _, masks_enc, masks_pred in micro)
        return torch.zeros(7)  # [loss, skipped, ctx tokens, tgt tokens, FLOPs, log write failed, nonfinite]

    monkeypatch.setattr(loop.Trainer, "step_micro", fake_step)
    values = loop.train(tiny(tmp_path, packed=True, img_size=64, min_keep=2, benchmark=1, benchmark_warmup=0,
                             benchmark_batches=1))
    assert len(values) == 2 and all(math.isfinite(v) for v in values)
    assert seen and all(seen), "the benchmark ran rectangular (truncated) masks under --packed"


def test_a_step_saved_again_and_interrupted_between_renames_is_still_found(tmp_path, cpu_train):
    from stop_kernels.training import loop
    loop.train(tiny(tmp_path, steps=2))
    ck = tmp_path / "checkpoints"
    (ck / "step_00000002").rename(ck / "step_00000002.old")   # the state after the first rename of _finalize
    assert latest_checkpoint(str(ck)).endswith("step_00000002.old")
    assert [s for s, _ in list_checkpoints(str(ck))] == [2]
    assert loop.train(tiny(tmp_path, steps=3, resume=True))   # resumes from it: one more step


def test_first_step_after_a_checkpoint_is_untimed(tmp_path, cpu_train):
    from stop_kernels.training import loop
    loop.train(tiny(tmp_path, steps=5, ckpt_every=2, log_every=1))
    recs = read_log(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    untimed = [r["step"] for r in recs if r["images_per_s"] is None]
    assert untimed == [1, 3, 5], untimed                      # after start and after the saves at 2 and 4
    assert all(r["images_per_s"] > 0 for r in recs if r["step"] in (2, 4))


@pytest.mark.needs("safetensors")
@pytest.mark.parametrize("steps_b", [3, 2])
def test_an_earlier_runs_export_is_not_taken_for_this_runs(tmp_path, cpu_train, monkeypatch, steps_b):
    """Run A exports; run B (fresh, in the same --out; as long as A, or longer) dies at its own export
    and is resumed: the export is B's, and A's is kept under export.replaced-*."""
    from safetensors.torch import load_file
    from stop_kernels.training import loop
    loop.train(tiny(tmp_path, steps=2, export=True, lr=1e-3))         # run A exports at step 2
    a = load_file(str(tmp_path / "export" / "encoder.safetensors"))
    real_export = loop.export

    def killed(*a, **k):
        raise KeyboardInterrupt("killed while exporting")

    monkeypatch.setattr(loop, "export", killed)
    with pytest.raises(KeyboardInterrupt):                          # run B (fresh, other lr) dies at its export
        loop.train(tiny(tmp_path, steps=steps_b, export=True, lr=5e-3))
    monkeypatch.setattr(loop, "export", real_export)
    loop.train(tiny(tmp_path, steps=steps_b, export=True, lr=5e-3, resume=True))  # "nothing to do" + export
    b = load_file(str(tmp_path / "export" / "encoder.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a), "the export is still run A's"
    (kept,) = tmp_path.glob("export.replaced-*")
    assert all(torch.equal(a[k], v) for k, v in load_file(str(kept / "encoder.safetensors")).items())


def test_cpu_steps_are_timed_one_step_each(tmp_path, cpu_train, monkeypatch):
    """On the CPU a step runs to its end before the loop goes on: the step after each (re)start must not
    be charged its predecessor's time too (it showed twice the steady-state time)."""
    import time
    from stop_kernels.training import loop

    def slow_step(self, *a, **k):
        time.sleep(0.25)
        return torch.zeros(7)  # [loss, skipped, ctx tokens, tgt tokens, FLOPs, log write failed, nonfinite]

    monkeypatch.setattr(loop.Trainer, "step_micro", slow_step)
    loop.train(tiny(tmp_path, steps=5, ckpt_every=2))
    timed = {r["step"]: r["step_time_s"] for r in read_log(tmp_path) if r["step_time_s"] is not None}
    assert sorted(timed) == [2, 4]                                 # 1, 3, 5 follow a (re)start: untimed
    assert all(0.2 <= t < 0.45 for t in timed.values()), timed     # one 0.25 s step each, not two


def test_a_fresh_run_sets_the_earlier_runs_log_aside(tmp_path, cpu_train):
    from stop_kernels.training import loop
    loop.train(tiny(tmp_path, steps=2))
    loop.train(tiny(tmp_path, steps=1))
    (kept,) = tmp_path.glob("log.jsonl.replaced-*")
    assert [json.loads(line)["step"] for line in kept.read_text().splitlines()] == [1, 2]
    assert [r["step"] for r in read_log(tmp_path)] == [1]


def test_an_attention_backend_that_cannot_run_is_refused_before_anything_moves(tmp_path, cpu_train, monkeypatch):
    from stop_kernels.ops import attention
    from stop_kernels.training import loop
    loop.train(tiny(tmp_path, steps=1))
    monkeypatch.setattr(attention, "_INTERPRET", False)           # a CPU run without the Triton interpreter
    with pytest.raises(ConfigError, match="^attention: the Triton kernels need a CUDA device"):
        loop.train(tiny(tmp_path, steps=1, attention="triton"))
    assert not list(tmp_path.glob("*.replaced-*")) and [r["step"] for r in read_log(tmp_path)] == [1]


def test_the_attention_check_runs_under_the_runs_auto_policy(tmp_path, cpu_train, monkeypatch):
    """The start-up check of the attention backend sees the policy the steps will run under (config key
    attention_policy), so a policy naming a backend that cannot run is refused before the first step."""
    from stop_kernels.ops import attention
    from stop_kernels.training import loop
    seen = []

    def check(name, device):
        seen.append((name, attention.get_auto_policy()))
        return ""
    monkeypatch.setattr(loop, "attention_backend_problem", check)
    loop.train(tiny(tmp_path, steps=1, attention_policy="train=xformers"))
    assert seen == [("auto", {**attention.DEFAULT_AUTO_POLICY, "train": "xformers"})]


@pytest.mark.parametrize("over, key", [(dict(pred_depth=2), "pred_depth"), (dict(img_size=40), "img_size"),
                                       (dict(noise_mode="none"), "noise_mode"), (dict(model="vit_small"), "model"),
                                       (dict(pred_emb_dim=48), "pred_emb_dim"),
                                       (dict(pred_depth=2, img_size=40), "img_size")])  # the first key changed
def test_resume_with_other_model_settings_names_the_key(tmp_path, cpu_train, over, key):
    """A checkpoint holds the models and the optimizer of its own settings: resuming it with another model size
    (or with the mask token optimized, noise_mode none) is a ConfigError naming the key, not DCP's missing-key
    or size error (the first of the changed keys, in the config's order), and nothing of the run is touched."""
    from stop_kernels.training import loop
    loop.train(tiny(tmp_path, steps=1))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ConfigError, match=f"^{key}: the checkpoint to resume"):
        loop.train(tiny(tmp_path, steps=2, resume=True, **over))
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert loop.train(tiny(tmp_path, steps=2, resume=True, noise_mode="isotropic"))  # same parameters: resumes


def test_resume_with_another_global_batch_is_refused(tmp_path, cpu_train):
    """The data position (epoch, batch in epoch) and the schedules are counted in steps of the global batch: a
    resume with another batch_size skipped the rest of the epoch (and logged images_seen wrong), so it is a
    ConfigError naming the key; another grad_accum (the same global batch) resumes."""
    from stop_kernels.training import loop
    loop.train(tiny(tmp_path, steps=1, batch_size=4))
    with pytest.raises(ConfigError, match=r"^batch_size: the checkpoint to resume, .* batch_size=4, this run has 8"):
        loop.train(tiny(tmp_path, steps=2, resume=True, batch_size=8))
    assert len(loop.train(tiny(tmp_path, steps=2, resume=True, batch_size=4, grad_accum=2))) == 1


@pytest.mark.parametrize("damage", ["shard-garbage", "shard-truncated", "metadata-garbage", "meta-json-garbage"])
def test_a_damaged_checkpoint_is_a_config_error_naming_it(tmp_path, cpu_train, damage):
    """A damaged shard, ``.metadata`` or meta.json gave DCP's or json's raw traceback on --resume (EOFError, a zip
    reader error, "metadata is None"); it is a ConfigError naming the checkpoint with the remedy, and converting
    the run to the official layout is an error naming it too (exit 2) where the damage reaches the models."""
    from stop_kernels.training import checkpoint as C
    from stop_kernels.training import loop
    loop.train(tiny(tmp_path, steps=1))
    ck = tmp_path / "checkpoints" / "step_00000001"
    if damage.startswith("shard"):
        shard = sorted(ck.glob("*.distcp"))[0]
        data = shard.read_bytes()
        shard.write_bytes(b"\x00garbage" * 50 if damage == "shard-garbage" else data[:len(data) // 2])
    else:
        (ck / (".metadata" if damage == "metadata-garbage" else "meta.json")).write_bytes(b"\x00garbage{")
    with pytest.raises(ConfigError, match=r"^resume: (checkpoint: )?cannot read .*step_00000001.*move .* aside"):
        loop.train(tiny(tmp_path, steps=2, resume=True))
    if damage == "shard-truncated":  # (the models' tensors, which to-official reads, may all lie in the kept half)
        return
    with pytest.raises(SystemExit) as e:
        C.main(["to-official", str(tmp_path), str(tmp_path / "official.pth.tar")])
    assert e.value.code == 2


def test_a_resume_killed_while_it_rewrites_the_log_keeps_the_earlier_records(tmp_path, cpu_train, monkeypatch):
    """A resumed run rewrites log.jsonl to the steps before its own. Killed right after it opens the log for
    writing, the earlier records must still be there: open(path, "w") had already emptied the file."""
    import builtins
    from stop_kernels.training import loop, metrics
    loop.train(tiny(tmp_path, steps=2, ckpt_every=1, keep_ckpts=5))
    import shutil
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000002")  # resume from step 1: the log keeps its record
    real_open = builtins.open

    def killed_after_opening(path, mode="r", *a, **k):
        fh = real_open(path, mode, *a, **k)
        if str(path).endswith("log.jsonl") and mode != "r":
            fh.close()
            raise KeyboardInterrupt("killed while the log is rewritten")
        return fh
    monkeypatch.setattr(metrics, "open", killed_after_opening, raising=False)
    with pytest.raises(KeyboardInterrupt):
        loop.train(tiny(tmp_path, steps=2, resume=True))
    assert [r["step"] for r in read_log(tmp_path)] == [1]  # the step of the checkpoint it resumes
    monkeypatch.setattr(metrics, "open", real_open, raising=False)  # (not undo(): cpu_train's patches stay)
    loop.train(tiny(tmp_path, steps=2, resume=True))
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2]


def test_a_second_run_in_an_out_folder_in_use_stops_before_it_touches_anything(tmp_path, cpu_train):
    """Two runs at once in one --out (a second experiment given the first's --out, a job requeued while the first
    still runs): the second set the first's checkpoints and log aside while the first kept writing, the two pruned
    each other's checkpoints and .tmp- folders (the second crashed in its first save). The second now stops with
    the key named; a killed run leaves no lock behind (flock goes with the process)."""
    import fcntl
    import subprocess
    import sys
    from stop_kernels.training import loop
    loop.train(tiny(tmp_path, steps=2, ckpt_every=1))
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; fh = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(fh, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(600)",
                               str(tmp_path / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"  # a run still training in tmp_path
        before = sorted(p.name for p in tmp_path.iterdir())
        with pytest.raises(ConfigError, match="^out: .* is in use by another run"):
            loop.train(tiny(tmp_path, steps=1))
        assert sorted(p.name for p in tmp_path.iterdir()) == before
        assert [s for s, _ in list_checkpoints(str(tmp_path / "checkpoints"))] == [1, 2]
    finally:
        holder.kill()
        holder.wait()
    assert loop.train(tiny(tmp_path, steps=3, ckpt_every=1, resume=True))  # the lock went with the process
    with open(tmp_path / ".lock") as fh:  # and this process released its own
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_progress_log_tensorboard_and_checkpoints_number_the_steps_alike(tmp_path, cpu_train, capsys, monkeypatch):
    """After the N-th step (1-based: steps completed) the progress line says "step N/total", its log.jsonl record
    and TensorBoard scalars carry step N, and the checkpoint written after it is step_N (the progress line said
    "step N-1/total" and the log and TensorBoard N-1: 0-based). A resume from step_N keeps the log and
    TensorBoard records up to N and rewrites them from N + 1 on, with the uninterrupted run's losses."""
    import shutil
    import sys
    import types
    from stop_kernels.training import loop
    writers = []

    class FakeSummaryWriter:  # tensorboard itself need not be installed: the steps the logger gives it
        def __init__(self, logdir, purge_step=None):
            self.purge_step, self.steps = purge_step, set()
            writers.append(self)

        def add_scalar(self, tag, value, step):
            self.steps.add(step)

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeSummaryWriter))

    def numbers(out):  # "step N/4" lines as N, "checkpoint .../step_0000000N" lines as ("ckpt", N)
        found = []
        for line in out.splitlines():
            if line.startswith("step "):
                n, total = line.split()[1].split("/")
                assert total == "4", line
                found.append(int(n))
            elif line.startswith("checkpoint "):
                found.append(("ckpt", int(line.rsplit("step_", 1)[1])))
        return found

    full = loop.train(tiny(tmp_path, steps=4, ckpt_every=2, log_every=2, tensorboard=True, keep_ckpts=5))
    assert numbers(capsys.readouterr().out) == [1, 2, ("ckpt", 2), 4, ("ckpt", 4)]
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4]
    assert writers[0].purge_step is None and writers[0].steps == {1, 2, 3, 4}
    assert [s for s, _ in list_checkpoints(str(tmp_path / "checkpoints"))] == [2, 4]

    shutil.rmtree(tmp_path / "checkpoints" / "step_00000004")  # resume after step 2
    resumed = loop.train(tiny(tmp_path, steps=4, ckpt_every=2, log_every=2, tensorboard=True, resume=True))
    assert resumed == full[2:]
    assert numbers(capsys.readouterr().out) == [4, ("ckpt", 4)]
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4]
    assert [r["loss"] for r in read_log(tmp_path)] == full
    assert writers[1].purge_step == 3 and writers[1].steps == {3, 4}  # events of steps >= 3 are replaced


def test_resume_of_a_checkpoint_missing_a_ranks_rng_file_stops_before_training(tmp_path, cpu_train):
    """docs/training.md promises a bit-exact resume on the same world size: a checkpoint without this rank's
    rng_rank0.pt resumed silently with fresh RNG states (printing "RNG re-seeded: world size changed"). It is
    now a ConfigError (train.py: exit 2) naming the file, and the run's log is left as it was."""
    from stop_kernels.training import loop
    loop.train(tiny(tmp_path, steps=1))
    (tmp_path / "checkpoints" / "step_00000001" / "rng_rank0.pt").unlink()
    before = (tmp_path / "log.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"^resume: cannot read .*step_00000001/rng_rank0.pt, the RNG states"):
        loop.train(tiny(tmp_path, steps=2, resume=True))
    assert (tmp_path / "log.jsonl").read_text() == before


def test_a_resume_on_another_world_size_reseeds_away_from_the_first_steps_noise(tmp_path, cpu_train, monkeypatch,
                                                                                capsys):
    """A checkpoint of another world size has no RNG file for this rank layout: the run re-seeds. The StoP noise
    of the resumed steps must not replay the run's first steps' (a re-seed from the run's seed alone would hand
    step k the noise of step 0 again), so the step after the resume starts from another stream than step 0."""
    from stop_kernels.training import loop
    states = []
    real = loop.Trainer.step_micro

    def recording(self, *a, **kw):  # the global generator the StoP noise of this step draws from
        states.append(torch.get_rng_state())
        return real(self, *a, **kw)
    monkeypatch.setattr(loop.Trainer, "step_micro", recording)
    loop.train(tiny(tmp_path, steps=1))
    meta = tmp_path / "checkpoints" / "step_00000001" / "meta.json"
    meta.write_text(json.dumps(dict(json.loads(meta.read_text()), world_size=2)))  # as if written by 2 ranks
    loop.train(tiny(tmp_path, steps=2, resume=True))
    assert "RNG re-seeded: world size changed" in capsys.readouterr().out
    assert len(states) == 2
    assert not torch.equal(states[1], states[0]), "the resumed step replays the first step's noise"


def test_an_export_of_an_earlier_step_of_this_run_is_redone_after_a_kill(tmp_path, cpu_train, monkeypatch):
    """A run exported at step 2, then continued to step 3 and killed while exporting: the export on disk is the
    run's own, of step 2, and the requeued job must replace it with step 3's (export_complete compares the
    step in the files' metadata: files of the same run that merely exist are not the export of this step)."""
    from safetensors import safe_open
    from stop_kernels.training import loop
    loop.train(tiny(tmp_path, steps=2, export=True))
    real_export = loop.export

    def killed(*a, **k):
        raise KeyboardInterrupt("killed while exporting")
    monkeypatch.setattr(loop, "export", killed)
    with pytest.raises(KeyboardInterrupt):
        loop.train(tiny(tmp_path, steps=3, export=True, resume=True))
    monkeypatch.setattr(loop, "export", real_export)
    assert loop.train(tiny(tmp_path, steps=3, export=True, resume=True)) == []  # nothing to train: export only
    for n in ("encoder", "target_encoder"):
        with safe_open(str(tmp_path / "export" / f"{n}.safetensors"), "pt") as fh:
            assert fh.metadata()["step"] == "3", n


@pytest.mark.parametrize("over, key", [(dict(seed=1), "seed"), (dict(synthetic_size=48), "synthetic_size")])
def test_resume_with_another_seed_or_dataset_is_refused(tmp_path, cpu_train, over, key):
    """The seed orders the epoch (the sampler's shuffle, the masks, the synthetic images) and the dataset's size sets
    its length: a resume with another one continued at step k of another order, so the rest of the epoch repeated
    some images and skipped others (audit, session 30: 12 distinct images of 16). Refused by name, nothing moved."""
    from stop_kernels.training import loop
    loop.train(tiny(tmp_path, steps=1))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ConfigError, match=f"^{key}: the checkpoint to resume"):
        loop.train(tiny(tmp_path, steps=2, resume=True, **over))
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert len(loop.train(tiny(tmp_path, steps=2, resume=True))) == 1


@pytest.mark.needs("safetensors")
def test_a_fresh_run_without_export_sets_the_earlier_export_aside(tmp_path, cpu_train):
    """Run A exports; run B starts fresh in the same --out with --export false, finishes, and is resumed with
    --export true ("nothing to do"): the export must be B's. B left A's export in place, and the resume found it
    complete at the same step and kept it (audit, session 30)."""
    from safetensors.torch import load_file
    from stop_kernels.training import loop
    from stop_kernels.training.checkpoint import load_run_models
    loop.train(tiny(tmp_path, steps=2, export=True, lr=1e-3))          # run A
    loop.train(tiny(tmp_path, steps=2, export=False, lr=5e-3))         # run B, fresh: A's export moves aside now
    assert not (tmp_path / "export").exists() and list(tmp_path.glob("export.replaced-*"))
    assert loop.train(tiny(tmp_path, steps=2, export=True, lr=5e-3, resume=True)) == []
    exported = load_file(str(tmp_path / "export" / "encoder.safetensors"))
    ours = load_run_models(str(tmp_path))[0].encoder.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in exported.items())


def test_an_incomplete_old_step_folder_is_pruned(tmp_path, cpu_train):
    """A step saved again over an incomplete step_N, killed between _finalize's renames, left an incomplete
    step_N.old that no later save or prune removed (a checkpoint's worth of disk; audit, session 30)."""
    from stop_kernels.training import loop
    loop.train(tiny(tmp_path, steps=2))
    ck = tmp_path / "checkpoints"
    stale = ck / "step_00000001.old"
    stale.mkdir()
    (stale / "junk").write_bytes(b"x" * 100)                  # no meta.json: no checkpoint
    shadowed = ck / "step_00000002.old"
    shadowed.mkdir()                                          # beside a complete step_2: stale too
    assert [s for s, _ in list_checkpoints(str(ck))] == [2]
    loop.train(tiny(tmp_path, steps=3, resume=True, keep_ckpts=2))
    assert sorted(p.name for p in ck.iterdir()) == ["step_00000002", "step_00000003"]
