"""Linear probe of a frozen I-JEPA / StoP encoder on an ImageNet-layout folder.

    python -m stop_kernels.eval.linear_probe --checkpoint CKPT --data DIR [--subset 1percent.txt]
        [--model vit_h --patch-size 14 --img-size 224] [--encoder target|context] [--last-k 1]
        [--cache-dir DIR] [--batch-size 128] [--device auto] [--out result.json]

1. Features: the frozen encoder's average-pooled last-layer features (or the mean of the last K
   layers' LayerNorm'd outputs) of ``DIR/train`` (restricted to ``--subset``) and ``DIR/val``,
   extracted once (bf16 on GPU, fp32 on CPU) and cached on disk (:mod:`.features`).
2. Classifier: multinomial logistic regression with an L2 penalty on standardised features, fitted
   full-batch with L-BFGS (in torch, chunked so that memory is bounded); the penalty is chosen by a
   sweep on a stratified held-out part of the training split, then the classifier is refitted on the
   whole training split.
3. Top-1 accuracy on ``DIR/val``, printed and written to a JSON file.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import _checks as chk
from . import features as feat

DEFAULT_PENALTIES = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4, 1e-5, 0.0)


# ----------------------------------------------------------------------------------------------
# logistic regression
# ----------------------------------------------------------------------------------------------
def standardise(train: torch.Tensor, *others: torch.Tensor) -> List[torch.Tensor]:
    """Centre and scale every column by the training split's mean and std (``[N, E]`` each)."""
    mean = train.mean(0)
    std = train.std(0, unbiased=False).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


SINGLE_IMAGE_CLASSES = "train split: every class has a single image; no held-out set for the penalty sweep"


def check_classifier_settings(*, heldout: Optional[float] = None, max_iter: Optional[int] = None,
                              penalties: Optional[Sequence[float]] = None) -> None:
    """The classifier settings that are given, each refused by its flag's name: ``heldout`` in (0, 1),
    ``max_iter`` >= 1 (0 iterations return the all-zero classifier), one or more finite penalties >= 0.
    :func:`run_probe` checks them all before any extraction; the functions below check theirs."""
    if heldout is not None and not 0 < heldout < 1:
        raise ValueError(f"--heldout: expected a fraction in (0, 1), got {heldout}")
    if max_iter is not None and (not chk.is_int(max_iter) or max_iter < 1):
        raise ValueError(f"--max-iter: expected an integer >= 1, got {max_iter!r}")
    if penalties is not None and (not penalties or not all(0 <= p < math.inf for p in penalties)):
        raise ValueError(f"--penalties: expected one or more finite values >= 0, got {list(penalties)}")


def check_labelled_features(x: torch.Tensor, y: torch.Tensor, num_classes: Optional[int] = None) -> None:
    """``x [N, E]`` floating features with N >= 1 and ``y [N]`` int64 labels (in ``[0, num_classes)`` when
    given), each refused by its name: a label out of range is an IndexError in ``cross_entropy`` on the CPU and
    a device-side assert, which ends the CUDA context, on a GPU."""
    chk.float_tensor("x", x, ndim=2)
    if x.shape[0] == 0:
        raise ValueError(f"x: expected at least one row, got shape {tuple(x.shape)}")
    chk.tensor("y", y, ndim=1, dtypes=(torch.int64,))
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y: expected {x.shape[0]} labels (one per row of x), got shape {tuple(y.shape)}")
    if num_classes is not None:
        chk.int_at_least("num_classes", num_classes, 1)
        chk.index_tensor("y", y, upper=num_classes, what=f"num_classes {num_classes}")


def fit_logistic_regression(x: torch.Tensor, y: torch.Tensor, num_classes: int, penalty: float, *,
                            max_iter: int = 200, chunk: int = 65536,
                            init: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Minimise ``mean CE(x Wᵀ + b, y) + penalty/2 · ‖W‖²`` with L-BFGS (strong Wolfe line search).

    Args:
        x: ``[N, E]`` float features; y: ``[N]`` int64 labels in ``[0, num_classes)``.
        penalty: the L2 coefficient λ ≥ 0 (the bias is not penalised).
        chunk: rows per forward/backward chunk (memory bound for large N).
        init: optional ``(W [C, E], b [C])`` warm start.
    Returns:
        ``(W [C, E], b [C])`` float32 on ``x``'s device.
    """
    check_labelled_features(x, y, num_classes)
    check_classifier_settings(max_iter=max_iter, penalties=[penalty])
    N, E = x.shape
    if init is not None and (len(init) != 2 or tuple(init[0].shape) != (num_classes, E)
                             or tuple(init[1].shape) != (num_classes,)):
        raise ValueError(f"init: expected W [{num_classes}, {E}] and b [{num_classes}], got "
                         f"{[tuple(t.shape) for t in init]}")
    W = torch.zeros(num_classes, E, device=x.device) if init is None else init[0].clone()
    b = torch.zeros(num_classes, device=x.device) if init is None else init[1].clone()
    W.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=False)
        total = 0.0
        for s in range(0, N, chunk):
            xs, ys = x[s:s + chunk], y[s:s + chunk]
            loss = F.cross_entropy(xs @ W.t() + b, ys, reduction="sum") / N
            loss.backward()
            total += loss.item()
        reg = 0.5 * penalty * W.pow(2).sum()
        reg.backward()
        return torch.tensor(total + reg.item())

    with torch.enable_grad():
        opt.step(closure)
    return W.detach(), b.detach()


@torch.no_grad()
def accuracy(W: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor, chunk: int = 65536) -> float:
    """Top-1 accuracy of the linear classifier ``x Wᵀ + b`` (``W [C, E]``, ``b [C]``) on ``(x [N, E], y [N])``."""
    check_labelled_features(x, y)
    if W.dim() != 2 or W.shape[1] != x.shape[1] or tuple(b.shape) != (W.shape[0],):
        raise ValueError(f"W, b: expected [C, {x.shape[1]}] and [C] (x has {x.shape[1]} features), got "
                         f"{tuple(W.shape)} and {tuple(b.shape)}")
    correct = 0
    for s in range(0, x.shape[0], chunk):
        correct += (x[s:s + chunk] @ W.t() + b).argmax(1).eq(y[s:s + chunk]).sum().item()
    return correct / x.shape[0]


def stratified_split(y: torch.Tensor, frac: float, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(fit, heldout)``: from every class with ≥ 2 samples, ``max(1, round(frac·n))`` (and
    fewer than n) are held out at random."""
    check_classifier_settings(heldout=frac)
    g = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for c in torch.unique(y.cpu()).tolist():
        idx = torch.nonzero(y.cpu() == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = min(max(1, round(frac * len(idx))), len(idx) - 1) if len(idx) >= 2 else 0
        held.append(idx[:k])
        fit.append(idx[k:])
    held_t = torch.cat(held)
    if held_t.numel() == 0:
        raise ValueError(SINGLE_IMAGE_CLASSES)
    return torch.cat(fit).sort().values, held_t.sort().values


def sweep_logistic_regression(x: torch.Tensor, y: torch.Tensor, num_classes: int,
                              penalties: Sequence[float] = DEFAULT_PENALTIES, *, heldout: float = 0.2,
                              max_iter: int = 200, seed: int = 0, log=print) -> Tuple[float, Dict[str, float]]:
    """Choose the L2 penalty on a stratified held-out part of ``(x [N, E], y [N])``.

    Penalties are tried from the largest to the smallest, each warm-started from the previous
    solution. Returns ``(best penalty, {str(penalty): held-out accuracy})``; ties go to the larger penalty.
    """
    check_labelled_features(x, y, num_classes)
    check_classifier_settings(penalties=penalties)
    fit_idx, held_idx = stratified_split(y, heldout, seed)
    fit_idx, held_idx = fit_idx.to(x.device), held_idx.to(x.device)
    xf, xh = standardise(x[fit_idx], x[held_idx])
    yf, yh = y[fit_idx], y[held_idx]
    scores: Dict[str, float] = {}
    best, best_acc, init = None, -1.0, None
    for lam in sorted(penalties, reverse=True):
        W, b = fit_logistic_regression(xf, yf, num_classes, lam, max_iter=max_iter, init=init)
        init = (W, b)
        acc = accuracy(W, b, xh, yh)
        scores[repr(float(lam))] = acc
        log(f"  penalty {lam:g}: held-out top-1 {100 * acc:.2f}% ({len(held_idx)} images)")
        if acc > best_acc:
            best, best_acc = float(lam), acc
    return best, scores


# ----------------------------------------------------------------------------------------------
# the probe
# ----------------------------------------------------------------------------------------------
def run_probe(checkpoint: str, data: str, *, subset: Optional[str] = None, model: Optional[str] = None,
              patch_size: Optional[int] = None, img_size: Optional[int] = None, num_heads: Optional[int] = None,
              encoder: str = "target", last_k: int = 1, cache_dir: Optional[str] = None, batch_size: int = 128,
              device: str = "auto", workers: Optional[int] = None, penalties: Sequence[float] = DEFAULT_PENALTIES,
              heldout: float = 0.2, max_iter: int = 200, seed: int = 0, out: Optional[str] = None,
              verbose: bool = True) -> Dict:
    """Linear-probe ``checkpoint`` on ``data/train`` (optionally ``subset``) and ``data/val``.

    Returns the result dict (also written to ``out`` as JSON when given): ``top1`` on val, the
    chosen ``penalty``, the held-out sweep, sizes, the encoder's inferred sizes and the cache files.
    """
    log = (lambda *a: print(*a, flush=True)) if verbose else (lambda *a: None)
    t0 = time.perf_counter()
    if not os.path.isdir(data):
        raise FileNotFoundError(f"--data: no such folder: {data}")
    train_dir, val_dir = os.path.join(data, "train"), os.path.join(data, "val")
    for d in (train_dir, val_dir):
        if not os.path.isdir(d):
            raise FileNotFoundError(f"--data: no such folder: {d} (expected an ImageNet layout DIR/train/<class>/*, "
                                    "DIR/val/<class>/*)")
    # A run folder means its newest checkpoint, which a running training replaces (and, keep_ckpts, deletes):
    # resolved once, so the encoder and both splits' cache keys are of one checkpoint, taken before any read.
    checkpoint = feat.check_checkpoint_path(checkpoint)
    checkpoint_id = feat.checkpoint_identity(checkpoint)
    # every classifier and loader setting is checked here, before hours of feature extraction
    chk.int_at_least("--last-k", last_k, 1)
    check_classifier_settings(heldout=heldout, max_iter=max_iter, penalties=penalties)
    if out:
        check_writable_file("--out", out)
    if batch_size < 1:
        raise ValueError(f"--batch-size: expected >= 1, got {batch_size}")
    if workers is not None and workers < 0:
        raise ValueError(f"--workers: expected >= 0, got {workers}")
    subset_list = feat.read_subset(subset) if subset else None
    train_samples, classes = feat.list_images(train_dir, subset=subset_list)
    val_samples, _ = feat.list_images(val_dir, classes=classes)
    train_labels = sorted({label for _, label in train_samples})
    if len(train_labels) < 2:  # the classifier could only answer that class: its "top-1" would mean nothing
        where = f"--subset: {subset} lists" if subset else f"--data: {train_dir} has"
        raise ValueError(f"{where} images of a single class ({classes[train_labels[0]]!r}); a linear probe needs "
                         f"training images of two or more classes")
    if len(train_samples) == len(train_labels):
        raise ValueError(SINGLE_IMAGE_CLASSES)
    dev = feat.resolve_device(device)
    workers = (min(8, os.cpu_count() or 1) if dev.type == "cuda" else 0) if workers is None else workers
    cache_dir = cache_dir or feat.default_cache_dir()

    # The encoder is built (and its flags checked) up front: a wrong flag fails before any work,
    # and a cache hit still proves that the checkpoint matches the flags.
    enc, info = feat.load_encoder(checkpoint, which=encoder, model=model, patch_size=patch_size,
                                  img_size=img_size, num_heads=num_heads)
    s = info.sizes
    if last_k > s.depth:
        raise ValueError(f"--last-k: expected 1 … {s.depth} (the encoder's depth), got {last_k}")
    log(f"encoder: {encoder} of {checkpoint} ({info.model or 'custom'}: width {s.embed_dim}, depth {s.depth}, "
        f"heads {info.num_heads}, patch {s.patch_size}, img {s.img_size}); {len(train_samples)} train / "
        f"{len(val_samples)} val images, {len(classes)} classes")
    settings = {"encoder": encoder, "num_heads": info.num_heads,
                "precision": "bf16" if dev.type == "cuda" else "fp32"}
    common = dict(checkpoint=checkpoint_id, img_size=s.img_size, settings=settings, cache_dir=cache_dir,
                  batch_size=batch_size, device=str(dev), last_k=last_k, workers=workers, progress=verbose)
    held = [enc]  # released once both splits have their features (ViT-H weights are large)
    del enc
    x_tr, y_tr, tr_path, tr_hit = feat.cached_features(lambda: held[0], split="train", split_dir=train_dir,
                                                       samples=train_samples, **common)
    x_va, y_va, va_path, va_hit = feat.cached_features(lambda: held[0], split="val", split_dir=val_dir,
                                                       samples=val_samples, **common)
    held.clear()

    x_tr, y_tr, x_va, y_va = (t.to(dev) for t in (x_tr, y_tr, x_va, y_va))
    C = len(classes)
    log(f"penalty sweep on a {heldout:.0%} held-out part of the training features ({x_tr.shape[1]} dims)")
    best, scores = sweep_logistic_regression(x_tr, y_tr, C, penalties, heldout=heldout, max_iter=max_iter,
                                             seed=seed, log=log)
    xs_tr, xs_va = standardise(x_tr, x_va)
    W, b = fit_logistic_regression(xs_tr, y_tr, C, best, max_iter=max_iter)
    top1 = accuracy(W, b, xs_va, y_va)
    train_acc = accuracy(W, b, xs_tr, y_tr)
    result = {
        "top1": top1, "train_top1": train_acc, "penalty": best, "heldout_top1": scores,
        "num_train": len(train_samples), "num_val": len(val_samples), "num_classes": C,
        "checkpoint": os.path.abspath(checkpoint), "data": os.path.abspath(data),
        "subset": os.path.abspath(subset) if subset else None, "encoder": encoder, "last_k": last_k,
        "model": info.model, "embed_dim": s.embed_dim, "depth": s.depth, "num_heads": info.num_heads,
        "patch_size": s.patch_size, "img_size": s.img_size, "device": str(dev),
        "cache": {"train": tr_path, "val": va_path, "train_hit": tr_hit, "val_hit": va_hit},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log(f"top-1 {100 * top1:.2f}% on {len(val_samples)} val images (train {100 * train_acc:.2f}%, "
        f"penalty {best:g})")
    if out:  # atomically: a failed write leaves the previous result, not a torn file
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        chk.write_json_atomic(out, result)
        log(f"wrote {out}")
    return result


def check_writable_file(name: str, path: str) -> None:
    """``path`` can be written at the end of a long run: not a folder, and its folder (or the nearest
    existing folder above it, where the run will create the rest) is writable."""
    full = os.path.abspath(path)
    if os.path.isdir(full):
        raise ValueError(f"{name}: {path} is a folder; expected a file path")
    parent = os.path.dirname(full)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{name}: cannot write {path} ({parent} is not a writable folder)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stop_kernels.eval.linear_probe",
                                description="Linear probe of a frozen I-JEPA / StoP encoder (top-1 on DIR/val).")
    p.add_argument("--checkpoint", required=True,
                   help="official .pth.tar, a training run (its --out folder: the newest complete checkpoint; "
                        "its checkpoints/ or a step_* folder), or an encoder state dict (.safetensors / .pt)")
    p.add_argument("--data", required=True, help="ImageNet-layout folder with train/<class>/* and val/<class>/*")
    p.add_argument("--subset", help="file listing the training images to use (official 1%%-of-labels format)")
    p.add_argument("--model", help="encoder preset (vit_tiny … vit_giant, vit_h style aliases); inferred if omitted")
    p.add_argument("--patch-size", type=int, help="inferred from the weights if omitted")
    p.add_argument("--img-size", type=int, help="inferred from the weights if omitted")
    p.add_argument("--num-heads", type=int, help="only for widths that match no preset")
    p.add_argument("--encoder", default="target", choices=feat.ENCODERS,
                   help="the EMA target encoder (default) or the context encoder")
    p.add_argument("--last-k", type=int, default=1, help="average the pooled features of the last K layers")
    p.add_argument("--cache-dir", help=f"feature cache (default $STOP_KERNELS_CACHE or {feat.default_cache_dir()})")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--workers", type=int, help="data-loader workers (default 8 on GPU, 0 on CPU)")
    p.add_argument("--penalties", default=",".join(f"{v:g}" for v in DEFAULT_PENALTIES),
                   help="comma-separated L2 penalties to sweep")
    p.add_argument("--heldout", type=float, default=0.2, help="fraction of train held out for the sweep")
    p.add_argument("--max-iter", type=int, default=200, help="L-BFGS iterations per fit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="linear_probe.json", help="result JSON (default ./linear_probe.json)")
    p.add_argument("--quiet", action="store_true")
    return p


def parse_penalties(text: str) -> List[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--penalties: expected comma-separated numbers, got {text!r}") from None
    if not vals or any(v < 0 or not math.isfinite(v) for v in vals):
        raise ValueError(f"--penalties: expected non-negative finite numbers, got {text!r}")
    return vals


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    run_probe(args.checkpoint, args.data, subset=args.subset, model=args.model, patch_size=args.patch_size,
              img_size=args.img_size, num_heads=args.num_heads, encoder=args.encoder, last_k=args.last_k,
              cache_dir=args.cache_dir, batch_size=args.batch_size, device=args.device, workers=args.workers,
              penalties=parse_penalties(args.penalties), heldout=args.heldout, max_iter=args.max_iter,
              seed=args.seed, out=args.out, verbose=not args.quiet)
    return 0


if __name__ == "__main__":
    from stop_kernels._checks import run_command
    run_command(main, "python -m stop_kernels.eval.linear_probe")  # a bad argument or file: one error line, status 2
