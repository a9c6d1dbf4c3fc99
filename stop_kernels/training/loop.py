"""The I-JEPA + StoP training step and training loop (single process, torchrun, FSDP2), and ``--benchmark``.

One step (as in the official code):
    targets = gather(LayerNorm(target_encoder(imgs)), masks_pred)          (no grad)
    z       = predictor(encoder(imgs, masks_enc), masks_enc, masks_pred)  (StoP noise inside)
    loss    = smooth_l1(z, targets); AdamW step; target ← EMA(encoder)

Order of :func:`train`: config check → process group → data (a bad folder fails here, before any
model) → models (same seed on every rank, built directly on the device) → AC / compile / FSDP2
(:mod:`.parallelize`) → AdamW (fused on CUDA) → resume (models, optimizer, RNG, data position) →
steps → final checkpoint and safetensors export.

No host synchronisation inside a step: the loss of step i (averaged over ranks with an
asynchronous all-reduce) is read on the host while step i+1 is already queued, then checked and
logged. A non-finite loss stops training with :class:`TrainingDiverged` before any further
checkpoint is written (pending losses are always checked before a save), and so do non-finite
parameters at save time (a non-finite gradient with a finite loss), so the last checkpoint on
disk is the last good one. With ``skip_nonfinite_grads`` such a gradient makes AdamW skip the step instead
(its fused kernel's ``found_inf``, set on the device: still no host synchronisation).
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .. import _checks as chk
from .. import reference
from ..data.datasets import TrainData
from ..models import predictor_for, vit_encoder
from ..models.vit import use_gelu_epilogue
from ..models.packing import is_ragged, mean_tokens, packed_targets
from ..ops.attention import attention_backend_problem, parse_auto_policy, use_attention_backend, use_auto_policy
from . import distributed as D
from .checkpoint import Checkpointer, export_safetensors, out_lock, set_aside
from .config import (ConfigError, TrainConfig, check_init_from, init_from_applies, local_batch, unused_data_keys,
                     uses_cuda_graph_trees, validate, with_micro_batch)
from .cuda_graphs import GraphedForward
from .ema import ema_update
from .metrics import (LogWriteError, MetricsLogger, gpu_name, mfu_peak_tflops, peak_memory_gib, peak_reserved_gib,
                      step_flops, step_phase)
from .parallelize import (count_parameters, cudagraph_recordings, cudagraph_skips, describe, paired_parameters,
                          parallelize)
from .schedules import lr_at, momentum_at, wd_at


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or Inf; the message says at which step and which checkpoint is intact."""


class TrainingOutOfMemory(torch.cuda.OutOfMemoryError):
    """A step ran out of GPU memory; the message says what lowers the memory per step (a
    ``torch.cuda.OutOfMemoryError``, so existing handlers still catch it)."""


class JEPAModels(NamedTuple):
    encoder: torch.nn.Module
    predictor: torch.nn.Module
    target_encoder: torch.nn.Module


class JEPAContainer(nn.Module):
    """The three models under one module, for one checkpoint namespace (``encoder.…``, ``predictor.…``, …)."""

    def __init__(self, models: JEPAModels):
        super().__init__()
        self.encoder, self.predictor, self.target_encoder = models


def build_models(cfg: TrainConfig) -> JEPAModels:
    """Encoder, StoP predictor and target encoder (an exact copy of the encoder, without gradients).

    Built on the current default device (the loop builds them under ``torch.device(<gpu>)``).
    """
    encoder = vit_encoder(cfg.model, img_size=cfg.img_size, patch_size=cfg.patch_size)
    predictor = predictor_for(encoder, img_size=cfg.img_size, patch_size=cfg.patch_size,
                              predictor_embed_dim=cfg.pred_emb_dim, depth=cfg.pred_depth,
                              noise_mode=cfg.noise_mode, noise_std=cfg.noise_std)
    if cfg.bf16_residual:  # see models.vit.run_blocks
        encoder.residual_dtype = predictor.residual_dtype = torch.bfloat16
    target = copy.deepcopy(encoder)
    for p in target.parameters():
        p.requires_grad_(False)
    if cfg.fused_target_gelu:  # see models.vit.MLP: forward only, so the target encoder's MLPs alone
        use_gelu_epilogue(target)
    return JEPAModels(encoder, predictor, target)


def init_weights_from(models: JEPAModels, cfg: TrainConfig) -> str:
    """Copy the weights of ``cfg.init_from`` into freshly built ``models``; return a line saying what was read.

    ``init_from`` is an official I-JEPA / StoP checkpoint (``.pth.tar``: encoder, predictor and, when
    present, target encoder; without one the target starts as a copy of the encoder, as a new run does) or
    a run of this project (its folder, ``checkpoints/`` or one ``step_*``: the three models of the newest
    checkpoint). Weights only: the run still starts at step 0 with a fresh optimizer and its own schedules
    (``--resume`` of this run's own checkpoints takes precedence, as it loads after this). Sizes that do
    not match the config are a :class:`ConfigError` naming ``init_from``.
    """
    from ..models.official import UnreadableCheckpoint, load_official_checkpoint
    from .checkpoint import CheckpointReadError, load_run_models
    path = cfg.init_from
    try:
        if os.path.isdir(path):
            src, meta = load_run_models(path)
            what = f"{meta['path']} (step {meta['step']})"
            sources = {"encoder": src.encoder, "predictor": src.predictor, "target_encoder": src.target_encoder}
        else:
            m = load_official_checkpoint(path, model=cfg.model, patch_size=cfg.patch_size, img_size=cfg.img_size,
                                         noise_mode=cfg.noise_mode, noise_std=cfg.noise_std)
            what = f"{path} (official layout" + (f", epoch {m.epoch})" if m.epoch is not None else ")")
            sources = {"encoder": m.encoder, "predictor": m.predictor,
                       "target_encoder": m.target_encoder if m.target_encoder is not None else m.encoder}
        for name, src_module in sources.items():
            getattr(models, name).load_state_dict(src_module.state_dict(), strict=True)
    except (CheckpointReadError, UnreadableCheckpoint) as e:  # damaged, or no checkpoint at all: not a mismatch
        raise ConfigError(f"init_from: {e}") from None
    except (ValueError, TypeError, RuntimeError, FileNotFoundError) as e:  # (a ConfigError is a ValueError)
        raise ConfigError(f"init_from: {path} does not fit this config ({cfg.model}, img {cfg.img_size}, patch "
                          f"{cfg.patch_size}, predictor depth {cfg.pred_depth} width {cfg.pred_emb_dim}): {e}") from None
    return f"initialised the encoder, predictor and target encoder from {what}"


def param_groups(*modules: torch.nn.Module, skip=()) -> List[Dict]:
    """AdamW groups: biases and 1-D parameters (LayerNorm) get no weight decay (``WD_exclude``).

    ``skip``: parameters left out (ones that never receive a gradient, such as the predictor's
    mask token under StoP noise: AdamW would never create their state, and a checkpoint's optimizer
    state must cover exactly the optimized parameters).
    """
    skip_ids = {id(p) for p in skip}
    decay, no_decay = [], []
    for m in modules:
        for name, p in m.named_parameters():
            if not p.requires_grad or id(p) in skip_ids:
                continue
            (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "WD_exclude": True, "weight_decay": 0.0}]


def build_optimizer(models: JEPAModels, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (betas 0.9/0.999 as I-JEPA): fused kernel on CUDA, foreach (multi-tensor) on CPU. With
    ``skip_nonfinite_grads`` the fused kernel on the CPU too: only it takes the ``found_inf`` flag."""
    kw = {"fused": True} if device.type == "cuda" or cfg.skip_nonfinite_grads else {"foreach": True}
    unused = [models.predictor.mask_token] if cfg.noise_mode != "none" else []  # only read by noise_mode 'none'
    return torch.optim.AdamW(param_groups(models.encoder, models.predictor, skip=unused), lr=cfg.start_lr, **kw)


def schedule_lengths(cfg: TrainConfig, iters_per_epoch: int) -> Tuple[int, int, int, int]:
    """``(total_steps, warmup_steps, lr_hold_step, wd_hold_step)``: ``steps`` if set, else ``epochs ×
    iters_per_epoch``; the other three are ``warmup_epochs``, ``lr_hold_epoch``, ``wd_hold_epoch`` in steps
    (0: no hold), as fractions of ``steps`` when it is set."""
    total = cfg.steps or cfg.epochs * iters_per_epoch

    def in_steps(epochs: float) -> int:
        if cfg.steps:
            return round(total * epochs / max(cfg.epochs, 1))
        # the official schedules' int(warmup * ipe) (truncated, not rounded); the holds are whole epochs there
        return int(epochs * iters_per_epoch)
    return total, in_steps(cfg.warmup_epochs), in_steps(cfg.lr_hold_epoch), in_steps(cfg.wd_hold_epoch)


def set_schedules(opt: torch.optim.Optimizer, cfg: TrainConfig, step: int, total: int, warmup: int,
                  lr_hold: int = 0, wd_hold: int = 0):
    lr = lr_at(step, warmup=warmup, total=total, start_lr=cfg.start_lr, ref_lr=cfg.lr, final_lr=cfg.final_lr,
               hold=lr_hold)
    wd = wd_at(step, total=total, ref_wd=cfg.weight_decay, final_wd=cfg.final_weight_decay, hold=wd_hold)
    for g in opt.param_groups:
        g["lr"] = lr
        if not g.get("WD_exclude", False):
            g["weight_decay"] = wd
    return lr, wd, momentum_at(step, total=total, start=cfg.ema_start, end=cfg.ema_end)


def jepa_step_loss(models: JEPAModels, imgs: torch.Tensor, masks_enc, masks_pred, autocast,
                   target_forward=None, side_stream: Optional["torch.cuda.Stream"] = None) -> torch.Tensor:
    """Forward of one I-JEPA+StoP step; returns the loss (backward is the caller's).

    Rectangular masks follow the official code; ragged masks (``--packed``) run the encoder and
    predictor on packed sequences and take the loss over every target token. ``target_forward``
    replaces the call of the target encoder (e.g. its CUDA-graphed forward, ``cuda_graph_target``).
    ``side_stream`` (``overlap_target``): the target branch (no gradients, it needs only the images)
    runs on that CUDA stream while the context encoder and the predictor run on the current one, so
    its large GEMMs can fill the GPU while the predictor's small kernels leave it idle; the loss
    waits for both. Same kernels, same order per stream: the same loss.
    """
    packed = is_ragged(masks_enc)
    main = torch.cuda.current_stream() if side_stream is not None else None
    with autocast:
        if side_stream is not None:
            side_stream.wait_stream(main)  # the images, and the last step's EMA update of the target weights
        with torch.no_grad(), (torch.cuda.stream(side_stream) if side_stream is not None else nullcontext()), \
                step_phase("target encoder"):
            h = (target_forward or models.target_encoder)(imgs)
            h = packed_targets(h, masks_pred) if packed else reference.target_features(h, masks_pred)
        with step_phase("context encoder"):
            z = models.encoder(imgs, masks_enc)
        with step_phase("predictor"):
            z = models.predictor(z, masks_enc, masks_pred)
        with step_phase("loss"):
            if side_stream is not None:
                main.wait_stream(side_stream)
                h.record_stream(main)  # made on the side stream, read here: not reused before this stream is done
            return reference.jepa_loss(z.float(), h.float())


def resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return cfg.precision


def autocast_for(precision: str, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


class Trainer:
    """Holds the built pieces of a run; :meth:`step_micro` (a step's micro-batches) and :meth:`step` (one whole
    batch) are one optimizer step each, with no host synchronisation."""

    def __init__(self, cfg: TrainConfig, info: D.DistInfo, data: Optional[TrainData], stream=None):
        self.cfg, self.info, self.data = cfg, info, data
        stream = stream or sys.stdout  # read at each call, not once at import (a caller may redirect it)
        local_batch(cfg, info.world_size)  # before any model is built
        self.device = info.device
        self.precision = resolve_precision(cfg, self.device)
        if cfg.bf16_residual and self.precision != "bf16":
            raise ConfigError(f"bf16_residual: needs precision bf16 (autocast), got {self.precision!r} on "
                              f"{self.device.type}")
        self.autocast = autocast_for(self.precision, self.device)
        self.sharding = D.resolve_sharding(cfg, info.world_size)
        self.stream = stream
        self.auto_policy = parse_auto_policy(cfg.attention_policy)  # applied around each step
        with use_auto_policy(self.auto_policy):  # the policy "auto" will follow (it may name xformers)
            problem = attention_backend_problem(cfg.attention, self.device)
        if problem:
            raise ConfigError(f"attention: {problem}")
        torch.manual_seed(cfg.seed)  # identical initialisation on every rank
        with torch.device(self.device):
            models = build_models(cfg)
        if init_from_applies(cfg):  # before FSDP2 shards them: every rank loads the whole tensors
            _print(init_weights_from(models, cfg), info, stream)
        self.n_params = count_parameters([models.encoder, models.predictor])
        self.mesh = D.build_mesh(self.sharding, info)
        if cfg.compile and cfg.compile_scope != "block" and self.mesh is not None:
            raise ConfigError(f"compile_scope: {cfg.compile_scope!r} calls the blocks' forwards inside one compiled graph, without "
                              f"the per-block hooks FSDP2 gathers the parameters in; use sharding none (one "
                              f"process) or compile_scope block, got sharding {self.sharding!r}")
        self.cuda_graph_trees = uses_cuda_graph_trees(cfg)
        if self.cuda_graph_trees and self.device.type != "cuda":
            _print(f"compile_mode: 'reduce-overhead' has no CUDA graphs on {self.device.type}: the compiled blocks run "
                   f"as in mode 'default'", info, stream)
        if self.cuda_graph_trees and self.mesh is not None:
            raise ConfigError(f"compile_mode: 'reduce-overhead' replays graphs that read the parameters at fixed "
                              f"addresses, and FSDP2 gathers them into new memory every step; use sharding none (one "
                              f"process), got sharding {self.sharding!r}")
        self.models = parallelize(models, cfg, self.mesh, self.precision)
        self.container = JEPAContainer(self.models)
        self.opt = build_optimizer(self.models, cfg, self.device)
        # A replayed backward writes its gradients into the tree's memory, which the next micro-batch's replay
        # overwrites: with several micro-batches each gradient moves to a buffer of its own once (_own_grads) and
        # is zeroed, not freed, after each step. One micro-batch per step needs none: AdamW reads its gradients
        # before the next replay.
        self.stable_grads = self.cuda_graph_trees and cfg.grad_accum > 1
        self._owned_grads: set = set()
        self.ema_target, self.ema_online = paired_parameters(self.models.target_encoder, self.models.encoder)
        for key in ("cuda_graph_target", "overlap_target"):
            if getattr(cfg, key) and (self.device.type != "cuda" or self.mesh is not None):
                raise ConfigError(f"{key}: needs one CUDA device without FSDP sharding; got device "
                                  f"{self.device} and sharding {self.sharding!r}")
        self.target_forward = (GraphedForward(self.models.target_encoder, log=lambda m: _print(m, info, stream))
                               if cfg.cuda_graph_target else None)
        self.side_stream = torch.cuda.Stream(self.device) if cfg.overlap_target else None
        self.checkpointer = Checkpointer(os.path.join(cfg.out, "checkpoints"), info, keep=cfg.keep_ckpts)

    def step(self, imgs, masks_enc, masks_pred, lr_wd_mom, skipped: int = 0) -> torch.Tensor:
        """One optimizer step on a whole batch: with ``grad_accum`` = k > 1, cut into k equal micro-batches
        (:func:`micro_batches`, keeping the batch's masks) and run by :meth:`step_micro`."""
        return self.step_micro(micro_batches(imgs, masks_enc, masks_pred, self.cfg.grad_accum), lr_wd_mom, skipped)

    def step_micro(self, micro, lr_wd_mom, skipped: int = 0, summed: Sequence[float] = ()) -> torch.Tensor:
        """Forward and backward of each micro-batch ``(imgs, masks_enc, masks_pred)`` in ``micro``, then
        AdamW and the EMA.

        The step's loss is the mean of the micro-batches' losses (each a mean over its own target
        tokens), as data parallelism averages its ranks: k micro-batches on each of N ranks train like
        one micro-batch on each of N·k ranks. Each loss is scaled by 1/k before its backward, so the
        gradients add up to that mean's. Under FSDP2 they are reduced once, after the last micro-batch.

        Returns ``[loss averaged over ranks, unreadable images skipped on all ranks, *summed, nonfinite]`` as one
        float64 tensor still on the device, each of ``summed`` (host values of this rank, such as
        :func:`step_counts`) summed over ranks: one asynchronous all-reduce; the caller reads it later.
        ``nonfinite`` is > 0 where ``skip_nonfinite_grads`` found an inf or NaN gradient and AdamW skipped the step.
        """
        _, _, momentum = lr_wd_mom
        k = len(micro)
        # the masks were range-checked on the host (check_masks) before they were moved: no device
        # index check (a host synchronisation each) inside the step
        with chk.trusted_device_indices(), use_attention_backend(self.cfg.attention), \
                use_auto_policy(self.auto_policy):
            loss = None
            for i, (imgs, masks_enc, masks_pred) in enumerate(micro):
                self._gradient_sync(i == k - 1)
                if self.cuda_graph_trees:  # a new generation of the tree: last micro-batch's activations are done
                    torch.compiler.cudagraph_mark_step_begin()
                part = jepa_step_loss(self.models, imgs, masks_enc, masks_pred, self.autocast, self.target_forward,
                                      self.side_stream)
                if k > 1:
                    part = part / k
                with step_phase("backward"):
                    part.backward()
                if self.stable_grads:
                    self._own_grads()
                loss = part.detach() if loss is None else loss + part.detach()
        with step_phase("optimizer"):
            nonfinite = loss.new_zeros((), dtype=torch.float64)
            if self.cfg.skip_nonfinite_grads:  # AdamW's fused kernel skips its update where found_inf is 1
                self.opt.found_inf = gradients_nonfinite(self.opt, self.info)
                nonfinite = self.opt.found_inf.double()
            self.opt.step()
            self.opt.found_inf = None  # (read by this step only: another opt.step() must not skip with it)
            self.opt.zero_grad(set_to_none=not self.stable_grads)
        with step_phase("ema"):
            ema_update(self.ema_target, self.ema_online, momentum)
        W = self.info.world_size
        # float64: the summed counts (tokens, FLOPs) stay exact integers far beyond float32's 2**24
        stats = torch.stack([loss.detach().double()] + [loss.new_full((), float(v), dtype=torch.float64)
                                                        for v in (skipped, *summed)] + [nonfinite])
        if self.info.distributed and W > 1:
            torch.distributed.all_reduce(stats)
            stats[0].div_(W)
        return stats

    def _own_grads(self) -> None:
        """Give every gradient that has none yet a buffer of its own (a copy of the one the backward returned, which
        may live in the CUDA-graph tree's memory), kept for the rest of the run: the next micro-batches add into it.
        A parameter that gets no gradient (the predictor's unused ``mask_token`` in the StoP modes) keeps none, so
        AdamW skips it as it does with ``set_to_none``."""
        for m in (self.models.encoder, self.models.predictor):
            for p in m.parameters():
                if p.grad is not None and id(p) not in self._owned_grads:
                    p.grad = p.grad.clone()
                    self._owned_grads.add(id(p))

    def _gradient_sync(self, on: bool) -> None:
        """FSDP2 reduces gradients only when ``on`` (the last micro-batch): the others accumulate the
        unsharded gradients locally (in the fp32 reduce dtype), one reduction per step instead of k."""
        if self.mesh is not None and self.cfg.grad_accum > 1:  # (a k = 1 step never turns it off)
            for m in (self.models.encoder, self.models.predictor):
                m.set_requires_gradient_sync(on)

    def to_device(self, imgs, masks_enc, masks_pred):
        """Range-check the (host) masks, then move the batch to the device without blocking."""
        check_masks(masks_enc, masks_pred, self.models.encoder.num_patches)
        return move_batch(imgs, masks_enc, masks_pred, self.device)


def all_finite(tensors: Iterable[torch.Tensor], info: D.DistInfo) -> torch.Tensor:
    """1.0 where every element of ``tensors`` (the local shards of DTensors) is finite on every rank, else 0.0: a
    device scalar, one max-abs norm per tensor and a MIN all-reduce, no host read."""
    local = [(t.to_local() if hasattr(t, "to_local") else t).detach() for t in tensors]
    local = [t for t in local if t.numel()]
    ok = torch.stack(torch._foreach_norm(local, float("inf"))).isfinite().all().float() if local else \
        torch.ones((), dtype=torch.float32, device=info.device)
    if info.distributed and info.world_size > 1:
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return ok


def parameters_finite(models: "JEPAModels", info: D.DistInfo) -> bool:
    """Whether every parameter of the three models (the local shards under FSDP2) is finite, on all
    ranks: one host read (checkpoint time only)."""
    return bool(all_finite((p for m in (models.encoder, models.predictor, models.target_encoder)
                            for p in m.parameters()), info).item())


def gradients_nonfinite(opt: torch.optim.Optimizer, info: D.DistInfo) -> torch.Tensor:
    """AdamW's ``found_inf``: 1.0 where a gradient it would apply holds an inf or NaN on any rank, else 0.0 (a
    float32 scalar on the parameters' device, the shape of AdamW's step counts, from which the fused step subtracts
    it), with no host read: every rank skips the same steps."""
    grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
    return 1.0 - all_finite(grads, info)


def micro_batches(imgs, masks_enc, masks_pred, parts: int):
    """A batch as ``parts`` equal slices along the batch dimension, ``[(imgs, masks_enc, masks_pred)]``, each
    keeping the batch's mask lengths (the training loop instead loads micro-batches collated on their own:
    :meth:`stop_kernels.data.datasets.TrainData.steps`)."""
    if parts == 1:
        return [(imgs, masks_enc, masks_pred)]
    B = imgs.shape[0]
    if B % parts:
        raise ValueError(f"grad_accum: a batch of {B} images cannot be split into {parts} equal micro-batches")
    size = B // parts
    return [(imgs[s], [m[s] for m in masks_enc], [m[s] for m in masks_pred])
            for s in (slice(i * size, (i + 1) * size) for i in range(parts))]


def step_counts(cfg: TrainConfig, micro) -> Tuple[float, float, float]:
    """``(context tokens, target tokens, matmul FLOPs)`` of one rank's step: over its micro-batches ``(imgs,
    masks_enc, masks_pred)``, Σ images × mean tokens per image (:func:`mean_tokens`) and Σ :func:`step_flops` of
    each micro-batch at its own mask lengths. Read from the masks' shapes: no host synchronisation. The ranks'
    masks differ, so a job's totals are these summed over ranks (divide the tokens by the images for means)."""
    ctx = tgt = flops = 0.0
    for imgs, masks_enc, masks_pred in micro:
        b, n_ctx, n_tgt = imgs.shape[0], mean_tokens(masks_enc), mean_tokens(masks_pred)
        ctx, tgt, flops = ctx + b * n_ctx, tgt + b * n_tgt, flops + step_flops(cfg, b, n_ctx, n_tgt)
    return ctx, tgt, flops


def batch_text(cfg: TrainConfig, world_size: int) -> str:
    """``global batch 2048 (4 micro-batches of 64 per rank)`` for the start-up lines."""
    text = f"global batch {cfg.batch_size}"
    if cfg.grad_accum > 1:
        text += f" ({cfg.grad_accum} micro-batches of {local_batch(cfg, world_size) // cfg.grad_accum} per rank)"
    return text


def move_batch(imgs, masks_enc, masks_pred, device: torch.device):
    """The batch on ``device`` (non-blocking on CUDA); masks ``[B, K]`` or ragged lists of B 1-D tensors."""
    nb = device.type == "cuda"

    def move(m):
        return [move(t) for t in m] if isinstance(m, (list, tuple)) else m.to(device, non_blocking=nb)
    return imgs.to(device, non_blocking=nb), move(masks_enc), move(masks_pred)


def check_masks(masks_enc, masks_pred, num_patches: int) -> None:
    """Every mask index lies in ``[0, num_patches)``: checked on the host, where it costs no device sync
    (:meth:`Trainer.step` then skips the device-side checks)."""
    for name, masks in (("masks_enc", masks_enc), ("masks_pred", masks_pred)):
        for m in masks:
            for t in (m if isinstance(m, (list, tuple)) else [m]):
                if t.device.type != "cpu":
                    raise ValueError(f"{name}: expected host (CPU) tensors before the move to the device, "
                                     f"got {t.device}")
                chk.index_tensor(name, t, upper=num_patches, what=f"{num_patches} patches")


def _print(msg: str, info: D.DistInfo, stream) -> None:
    if info.is_main:
        print(msg, file=stream, flush=True)


def train(cfg: TrainConfig) -> List[float]:
    """Train (or benchmark, when ``cfg.benchmark`` > 0); returns the losses of the steps run by this call.

    Launched by torchrun it trains on all ranks with FSDP2; as a plain process, on one device.
    Raises :class:`ConfigError` for bad settings or data folders (before any model is built) and
    :class:`TrainingDiverged` when the loss becomes NaN/Inf.
    """
    validate(cfg)
    info = D.init_distributed(cfg)
    try:
        cfg = with_micro_batch(cfg, info.world_size)  # (the rank count is known from here)
        local_batch(cfg, info.world_size)  # before the data folder is read and the models are built
        _on_every_rank(check_init_from, cfg, info)  # (validate() leaves it here when there are several ranks)
        if cfg.benchmark:
            result = run_benchmark(cfg, info)
        else:
            with out_lock(cfg.out, info):
                result = _train(cfg, info)
        # every rank has finished before any destroys the process group: a rank that tore its gloo connections
        # down while another was still finishing made that one abort now and then. (The abort seen since, in the
        # interpreter's teardown after all this, is train.py's exit_worker's to avoid.) On the success path only:
        # after an error on one rank a barrier would wait for the others, which wait for it in their next collective
        D.barrier(info)
        return result
    except torch.cuda.OutOfMemoryError as e:
        raise TrainingOutOfMemory(f"{out_of_memory_advice(cfg, info.world_size)}\n{e}") from e
    finally:
        D.shutdown(info)


def _on_every_rank(check, cfg: TrainConfig, info: D.DistInfo):
    """``check(cfg)`` on every rank, its :class:`ConfigError` raised on all of them when it fails on any (a path
    that one node does not see): one rank stopping alone would leave the others to crash or wait in their next
    collective. Returns ``check``'s result."""
    result, problem = None, None
    try:
        result = check(cfg)
    except ConfigError as e:
        problem = str(e)
    problem = D.agree(problem, info)
    if problem:
        raise ConfigError(problem)
    return result


# the keys that fix the parameters of the models and the optimizer (noise_mode "none" alone optimizes the
# mask token): a checkpoint written with other values cannot be loaded into this run's models
_MODEL_KEYS = ("model", "img_size", "patch_size", "pred_depth", "pred_emb_dim")


def check_resumable(path: str, cfg: TrainConfig, dataset_size: Optional[int] = None) -> None:
    """:class:`ConfigError` naming the first key whose value in the checkpoint ``path`` (its meta.json's
    config) gives models or an optimizer other than ``cfg``'s: DCP's own error for a missing key or a
    size mismatch names no setting; or another global ``batch_size``, in whose steps the data position and
    the schedules are counted; or another ``seed`` or dataset (``dataset_size`` images against the checkpoint's),
    which reorder the epoch the run is in the middle of. Other keys (grad_accum, schedules, sharding, the data
    folder's path, ...) may change on resume.
    Also a :class:`ConfigError` when this rank cannot read the checkpoint's ``meta.json`` (the main rank chose
    ``path``; a node whose ``--out`` is not the shared folder does not see it)."""
    from .checkpoint import CheckpointReadError, read_meta
    try:
        meta = read_meta(path)
        saved = meta.get("config") or {}
    except CheckpointReadError as e:
        advice = ("every rank must see the run's --out (a folder shared by all nodes)"
                  if isinstance(e.__cause__, FileNotFoundError) else
                  f"move {path} aside to resume from the checkpoint before it")
        raise ConfigError(f"resume: {e}; {advice}") from None
    changed = [k for k in _MODEL_KEYS if k in saved and saved[k] != getattr(cfg, k)]
    if "noise_mode" in saved and (saved["noise_mode"] == "none") != (cfg.noise_mode == "none"):
        changed.append("noise_mode")
    if changed:
        key = changed[0]
        raise ConfigError(f"{key}: the checkpoint to resume, {path}, was written with {key}={saved[key]!r}, this "
                          f"run has {getattr(cfg, key)!r}; resume with the run's own settings, or start a new "
                          f"run in another --out")
    # the global batch: the data position (epoch, batch in epoch) and the schedules are counted in its steps, so
    # another one would skip or repeat data and reshape the schedules (grad_accum and the rank count may change)
    if "batch_size" in saved and saved["batch_size"] != cfg.batch_size:
        raise ConfigError(f"batch_size: the checkpoint to resume, {path}, was written with batch_size="
                          f"{saved['batch_size']!r}, this run has {cfg.batch_size!r}: the run's position in the data "
                          f"and its schedules are counted in steps of that global batch. Resume with batch_size "
                          f"{saved['batch_size']!r} (--grad-accum changes the per-step memory instead), or start a "
                          f"new run in another --out")
    # the seed orders each epoch (the sampler's shuffle) and draws the masks and the synthetic images: the resumed
    # run skips the first steps' worth of another order, so some images of the epoch come twice and others never
    if "seed" in saved and saved["seed"] != cfg.seed:
        raise ConfigError(f"seed: the checkpoint to resume, {path}, was written with seed={saved['seed']!r}, this run "
                          f"has {cfg.seed!r}: the seed orders the data of the epoch the run is in, so the rest of it "
                          f"would repeat some images and skip others. Resume with seed {saved['seed']!r}, or start a "
                          f"new run in another --out")
    # likewise another dataset (another synthetic_size, or a folder with other contents; a moved one is fine)
    was = meta.get("dataset_size")
    if dataset_size is not None and was is not None and was != dataset_size:
        key = "synthetic_size" if cfg.data == "synthetic" else "data"
        raise ConfigError(f"{key}: the checkpoint to resume, {path}, was written over a dataset of {was} images, this "
                          f"run's has {dataset_size}: the position in the epoch and the epoch's length would not "
                          f"carry over. Resume over the same images, or start a new run in another --out")


def out_of_memory_advice(cfg: TrainConfig, world_size: int) -> str:
    """What to change when a step does not fit: a larger ``grad_accum`` (the same optimizer step), AC, more GPUs."""
    local = local_batch(cfg, world_size)
    micro = local // cfg.grad_accum
    tips = []
    more = [k for k in range(cfg.grad_accum + 1, local + 1) if local % k == 0][:5]  # the next divisors

    def listed(items):
        items = [str(i) for i in items]
        return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]
    if more:
        tips.append(f"--grad-accum {listed(more)} ({listed(local // k for k in more)} instead of {micro} images per "
                    f"micro-batch; the same optimizer step)")
    if cfg.ac == "none":
        tips.append("--ac block (activation checkpointing: about a third more compute)")
    tips.append("more GPUs for the same --batch-size")
    return (f"out of GPU memory with {micro} images per micro-batch on each of {world_size} rank(s) (batch_size "
            f"{cfg.batch_size}, grad_accum {cfg.grad_accum}, ac {cfg.ac}); try " + ", or ".join(tips) + ". "
            "Lowering --batch-size also fits, but changes the recipe (scale --lr with it).")


def _train(cfg: TrainConfig, info: D.DistInfo) -> List[float]:
    stream = sys.stdout
    data = _on_every_rank(lambda c: TrainData(c, rank=info.rank, world_size=info.world_size,
                                              pin_memory=c.pin_memory and info.device.type == "cuda"), cfg, info)
    ipe = data.iters_per_epoch
    total, warmup, lr_hold, wd_hold = schedule_lengths(cfg, ipe)
    tr = Trainer(cfg, info, data, stream)
    ckpt = tr.checkpointer
    unused = unused_data_keys(cfg)
    if unused:  # (set by a recipe or the command line; never silently)
        _print(f"note: {', '.join(unused)} set but unused: "
               + ("synthetic images take no augmentation (they apply to --data folders)" if cfg.data == "synthetic"
                  else f"the data is the folder {cfg.data}"), info, stream)

    start_step, skipped_before, nonfinite_before = 0, 0, 0
    if cfg.resume:
        path = ckpt.latest()
        if path is None:
            _print(f"resume: no complete checkpoint in {ckpt.folder}; starting from step 0", info, stream)
        else:
            # on every rank, all stopping together: a rank that cannot read it would stop alone and leave the
            # others waiting for it in the collective load
            _on_every_rank(lambda c: check_resumable(path, c, len(data.dataset)), cfg, info)
            meta = ckpt.load(path, tr.container, tr.opt)
            start_step = int(meta["step"])
            skipped_before = int(meta.get("skipped_images", 0))
            nonfinite_before = int(meta.get("nonfinite_steps_skipped", 0))
            _print(f"resumed from {path} (step {start_step}"
                   + ("" if meta["rng_restored"] else "; RNG re-seeded: world size changed") + ")", info, stream)
            if not meta["rng_restored"]:
                torch.manual_seed(cfg.seed + 1_000_003 * info.rank + start_step)
    if start_step == 0:
        torch.manual_seed(cfg.seed + 1_000_003 * info.rank)  # distinct StoP noise per rank
    if start_step >= total:
        _print(f"nothing to do: the checkpoint is at step {start_step} of {total}", info, stream)
        # killed between the last checkpoint and the export: export now (rank 0 decides: export is collective)
        if cfg.export and not D.broadcast_object(export_complete(cfg, start_step) if info.is_main else None, info):
            export(tr, cfg, info, stream, start_step)
        return []
    if start_step == 0:
        moved = ckpt.set_aside_previous_run()
        if moved:
            _print(f"{ckpt.folder} held the checkpoints of an earlier run (not resumed): moved to {moved}, so "
                   f"this run's checkpoints are its own; delete it when no longer needed", info, stream)
        # an earlier run's export, too: a resume of this run after a kill during its own export would
        # otherwise find files of the same step and keep them (export_complete compares steps only)
        # (whether this run exports or not: a later resume with --export would find them complete)
        moved = set_aside(os.path.join(cfg.out, "export"), info)
        if moved:
            _print(f"{cfg.out}/export held an earlier run's export: moved to {moved}", info, stream)
        # and its step log and TensorBoard events, which this run would truncate or interleave with its own
        for name in ("log.jsonl", "tensorboard"):
            moved = set_aside(os.path.join(cfg.out, name), info)
            if moved:
                _print(f"{cfg.out}/{name} held an earlier run's {name}: moved to {moved}", info, stream)

    metrics = MetricsLogger(cfg, info.device, info.world_size, is_main=info.is_main, resume_step=start_step,
                            stream=stream)
    problem = D.agree(metrics.failed, info)  # rank 0 alone opens the log: all stop when it cannot
    if problem:
        metrics.close()
        raise LogWriteError(problem)
    metrics.skipped_images = skipped_before  # a cumulative count across resumes
    # noise_mode none (the I-JEPA mask token) draws no noise: a σ beside it would read as if it did
    noise = "none (mask token)" if cfg.noise_mode == "none" else f"{cfg.noise_mode} σ={cfg.noise_std}"
    _print(f"training {cfg.model} (img {cfg.img_size}, patch {cfg.patch_size}, {tr.n_params / 1e6:.1f}M trainable "
           f"params; predictor depth {cfg.pred_depth} width {cfg.pred_emb_dim}; noise {noise}) on {info.world_size} × {gpu_name(info.device)} [{describe(cfg, tr.mesh, tr.precision)}]"
           f" for {total} steps ({ipe} per epoch), {batch_text(cfg, info.world_size)}, data {cfg.data}", info, stream)

    losses: List[float] = []
    metrics.nonfinite_steps = nonfinite_before  # (cumulative across resumes, as skipped_images)
    last_saved = start_step if cfg.resume and start_step > 0 else -1
    # (step, epoch, stats tensor, lr, wd, mom, time the step was queued)
    pending = None

    def finish(p) -> None:
        # (step: the step's 0-based index; logged and named as step + 1, the steps completed, as its checkpoint)
        step, epoch, stats, lr, wd, mom, t_done = p
        # (the counts of every rank: step_counts; log_failed: rank 0 could not write log.jsonl, up to the step
        # before this one was queued; nonfinite: AdamW skipped the step, skip_nonfinite_grads)
        value, skipped, ctx_tokens, tgt_tokens, flops, log_failed, nonfinite = stats.tolist()
        if log_failed:  # seen by every rank in the same step: the message is rank 0's
            raise LogWriteError(D.agree(metrics.failed, info))
        metrics.skipped_images += int(round(skipped))
        if not math.isfinite(value):
            good = ckpt.latest()
            raise TrainingDiverged(
                f"loss is {value} at step {step + 1} (epoch {epoch}, lr {lr:.3g}); stopping. "
                + (f"The last good checkpoint is {good} (continue with --resume, e.g. after lowering --lr)."
                   if good else "No checkpoint was written before it."))
        if nonfinite:
            metrics.nonfinite_steps += 1
            _print(f"step {step + 1}: a gradient is not finite (loss {value:.4g}); AdamW skipped the step "
                   f"(skip_nonfinite_grads; {metrics.nonfinite_steps} so far)", info, stream)
        losses.append(value)
        metrics.record(step + 1, epoch, value, lr, wd, mom, ctx_tokens / cfg.batch_size, tgt_tokens / cfg.batch_size,
                       cfg.batch_size, total, t_done, flops=flops)

    def save(step: int) -> None:
        nonlocal last_saved
        if step == last_saved:
            return
        if not parameters_finite(tr.models, info):
            # the loss checked before this save was computed before the last update: a non-finite
            # gradient with a finite loss reaches the weights unseen until here
            good = ckpt.latest()
            raise TrainingDiverged(
                f"parameters are not finite after step {step} (a non-finite gradient reached the optimizer); "
                f"checkpoint not written. " + (f"The last good checkpoint is {good} (continue with --resume, e.g. "
                                               f"after lowering --lr)." if good else "No checkpoint was written before it."))
        meta = {"epoch": step // ipe, "batch_in_epoch": step % ipe, "images_seen": step * cfg.batch_size,
                "skipped_images": metrics.skipped_images, "nonfinite_steps_skipped": metrics.nonfinite_steps,
                "dataset_size": len(data.dataset), "config": cfg.to_dict()}
        metrics.sync()  # the log's records of these steps are on disk before the checkpoint that ends them
        path = ckpt.save(step, tr.container, tr.opt, meta)
        last_saved = step
        _print(f"checkpoint {path}", info, stream)

    step = start_step
    asynchronous = tr.device.type == "cuda"  # step() returns once the step's kernels are queued
    metrics.start_clock()
    restarted = True  # the clock was (re)started: no step in flight
    try:
        while step < total:
            epoch, first = step // ipe, step % ipe
            for micro, skipped in data.steps(epoch, first):
                if step >= total:
                    break
                t_begin = time.perf_counter()
                micro = [tr.to_device(*batch) for batch in micro]
                sched = set_schedules(tr.opt, cfg, step, total, warmup, lr_hold, wd_hold)
                # this rank's tokens and FLOPs, summed over ranks with the loss (the ranks' masks differ), and
                # whether its log write failed (rank 0's, which must not stop alone: MetricsLogger.failed)
                stats = tr.step_micro(micro, sched, skipped, (*step_counts(cfg, micro), metrics.failed is not None))
                if pending is not None:
                    finish(pending)
                # a step's time stamp: when it was queued, i.e. in steady state when the step before it
                # finished (finish() waited for it); the first step after a (re)start has no step before
                # it, so it is stamped when its own work began and logged untimed (MetricsLogger.start_clock).
                # On the CPU every step runs to its end before the next line: stamps mark step ends, the
                # restarted step's included (its begin would give the next step two steps' time)
                pending = (step, epoch, stats, *sched,
                           t_begin if restarted and asynchronous else time.perf_counter())
                restarted = False
                step += 1
                if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < total:
                    finish(pending)
                    pending = None
                    save(step)
                    metrics.start_clock()  # the next step's time excludes the save
                    restarted = True
        if pending is not None:
            finish(pending)
            pending = None
        metrics.sync()
        problem = D.agree(metrics.failed, info)  # the last steps' records: no later step carries the flag
        if problem:
            raise LogWriteError(problem)
    finally:
        metrics.close()
    save(step)
    if cfg.export:
        export(tr, cfg, info, stream, step)
    n = max(1, min(10, len(losses) // 4))
    if losses:
        _print(f"done: mean loss of the first {n} steps {sum(losses[:n]) / n:.4f}, of the last {n} steps "
               f"{sum(losses[-n:]) / n:.4f}; {metrics.skipped_images} unreadable images skipped"
               + (f"; {metrics.nonfinite_steps} steps skipped for non-finite gradients" if cfg.skip_nonfinite_grads
                  else ""),
               info, stream)
    return losses


_EXPORTED = ("encoder", "target_encoder")


def export_complete(cfg: TrainConfig, step: int) -> bool:
    """Both export files exist and were written at ``step`` (an earlier run's export in the same --out,
    left by a run that was killed before its own, does not count)."""
    try:
        from safetensors import safe_open
        for n in _EXPORTED:
            with safe_open(os.path.join(cfg.out, "export", f"{n}.safetensors"), "pt") as fh:
                if (fh.metadata() or {}).get("step") != str(step):
                    return False
        return True
    except Exception:  # missing, unreadable or no safetensors
        return False


def export(tr: Trainer, cfg: TrainConfig, info: D.DistInfo, stream, step: int) -> None:
    """Consolidated encoder and target-encoder weights as safetensors under ``<out>/export/`` (the
    training ``step`` they hold is in their metadata)."""
    import importlib.util
    if importlib.util.find_spec("safetensors") is None:
        _print("export: safetensors is not installed (pip install safetensors); skipping the encoder export",
               info, stream)
        return
    meta = {"model": cfg.model, "img_size": str(cfg.img_size), "patch_size": str(cfg.patch_size),
            "format": "stop_kernels VisionTransformer state dict", "step": str(step)}
    for name in _EXPORTED:
        path = os.path.join(cfg.out, "export", f"{name}.safetensors")
        export_safetensors(getattr(tr.models, name), path, info, meta)
    _print(f"exported {os.path.join(cfg.out, 'export')}/{{encoder,target_encoder}}.safetensors", info, stream)


# ----------------------------------------------------------------------------------------------
# --benchmark N
# ----------------------------------------------------------------------------------------------
def synthetic_batches(cfg: TrainConfig, n: int, batch: int, device: torch.device, seed: int):
    """``n`` batches of random images with freshly sampled masks (ragged under ``cfg.packed``, as in
    training), on ``device`` (4 distinct image tensors and ``n`` mask batches; callers cycle through them)."""
    from ..data.masks import MultiBlockMaskCollator
    collator = MultiBlockMaskCollator.from_config(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    imgs = [torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=g).to(device) for _ in range(min(n, 4))]
    out = []
    dummy = [(torch.zeros(()), 0)] * batch
    num_patches = (cfg.img_size // cfg.patch_size) ** 2
    for i in range(n):
        _, me, mp = collator(dummy)
        check_masks(me, mp, num_patches)
        out.append(move_batch(imgs[i % len(imgs)], me, mp, device))  # the images are there already
    return out


# Inductor's CUDA-graph trees run a new sequence length once as it is (its warm-up), record it at the second
# call and replay it from the third on
CUDA_GRAPH_TREE_PASSES = 3


def warmup_steps(cfg: TrainConfig, warmup: int, pool: int) -> int:
    """Untimed steps before a timing that cycles through ``pool`` mask batches: at least ``warmup``, and enough that
    every batch's lengths are past their first-time costs (a Triton JIT, a compiled graph; under ``compile_mode:
    reduce-overhead`` also the CUDA graph's warm-up and recording, :data:`CUDA_GRAPH_TREE_PASSES` calls)."""
    return max(warmup, pool * (CUDA_GRAPH_TREE_PASSES if uses_cuda_graph_trees(cfg) else 1))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_benchmark(cfg: TrainConfig, info: D.DistInfo) -> List[float]:
    """``cfg.benchmark`` timed steps after warm-up, on synthetic batches already on the device (the
    step alone: no data loading). Progress goes to stderr; rank 0 prints one JSON line to stdout and
    writes it to ``<out>/benchmark.json``.

    It measures the steady state of training: the steps cycle through ``cfg.benchmark_batches``
    mask batches (their context and target lengths differ, as in training), and the warm-up
    (:func:`warmup_steps`) runs each of them at least once (three times under ``compile_mode:
    reduce-overhead``), so the timed steps never include a first-time cost — a Triton JIT compile for a
    new sequence-length bucket, a torch.compile graph, a CUDA-graph recording — that a long run pays once."""
    stream = sys.stderr
    local = local_batch(cfg, info.world_size)
    tr = Trainer(cfg, info, None, stream)
    torch.manual_seed(cfg.seed + 1_000_003 * info.rank)
    n = cfg.benchmark
    pool = min(cfg.benchmark_batches, n)
    warm = warmup_steps(cfg, cfg.benchmark_warmup, pool)
    _print(f"benchmark: {cfg.model} img {cfg.img_size}/{cfg.patch_size}, {batch_text(cfg, info.world_size)}, "
           f"{info.world_size} × {gpu_name(info.device)} [{describe(cfg, tr.mesh, tr.precision)}; attention "
           f"{cfg.attention}{' ' + cfg.attention_policy if cfg.attention_policy else ''}]: {warm} warm-up + {n} "
           f"timed steps over {pool} mask batches", info, stream)
    ignored = [k for k, on in (("resume", cfg.resume), ("data", cfg.data != "synthetic")) if on]
    if ignored:  # the step alone is timed: the models as built (--init-from's weights where given), synthetic
        # batches, no checkpoint read or written
        _print(f"benchmark: ignores {' and '.join('--' + k for k in ignored)} (the models as built"
               f"{', from --init-from' if init_from_applies(cfg) else ''}, on synthetic batches)", info, stream)
    k = cfg.grad_accum  # each step: k micro-batches with masks of their own, as training loads them
    micro = synthetic_batches(cfg, pool * k, local // k, info.device, cfg.seed + 7919 * info.rank)
    steps = [micro[j * k:(j + 1) * k] for j in range(pool)]
    # (context tokens, target tokens, matmul FLOPs) of each pooled step on every rank (their masks differ),
    # counted here: the timed loop only queues steps
    summed = D.all_reduce_sum([c for m in steps for c in step_counts(cfg, m)], info)
    pool_counts = [summed[3 * j:3 * j + 3] for j in range(pool)]
    steps = [steps[i % pool] for i in range(warm + n)]
    total = warm + n
    sched = (cfg.lr, cfg.weight_decay, cfg.ema_start)
    losses: List[torch.Tensor] = []
    t_warm = time.perf_counter()
    for i in range(warm):
        set_schedules(tr.opt, cfg, i, total, 0)
        losses.append(tr.step_micro(steps[i], sched))
        if i == 0:
            _sync(info.device)
            _print(f"  first step {time.perf_counter() - t_warm:.1f} s", info, stream)
    _sync(info.device)
    _print(f"  warm-up {time.perf_counter() - t_warm:.1f} s", info, stream)
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(info.device)
    D.barrier(info)
    flops = 0.0
    t0 = time.perf_counter()
    for i in range(warm, total):
        set_schedules(tr.opt, cfg, i, total, 0)
        losses.append(tr.step_micro(steps[i], sched))
        flops += pool_counts[i % pool][2]
    _sync(info.device)
    D.barrier(info)
    dt = time.perf_counter() - t0
    values = [float(x[0].item()) for x in losses]
    ms = 1000.0 * dt / max(n, 1)
    tflops = flops / dt / 1e12
    peak = mfu_peak_tflops(cfg, info.device)
    mem = peak_memory_gib(info.device)  # the largest of the ranks' peaks: the memory a run must fit
    reserved = peak_reserved_gib(info.device)  # (CUDA-graph replays' buffers are reserved, never allocated)
    if mem is not None:  # (None on every rank alike: the device type is the run's)
        mem, reserved = D.all_reduce_max([mem, reserved], info)
    n_ctx, n_tgt = (sum(pool_counts[i % pool][c] for i in range(warm, total)) / max(n * cfg.batch_size, 1)
                    for c in (0, 1))
    result = {
        "model": cfg.model, "img_size": cfg.img_size, "patch_size": cfg.patch_size, "batch": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "world_size": info.world_size, "gpu": gpu_name(info.device), "precision": tr.precision,
        "sharding": tr.sharding, "ac": cfg.ac, "compile": cfg.compile, "attention": cfg.attention,
        "attention_policy": cfg.attention_policy, "packed": cfg.packed, "compile_mode": cfg.compile_mode,
        "steps": n, "warmup": warm, "mask_batches": pool,
        "ms_per_step": round(ms, 3), "images_per_s": round(cfg.batch_size * n / dt, 2),
        "tflops": round(tflops, 2), "mfu": None if peak is None else round(tflops / (peak * info.world_size), 4),
        "peak_mem_gib": None if mem is None else round(mem, 2),
        "peak_reserved_gib": None if reserved is None else round(reserved, 2),
        "mean_ctx_tokens": round(n_ctx, 1), "mean_tgt_tokens": round(n_tgt, 1),
        "loss_first": values[0] if values else None, "loss_last": values[-1] if values else None,
        "torch": torch.__version__,
    }
    if tr.cuda_graph_trees:  # graphs run without CUDA graphs (all of them on a CPU), and the graphs recorded
        result["cudagraph_skips"] = cudagraph_skips()
        result["cudagraph_recordings"] = cudagraph_recordings(info.device)
    if not all(math.isfinite(v) for v in values):
        result["warning"] = "non-finite loss during the benchmark"
    if info.is_main:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "benchmark.json"), "w") as fh:
            json.dump(result, fh)
            fh.write("\n")
        print(json.dumps(result), flush=True)
    return values


__all__ = ["JEPAModels", "JEPAContainer", "Trainer", "TrainingDiverged", "TrainingOutOfMemory", "out_of_memory_advice",
           "init_weights_from", "build_models", "build_optimizer", "check_masks", "check_resumable",
           "parameters_finite", "micro_batches",
           "param_groups", "set_schedules", "schedule_lengths", "jepa_step_loss", "train", "run_benchmark",
           "resolve_precision", "warmup_steps"]
