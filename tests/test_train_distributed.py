"""`torchrun --nproc_per_node=2` on CPU (gloo): FSDP2 + bf16 training of vit_tiny, killed with SIGKILL and
resumed with `--resume`: the resumed run's losses equal the uninterrupted run's bit for bit.

The three runs also switch settings that must not change the numbers: the killed run uses activation
checkpointing, the resumed one the hybrid (2-D mesh) sharding.
"""
import os
import shutil
import signal
import subprocess
import time

from _train_helpers import read_log, subprocess_env, tiny_args, torchrun_cmd, free_port

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
    assert [r["step"] for r in resumed] == list(range(STEPS))
    assert [r["loss"] for r in resumed] == full, ("killed while running" if killed_running else "finished first")
