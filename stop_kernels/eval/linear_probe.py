"""Linear probe of a frozen I-JEPA / StoP encoder on an ImageNet-layout folder.

    python -m stop_kernels.eval.linear_probe --checkpoint CKPT --data DIR [--subset 1percent.txt]
        [--model vit_h --patch-size 14 --img-size 224] [--encoder target|context] [--last-k 1]
        [--cache-dir DIR] [--batch-size 128] [--device auto] [--out result.json]
        [--protocol project|official [--lambd 0.00025]]

``--protocol project`` (the default) is described below; ``--protocol official`` reproduces StoP's
``logistic_eval.py`` instead (its transform, fp32 features, :func:`official_normalise`, and its objective
minimised by :func:`fit_logistic_regression` without an intercept, see :func:`run_probe`).

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
import numbers
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import _checks as chk
from . import features as feat

DEFAULT_PENALTIES = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4, 1e-5, 0.0)
DEFAULT_HELDOUT, DEFAULT_MAX_ITER = 0.2, 200
# --protocol official: logistic_eval.py's --lambd default (its README's command passes 0.0025); the relative
# suboptimality the fit is certified to (cyanure stops at 1e-3 or after 100 epochs); L-BFGS iterations at most
OFFICIAL_LAMBD, OFFICIAL_RTOL, OFFICIAL_MAX_ITER = 0.00025, 1e-6, 1000
RTOL_CHECK_EVERY = 10  # L-BFGS iterations between two evaluations of the suboptimality bound


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
    if heldout is not None and not chk.is_number(heldout):
        raise TypeError(f"--heldout: expected a number, got {heldout!r}")
    if heldout is not None and not 0 < heldout < 1:
        raise ValueError(f"--heldout: expected a fraction in (0, 1), got {heldout}")
    if max_iter is not None and (not chk.is_int(max_iter) or max_iter < 1):
        raise ValueError(f"--max-iter: expected an integer >= 1, got {max_iter!r}")
    if penalties is not None and not all(chk.is_number(p) for p in penalties):
        raise TypeError(f"--penalties: expected numbers, got {list(penalties)!r}")
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


def logistic_objective(x: torch.Tensor, y: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor],
                       penalty: float, *, chunk: int = 65536) -> float:
    """``f(W, b) = (1/N) Σᵢ CE(xᵢ Wᵀ + b, yᵢ) + penalty/2 · ‖W‖²_F`` for ``x [N, E]``, ``y [N]``, ``W [C, E]``,
    ``b [C]`` (``None``: no intercept), computed ``chunk`` rows at a time.

    Where ``W`` (``b``) requires grad, ``∇f`` is accumulated into its ``.grad``, one backward per chunk (the
    graph of a whole split is never held). Returns ``f``."""
    chk.int_at_least("chunk", chunk, 1)  # (a chunk below 1 would sum no row: f would be the penalty alone)
    N = x.shape[0]
    total = 0.0
    for s in range(0, N, chunk):
        logits = x[s:s + chunk] @ W.t()
        loss = F.cross_entropy(logits if b is None else logits + b, y[s:s + chunk], reduction="sum") / N
        if loss.requires_grad:
            loss.backward()
        total += loss.item()
    reg = 0.5 * penalty * W.pow(2).sum()
    if reg.requires_grad:
        reg.backward()
    return total + reg.item()


def relative_gap_bound(x: torch.Tensor, y: torch.Tensor, W: torch.Tensor, penalty: float, *,
                       chunk: int = 65536) -> float:
    """An upper bound on ``(f(W) − f*) / f(W)`` for :func:`logistic_objective` without an intercept and with
    ``penalty`` > 0: ``f`` is then ``penalty``-strongly convex, so ``f(W) − f* ≤ ‖∇f(W)‖²_F / (2·penalty)``.
    (The same relative suboptimality that cyanure's ``tol`` bounds with its duality gap.)"""
    if not (chk.is_number(penalty) and penalty > 0):
        raise ValueError(f"penalty: the bound needs a penalty > 0 (strong convexity), got {penalty!r}")
    Wg = W.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        f = logistic_objective(x, y, Wg, None, penalty, chunk=chunk)
    return Wg.grad.pow(2).sum().item() / (2 * penalty) / f


def fit_logistic_regression(x: torch.Tensor, y: torch.Tensor, num_classes: int, penalty: float, *,
                            max_iter: int = DEFAULT_MAX_ITER, chunk: int = 65536,
                            init: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, fit_intercept: bool = True,
                            rtol: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Minimise ``mean CE(x Wᵀ + b, y) + penalty/2 · ‖W‖²`` (:func:`logistic_objective`) with L-BFGS (strong
    Wolfe line search), in ``x``'s dtype.

    Args:
        x: ``[N, E]`` float features; y: ``[N]`` int64 labels in ``[0, num_classes)``.
        penalty: the L2 coefficient λ ≥ 0 (the bias is not penalised).
        max_iter: L-BFGS iterations at most.
        chunk: rows per forward/backward chunk (memory bound for large N).
        init: optional ``(W [C, E], b [C])`` warm start (``b`` zero without an intercept).
        fit_intercept: ``False`` fixes ``b = 0``.
        rtol: without it, L-BFGS stops when every gradient entry is below 1e-6 (or on no change). With it
            (needs ``fit_intercept=False`` and ``penalty > 0``), it runs until :func:`relative_gap_bound` is at
            most ``rtol``, i.e. ``f(W) − f* ≤ rtol · f(W)`` is certified, or ``max_iter`` iterations, or no further
            progress at ``x``'s precision (float64 reaches 1e-6; float32 can stall orders of magnitude above).
    Returns:
        ``(W [C, E], b [C])`` in ``x``'s dtype on its device.
    """
    check_labelled_features(x, y, num_classes)
    check_classifier_settings(max_iter=max_iter, penalties=[penalty])
    chk.int_at_least("chunk", chunk, 1)
    if rtol is not None and (fit_intercept or not penalty > 0 or not 0 < rtol < 1):
        raise ValueError(f"rtol: needs fit_intercept=False and penalty > 0 (the bound needs strong convexity in "
                         f"every parameter) and a value in (0, 1); got rtol={rtol}, penalty={penalty}, "
                         f"fit_intercept={fit_intercept}")
    N, E = x.shape
    if init is not None and (len(init) != 2 or tuple(init[0].shape) != (num_classes, E)
                             or tuple(init[1].shape) != (num_classes,)):
        raise ValueError(f"init: expected W [{num_classes}, {E}] and b [{num_classes}], got "
                         f"{[tuple(t.shape) for t in init]}")
    if init is not None and not fit_intercept and bool(init[1].ne(0).any()):
        raise ValueError("init: b must be zero with fit_intercept=False")
    W = torch.zeros(num_classes, E, device=x.device, dtype=x.dtype) if init is None else init[0].to(x).clone()
    b = torch.zeros(num_classes, device=x.device, dtype=x.dtype) if init is None else init[1].to(x).clone()
    W.requires_grad_(True)
    b.requires_grad_(fit_intercept)
    per_step = max_iter if rtol is None else min(max_iter, RTOL_CHECK_EVERY)
    opt = torch.optim.LBFGS([W, b] if fit_intercept else [W], lr=1.0, max_iter=per_step, history_size=20,
                            line_search_fn="strong_wolfe",
                            # with rtol, the certificate alone decides when to stop
                            tolerance_grad=1e-6 if rtol is None else 0.0,
                            tolerance_change=1e-9 if rtol is None else 0.0)

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=False)
        # in x's dtype: a float32 loss ends a float64 fit where the line search can no longer see f decrease
        f = logistic_objective(x, y, W, b if fit_intercept else None, penalty, chunk=chunk)
        return torch.tensor(f, dtype=x.dtype)

    with torch.enable_grad():
        if rtol is None:
            opt.step(closure)
        else:
            done = 0
            while done < max_iter and relative_gap_bound(x, y, W, penalty, chunk=chunk) > rtol:
                opt.param_groups[0]["max_iter"] = min(per_step, max_iter - done)
                before = W.detach().clone()
                opt.step(closure)
                done = opt.state[W]["n_iter"]
                if torch.equal(before, W.detach()):  # no descent direction left at x's precision
                    break
    return W.detach(), b.detach()


def official_normalise(train: torch.Tensor, val: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The feature normalisation of StoP's ``logistic_eval.py``, for ``train [N, E]`` and ``val [M, E]``
    (float64 out):

    1. each split is standardised by its own column mean and unbiased std (torch's default there):
       ``z = (x − mean) / std``, the val split by val statistics;
    2. both are multiplied by the same ``Q [E, E]`` whose columns are the eigenvectors of ``z_trainᵀ z_train``
       by descending eigenvalue (the training features' PCA basis; no whitening, all E components kept).

    The script's own matrix differs: ``v[argsort(e)]`` on ``torch.eig``'s output permutes the rows of an
    eigenvector matrix whose column order is LAPACK's. With distinct eigenvalues (more training images than
    features, as in the 1 % protocol) that matrix is orthogonal as well, and the official objective (L2 penalty,
    no intercept) is invariant under an orthogonal change of the features (``W → W Q``: same logits, same ‖W‖):
    the minimiser's predictions and the optimal value do not depend on which orthogonal ``Q`` is used.
    """
    chk.float_tensor("train", train, ndim=2)
    chk.float_tensor("val", val, ndim=2)
    if val.shape[1] != train.shape[1]:
        raise ValueError(f"val: expected {train.shape[1]} features (as train), got shape {tuple(val.shape)}")
    out = []
    for name, t in (("train", train), ("val", val)):
        if t.shape[0] < 2:
            raise ValueError(f"--protocol official: the {name} split has a single image; the official "
                             f"normalisation divides by each feature's standard deviation within the split")
        t = t.double()
        std = t.std(0)
        if not bool((std > 0).all()):
            raise ValueError(f"--protocol official: a feature of the {name} split has zero standard deviation; "
                             f"the official normalisation divides by it")
        out.append((t - t.mean(0)) / std)
    eigvals, eigvecs = torch.linalg.eigh(out[0].T @ out[0])  # (symmetric: orthonormal eigenvectors)
    rotation = eigvecs[:, torch.argsort(eigvals, descending=True)]
    return out[0] @ rotation, out[1] @ rotation


@torch.no_grad()
def accuracy(W: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor, chunk: int = 65536) -> float:
    """Top-1 accuracy of the linear classifier ``x Wᵀ + b`` (``W [C, E]``, ``b [C]``) on ``(x [N, E], y [N])``."""
    check_labelled_features(x, y)
    chk.int_at_least("chunk", chunk, 1)
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
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):  # (numpy ints too)
        raise TypeError(f"seed: expected an integer, got {seed!r}")
    g = torch.Generator().manual_seed(int(seed))
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

    Each penalty's classifier is fitted from zero, as the final refit on all the training features is: a penalty's
    held-out score is then that of the procedure that makes the probe's classifier. (Warm-started along the
    penalties, a weak penalty's fit had the stronger ones' iterations behind it and scored what the refit from
    zero, within ``max_iter``, does not reach.) Returns ``(best penalty, {str(penalty): held-out accuracy})``; ties
    go to the larger penalty.
    """
    check_labelled_features(x, y, num_classes)
    check_classifier_settings(penalties=penalties)
    fit_idx, held_idx = stratified_split(y, heldout, seed)
    fit_idx, held_idx = fit_idx.to(x.device), held_idx.to(x.device)
    xf, xh = standardise(x[fit_idx], x[held_idx])
    yf, yh = y[fit_idx], y[held_idx]
    scores: Dict[str, float] = {}
    best, best_acc = None, -1.0
    for lam in sorted(penalties, reverse=True):
        W, b = fit_logistic_regression(xf, yf, num_classes, lam, max_iter=max_iter)
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
              device: str = "auto", workers: Optional[int] = None, penalties: Optional[Sequence[float]] = None,
              heldout: Optional[float] = None, max_iter: Optional[int] = None, seed: int = 0,
              out: Optional[str] = None, verbose: bool = True, protocol: str = "project",
              lambd: Optional[float] = None) -> Dict:
    """Linear-probe ``checkpoint`` on ``data/train`` (optionally ``subset``) and ``data/val``.

    ``protocol='project'``: standardised features (training statistics), the L2 penalty chosen among
    ``penalties`` (default :data:`DEFAULT_PENALTIES`) on a ``heldout`` part (0.2) of the training split, an
    intercept; ``max_iter`` 200.
    ``protocol='official'`` (StoP's ``logistic_eval.py``): its transform, fp32 features,
    :func:`official_normalise`, then its classifier's objective, cyanure's ``MultiClassifier(loss=
    'multiclass-logistic', penalty='l2', fit_intercept=False)`` fitted with ``lambd / N`` (N training images),
    ``(1/N) Σᵢ CE(xᵢ Wᵀ, yᵢ) + (lambd/N)/2 · ‖W‖²_F``, minimised in float64 until ``f − f* ≤ 1e-6 · f`` is
    certified (:func:`relative_gap_bound`; ``max_iter`` 1000 at most). ``lambd`` (default
    :data:`OFFICIAL_LAMBD`) belongs to this protocol only, ``penalties`` and ``heldout`` to the other.

    Returns the result dict (also written to ``out`` as JSON when given): ``top1`` on val, the ``protocol``,
    the ``penalty`` used (chosen, or ``lambd / N``), the held-out sweep (project) or ``lambd`` and the
    certified ``relative_gap_bound`` (official), sizes, the encoder's inferred sizes and the cache files.
    """
    log = (lambda *a: print(*a, flush=True)) if verbose else (lambda *a: None)
    t0 = time.perf_counter()
    chk.choice("--protocol", protocol, feat.PROTOCOLS)
    official = protocol == "official"
    if official:
        for flag, value in (("--penalties", penalties), ("--heldout", heldout)):
            if value is not None:
                raise ValueError(f"{flag}: only with --protocol project (--protocol official fits one fixed --lambd)")
        lambd = chk.non_negative("--lambd", OFFICIAL_LAMBD if lambd is None else lambd)
        if lambd == 0:  # without a penalty the minimiser need not exist (separable features) nor be unique
            raise ValueError("--lambd: expected a finite value > 0, got 0")
        max_iter = OFFICIAL_MAX_ITER if max_iter is None else max_iter
    else:
        if lambd is not None:
            raise ValueError("--lambd: only with --protocol official (--protocol project chooses the penalty "
                             "among --penalties)")
        penalties = DEFAULT_PENALTIES if penalties is None else penalties
        heldout = DEFAULT_HELDOUT if heldout is None else heldout
        max_iter = DEFAULT_MAX_ITER if max_iter is None else max_iter
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
    if not official and len(train_samples) == len(train_labels):  # (the official protocol holds nothing out)
        raise ValueError(SINGLE_IMAGE_CLASSES)
    dev = feat.resolve_device(device)
    workers = (min(8, os.cpu_count() or 1) if dev.type == "cuda" else 0) if workers is None else workers
    cache_dir = cache_dir or feat.default_cache_dir()
    feat.check_cache_dir(cache_dir)  # before the encoder is loaded and any split extracted

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
    settings = {"encoder": encoder, "num_heads": info.num_heads, "precision": feat.feature_precision(protocol, dev)}
    common = dict(checkpoint=checkpoint_id, img_size=s.img_size, settings=settings, cache_dir=cache_dir,
                  batch_size=batch_size, device=str(dev), last_k=last_k, workers=workers, progress=verbose,
                  protocol=protocol)
    held = [enc]  # released once both splits have their features (ViT-H weights are large)
    del enc
    x_tr, y_tr, tr_path, tr_hit = feat.cached_features(lambda: held[0], split="train", split_dir=train_dir,
                                                       samples=train_samples, **common)
    x_va, y_va, va_path, va_hit = feat.cached_features(lambda: held[0], split="val", split_dir=val_dir,
                                                       samples=val_samples, **common)
    held.clear()

    x_tr, y_tr, x_va, y_va = (t.to(dev) for t in (x_tr, y_tr, x_va, y_va))
    C = len(classes)
    scores, gap = None, None
    if official:
        xs_tr, xs_va = official_normalise(x_tr, x_va)
        best = lambd / len(xs_tr)  # the script's `lambd /= len(embs)`, then cyanure's (lambd/2)·‖W‖²
        log(f"official classifier: lambd {lambd:g} / {len(xs_tr)} images, no intercept ({x_tr.shape[1]} dims)")
        W, b = fit_logistic_regression(xs_tr, y_tr, C, best, max_iter=max_iter, fit_intercept=False,
                                       rtol=OFFICIAL_RTOL)
        gap = relative_gap_bound(xs_tr, y_tr, W, best)
        if gap > OFFICIAL_RTOL:
            log(f"warning: the fit stopped with (f - f*)/f <= {gap:.1e} certified, above {OFFICIAL_RTOL:g} "
                f"(--max-iter {max_iter} reached, or no progress left)")
    else:
        log(f"penalty sweep on a {heldout:.0%} held-out part of the training features ({x_tr.shape[1]} dims)")
        best, scores = sweep_logistic_regression(x_tr, y_tr, C, penalties, heldout=heldout, max_iter=max_iter,
                                                 seed=seed, log=log)
        xs_tr, xs_va = standardise(x_tr, x_va)
        W, b = fit_logistic_regression(xs_tr, y_tr, C, best, max_iter=max_iter)
    top1 = accuracy(W, b, xs_va, y_va)
    train_acc = accuracy(W, b, xs_tr, y_tr)
    result = {
        "top1": top1, "train_top1": train_acc, "protocol": protocol, "penalty": best, "heldout_top1": scores,
        "lambd": lambd, "relative_gap_bound": gap,
        "num_train": len(train_samples), "num_val": len(val_samples), "num_classes": C,
        "checkpoint": os.path.abspath(checkpoint), "data": os.path.abspath(data),
        "subset": os.path.abspath(subset) if subset else None, "encoder": encoder, "last_k": last_k,
        "model": info.model, "embed_dim": s.embed_dim, "depth": s.depth, "num_heads": info.num_heads,
        "patch_size": s.patch_size, "img_size": s.img_size, "device": str(dev),
        "cache": {"train": tr_path, "val": va_path, "train_hit": tr_hit, "val_hit": va_hit},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log(f"top-1 {100 * top1:.2f}% on {len(val_samples)} val images (train {100 * train_acc:.2f}%, "
        f"penalty {best:g}, protocol {protocol})")
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
    p.add_argument("--workers", type=int, help="data-loader workers (default min(8, CPU cores) on GPU, 0 on CPU)")
    p.add_argument("--protocol", default="project", choices=feat.PROTOCOLS,
                   help="project (default): this project's evaluation; official: StoP's logistic_eval.py (its "
                        "transform, fp32 features, per-split standardisation and PCA rotation, cyanure's objective "
                        "with a fixed --lambd and no intercept); see docs/evaluation.md")
    p.add_argument("--lambd", type=float,
                   help=f"--protocol official only: logistic_eval.py's --lambd, divided by the number of training "
                        f"images (default {OFFICIAL_LAMBD:g}, the script's; its README's command passes 0.0025)")
    p.add_argument("--penalties",
                   help="--protocol project only: comma-separated L2 penalties to sweep (default "
                        + ",".join(f"{v:g}" for v in DEFAULT_PENALTIES) + ")")
    p.add_argument("--heldout", type=float,
                   help=f"--protocol project only: fraction of train held out for the sweep "
                        f"(default {DEFAULT_HELDOUT})")
    p.add_argument("--max-iter", type=int, help=f"L-BFGS iterations per fit (default {DEFAULT_MAX_ITER}; "
                                                f"--protocol official: at most {OFFICIAL_MAX_ITER})")
    p.add_argument("--seed", type=int, default=0, help="of the held-out split (--protocol project)")
    p.add_argument("--out", default="linear_probe.json", help="result JSON (default ./linear_probe.json)")
    p.add_argument("--quiet", action="store_true")
    return p


def parse_penalties(text: Optional[str]) -> Optional[List[float]]:
    if text is None:
        return None
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
              seed=args.seed, out=args.out, verbose=not args.quiet, protocol=args.protocol, lambd=args.lambd)
    return 0


if __name__ == "__main__":
    from stop_kernels._checks import run_command
    run_command(main, "python -m stop_kernels.eval.linear_probe")  # a bad argument or file: one error line, status 2
