"""Training metrics: analytic FLOP count, throughput / MFU, peak memory, the JSONL log and TensorBoard, and the
step's phases as profiler ranges (:func:`step_phase`).

FLOPs are counted analytically from the model sizes and the mask lengths of each step
(:mod:`stop_kernels.models.flops`: matrix multiplies and attention, 2 FLOP per multiply-add; for
ViT-H/14 at 224, B 64, Nc 74, Nt 42 ≈ 43 TFLOP per step, the figure of ``ANCHORS.md``).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from typing import Any, ContextManager, Dict, Optional, TextIO

import torch

from .._checks import write_atomic
from ..models.flops import jepa_step_flops, jepa_step_floors_ms, peak_tflops
from ..models.vit import VIT_PRESETS, resolve_model_name
from .config import TrainConfig


STEP_PHASE_PREFIX = "## step: "  # (a "##" name: the profile readers take its GPU-timeline twin for no kernel)
STEP_PHASES = ("target encoder", "context encoder", "predictor", "loss", "backward", "optimizer", "ema")
_phase_ranges = {"on": False}


def annotate_step_phases(on: bool) -> None:
    """Mark the training step's phases (:data:`STEP_PHASES`) as ``torch.profiler.record_function`` ranges named
    ``## step: <phase> ##``, so that a profile can say which phase's work the GPU waited for, and where the host
    waited for the GPU (``benchmarks/profile_step.py``). Off by default: each range costs a dispatcher call on the
    host."""
    _phase_ranges["on"] = bool(on)


def step_phase(name: str) -> ContextManager:
    """The profiler range of step phase ``name`` (one of :data:`STEP_PHASES`) while :func:`annotate_step_phases`
    is on; a no-op context otherwise."""
    if not _phase_ranges["on"]:
        return contextlib.nullcontext()
    if name not in STEP_PHASES:
        raise ValueError(f"name: a step phase is one of {STEP_PHASES}, got {name!r}")
    return torch.profiler.record_function(f"{STEP_PHASE_PREFIX}{name} ##")


def _step_sizes(cfg: TrainConfig, batch: int, n_ctx: float, n_tgt: float) -> Dict[str, Any]:
    """The sizes of one step that the FLOP and floor models of :mod:`stop_kernels.models.flops` take."""
    spec = VIT_PRESETS[resolve_model_name(cfg.model)]
    return dict(embed_dim=spec.embed_dim, depth=spec.depth, mlp_ratio=spec.mlp_ratio, pred_dim=cfg.pred_emb_dim,
                pred_depth=cfg.pred_depth, batch=batch, num_patches=(cfg.img_size // cfg.patch_size) ** 2,
                patch_size=cfg.patch_size, n_ctx=n_ctx, n_tgt=n_tgt, npred=cfg.npred,
                noise_projection=cfg.noise_mode == "learned")


def step_flops(cfg: TrainConfig, batch: int, n_ctx: float, n_tgt: float) -> float:
    """Matmul FLOPs of one training step on ``batch`` images with ``n_ctx`` context / ``n_tgt`` target tokens."""
    return jepa_step_flops(**_step_sizes(cfg, batch, n_ctx, n_tgt))["total"]


def step_floors_ms(cfg: TrainConfig, batch: int, n_ctx: float, n_tgt: float, *, trainable_params: int,
                   ema_params: int, tflops: float, tbps: float) -> Dict[str, float]:
    """Floors of one step's GPU time per kernel category (matmul, attention, optimizer) at the card's
    measured ceilings: :func:`stop_kernels.models.flops.jepa_step_floors_ms`."""
    return jepa_step_floors_ms(**_step_sizes(cfg, batch, n_ctx, n_tgt), trainable_params=trainable_params,
                               ema_params=ema_params, tflops=tflops, tbps=tbps)


def gpu_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def peak_memory_gib(device: torch.device) -> Optional[float]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return None


def peak_reserved_gib(device: torch.device) -> Optional[float]:
    """The allocator's peak of reserved memory. Next to :func:`peak_memory_gib` for CUDA-graph replays: a replay
    allocates nothing, so its buffers (the graphs' private pool, reserved at recording) show here and not in the
    allocated peak of the replayed steps."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2 ** 30
    return None


def mfu_peak_tflops(cfg: TrainConfig, device: torch.device) -> Optional[float]:
    """The per-device peak TFLOP/s that MFU divides by: ``cfg.peak_tflops`` when given (> 0); else (0, the default)
    the dense bf16 peak of the GPU by its name (:func:`~stop_kernels.models.flops.peak_tflops`: an H100 PCIe is
    not an SXM; unknown cards get the H100/H200's), and None on a CPU: no MFU, since a GPU's peak says nothing of
    a CPU (its MFU read 0.0%)."""
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops
    if device.type != "cuda":
        return None
    return peak_tflops(torch.cuda.get_device_name(device) if torch.cuda.is_available() else "")


class LogWriteError(RuntimeError):
    """``<out>/log.jsonl`` could not be written (raised on every rank alike by the training loop)."""


class MetricsLogger:
    """Rank-0 progress lines, the JSONL log of every step, and optional TensorBoard scalars.

    Steps are numbered as the checkpoints are, by the steps completed: the record of step N (1-based) is
    the N-th optimizer step, whose state ``step_N`` saves, and its progress line reads ``step N/total``.

    ``resume_step``: the checkpoint's step; the log keeps the records up to it and TensorBoard drops the
    events after it (a resumed run rewrites the steps it redoes, so both read like one uninterrupted run).

    A failure to write the log (a full disk) is not raised here, on rank 0 alone, where the other ranks
    would wait for it in their next collective: it is kept in :attr:`failed` (the message; None while the
    log is fine), no later record is written, and the training loop stops every rank with it.
    """

    def __init__(self, cfg: TrainConfig, device: torch.device, world_size: int, *, is_main: bool,
                 resume_step: int = 0, stream: TextIO = sys.stdout):
        self.cfg, self.device, self.world_size, self.is_main = cfg, device, world_size, is_main
        self.stream = stream
        peak = mfu_peak_tflops(cfg, device)
        self.peak = None if peak is None else peak * 1e12 * world_size  # FLOP/s of all ranks; None: no MFU
        self._log: Optional[TextIO] = None
        self._tb = None
        self._t_last: Optional[float] = None
        self.images = 0
        self.skipped_images = 0
        self.nonfinite_steps = 0  # steps AdamW skipped for a non-finite gradient (skip_nonfinite_grads), cumulative
        self.failed: Optional[str] = None
        if not is_main:
            return
        path = self.path = os.path.join(cfg.out, "log.jsonl")
        try:
            self._open(path, resume_step)
        except OSError as e:
            self.failed = f"log: writing {path} failed: {type(e).__name__}: {e}"
            return
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                # (purge_step: the events of this step and later ones are dropped)
                self._tb = SummaryWriter(os.path.join(cfg.out, "tensorboard"),
                                         purge_step=resume_step + 1 if resume_step else None)
            except Exception:  # tensorboard is optional
                self._tb = None

    def _open(self, path: str, resume_step: int) -> None:
        os.makedirs(self.cfg.out, exist_ok=True)
        kept = []
        if resume_step > 0 and os.path.exists(path):
            with open(path) as fh:
                for line in fh:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a kill
                    if rec.get("step", 0) <= resume_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
        # the kept records replace the file atomically before it is opened for appending: a job killed while
        # a resumed run rewrites its log (open(path, "w") truncated it first) keeps the earlier steps' records
        write_atomic(path, lambda fh: fh.writelines(kept), mode="w")
        self._log = open(path, "a")

    def print(self, msg: str) -> None:
        if self.is_main:
            print(msg, file=self.stream, flush=True)

    def start_clock(self) -> None:
        """Restart the step clock (at the start and after a checkpoint): the next recorded step is logged
        untimed (``images_per_s`` etc. None). Its queue time is the only time stamp it has, and with no
        step in flight before it, that time is the host's enqueue time, not the GPU's step time."""
        self._t_last = None

    def record(self, step: int, epoch: int, loss: float, lr: float, wd: float, momentum: float,
               n_ctx: float, n_tgt: float, batch: int, total_steps: int, t_done: Optional[float] = None, *,
               flops: Optional[float] = None) -> Dict[str, Any]:
        """Log one finished step (``step``: 1-based, the steps completed with it; ``batch`` is the global batch)
        and return its record.

        ``n_ctx`` / ``n_tgt``: mean context / target tokens per image over the global batch (every rank's).
        ``flops``: the step's matmul FLOPs on all ranks together (the training loop sums each rank's
        micro-batches at their own mask lengths: :func:`stop_kernels.training.loop.step_counts`); None:
        ``step_flops(batch, n_ctx, n_tgt)``, as if every image had the mean lengths.
        ``t_done``: host time when the step was queued (the loop reads each loss one step later, so
        the interval between queue times is the step time in steady state); now when None.
        """
        now = time.perf_counter() if t_done is None else t_done
        dt = now - (self._t_last if self._t_last is not None else now)
        self._t_last = now
        self.images += batch
        if flops is None:
            flops = step_flops(self.cfg, batch, n_ctx, n_tgt)
        rec: Dict[str, Any] = {
            "step": step, "epoch": epoch, "loss": loss, "lr": lr, "wd": wd, "momentum": momentum,
            "images_per_s": batch / dt if dt > 0 else None,
            "step_time_s": dt if dt > 0 else None,
            "tflops": flops / dt / 1e12 if dt > 0 else None,
            "mfu": flops / dt / self.peak if dt > 0 and self.peak is not None else None,
            "peak_mem_gib": peak_memory_gib(self.device),
            "ctx_tokens": n_ctx, "tgt_tokens": n_tgt,
            "skipped_images": self.skipped_images,
            "nonfinite_steps_skipped": self.nonfinite_steps,
        }
        if not self.is_main:
            return rec
        if self._log is not None and self.failed is None:
            try:
                self._log.write(json.dumps(rec) + "\n")
                self._log.flush()
            except OSError as e:
                self.failed = f"log: writing {self.path} failed at step {step}: {type(e).__name__}: {e}"
        if self._tb is not None:
            for k in ("loss", "lr", "wd", "momentum", "images_per_s", "tflops", "mfu", "peak_mem_gib"):
                if rec[k] is not None:
                    self._tb.add_scalar(f"train/{k}", rec[k], step)
        if step % self.cfg.log_every == 0 or step in (1, total_steps):
            self.print(format_progress(rec, total_steps, has_mfu=self.peak is not None))
        return rec

    def sync(self) -> None:
        """Make the log's records durable (flush and fsync), so a checkpoint written after this call never
        outlives the records of its steps in a crash of the machine (a flush alone leaves them in the page
        cache). Called before each checkpoint and at :meth:`close`, not per step: an fsync may take
        milliseconds on network filesystems. A failure is kept in :attr:`failed`, as :meth:`record`'s."""
        if self._log is None or self.failed is not None:
            return
        try:
            self._log.flush()
            os.fsync(self._log.fileno())
        except OSError as e:
            self.failed = f"log: syncing {self.path} failed: {type(e).__name__}: {e}"

    def close(self) -> None:
        self.sync()
        if self._log is not None:
            try:
                self._log.close()
            except OSError:  # a full disk at the last flush: already failed, or nothing was left to write
                pass
            self._log = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _fmt(v: Optional[float], spec: str, none: str = "-") -> str:
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_progress(rec: Dict[str, Any], total: int, has_mfu: bool = True) -> str:
    """The progress line of a step's record; ``has_mfu`` False: the run has no peak to divide by (a CPU run
    without ``peak_tflops``), shown as ``MFU n/a`` rather than as an untimed step's ``-``."""
    width = len(str(total))
    mem = rec.get("peak_mem_gib")
    mfu = rec.get("mfu")
    mfu_text = f"{_fmt(None if mfu is None else 100 * mfu, '.1f')}%" if has_mfu else "n/a"
    line = (f"step {rec['step']:{width}d}/{total}  ep {rec['epoch']}  loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  "
            f"wd {rec['wd']:.3f}  mom {rec['momentum']:.4f}  {_fmt(rec['images_per_s'], '.1f')} img/s  "
            f"{_fmt(rec['tflops'], '.2f')} TFLOP/s  MFU {mfu_text}")
    if mem is not None:
        line += f"  mem {mem:.1f} GiB"
    if rec.get("skipped_images"):
        line += f"  skipped {rec['skipped_images']} img"
    if rec.get("nonfinite_steps_skipped"):
        line += f"  skipped {rec['nonfinite_steps_skipped']} non-finite steps"
    return line


__all__ = ["step_flops", "step_floors_ms", "gpu_name", "peak_memory_gib", "mfu_peak_tflops", "LogWriteError",
           "MetricsLogger", "format_progress"]
