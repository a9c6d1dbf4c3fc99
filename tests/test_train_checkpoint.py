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


def test_interrupted_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    ck = Checkpointer(str(tmp_path), single(), keep=2)
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
    assert latest_checkpoint(str(tmp_path)).endswith("step_00000001")
    # the next successful save removes the stale temporary folder
    monkeypatch.undo()
    ck.save(3, m, opt, {"epoch": 0})
    assert not any(n.startswith(".tmp-") for n in os.listdir(tmp_path))
