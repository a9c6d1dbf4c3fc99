"""The I-JEPA + StoP training step and a single-process training loop.

One step (as in the official code):
    targets = gather(LayerNorm(target_encoder(imgs)), masks_pred)          (no grad)
    z       = predictor(encoder(imgs, masks_enc), masks_enc, masks_pred)  (StoP noise inside)
    loss    = smooth_l1(z, targets); AdamW step; target ← EMA(encoder)
"""
from __future__ import annotations

import copy
import json
import os
import time
from contextlib import nullcontext
from typing import Dict, List, NamedTuple

import torch
from torch.utils.data import DataLoader

from .. import reference
from ..data import MultiBlockMaskCollator, SyntheticImages
from ..models import predictor_for, vit_encoder
from .config import TrainConfig
from .ema import ema_update
from .schedules import lr_at, momentum_at, wd_at


class JEPAModels(NamedTuple):
    encoder: torch.nn.Module
    predictor: torch.nn.Module
    target_encoder: torch.nn.Module


def build_models(cfg: TrainConfig) -> JEPAModels:
    encoder = vit_encoder(cfg.model, img_size=cfg.img_size, patch_size=cfg.patch_size)
    predictor = predictor_for(encoder, img_size=cfg.img_size, patch_size=cfg.patch_size,
                              predictor_embed_dim=cfg.pred_emb_dim, depth=cfg.pred_depth,
                              noise_mode=cfg.noise_mode, noise_std=cfg.noise_std)
    target = copy.deepcopy(encoder)
    for p in target.parameters():
        p.requires_grad_(False)
    return JEPAModels(encoder, predictor, target)


def param_groups(*modules: torch.nn.Module) -> List[Dict]:
    """AdamW groups: biases and 1-D parameters (LayerNorm) get no weight decay (``WD_exclude``)."""
    decay, no_decay = [], []
    for m in modules:
        for name, p in m.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "WD_exclude": True, "weight_decay": 0.0}]


def set_schedules(opt: torch.optim.Optimizer, cfg: TrainConfig, step: int, total: int, warmup: int):
    lr = lr_at(step, warmup=warmup, total=total, start_lr=cfg.start_lr, ref_lr=cfg.lr, final_lr=cfg.final_lr)
    wd = wd_at(step, total=total, ref_wd=cfg.weight_decay, final_wd=cfg.final_weight_decay)
    for g in opt.param_groups:
        g["lr"] = lr
        if not g.get("WD_exclude", False):
            g["weight_decay"] = wd
    return lr, wd, momentum_at(step, total=total, start=cfg.ema_start, end=cfg.ema_end)


def jepa_step_loss(models: JEPAModels, imgs: torch.Tensor, masks_enc, masks_pred, autocast) -> torch.Tensor:
    """Forward of one I-JEPA+StoP step; returns the loss (backward is the caller's)."""
    with autocast:
        with torch.no_grad():
            h = reference.target_features(models.target_encoder(imgs), masks_pred)
        z = models.encoder(imgs, masks_enc)
        z = models.predictor(z, masks_enc, masks_pred)
        return reference.jepa_loss(z.float(), h.float())


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' requested but no CUDA GPU is visible")
    return torch.device(cfg.device)


def train(cfg: TrainConfig) -> List[float]:
    """Train single-process on synthetic data; prints progress, writes ``cfg.out/log.jsonl``; returns losses."""
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg)
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    if cfg.data != "synthetic":
        raise ValueError("data: this loop trains on 'synthetic' only; use the full pipeline for folders")
    dataset = SyntheticImages(cfg.synthetic_size, cfg.img_size, seed=cfg.seed)
    collator = MultiBlockMaskCollator(cfg.img_size, cfg.patch_size, cfg.enc_mask_scale, cfg.pred_mask_scale,
                                      cfg.aspect_ratio, npred=cfg.npred, min_keep=cfg.min_keep, seed=cfg.seed)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True, collate_fn=collator,
                        num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(cfg.seed))
    ipe = len(loader)
    total = cfg.steps or cfg.epochs * ipe
    warmup = round(cfg.warmup_epochs * ipe) if not cfg.steps else round(total * cfg.warmup_epochs / max(cfg.epochs, 1))
    models = JEPAModels(*(m.to(device) for m in build_models(cfg)))
    opt = torch.optim.AdamW(param_groups(models.encoder, models.predictor), lr=cfg.start_lr)
    os.makedirs(cfg.out, exist_ok=True)
    losses: List[float] = []
    step, epoch, t0 = 0, 0, time.perf_counter()
    print(f"training {cfg.model} (img {cfg.img_size}, patch {cfg.patch_size}, noise {cfg.noise_mode} "
          f"σ={cfg.noise_std}) on {device} [{precision}] for {total} steps, batch {cfg.batch_size}", flush=True)
    with open(os.path.join(cfg.out, "log.jsonl"), "w") as log:
        while step < total:
            collator.set_epoch(epoch)
            for imgs, masks_enc, masks_pred in loader:
                if step >= total:
                    break
                imgs = imgs[0].to(device, non_blocking=True)
                masks_enc = [m.to(device) for m in masks_enc]
                masks_pred = [m.to(device) for m in masks_pred]
                lr, wd, mom = set_schedules(opt, cfg, step, total, warmup)
                loss = jepa_step_loss(models, imgs, masks_enc, masks_pred, autocast)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at step {step}; stopping")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                ema_update(models.target_encoder.parameters(), models.encoder.parameters(), mom)
                losses.append(loss.item())
                dt = time.perf_counter() - t0
                rec = {"step": step, "epoch": epoch, "loss": losses[-1], "lr": lr, "wd": wd, "momentum": mom,
                       "images_per_s": (step + 1) * cfg.batch_size / dt}
                log.write(json.dumps(rec) + "\n")
                if step % cfg.log_every == 0 or step == total - 1:
                    print(f"step {step:5d}/{total}  loss {rec['loss']:.4f}  lr {lr:.2e}  wd {wd:.3f}  "
                          f"mom {mom:.4f}  {rec['images_per_s']:.1f} img/s", flush=True)
                step += 1
            epoch += 1
    n = max(1, min(10, len(losses) // 4))
    print(f"done: mean loss of the first {n} steps {sum(losses[:n]) / n:.4f}, "
          f"of the last {n} steps {sum(losses[-n:]) / n:.4f}", flush=True)
    return losses
