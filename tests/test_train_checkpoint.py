"""Checkpoints: atomic publication, keep-last-K, and a save interrupted mid-write leaving the previous one loadable."""
import os

import pytest
import torch
import torch.nn as nn

from stop_kernels.training.checkpoint import Checkpointer, latest_checkpoint, list_checkpoints
from stop_kernels.training.distributed import DistInfo


def single() -> DistInfo:
    return DistInfo(0, 1, 0, 1, torch.device("cpu"), None, False)


def model_and_opt(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    m(torch.randn(3, 4)).sum().backward()
    opt.step()
    return m, opt


def snapshot(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_save_load_roundtrip_and_keep_last(tmp_path):
    ck = Checkpointer(str(tmp_path), single(), keep=2)
    m, opt = model_and_opt()
    saved = {}
    for step in (1, 2, 3):
        with torch.no_grad():
            m[0].weight.add_(1.0)
        saved[step] = snapshot(m)
        ck.save(step, m, opt, {"epoch": 0})
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [2, 3]
    m2, opt2 = model_and_opt(seed=1)
    meta = ck.load(latest_checkpoint(str(tmp_path)), m2, opt2)
    assert meta["step"] == 3 and meta["rng_restored"]
    for k, v in snapshot(m2).items():
        assert torch.equal(v, saved[3][k])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


@pytest.mark.parametrize("keep", [1, 2])
def test_interrupted_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch, keep):
    """keep = 1 too: old checkpoints are pruned only after the new one is published, never to make room."""
    ck = Checkpointer(str(tmp_path), single(), keep=keep)
    m, opt = model_and_opt()
    ck.save(1, m, opt, {"epoch": 0})
    good = snapshot(m)
    with torch.no_grad():
        m[0].weight.mul_(0.0)

    def crash(*args, **kw):  # the job dies after the shards are written, before publication
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(Checkpointer, "_finalize", crash)
    with pytest.raises(KeyboardInterrupt):
        ck.save(2, m, opt, {"epoch": 0})
    names = sorted(os.listdir(tmp_path))
    assert names == [".tmp-step_00000002", "step_00000001"]
    assert latest_checkpoint(str(tmp_path)).endswith("step_00000001")
    m2, opt2 = model_and_opt(seed=3)
    ck.load(latest_checkpoint(str(tmp_path)), m2, opt2)
    for k, v in snapshot(m2).items():
        assert torch.equal(v, good[k])
    # a folder without meta.json (cut before publication) or without DCP metadata is never taken
    (tmp_path / "step_00000009").mkdir()
    (tmp_path / "step_00000009" / "meta.json").write_text("{}")
    (tmp_path / "step_00000010").mkdir()
    (tmp_path / "step_00000010" / ".metadata").write_bytes(b"x")
    assert latest_checkpoint(str(tmp_path)).endswith("step_00000001")
    # the next successful save removes the stale temporary folder
    monkeypatch.undo()
    ck.save(3, m, opt, {"epoch": 0})
    assert not any(n.startswith(".tmp-") for n in os.listdir(tmp_path))


def test_every_file_of_a_checkpoint_reaches_the_disk_before_publication(tmp_path, monkeypatch):
    """Durability, not only atomicity: every file of the checkpoint (DCP shards and metadata, the RNG
    file, meta.json) is fsynced while still in the temporary folder, then that folder, then the parent
    after the rename. Without it a power loss after the rename could publish empty files."""
    synced = []
    real = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)
    if not os.path.exists("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd (Linux) to name the fsynced files")
    monkeypatch.setattr(os, "fsync", recording_fsync)
    folder = tmp_path / "ckpts"
    ck = Checkpointer(str(folder), single(), keep=2)
    m, opt = model_and_opt()
    final = ck.save(1, m, opt, {"epoch": 0})
    tmp = str(folder / ".tmp-step_00000001")
    names = set(os.listdir(final))
    assert {".metadata", "meta.json", "rng_rank0.pt"} <= names and any(n.endswith(".distcp") for n in names)
    for name in names:  # meta.json and DCP's .metadata are synced as temporaries, then renamed in the folder
        path = os.path.join(tmp, name)
        assert any(p == path or (p.startswith(path + ".") and p.endswith(".tmp")) for p in synced), name
    assert tmp in synced and str(folder) in synced
    assert synced.index(tmp) < synced.index(str(folder))


def test_checkpoint_files_get_the_mode_of_the_umask(tmp_path):
    """meta.json (written through a temporary file) is readable like the DCP shards beside it: mkstemp's 0600
    kept it, and the exports and official checkpoints, from the other users of a shared --out."""
    old = os.umask(0o022)
    try:
        ck = Checkpointer(str(tmp_path), single(), keep=2)
        m, opt = model_and_opt()
        final = ck.save(1, m, opt, {"epoch": 0})
        modes = {name: os.stat(os.path.join(final, name)).st_mode & 0o777 for name in os.listdir(final)}
        assert modes["meta.json"] == modes[".metadata"] == 0o644, modes
        os.umask(0o077)
        from stop_kernels._checks import write_atomic
        write_atomic(str(tmp_path / "private.bin"), lambda fh: fh.write(b"x"))
        assert os.stat(tmp_path / "private.bin").st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_write_atomic_leaves_the_process_umask_as_it_was(tmp_path):
    """write_atomic never changes the process umask (reading it means setting it, os.umask has no read-only form:
    left at 0, or set while another thread creates a file, the files created then — DCP shards, logs — would
    be world-writable); the umask applies to its file as open() applies it."""
    import os
    from stop_kernels import _checks
    old = os.umask(0o027)
    calls = []
    real_umask = os.umask
    try:
        os.umask = lambda m: calls.append(m) or real_umask(m)
        _checks.write_atomic(str(tmp_path / "a.bin"), lambda fh: fh.write(b"x"))
        os.umask = real_umask
        assert calls == [] and os.umask(0o027) == 0o027
        assert os.stat(tmp_path / "a.bin").st_mode & 0o777 == 0o640
    finally:
        os.umask = real_umask
        os.umask(old)


def test_a_kill_while_pruning_never_leaves_a_complete_looking_checkpoint(tmp_path, monkeypatch):
    """A job killed while prune() deletes an old checkpoint (shutil.rmtree removes file by file) must not leave a
    step_* folder that still has meta.json and .metadata but lost its shards: list_checkpoints would offer it as
    complete (to-official --step, --init-from), and prune would never remove a folder that lost meta.json."""
    import shutil
    from stop_kernels.training import checkpoint as ckmod
    ck = Checkpointer(str(tmp_path), single(), keep=1)
    m, opt = model_and_opt()
    ck.save(1, m, opt, {"epoch": 0})
    real_rmtree = shutil.rmtree

    def killed_mid_rmtree(path, *a, **k):  # the shards go first, then the job dies
        for name in os.listdir(path):
            if name.endswith(".distcp"):
                os.unlink(os.path.join(path, name))
        raise KeyboardInterrupt("killed mid-rmtree")

    monkeypatch.setattr(ckmod.shutil, "rmtree", killed_mid_rmtree)
    with pytest.raises(KeyboardInterrupt):
        ck.save(2, m, opt, {"epoch": 0})
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [2]
    monkeypatch.setattr(ckmod.shutil, "rmtree", real_rmtree)
    ck.save(3, m, opt, {"epoch": 0})  # the next save removes what the killed deletion left
    assert sorted(os.listdir(tmp_path)) == ["step_00000003"]


def test_a_failed_save_names_the_folder_and_free_space_and_removes_its_partial_files(tmp_path, monkeypatch):
    """A full disk during DCP's write is a RuntimeError naming the checkpoint folder and the space left; the partial
    .tmp- folder is gone, the previous checkpoint loads. The failure is raised inside DCP's own writer (the sync of
    a shard file), so DCP wraps it as it wraps a real one: in its CheckpointException, which derives from
    BaseException (an ``except Exception`` let it through as a raw traceback, with the .tmp- folder left)."""
    import errno
    ck = Checkpointer(str(tmp_path), single(), keep=2)
    m, opt = model_and_opt()
    ck.save(1, m, opt, {"epoch": 0})
    good = snapshot(m)
    real_fsync = os.fsync
    failed = []

    def fsync_full_disk(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".distcp"):  # a shard of the save under test
            failed.append(fd)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_full_disk)
    with torch.no_grad():
        m[0].weight.add_(1.0)
    with pytest.raises(RuntimeError, match=r"saving step 2 into .* failed \(.*GiB free.*No space left"):
        ck.save(2, m, opt, {"epoch": 0})
    assert failed, "the save never synced a shard: the failure was not injected inside DCP"
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert sorted(os.listdir(tmp_path)) == ["step_00000001"]
    m2, opt2 = model_and_opt(seed=1)
    assert ck.load(latest_checkpoint(str(tmp_path)), m2, opt2)["step"] == 1
    for k, v in snapshot(m2).items():
        assert torch.equal(v, good[k])


@pytest.mark.parametrize("damage", ["missing", "unreadable"])
def test_resume_without_this_ranks_rng_file_stops_instead_of_reseeding(tmp_path, damage):
    """A checkpoint of this run's world size promises a bit-exact resume (docs/training.md, Checkpoints): one
    without this rank's rng_rank<N>.pt (deleted, or a copy that missed it) was loaded with fresh RNG states,
    silently on that rank (rank 0 alone prints, and said "world size changed"), so the run went on no longer
    exact; an unreadable one raised on that rank alone, after the collective load. Both now stop every rank with
    a ConfigError naming the file, before the models are touched. Another world size still re-seeds."""
    import json
    from stop_kernels.training.config import ConfigError
    ck = Checkpointer(str(tmp_path), single())
    m, opt = model_and_opt()
    ck.save(1, m, opt, {"epoch": 0})
    path = tmp_path / "step_00000001"
    rng = path / "rng_rank0.pt"
    if damage == "missing":
        rng.unlink()
    else:
        rng.write_bytes(b"not a torch file")
    m2, opt2 = model_and_opt(seed=1)
    before = snapshot(m2)
    with pytest.raises(ConfigError, match=rf"^resume: cannot read {rng}, the RNG states of rank 0 .*would not be bit-exact"):
        ck.load(str(path), m2, opt2)
    assert all(torch.equal(v, before[k]) for k, v in snapshot(m2).items())  # nothing was loaded
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps(dict(meta, world_size=2)))  # written by 2 ranks: re-seeded
    assert ck.load(str(path), m2, opt2)["rng_restored"] is False


def test_load_restores_every_random_generator_the_save_captured(tmp_path):
    """rng_rank<N>.pt holds torch's CPU, Python's and numpy's generators (a transform or a user hook may draw
    from any of them): after a load each must continue exactly where it stood at the save. The resume tests
    compare losses, which only torch's generator feeds, so a state saved but not set back went unseen."""
    import random
    import numpy as np

    def draws():
        return torch.rand(4), [random.random() for _ in range(4)], np.random.rand(4)
    ck = Checkpointer(str(tmp_path), single())
    m, opt = model_and_opt()
    torch.manual_seed(11), random.seed(12), np.random.seed(13)
    ck.save(1, m, opt, {"epoch": 0})
    want = draws()
    torch.manual_seed(21), random.seed(22), np.random.seed(23)  # the states a resumed process starts with
    assert ck.load(str(tmp_path / "step_00000001"), m, opt)["rng_restored"]
    got = draws()
    assert torch.equal(got[0], want[0])
    assert got[1] == want[1]
    assert np.array_equal(got[2], want[2])


def test_saving_a_step_again_replaces_it(tmp_path):
    """A step saved a second time (a re-run over a published step_N) replaces the first save: its folder is
    published over the old one (which cannot take a rename onto it) and the load reads the new weights, with no
    step_N.old left behind. Only the state between the two renames was tested, never the save itself."""
    ck = Checkpointer(str(tmp_path), single(), keep=2)
    m, opt = model_and_opt()
    ck.save(1, m, opt, {"epoch": 0})
    with torch.no_grad():
        m[0].weight.add_(torch.randn(m[0].weight.shape))
    second = snapshot(m)
    ck.save(1, m, opt, {"epoch": 0})
    assert sorted(os.listdir(tmp_path)) == ["step_00000001"]
    m2, opt2 = model_and_opt(seed=4)
    ck.load(latest_checkpoint(str(tmp_path)), m2, opt2)
    assert all(torch.equal(v, second[k]) for k, v in snapshot(m2).items())


def test_the_log_reaches_the_disk_before_each_checkpoint_that_ends_its_steps(tmp_path, monkeypatch):
    """A crash of the machine after a checkpoint must not leave a log without that checkpoint's steps (a resume
    keeps the records up to the checkpoint's step and rewrites the rest): log.jsonl is fsynced before every
    checkpoint's first file, and at the end of the run, not only flushed into the page cache."""
    from _train_helpers import TINY
    from stop_kernels.training.config import TrainConfig
    from stop_kernels.training.loop import train
    if not os.path.exists("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd (Linux) to name the fsynced files")
    synced = []
    real = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    out = tmp_path / "run"
    train(TrainConfig(**dict(TINY, out=str(out), steps=4, ckpt_every=2)))
    log = str(out / "log.jsonl")
    order = [("log" if p == log else p.rsplit(os.sep, 2)[-2]) for p in synced
             if p == log or ".tmp-step_" in p]
    first = {name: order.index(name) for name in (".tmp-step_00000002", ".tmp-step_00000004")}
    assert "log" in order[:first[".tmp-step_00000002"]], order
    assert "log" in order[first[".tmp-step_00000002"]:first[".tmp-step_00000004"]], order
    assert order.count("log") >= 2, order


def test_a_checkpoint_and_its_old_copy_list_as_the_plain_one(tmp_path):
    """step_N beside step_N.old (a kill while a save replaced step N): the plain folder is the checkpoint, whichever
    os.listdir returns first (mutation run, session 31: the .old one winning passed every test)."""
    for name in ("step_00000003", "step_00000003.old", "step_00000002.old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "meta.json").write_text("{}")
        (tmp_path / name / ".metadata").write_bytes(b"")
    assert list_checkpoints(str(tmp_path)) == [(2, str(tmp_path / "step_00000002.old")),
                                               (3, str(tmp_path / "step_00000003"))]
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "step_00000003")
