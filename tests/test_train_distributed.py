"""`torchrun --nproc_per_node=2` on CPU (gloo): FSDP2 + bf16 training of vit_tiny, killed with SIGKILL and
resumed with `--resume`: the resumed run's losses equal the uninterrupted run's bit for bit.

The three runs also switch settings that must not change the numbers: the killed run uses activation
checkpointing, the resumed one the hybrid (2-D mesh) sharding.

Two more runs check gradient accumulation across ranks: resumed with 2 micro-batches per rank, a run repeats
the uninterrupted one's losses bit for bit.

Then the host-side logic of the distributed, parallelize and CUDA-graph helpers, checked in this process
with the process group, the mesh, fully_shard, torch.compile and the CUDA graph calls stood in.
"""
import contextlib
import datetime
import os
import shutil
import signal
import subprocess
import time
import types

import pytest
import torch

from _train_helpers import REPO, read_log, subprocess_env, tiny_args, torchrun_cmd, free_port, trained_run
from stop_kernels.devtools import cuda_autocast_flags
from stop_kernels.training import distributed as D
from stop_kernels.training import parallelize as par
from stop_kernels.training.config import ConfigError, TrainConfig, parse_config
from stop_kernels.training.loop import build_models

STEPS = 8
COMMON = dict(steps=STEPS, batch_size=8, precision="bf16", ckpt_every=3, keep_ckpts=5)


def run(out, timeout=240, **over):
    cmd = torchrun_cmd(2, free_port(), *tiny_args(**dict(COMMON, out=str(out), **over)))
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_fsdp2_bf16_kill_and_resume_is_bitwise(tmp_path):
    full_out, out = tmp_path / "full", tmp_path / "killed"
    stdout = run(full_out)
    assert "FSDP2 mesh {'dp_shard': 2}" in stdout and "bf16 params" in stdout
    full = [r["loss"] for r in read_log(full_out)]
    assert len(full) == STEPS and len(set(full)) > 1

    # the same run with activation checkpointing, killed (SIGKILL to the whole process group) after step 4
    cmd = torchrun_cmd(2, free_port(), *tiny_args(**dict(COMMON, out=str(out), ac="block")))
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log = out / "log.jsonl"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if log.exists() and len(log.read_text().splitlines()) >= 5:
                break
            time.sleep(0.05)
        killed_running = proc.poll() is None
        # the group is gone when the run ended before the kill (finished first, or failed: the assertions
        # below show its output); killpg then raises ProcessLookupError, which hid that output
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        output = proc.stdout.read().decode(errors="replace")
    assert (out / "checkpoints" / "step_00000003" / "meta.json").is_file(), output[-3000:]
    # continue from step 3 (drop any later checkpoint, in case the kill came late)
    for d in (out / "checkpoints").iterdir():
        if d.name != "step_00000003":
            shutil.rmtree(d)
    stdout = run(out, resume=True, sharding="hybrid")
    assert "resumed from" in stdout and "step 3" in stdout
    resumed = read_log(out)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in resumed] == full, ("killed while running" if killed_running else "finished first")


def test_fsdp2_gradient_accumulation_resumes_bitwise(tmp_path):
    """2 ranks under FSDP2 with 2 micro-batches each (gradients reduced once per step, after the second): the
    run resumed from its step-2 checkpoint, with activation checkpointing, repeats steps 2 and 3 bit for bit
    (the data position counts micro-batches on every rank)."""
    out = tmp_path / "run"
    stdout = run(out, steps=4, ckpt_every=2, keep_ckpts=5, grad_accum=2)
    assert "FSDP2 mesh {'dp_shard': 2}" in stdout and "global batch 8 (2 micro-batches of 2 per rank)" in stdout
    full = [r["loss"] for r in read_log(out)]
    assert len(full) == 4 and len(set(full)) > 1
    for d in (out / "checkpoints").iterdir():
        if d.name != "step_00000002":
            shutil.rmtree(d)
    stdout = run(out, steps=4, ckpt_every=2, grad_accum=2, resume=True, ac="block")
    assert "resumed from" in stdout and "step 2" in stdout
    resumed = read_log(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4] and [r["loss"] for r in resumed] == full


def test_logged_tokens_and_flops_count_every_ranks_masks(tmp_path):
    """Each rank draws masks of its own: a step's logged ctx_tokens / tgt_tokens are the means per image over
    every rank's micro-batches, and its TFLOP/s and MFU count every rank's micro-batches at their own mask
    lengths. They were rank 0's alone (rank 0's lengths charged for the whole global batch)."""
    from stop_kernels.data.datasets import TrainData
    from stop_kernels.models.packing import mean_tokens
    from stop_kernels.training.metrics import step_flops
    out, over = tmp_path / "run", dict(steps=4, ckpt_every=0, grad_accum=2, peak_tflops=1.0)  # CPU: an MFU needs a peak
    run(out, **over)
    cfg = parse_config(tiny_args(**dict(COMMON, out=str(out), **over)))
    recs = read_log(out)
    per_rank = [[micro for micro, _ in TrainData(cfg, rank=r, world_size=2).steps(0)][:len(recs)] for r in (0, 1)]
    assert len(recs) == 4 and all(len(s) == 4 for s in per_rank)

    def tokens(micro, which):
        return sum(m[0].shape[0] * mean_tokens(m[which]) for m in micro) / sum(m[0].shape[0] for m in micro)
    ranks_differ, timed = 0, 0
    for rec, mine, theirs in zip(recs, *per_rank):
        both = mine + theirs
        assert rec["ctx_tokens"] == pytest.approx(tokens(both, 1)) and rec["tgt_tokens"] == pytest.approx(tokens(both, 2))
        ranks_differ += (tokens(mine, 1), tokens(mine, 2)) != (tokens(theirs, 1), tokens(theirs, 2))
        if rec["step_time_s"] is not None:
            timed += 1
            flops = sum(step_flops(cfg, m[0].shape[0], mean_tokens(m[1]), mean_tokens(m[2])) for m in both)
            assert rec["tflops"] * 1e12 * rec["step_time_s"] == pytest.approx(flops, rel=1e-6)
            assert rec["mfu"] == pytest.approx(flops / rec["step_time_s"] / (2 * cfg.peak_tflops * 1e12), rel=1e-6)
    assert ranks_differ and timed == 3  # the ranks' masks differ at some step: rank 0's alone fail the check


def test_benchmark_counts_every_ranks_masks(tmp_path):
    """--benchmark on 2 ranks: its TFLOP/s (read back through the MFU, at a peak that keeps 4 decimals
    meaningful) and mean token counts cover both ranks' mask batches, not rank 0's times the world size."""
    import json
    from stop_kernels.models.packing import mean_tokens
    from stop_kernels.training.loop import synthetic_batches
    from stop_kernels.training.metrics import step_flops
    over = dict(benchmark=2, benchmark_warmup=1, benchmark_batches=1, peak_tflops=1e-5, seed=8)
    run(tmp_path, **over)
    res = json.loads((tmp_path / "benchmark.json").read_text())
    cfg = parse_config(tiny_args(**dict(COMMON, out=str(tmp_path), **over)))
    per_rank = [synthetic_batches(cfg, 1, 4, torch.device("cpu"), cfg.seed + 7919 * r)[0] for r in (0, 1)]
    ctx, tgt = ([mean_tokens(b[i]) for b in per_rank] for i in (1, 2))
    assert (ctx[0], tgt[0]) != (ctx[1], tgt[1])  # the ranks' masks differ: rank 0's alone fail the check
    assert res["mean_ctx_tokens"] == round(sum(ctx) / 2, 1) and res["mean_tgt_tokens"] == round(sum(tgt) / 2, 1)
    flops = sum(step_flops(cfg, 4, c, t) for c, t in zip(ctx, tgt))
    measured = res["mfu"] * 2 * cfg.peak_tflops * 1e12 * res["ms_per_step"] / 1000
    assert measured == pytest.approx(flops, rel=1e-3), (res, flops)


def _run_with_prelude(tmp_path, prelude, *args):
    """torchrun on 2 CPU ranks, each running the Python ``prelude`` (which may read ``os.environ['RANK']``) before
    train.py, with a collective timeout short enough that a rank waiting for a stopped one fails this test instead
    of hanging it."""
    wrapper = tmp_path / "prelude.py"
    wrapper.write_text(f"import os, runpy, sys\n{prelude}\nsys.argv[0] = {str(REPO / 'train.py')!r}\n"
                       "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    cmd = torchrun_cmd(2, free_port(), *args)
    cmd[cmd.index(str(REPO / "train.py"))] = str(wrapper)
    env = dict(subprocess_env(), STOP_KERNELS_DIST_TIMEOUT_MIN="1")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)


def _run_with_cwd_per_rank(tmp_path, cwds, *args):
    """torchrun on 2 CPU ranks, each in its own working directory (as two nodes that see different files)."""
    return _run_with_prelude(tmp_path, f"os.chdir({[str(c) for c in cwds]!r}[int(os.environ['RANK'])])", *args)


@pytest.mark.needs("safetensors")
def test_an_export_that_fails_on_the_main_rank_stops_every_rank(tmp_path):
    """The main rank alone writes the export: when its first file fails (a full disk), every rank stops with the
    error naming the file. Rank 1 used to go on into the second file's gather and wait there for rank 0."""
    prelude = _FAIL_SECOND_CALL.format(rank=0, name="write_atomic").replace("len(calls) == 2", "len(calls) == 1")
    out = tmp_path / "run"
    proc = _run_with_prelude(tmp_path, prelude, *tiny_args(**dict(COMMON, out=str(out), steps=1, export=True)))
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert text.count(f"train.py: export: writing {out / 'export' / 'encoder.safetensors'} failed: OSError: [Errno 28] "
                      f"No space left on device (on rank 0 of 2)") == 2, text[-4000:]
    assert "Connection closed by peer" not in text and "checkpoint.py\", line" not in text, text[-4000:]
    assert (out / "checkpoints" / "step_00000001" / "meta.json").is_file()  # the checkpoint came first


def test_an_out_folder_the_main_rank_cannot_create_stops_every_rank(tmp_path):
    """--out below a regular file: the main rank cannot create <out>/.lock. Every rank stops with the ConfigError
    naming it; rank 0 used to raise alone (NotADirectoryError) while the others waited for it in out_lock's agree."""
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "run"
    proc = _run_with_prelude(tmp_path, "", *tiny_args(**dict(COMMON, out=str(out), steps=1)))
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert text.count(f"train.py: error: out: cannot create {out / '.lock'}: NotADirectoryError: ") == 2, text[-4000:]
    assert text.count("(on rank 0 of 2)") == 2 and "]: Traceback" not in text, text[-4000:]


def test_an_earlier_run_the_main_rank_cannot_move_aside_stops_every_rank(tmp_path):
    """A fresh run in an --out with an earlier run's checkpoints, which the main rank cannot move aside (the rename
    refused): every rank stops with the ConfigError naming the folder. Rank 0 used to raise alone while the others
    waited for its verdict in the broadcast."""
    trained_run(tmp_path, steps=1)  # tmp_path/run/checkpoints/step_00000001
    out = tmp_path / "run"
    prelude = ("if os.environ['RANK'] == '0':\n"
               "    import errno\n"
               "    real_rename = os.rename\n\n"
               "    def rename(src, dst):\n"
               "        if '.replaced-' in str(dst):\n"
               "            raise PermissionError(errno.EACCES, 'Permission denied')\n"
               "        return real_rename(src, dst)\n"
               "    os.rename = rename\n")
    proc = _run_with_prelude(tmp_path, prelude, *tiny_args(**dict(COMMON, out=str(out), steps=1)))
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert text.count(f"train.py: error: out: cannot move the earlier run's {out / 'checkpoints'} aside") == 2, text[-4000:]
    assert text.count("PermissionError: [Errno 13] Permission denied") == 2, text[-4000:]
    assert "Connection closed by peer" not in text and "]: Traceback" not in text, text[-4000:]
    assert (out / "checkpoints" / "step_00000001" / "meta.json").is_file()


# on rank 0, log.jsonl opened for appending fails (FAIL_AT "open") or its FAIL_AT-th record's write does (a full disk)
_LOG_DISK_FULL = """
if os.environ["RANK"] == "0":
    import builtins, errno
    import stop_kernels.training.metrics as M
    FAIL_AT = {fail_at!r}

    class FullDisk:
        def __init__(self, fh):
            self.fh, self.writes = fh, 0

        def write(self, text):
            self.writes += 1
            if self.writes == FAIL_AT:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.fh.write(text)

        def __getattr__(self, name):
            return getattr(self.fh, name)

    def log_open(path, mode="r", *a, **k):
        if str(path).endswith("log.jsonl") and mode == "a":
            if FAIL_AT == "open":
                raise OSError(errno.ENOSPC, "No space left on device")
            return FullDisk(builtins.open(path, mode, *a, **k))
        return builtins.open(path, mode, *a, **k)
    M.open = log_open  # (the module's global shadows the builtin)
"""


@pytest.mark.parametrize("fail_at, steps, when", [("open", 2, ""), (3, 6, " at step 3"), (3, 3, " at step 3")],
                         ids=["opening", "mid-run", "last-step"])
def test_a_log_write_that_fails_on_the_main_rank_stops_every_rank(tmp_path, fail_at, steps, when):
    """Rank 0 alone writes log.jsonl: when that fails (a full disk) while it opens the log, in the middle of the run
    or at the last step, every rank stops with the error naming the file. Rank 0 used to raise alone while the
    others went on into the next step's all-reduce (or the final checkpoint's) and waited for it there."""
    out = tmp_path / "run"
    proc = _run_with_prelude(tmp_path, _LOG_DISK_FULL.format(fail_at=fail_at),
                             *tiny_args(**dict(COMMON, out=str(out), steps=steps, ckpt_every=0)))
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert text.count(f"train.py: log: writing {out / 'log.jsonl'} failed{when}: OSError: [Errno 28] No space left "
                      f"on device (on rank 0 of 2)") == 2, text[-4000:]
    assert "Connection closed by peer" not in text and "]: Traceback" not in text, text[-4000:]
    if fail_at != "open":
        assert [r["step"] for r in read_log(out)] == [1, 2]


# on one rank, the second call of a checkpoint module function raises a full disk's error
_FAIL_SECOND_CALL = """
if os.environ["RANK"] == "{rank}":
    import errno
    import stop_kernels.training.checkpoint as C
    real, calls = C.{name}, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)
    C.{name} = failing
"""


@pytest.mark.parametrize("rank, name, what", [(1, "rng_state", "writing {tmp}/rng_rank1.pt"),
                                              (0, "write_json_atomic", "publishing {final}")])
def test_a_save_that_fails_on_one_rank_stops_every_rank(tmp_path, rank, name, what):
    """The second checkpoint fails on one rank only (a full disk while rank 1 writes its RNG file, or while the
    main rank writes meta.json): every rank stops with the same error naming the file and the rank, and the
    first checkpoint stays the newest complete one. The failing rank used to raise alone while the others
    waited for it in the save's next barrier (a crash of the peers, or a hang for the collective timeout)."""
    out = tmp_path / "run"
    proc = _run_with_prelude(tmp_path, _FAIL_SECOND_CALL.format(rank=rank, name=name),
                             *tiny_args(**dict(COMMON, out=str(out), steps=4, ckpt_every=2)))
    text = proc.stdout + proc.stderr
    folder = out / "checkpoints"
    what = what.format(tmp=folder / ".tmp-step_00000004", final=folder / "step_00000004")
    assert proc.returncode != 0
    assert text.count(f"train.py: checkpoint: saving step 4 into {folder} failed") == 2, text[-4000:]
    assert text.count(f"{what}: OSError: [Errno 28] No space left on device (on rank {rank} of 2)") == 2, text[-4000:]
    assert "Connection closed by peer" not in text and "checkpoint.py\", line" not in text, text[-4000:]  # no rank's trace
    assert sorted(os.listdir(folder)) == ["step_00000002"]  # no partial .tmp- folder left
    assert {"meta.json", ".metadata", "rng_rank0.pt", "rng_rank1.pt"} <= set(os.listdir(folder / "step_00000002"))


def test_out_of_memory_on_one_rank_stops_the_run_within_seconds(tmp_path):
    """A step that runs out of GPU memory on rank 1 only (raised from its second step): that rank prints the
    advice (grad_accum, ac) and exits, and the launcher stops the rank left waiting in its next collective.
    Nothing waits for the collective timeout (1 minute here, 30 by default): an out-of-memory cannot be agreed
    on before the collective it breaks, so the peers' "Connection closed by peer" is the expected way out."""
    import time
    prelude = ("if os.environ['RANK'] == '1':\n"
               "    import torch\n"
               "    import stop_kernels.training.loop as L\n"
               "    real, calls = L.Trainer.step_micro, []\n\n"
               "    def step_micro(self, *a, **k):\n"
               "        calls.append(1)\n"
               "        if len(calls) == 2:\n"
               "            raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')\n"
               "        return real(self, *a, **k)\n"
               "    L.Trainer.step_micro = step_micro\n")
    t0 = time.monotonic()
    proc = _run_with_prelude(tmp_path, prelude, *tiny_args(**dict(COMMON, out=str(tmp_path / "run"), steps=4,
                                                                  ckpt_every=0)))
    took = time.monotonic() - t0
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert text.count("train.py: out of GPU memory with 4 images per micro-batch on each of 2 rank(s)") == 1, text[-4000:]
    assert "try --grad-accum 2" in text and "Tried to allocate 2.00 GiB" in text, text[-4000:]
    assert took < 45, took  # far below the 60 s collective timeout a waiting rank would need to give up


@pytest.mark.parametrize("key", [pytest.param("data", marks=pytest.mark.needs("PIL", "torchvision")), "init_from"])
def test_a_path_one_rank_does_not_see_stops_every_rank(tmp_path, key):
    """A data folder or init_from file that one node does not see (a relative path, a node-local disk): every rank
    stops with the same ConfigError, naming the key and the rank, before any model is built. A rank that stopped
    alone left the others to crash in their next collective (gloo: 'Connection closed by peer'), or, on another
    node, to wait for it in init_process_group for the whole collective timeout (30 minutes)."""
    seen, blind = tmp_path / "node0", tmp_path / "node1"
    blind.mkdir()
    if key == "data":
        from PIL import Image
        for c in ("a", "b"):
            (seen / "imgs" / c).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (40, 40), (60 * i, 20, 90)).save(seen / "imgs" / c / f"{i}.png")
        over = dict(data="imgs")
    else:
        run, _ = trained_run(tmp_path, steps=1)
        (seen).mkdir()
        os.symlink(run, seen / "src")
        over = dict(init_from="src")
    proc = _run_with_cwd_per_rank(tmp_path, (seen, blind),
                                  *tiny_args(**dict(COMMON, out=str(tmp_path / "out"), steps=1, **over)))
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert text.count(f"train.py: error: {key}: ") == 2 and text.count("(on rank 1 of 2)") == 2, text[-4000:]
    assert "Connection closed by peer" not in text and "]: Traceback" not in text, text[-4000:]  # ([rankN]: ...)


def test_a_checkpoint_one_rank_does_not_see_stops_every_rank(tmp_path):
    """--resume where rank 1's --out (relative, another working directory: a node-local disk) holds no checkpoint:
    the main rank picks the checkpoint, and every rank stops with the same ConfigError naming it before the
    collective load. Rank 1 used to raise alone (FileNotFoundError) while rank 0 waited for it in DCP's load."""
    seen, blind = tmp_path / "node0", tmp_path / "node1"
    blind.mkdir()
    trained_run(seen, steps=1, batch_size=COMMON["batch_size"])  # seen/run/checkpoints/step_00000001, resumable
    proc = _run_with_cwd_per_rank(tmp_path, (seen, blind),
                                  *tiny_args(**dict(COMMON, out="run", steps=2, resume=True)))
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    want = ("train.py: error: resume: checkpoint: cannot read run/checkpoints/step_00000001/meta.json "
            "(FileNotFoundError")
    assert text.count(want) == 2 and text.count("(on rank 1 of 2)") == 2, text[-4000:]
    assert "Connection closed by peer" not in text and "]: Traceback" not in text, text[-4000:]


# ------------------------------------------------------------------------------------------------
# Host-side logic of the helpers, in this process: no process group, no GPU (the collectives, the mesh
# constructor, fully_shard, torch.compile and the CUDA graph calls are stood in and recorded)
# ------------------------------------------------------------------------------------------------
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _tiny_models(**over):
    cfg = parse_config(tiny_args(**over))
    return cfg, build_models(cfg)


def test_parallelize_checkpoints_and_compiles_each_model_as_documented(monkeypatch):
    """AC wraps the encoder's and the predictor's blocks (not the target encoder's, which has no backward),
    without saving the RNG state; compile wraps every block, with dynamic shapes for the encoder and the
    predictor, static for the target encoder, and raises Dynamo's recompile limits."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    compiled = {}
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.setdefault(id(m), kw) and m)
    cfg = torch._dynamo.config
    # Dynamo's own patch, not monkeypatch: pytest's undo deletes a config attribute it did not find in the
    # module's __dict__, and torch 2.11 then hides the key from Dynamo itself for the rest of the process
    with cfg.patch(recompile_limit=8, accumulated_recompile_limit=16):
        tcfg, models = _tiny_models(ac="block", compile=True, pred_depth=2)
        par.parallelize(models, tcfg, None, "fp32")
        assert cfg.recompile_limit >= 64 and cfg.accumulated_recompile_limit >= 256
    for name, model, ac, dynamic in (("encoder", models.encoder, True, True), ("predictor", models.predictor, True, True),
                                     ("target_encoder", models.target_encoder, False, False)):
        blocks = par.block_list(model)
        assert len(blocks) >= 1
        for blk in blocks:
            assert isinstance(blk, CheckpointWrapper) == ac, name
            if ac:
                assert blk.checkpoint_fn.keywords["preserve_rng_state"] is False, name
            assert compiled[id(blk)]["dynamic"] is dynamic, name


class _Mesh:
    def __init__(self, n):
        self.n = n

    def size(self):
        return self.n


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_fsdp_wrapping_per_block(monkeypatch, ranks, precision):
    """fully_shard on every block, then the root (resharded after its forward); a model with a backward keeps
    its last block gathered (on one rank: every block), the forward-only target encoder reshards every block;
    bf16 parameters (fp32 with fp32) and fp32 gradient reduction."""
    import torch.distributed.fsdp as fsdp
    calls = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda m, **kw: calls.append((m, kw)))
    tcfg, models = _tiny_models(pred_depth=2)
    mesh = _Mesh(ranks)
    par.parallelize(models, tcfg, mesh, precision)
    got = {id(m): kw for m, kw in calls}
    assert len(got) == len(calls)  # each module once
    for model, forward_only in ((models.encoder, False), (models.predictor, False), (models.target_encoder, True)):
        blocks = par.block_list(model)
        n = len(blocks)
        want = [True] * n if forward_only else [ranks > 1 and i < n - 1 for i in range(n)]
        assert [got[id(b)]["reshard_after_forward"] for b in blocks] == want, type(model).__name__
        assert got[id(model)]["reshard_after_forward"] is True
        for m in (*blocks, model):
            mp = got[id(m)]["mp_policy"]
            assert got[id(m)]["mesh"] is mesh
            assert mp.param_dtype == (torch.bfloat16 if precision == "bf16" else None) and mp.reduce_dtype == torch.float32
    assert len(calls) == sum(len(par.block_list(m)) + 1 for m in (models.encoder, models.predictor, models.target_encoder))


def test_clean_names_pair_wrapped_target_and_encoder():
    """clean_name strips the AC and compile wrappers' components, so an AC'd encoder pairs with its compiled
    target copy by name; a parameter of another shape (even with as many elements) is refused."""
    _, models = _tiny_models()
    plain = [n for n, _ in models.encoder.named_parameters()]
    par.apply_ac(models.encoder)
    par.apply_compile(models.target_encoder, dynamic=False)  # wraps only: nothing compiles before a call
    wrapped = [n for n, _ in models.encoder.named_parameters()] + [n for n, _ in models.target_encoder.named_parameters()]
    assert any("_checkpoint_wrapped_module." in n for n in wrapped) and any("_orig_mod." in n for n in wrapped)
    assert sorted(par.clean_name(n) for n, _ in models.target_encoder.named_parameters()) == sorted(plain)
    tgt, onl = par.paired_parameters(models.target_encoder, models.encoder)
    assert len(tgt) == len(plain) and all(a.shape == b.shape and a is not b for a, b in zip(tgt, onl))
    a, b = torch.nn.Linear(4, 6), torch.nn.Linear(4, 6)
    b.weight = torch.nn.Parameter(torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"^target_encoder: weight has shape \(6, 4\), encoder \(4, 6\)"):
        par.paired_parameters(a, b)


def test_describe_names_the_precision_per_setup():
    cfg = TrainConfig()
    assert par.describe(cfg, None, "bf16") == "no FSDP, bf16 autocast, fp32 weights, AC none"
    mesh = types.SimpleNamespace(shape=(2,), mesh_dim_names=("dp_shard",))
    assert par.describe(cfg, mesh, "bf16") == ("FSDP2 mesh {'dp_shard': 2}, bf16 params + autocast, fp32 master "
                                               "weights and reductions, AC none")


def test_init_distributed_under_torchrun(monkeypatch):
    """Under torchrun: the group is started with gloo on the CPU (no device_id), the collective timeout in
    minutes, and the ranks and sizes of the environment (LOCAL_WORLD_SIZE defaulting to WORLD_SIZE)."""
    calls = []
    monkeypatch.setattr(D.dist, "init_process_group", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setattr(D.dist, "is_initialized", lambda: False)
    for k in _TORCHRUN_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.delenv("STOP_KERNELS_DIST_TIMEOUT_MIN", raising=False)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    info = D.init_distributed(TrainConfig(device="cpu"))
    assert info == D.DistInfo(3, 4, 1, 4, torch.device("cpu"), "gloo", True)
    assert calls == [(("gloo",), {"timeout": datetime.timedelta(minutes=30)})]


def test_init_distributed_without_torchrun(monkeypatch):
    """Without MASTER_ADDR: several ranks are refused; one rank runs without a group unless FSDP is asked for,
    which starts a one-rank group that this module owns. Empty variables read as unset, junk is named."""
    calls = []
    monkeypatch.setattr(D.dist, "init_process_group", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setattr(D.dist, "is_initialized", lambda: False)
    for k in _TORCHRUN_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="^WORLD_SIZE=2 without MASTER_ADDR"):
        D.init_distributed(TrainConfig(device="cpu"))
    monkeypatch.setenv("WORLD_SIZE", "")
    monkeypatch.setenv("LOCAL_RANK", "")
    assert D.init_distributed(TrainConfig(device="cpu")) == D.DistInfo(0, 1, 0, 1, torch.device("cpu"), None, False)
    assert calls == []
    info = D.init_distributed(TrainConfig(device="cpu", sharding="full"))
    assert info == D.DistInfo(0, 1, 0, 1, torch.device("cpu"), "gloo", True)
    assert calls[0][0] == ("gloo",) and calls[0][1]["world_size"] == 1 and calls[0][1]["rank"] == 0
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ConfigError, match="^RANK: expected an integer in the environment, got 'one'"):
        D.init_distributed(TrainConfig(device="cpu"))


def test_shutdown_destroys_only_its_own_group(monkeypatch):
    destroyed = []
    monkeypatch.setattr(D.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(D.dist, "destroy_process_group", lambda: destroyed.append(1))
    D.shutdown(D.DistInfo(0, 2, 0, 2, torch.device("cpu"), "gloo", False))  # the caller's group
    assert destroyed == []
    D.shutdown(D.DistInfo(0, 2, 0, 2, torch.device("cpu"), "gloo", True))
    assert destroyed == [1]


def test_build_mesh_layouts(monkeypatch):
    """full: (W,) over dp_shard; hybrid: (nodes, GPUs per node) = (W / LOCAL_WORLD_SIZE, LOCAL_WORLD_SIZE);
    none on several ranks: (W, 1), replicated; none on one rank: no mesh; a mesh needs a process group."""
    import torch.distributed.device_mesh as dm
    monkeypatch.setattr(dm, "init_device_mesh", lambda dev, shape, mesh_dim_names: (dev, shape, mesh_dim_names))
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match="^sharding: 'full' needs a process group"):
        D.build_mesh("full", D.DistInfo(0, 1, 0, 1, cpu, None, False))
    monkeypatch.setattr(D.dist, "is_initialized", lambda: True)
    info = D.DistInfo(0, 6, 0, 2, cpu, "gloo", False)
    assert D.build_mesh("full", info) == ("cpu", (6,), ("dp_shard",))
    assert D.build_mesh("hybrid", info) == ("cpu", (3, 2), ("dp_replicate", "dp_shard"))
    assert D.build_mesh("none", info) == ("cpu", (6, 1), ("dp_replicate", "dp_shard"))
    with pytest.raises(ConfigError, match=r"^sharding: 'hybrid' needs WORLD_SIZE \(6\) to be a multiple"):
        D.build_mesh("hybrid", D.DistInfo(0, 6, 0, 4, cpu, "gloo", False))
    assert D.build_mesh("none", D.DistInfo(0, 1, 0, 1, cpu, "gloo", False)) is None


def test_resolve_device_per_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert D.resolve_device(TrainConfig(device="cpu"), 1) == torch.device("cpu")  # asked for, GPUs or not
    assert D.resolve_device(TrainConfig(device="auto"), 1) == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="^device: LOCAL_RANK=2 but only 2 CUDA device"):
        D.resolve_device(TrainConfig(device="cuda"), 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert D.resolve_device(TrainConfig(device="auto"), 0) == torch.device("cpu")
    with pytest.raises(ConfigError, match="^device: 'cuda' requested but no CUDA GPU is visible"):
        D.resolve_device(TrainConfig(device="cuda"), 0)


def test_collectives_skip_a_one_rank_group(monkeypatch):
    """On one rank (even with a group) nothing is communicated; on several the object comes from rank 0."""
    monkeypatch.setattr(D.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(D.dist, "broadcast_object_list", lambda box, src: box.__setitem__(0, f"rank {src}'s"))
    monkeypatch.setattr(D.dist, "all_reduce", lambda t, *a, **kw: t.mul_(3))
    one = D.DistInfo(0, 1, 0, 1, torch.device("cpu"), "gloo", True)
    three = D.DistInfo(1, 3, 1, 3, torch.device("cpu"), "gloo", False)
    assert D.broadcast_object("mine", one) == "mine" and D.all_reduce_int(5, one) == 5
    assert D.broadcast_object("mine", three) == "rank 0's" and D.all_reduce_int(5, three) == 15
    t = torch.tensor([2.0, 4.0])
    assert torch.equal(D.all_reduce_mean_(t, three), torch.tensor([2.0, 4.0]))  # ×3 summed, then / 3
    ops = []
    monkeypatch.setattr(D.dist, "all_reduce", lambda t, op=None: ops.append(op) or t.mul_(3))
    assert D.all_reduce_sum([1, 2.5], three) == [3.0, 7.5] and D.all_reduce_max([1.5], three) == [4.5]
    assert ops == [D.dist.ReduceOp.SUM, D.dist.ReduceOp.MAX]  # the host helpers ask for their own reduction
    assert D.all_reduce_max([1.5], one) == [1.5] and not ops[2:]  # one rank: no collective


@pytest.mark.parametrize("problems, want", [
    ([None, None, None], None),
    (["disk full", None, None], "disk full (on rank 0 of 3)"),
    ([None, "no such file", "also missing"], "no such file (on ranks 1, 2 of 3)"),
])
def test_agree_reports_the_first_failing_rank_whichever_it_is(monkeypatch, problems, want):
    """agree() is what makes every rank stop together; outside the torchrun tests nothing checked it. Each rank
    must get the first failing rank's message naming all failing ranks, rank 0 included (a check that skipped
    rank 0 would let the others run on into a collective that rank 0, stopped, never joins)."""
    monkeypatch.setattr(D.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(D.dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), problems))
    for rank in range(3):  # every rank, whatever its own outcome, gets the same answer
        info = D.DistInfo(rank, 3, rank, 3, torch.device("cpu"), "gloo", False)
        assert D.agree(problems[rank], info) == want
    assert D.agree("only mine", D.DistInfo(0, 1, 0, 1, torch.device("cpu"), "gloo", True)) == "only mine"


# ------------------------------------------------------------------------------------------------
# cuda_graphs.GraphedForward's bookkeeping, the CUDA graph calls stood in by a recording fake
# ------------------------------------------------------------------------------------------------
class _CudaLike(torch.Tensor):
    """A CPU tensor that says it is on CUDA (GraphedForward only branches on ``is_cuda``)."""

    @property
    def is_cuda(self):
        return True


class _FakeGraphs:
    """torch.cuda's stream and graph calls: a graph records the kernels launched while it captures and
    replay re-runs them, reading the same input buffer and parameters and writing the same output buffer."""

    def __init__(self):
        self.capturing = None
        self.capture_kwargs = []  # the keyword arguments of each torch.cuda.graph(...) call

    def install(self, monkeypatch):
        fakes = self
        stream = types.SimpleNamespace(wait_stream=lambda other: None)

        class Graph:
            def __init__(self):
                self.kernels = []

            def replay(self):
                for k in self.kernels:
                    k()

        @contextlib.contextmanager
        def graph(g, pool=None, **kw):
            fakes.capture_kwargs.append(kw)
            fakes.capturing = g
            try:
                yield
            finally:
                fakes.capturing = None
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: self.capturing is not None)
        monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", graph)


class _Affine(torch.nn.Module):
    """y = x·W; while a fake graph captures, its one kernel is recorded (writing the output it returned)."""

    def __init__(self, fakes):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(5, 3))
        self.fakes = fakes

    def forward(self, x):
        y = x.as_subclass(torch.Tensor) @ self.weight
        if self.fakes.capturing is not None:
            self.fakes.capturing.kernels.append(lambda: y.copy_(x.as_subclass(torch.Tensor) @ self.weight))
        return y


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # the capture's autocast("cuda") on this CPU
def test_graphed_forward_bookkeeping(monkeypatch):
    """One capture per input signature (shape, dtype, autocast state and dtype), at most max_graphs (later
    signatures run eagerly); each replay reads the new input and returns a fresh tensor (the next replay
    overwrites the graph's output); with grad enabled the module runs eagerly."""
    from stop_kernels.training.cuda_graphs import GraphedForward
    fakes = _FakeGraphs()
    fakes.install(monkeypatch)
    mod = _Affine(fakes)
    gf = GraphedForward(mod, warmup=1, max_graphs=3)

    def x(rows):
        return torch.randn(rows, 5).as_subclass(_CudaLike)

    def eager(t):
        return t.as_subclass(torch.Tensor) @ mod.weight.detach()
    with torch.no_grad():
        x1, x2 = x(4), x(4)
        y1, y2 = gf(x1), gf(x2)
        torch.testing.assert_close(y1, eager(x1))
        torch.testing.assert_close(y2, eager(x2))
        assert (gf.captures, gf.replays) == (1, 2)
        for dt in (torch.bfloat16, torch.float16):  # the same input under autocast: a signature per dtype
            with cuda_autocast_flags(dt):
                torch.testing.assert_close(gf(x1), eager(x1))
        assert (gf.captures, gf.replays) == (3, 4)
        x3 = x(6)
        torch.testing.assert_close(gf(x3), eager(x3))  # a fourth signature: over max_graphs, eager
        assert (gf.captures, gf.replays) == (3, 4)
    y = gf(x1)  # grad enabled: eager, differentiable
    assert y.requires_grad and (gf.captures, gf.replays) == (3, 4)


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_graphed_forward_captures_in_thread_local_mode(monkeypatch):
    """The capture runs in the middle of training, while the DataLoader's pin-memory thread (pin_memory with
    worker processes, the default on CUDA) allocates pinned host memory for the next batches: under torch's
    default capture mode "global" any such CUDA call from another thread invalidates the capture
    (cudaErrorStreamCaptureUnsupported) and poisons that thread. "thread_local" restricts only this thread."""
    from stop_kernels.training.cuda_graphs import GraphedForward
    fakes = _FakeGraphs()
    fakes.install(monkeypatch)
    gf = GraphedForward(_Affine(fakes), warmup=1)
    with torch.no_grad():
        gf(torch.randn(4, 5).as_subclass(_CudaLike))
    assert fakes.capture_kwargs == [{"capture_error_mode": "thread_local"}]


def test_a_group_the_caller_started_keeps_its_ranks_and_device(monkeypatch):
    """A process group started by the caller (mp.spawn + init_process_group, no torchrun variables): the ranks are
    the group's, the GPU is the caller's current device (its set_device, not cuda:0 for every rank), and hybrid
    sharding, which needs the GPUs per node, asks for LOCAL_WORLD_SIZE. WORLD_SIZE alone names what is missing."""
    for k in _TORCHRUN_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(D.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(D.dist, "get_rank", lambda: 3)
    monkeypatch.setattr(D.dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(D.dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    info = D.init_distributed(TrainConfig(device="auto"))
    assert info == D.DistInfo(3, 4, 3, 4, torch.device("cuda", 3), "nccl", False) and chosen == [torch.device("cuda", 3)]
    with pytest.raises(ConfigError, match="^sharding: 'hybrid' needs LOCAL_WORLD_SIZE"):
        D.init_distributed(TrainConfig(device="auto", sharding="hybrid"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert D.init_distributed(TrainConfig(device="auto", sharding="hybrid")).local_rank == 1
    monkeypatch.setattr(D.dist, "is_initialized", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="^WORLD_SIZE=2 without RANK and MASTER_ADDR: launch with torchrun"):
        D.init_distributed(TrainConfig(device="cpu"))
