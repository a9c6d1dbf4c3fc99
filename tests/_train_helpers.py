"""Shared helpers of the tests: tiny training configs, the environment for subprocess runs, JSONL reading, a tiny
trained and checkpointed run."""
import json
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

# vit_tiny on a 4x4 patch grid, a one-block predictor: each step takes well under a second on one CPU core
TINY = dict(model="vit_tiny", img_size=32, patch_size=8, min_keep=0, pred_depth=1, pred_emb_dim=96, batch_size=4,
            synthetic_size=64, log_every=1000, export=False, tensorboard=False)


def tiny_args(**over):
    """Command-line flags of the tiny config with overrides."""
    kw = dict(TINY, **over)
    args = []
    for k, v in kw.items():
        args += ["--" + k.replace("_", "-"), str(v).lower() if isinstance(v, bool) else str(v)]
    return args


def subprocess_env():
    """Environment for `python train.py` / torchrun children: the CPU (no GPU visible, also on a GPU machine:
    gloo ranks, fp32, the runs these tests compare bit for bit), the reference (non-interpreted) backends,
    1 thread."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def torchrun_cmd(nproc, port, *args):
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master-addr=127.0.0.1",
            f"--master-port={port}", str(REPO / "train.py"), *args]


def read_log(out):
    path = pathlib.Path(out) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trained_run(tmp_path, steps=2, **over):
    """A tiny run (``TINY`` with ``over``) trained for ``steps`` steps in this process and checkpointed at the
    end; returns (its folder, each model's state dict after the steps)."""
    import torch
    from stop_kernels.training import distributed as D
    from stop_kernels.training.config import TrainConfig
    from stop_kernels.training.loop import Trainer, synthetic_batches
    cfg = TrainConfig(**dict(TINY, out=str(tmp_path / "run"), steps=steps, **over))
    tr = Trainer(cfg, D.init_distributed(cfg), None)
    for batch in synthetic_batches(cfg, steps, cfg.batch_size, torch.device("cpu"), 0):
        tr.step(*batch, (cfg.lr, cfg.weight_decay, cfg.ema_start))
    tr.checkpointer.save(steps, tr.container, tr.opt, {"epoch": 0, "config": cfg.to_dict()})
    return cfg.out, {name: {k: v.clone() for k, v in getattr(tr.models, name).state_dict().items()}
                     for name in ("encoder", "predictor", "target_encoder")}


def cuda_step_losses(out_dir, steps: int = 6, **over):
    """Losses of ``steps`` Trainer steps of a small vit_small run on CUDA (same seeds and batches for
    every call) and the Trainer; ``over``: TrainConfig keys to change."""
    import torch
    from stop_kernels.training import distributed as D
    from stop_kernels.training.config import TrainConfig
    from stop_kernels.training.loop import Trainer, synthetic_batches
    cfg = TrainConfig(model="vit_small", img_size=64, patch_size=8, pred_depth=2, pred_emb_dim=192, batch_size=8,
                      min_keep=4, out=str(out_dir), seed=5, **over)
    tr = Trainer(cfg, D.init_distributed(cfg), None)
    batches = synthetic_batches(cfg, 3, cfg.batch_size, torch.device("cuda"), seed=2)
    torch.manual_seed(6)
    sched = (cfg.lr, cfg.weight_decay, cfg.ema_start)
    # every step queued before any loss is read: a read per step would synchronise the host each time, which orders
    # one step's work after the previous one's whatever the streams do (a missing wait_stream would go unseen)
    losses = [tr.step(*batches[i % 3], sched)[0] for i in range(steps)]
    return [float(x) for x in losses], tr
