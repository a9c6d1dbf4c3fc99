"""Property-based tests (hypothesis) of the pure, CPU-side parts of the evaluation and of the data pipeline.

Contracts (docstrings, and ``docs/evaluation.md`` where they point to it):

* ``stop_kernels/eval/linear_probe.py``: ``standardise`` (every column centred and scaled by the training split's
  mean and population std, floored at 1e-6); ``check_classifier_settings`` / ``check_labelled_features`` (each bad
  value refused by its flag's or argument's name); ``logistic_objective`` (``(1/N) Σ CE + λ/2 ‖W‖²``, its gradient
  accumulated into ``.grad``, for any ``chunk``); ``relative_gap_bound`` (``‖∇f‖² / (2λ) / f``, an upper bound on
  ``(f − f*) / f``); ``fit_logistic_regression`` (the penalised optimum, no intercept when asked, certified to
  ``rtol``); ``official_normalise`` (each split by its own mean and unbiased std, then the training PCA basis by
  descending eigenvalue: Gram matrices kept, training columns orthogonal); ``accuracy`` (the argmax hit rate, the
  same for every ``chunk``); ``stratified_split`` (per class ``min(max(1, round(frac·n)), n − 1)`` held out of
  n >= 2, disjoint, covering, sorted, one split per seed); ``sweep_logistic_regression`` (every penalty scored on
  the held-out part, standardised by the fitting part, ties to the larger penalty); ``parse_penalties``,
  ``check_writable_file`` and ``main``'s flag errors (``ValueError`` / ``FileNotFoundError`` naming the flag before
  any extraction).
* ``stop_kernels/eval/features.py``: ``read_subset`` (both line formats, comments, ``./`` and backslashes),
  ``list_images`` (sorted pairs, the given classes' indices, image extensions only), ``eval_transform`` /
  ``ImageList`` (short side ``img·256/224`` bicubic or the official 256/img bilinear, centre crop, ImageNet
  normalisation; the expected tensor made with PIL here), ``check_checkpoint_path`` / ``read_checkpoint`` /
  ``_select_state_dict``, ``cache_key`` (changes with any input, stable otherwise), ``checkpoint_identity``,
  ``check_cache_dir``, ``resolve_device``, ``feature_precision``, ``encode`` (``last_k``: the mean of the last K
  layers' LayerNorm'd pooled outputs, each computed here by a truncated copy of the encoder).
* ``stop_kernels/data``: ``SyntheticImages`` (a function of ``(seed, i)``), ``scan_image_folder`` and
  ``ImageFolderDataset`` (sorted classes, hidden folders skipped, unreadable files substituted by ``i+1, i+2 …``
  mod n and counted, augmentation seeded per (seed, epoch, index) with the global generator untouched),
  ``ResumableDistributedSampler`` (the official sampler's order from ``seed + epoch``, drop-last, resumed at any
  batch), ``SkipCountingCollate``, ``check_transform_args`` / ``make_transforms``, ``stream_seed``.
* ``stop_kernels/models/packing.py``: ``is_ragged``, ``mean_tokens``, ``check_ragged``, ``check_target_blocks``,
  ``predictor_layout`` (sequence ``k·B + b`` is image b's context then its block k; the layout rebuilt here from
  labelled rows).

Every expectation is computed here, independently of the function under test; inputs are fresh random draws;
the examples come from the profile in ``conftest.py``. The example-based tests of the same code are in
``tests/test_linear_probe.py``, ``tests/test_train_data.py``, ``tests/test_data_streams.py`` and
``tests/test_packing.py`` (helpers imported from them). The four defects these properties found (a chunk below 1
scored or fitted nothing, a zero penalty's bare ZeroDivisionError, a string heldout or penalty refused by Python's
comparison naming no flag) are fixed; their reproductions stay at the end as regression tests.
"""
import contextlib
import copy
import math
import os
import re
import string
import tempfile
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import skip_unless_installed

skip_unless_installed("hypothesis", module_level=True)
from hypothesis import assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from stop_kernels.data.datasets import (IMG_EXTENSIONS, ImageFolderDataset, ResumableDistributedSampler,  # noqa: E402
                                        SkipCountingCollate, SyntheticImages, scan_image_folder)
from stop_kernels.data.streams import stream_seed  # noqa: E402
from stop_kernels.eval import features as feat  # noqa: E402
from stop_kernels.eval import linear_probe as lp  # noqa: E402
from stop_kernels.models import packing  # noqa: E402
from stop_kernels.models.vit import VisionTransformer  # noqa: E402
from stop_kernels.training.config import ConfigError  # noqa: E402

from test_linear_probe import official_objective  # noqa: E402
from test_train_data import FOLDERS, make_transforms  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)  # the published ImageNet constants
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
SEEDS = st.integers(0, 2 ** 31 - 1)
NAMES = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=6)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def _tmp():
    with tempfile.TemporaryDirectory() as d:
        yield d


def _touch(path, data=b"x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)


def _ce_sum(x, y, W, b):
    """Σᵢ CE(xᵢWᵀ + b, yᵢ) written out: logsumexp minus the label's logit."""
    z = x @ W.t() + (0 if b is None else b)
    return (torch.logsumexp(z, 1) - z[torch.arange(len(y)), y]).sum()


def _objective(x, y, W, b, lam):
    return _ce_sum(x, y, W, b) / x.shape[0] + 0.5 * lam * W.pow(2).sum()


def _problem(seed, N, E, C, dtype=torch.float64):
    """Features with some class structure (every class present once N >= C) and int64 labels."""
    g = _gen(seed)
    y = torch.randperm(N, generator=g) % C
    x = torch.randn(N, E, generator=g, dtype=dtype) + torch.randn(C, E, generator=g, dtype=dtype)[y]
    return x, y


# ------------------------------------------------------------------------------------------------ linear probe
@settings(max_examples=40)
@given(seed=SEEDS, N=st.integers(1, 12), E=st.integers(1, 5), others=st.lists(st.integers(1, 6), max_size=2),
       dead=st.booleans())
def test_standardise_uses_the_training_columns_mean_and_population_std(seed, N, E, others, dead):
    g = _gen(seed)
    train = torch.randn(N, E, generator=g, dtype=torch.float64) * (torch.rand(E, generator=g, dtype=torch.float64)
                                                                   * 3 + 0.1) + torch.randn(E, generator=g) * 4
    if dead:
        train[:, 0] = 2.5  # a constant column: scaled by the 1e-6 floor, never divided by 0
    rest = [torch.randn(m, E, generator=g, dtype=torch.float64) * 2 - 1 for m in others]
    out = lp.standardise(train, *rest)
    assert len(out) == 1 + len(rest)
    mean = train.sum(0) / N
    std = ((train - mean).pow(2).sum(0) / N).sqrt()
    std = torch.where(std < 1e-6, torch.full_like(std, 1e-6), std)
    for got, t in zip(out, [train, *rest]):
        assert got.shape == t.shape and torch.isfinite(got).all()
        torch.testing.assert_close(got, (t - mean) / std, rtol=1e-9, atol=1e-9)


_BAD_SETTINGS = st.one_of(
    st.tuples(st.just("heldout"), st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0),
                                            st.just(float("nan")))),
    st.tuples(st.just("max_iter"), st.one_of(st.integers(max_value=0), st.floats(1, 50), st.just(True))),
    st.tuples(st.just("penalties"), st.one_of(
        st.just([]), st.lists(st.floats(0, 10), max_size=3).flatmap(
            lambda ok: st.sampled_from([-1e-3, -5.0, math.inf, math.nan]).flatmap(
                lambda bad: st.permutations(ok + [bad]))))))


@settings(max_examples=60)
@given(bad=_BAD_SETTINGS, heldout=st.floats(0.001, 0.999), max_iter=st.integers(1, 10 ** 6),
       penalties=st.lists(st.floats(0, 1e6), min_size=1, max_size=4))
def test_classifier_settings_are_refused_by_their_flags_name(bad, heldout, max_iter, penalties):
    lp.check_classifier_settings(heldout=heldout, max_iter=max_iter, penalties=penalties)  # good values pass
    lp.check_classifier_settings()
    key, value = bad
    kw = {**dict(heldout=heldout, max_iter=max_iter, penalties=penalties), key: value}
    flag = "--" + key.replace("_", "-")
    with pytest.raises(ValueError, match=f"^{flag}: "):
        lp.check_classifier_settings(**kw)


@pytest.mark.parametrize("kind", ["ok", "x_int", "x_1d", "x_empty", "y_int32", "y_float", "y_2d", "y_short", "y_high",
                                  "y_negative", "classes_0"])
@settings(max_examples=6)
@given(seed=SEEDS, N=st.integers(1, 8), E=st.integers(1, 4), C=st.integers(1, 4))
def test_labelled_features_are_checked_by_name(seed, N, E, C, kind):
    g = _gen(seed)
    x, y = torch.randn(N, E, generator=g), torch.randint(0, C, (N,), generator=g)
    C_arg = C
    err, name = {"x_int": (TypeError, "x"), "x_1d": (ValueError, "x"), "x_empty": (ValueError, "x"),
                 "y_int32": (TypeError, "y"), "y_float": (TypeError, "y"), "y_2d": (ValueError, "y"),
                 "y_short": (ValueError, "y"), "y_high": (ValueError, "y"), "y_negative": (ValueError, "y"),
                 "classes_0": (ValueError, "num_classes")}.get(kind, (None, None))
    if kind == "x_int":
        x = x.long()
    elif kind == "x_1d":
        x = x[:, 0]
    elif kind == "x_empty":
        x, y = x[:0], y[:0]
    elif kind == "y_int32":
        y = y.int()
    elif kind == "y_float":
        y = y.float()
    elif kind == "y_2d":
        y = y[:, None]
    elif kind == "y_short":
        y = torch.cat([y, y[:1]])
    elif kind == "y_high":
        y[torch.randint(0, N, (), generator=g)] = C
    elif kind == "y_negative":
        y[torch.randint(0, N, (), generator=g)] = -1
    elif kind == "classes_0":
        C_arg = 0
    if err is None:
        lp.check_labelled_features(x, y, C_arg)
        lp.check_labelled_features(x, y)
        return
    with pytest.raises(err, match=f"^{name}: "):
        lp.check_labelled_features(x, y, C_arg)


@settings(max_examples=40)
@given(seed=SEEDS, N=st.integers(1, 14), E=st.integers(1, 4), C=st.integers(1, 4), chunk=st.integers(1, 16),
       lam=st.floats(0, 2), intercept=st.booleans())
def test_logistic_objective_and_its_gradient_for_any_chunk(seed, N, E, C, chunk, lam, intercept):
    x, y = _problem(seed, N, E, C)
    g = _gen(seed + 1)
    W0, b0 = torch.randn(C, E, generator=g, dtype=torch.float64), torch.randn(C, generator=g, dtype=torch.float64)
    Wr, br = W0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    want = _objective(x, y, Wr, br if intercept else None, lam)
    gW, gb = torch.autograd.grad(want, (Wr, br), allow_unused=True)
    # without grad: the value only
    f = lp.logistic_objective(x, y, W0, b0 if intercept else None, lam, chunk=chunk)
    assert f == pytest.approx(want.item(), rel=1e-10, abs=1e-12)
    W, b = W0.clone().requires_grad_(True), b0.clone().requires_grad_(intercept)
    f2 = lp.logistic_objective(x, y, W, b if intercept else None, lam, chunk=chunk)
    assert f2 == pytest.approx(want.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(W.grad, gW, rtol=1e-9, atol=1e-12)
    if intercept:
        torch.testing.assert_close(b.grad, gb, rtol=1e-9, atol=1e-12)


@settings(max_examples=15)
@given(seed=SEEDS, N=st.integers(3, 16), E=st.integers(1, 3), C=st.integers(2, 3), lam=st.floats(0.05, 1.0),
       scale=st.floats(0.1, 3.0))
def test_relative_gap_bound_is_the_strong_convexity_bound(seed, N, E, C, lam, scale):
    x, y = _problem(seed, N, E, C)
    W = torch.randn(C, E, generator=_gen(seed + 2), dtype=torch.float64) * scale
    Wr = W.clone().requires_grad_(True)
    f = official_objective(x, y, Wr, lam * N)  # its λ is lambd / N
    (grad,) = torch.autograd.grad(f, Wr)
    want = grad.pow(2).sum().item() / (2 * lam) / f.item()
    got = lp.relative_gap_bound(x, y, W, lam, chunk=max(1, N // 2))
    assert got == pytest.approx(want, rel=1e-8)
    # an upper bound on (f(W) - f*) / f(W): any fitted value is >= f*, so the gap to it is smaller still
    Wf, bf = lp.fit_logistic_regression(x, y, C, lam, fit_intercept=False, rtol=1e-9, max_iter=300)
    assert torch.equal(bf, torch.zeros(C, dtype=torch.float64))
    f_fit = official_objective(x, y, Wf, lam * N).item()
    assert f_fit <= f.item() + 1e-12
    assert (f.item() - f_fit) / f.item() <= want * (1 + 1e-6) + 1e-12


@settings(max_examples=10)
@given(seed=SEEDS, N=st.integers(4, 20), E=st.integers(1, 3), C=st.integers(2, 3), lam=st.floats(0.02, 1.0),
       intercept=st.booleans(), chunk=st.integers(1, 7), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_fit_reaches_the_penalised_optimum_for_any_chunk(seed, N, E, C, lam, intercept, chunk, dtype):
    x, y = _problem(seed, N, E, C, dtype)
    W, b = lp.fit_logistic_regression(x, y, C, lam, max_iter=200, chunk=chunk, fit_intercept=intercept)
    assert W.shape == (C, E) and b.shape == (C,) and W.dtype == b.dtype == dtype
    assert not W.requires_grad and not b.requires_grad
    if not intercept:
        assert torch.equal(b, torch.zeros(C, dtype=dtype))
    Wr, br = W.double().requires_grad_(True), b.double().requires_grad_(True)
    gW, gb = torch.autograd.grad(_objective(x.double(), y, Wr, br, lam), (Wr, br))
    tol = 1e-4 if dtype == torch.float64 else 1e-3
    assert gW.abs().max() < tol, gW
    if intercept:
        assert gb.abs().max() < tol, gb
    whole, _ = lp.fit_logistic_regression(x, y, C, lam, max_iter=200, chunk=N, fit_intercept=intercept)
    torch.testing.assert_close(W, whole, rtol=0, atol=10 * tol)


@settings(max_examples=10)
@given(seed=SEEDS, N=st.integers(4, 20), E=st.integers(1, 3), C=st.integers(2, 3), lam=st.floats(0.01, 1.0),
       rtol=st.floats(1e-9, 1e-3))
def test_fit_with_rtol_certifies_the_relative_gap(seed, N, E, C, lam, rtol):
    x, y = _problem(seed, N, E, C)
    W, b = lp.fit_logistic_regression(x, y, C, lam, fit_intercept=False, rtol=rtol, max_iter=500)
    assert torch.equal(b, torch.zeros(C, dtype=torch.float64))
    Wr = W.clone().requires_grad_(True)
    f = official_objective(x, y, Wr, lam * N)
    (grad,) = torch.autograd.grad(f, Wr)
    assert grad.pow(2).sum().item() / (2 * lam) / f.item() <= rtol


@pytest.mark.parametrize("kind", ["rtol_intercept", "rtol_zero_penalty", "rtol_one", "rtol_zero", "init_W", "init_b",
                                  "init_len", "init_b_nonzero", "max_iter", "penalty"])
@settings(max_examples=3)
@given(seed=SEEDS)
def test_fit_arguments_are_refused_by_name(seed, kind):
    x, y = _problem(seed, 6, 3, 2)
    g = _gen(seed)
    kw = dict(max_iter=3)
    name = "rtol"
    if kind == "rtol_intercept":
        kw.update(rtol=1e-3, fit_intercept=True)
    elif kind == "rtol_zero_penalty":
        kw.update(rtol=1e-3, fit_intercept=False)
    elif kind in ("rtol_one", "rtol_zero"):
        kw.update(rtol=1.0 if kind == "rtol_one" else 0.0, fit_intercept=False)
    elif kind.startswith("init"):
        name = "init"
        W, b = torch.randn(2, 3, generator=g), torch.randn(2, generator=g)
        kw["init"] = {"init_W": (W[:, :2], b), "init_b": (W, b[:1]), "init_len": (W,),
                      "init_b_nonzero": (W, b)}[kind]
        if kind == "init_b_nonzero":
            kw["fit_intercept"] = False
    elif kind == "max_iter":
        name, kw["max_iter"] = "--max-iter", 0
    else:
        name = "--penalties"
    lam = 0.0 if kind == "rtol_zero_penalty" else (-0.5 if kind == "penalty" else 0.1)
    with pytest.raises(ValueError, match=f"^{name}: "):
        lp.fit_logistic_regression(x, y, 2, lam, **kw)


@settings(max_examples=30)
@given(seed=SEEDS, E=st.integers(1, 4), extra=st.integers(2, 8), M=st.integers(2, 6),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_official_normalise_standardises_each_split_and_rotates_by_the_training_pca(seed, E, extra, M, dtype):
    g = _gen(seed)
    N = E + extra
    train = (torch.randn(N, E, generator=g, dtype=torch.float64) * (torch.rand(E, generator=g) + 0.5).double()
             + torch.randn(E, generator=g).double() * 3).to(dtype)
    val = (torch.randn(M, E, generator=g, dtype=torch.float64) * 2 + 1).to(dtype)
    a, b = lp.official_normalise(train, val)
    assert a.dtype == b.dtype == torch.float64 and a.shape == (N, E) and b.shape == (M, E)

    def z(t):
        t = t.double()
        m = t.sum(0) / len(t)
        return (t - m) / ((t - m).pow(2).sum(0) / (len(t) - 1)).sqrt()
    zt, zv = z(train), z(val)
    # an orthogonal change of basis keeps every inner product, within and across the splits
    torch.testing.assert_close(a @ a.T, zt @ zt.T, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(b @ a.T, zv @ zt.T, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(b @ b.T, zv @ zv.T, rtol=1e-7, atol=1e-8)
    # the training PCA basis: orthogonal columns of variance = the eigenvalues of zᵀz, largest first
    G = a.T @ a
    eig = np.sort(np.linalg.eigvalsh((zt.T @ zt).numpy()))[::-1].copy()
    torch.testing.assert_close(torch.diagonal(G), torch.from_numpy(eig), rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(G - torch.diag(torch.diagonal(G)), torch.zeros(E, E, dtype=torch.float64),
                               rtol=0, atol=1e-7 * max(1.0, eig[0]))


@pytest.mark.parametrize("kind", ["one_train", "one_val", "dead_train", "dead_val", "width", "int"])
@settings(max_examples=4)
@given(seed=SEEDS, E=st.integers(1, 3))
def test_official_normalise_refuses_what_it_cannot_divide_by(seed, E, kind):
    g = _gen(seed)
    train, val = torch.randn(E + 3, E, generator=g), torch.randn(4, E, generator=g)
    err, match = ValueError, "^--protocol official: "
    if kind == "one_train":
        train = train[:1]
    elif kind == "one_val":
        val = val[:1]
    elif kind == "dead_train":
        train[:, -1] = 0.7
    elif kind == "dead_val":
        val[:, 0] = -1.5
    elif kind == "width":
        val, match = torch.randn(4, E + 1, generator=g), "^val: "
    else:
        train, err, match = train.long(), TypeError, "^train: "
    with pytest.raises(err, match=match):
        lp.official_normalise(train, val)


@settings(max_examples=60)
@given(seed=SEEDS, N=st.integers(1, 30), E=st.integers(1, 4), C=st.integers(1, 5), chunk=st.integers(1, 35))
def test_accuracy_is_the_argmax_hit_rate_for_any_chunk(seed, N, E, C, chunk):
    g = _gen(seed)
    x, W, b = torch.randn(N, E, generator=g), torch.randn(C, E, generator=g), torch.randn(C, generator=g)
    logits = [[float(sum(x[i, e] * W[c, e] for e in range(E)) + b[c]) for c in range(C)] for i in range(N)]
    pred = [max(range(C), key=lambda c: row[c]) for row in logits]
    right = torch.rand(N, generator=g) < 0.5  # half the labels are the prediction, the others drawn at random
    y = torch.tensor([pred[i] if right[i] else int(torch.randint(0, C, (), generator=g)) for i in range(N)])
    want = sum(int(pred[i] == int(y[i])) for i in range(N)) / N
    assert lp.accuracy(W, b, x, y, chunk=chunk) == want
    assert lp.accuracy(W, b, x, y) == want


@settings(max_examples=80)
@given(counts=st.lists(st.integers(1, 12), min_size=1, max_size=6), frac=st.floats(0.01, 0.99), seed=SEEDS,
       labels_seed=SEEDS)
def test_stratified_split_holds_out_every_class_share(counts, frac, seed, labels_seed):
    g = _gen(labels_seed)
    classes = torch.randperm(20, generator=g)[:len(counts)]  # any label values, not 0 … C-1
    y = torch.cat([torch.full((n,), int(c)) for n, c in zip(counts, classes)])
    y = y[torch.randperm(len(y), generator=g)]
    if all(n == 1 for n in counts):
        with pytest.raises(ValueError, match="every class has a single image"):
            lp.stratified_split(y, frac, seed)
        return
    fit, held = lp.stratified_split(y, frac, seed)
    assert fit.dtype == held.dtype == torch.int64
    f, h = fit.tolist(), held.tolist()
    assert f == sorted(set(f)) and h == sorted(set(h))  # sorted, no repeats
    assert not set(f) & set(h) and sorted(f + h) == list(range(len(y)))
    for n, c in zip(counts, classes):
        k = min(max(1, round(frac * n)), n - 1) if n >= 2 else 0
        assert int((y[held] == c).sum()) == k and int((y[fit] == c).sum()) == n - k
    again = lp.stratified_split(y, frac, seed)
    assert torch.equal(again[0], fit) and torch.equal(again[1], held)


@settings(max_examples=30)
@given(n=st.integers(4, 12), frac=st.floats(0.2, 0.8), seed=SEEDS, other=st.integers(1, 5))
def test_stratified_split_draws_the_held_out_part_at_random_per_seed(n, frac, seed, other):
    """A class of n >= 4 images: twelve seeds do not all hold out the same images, and the first one is not
    always the held-out one (no fixed order)."""
    y = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(other, dtype=torch.long)])
    helds = {tuple(lp.stratified_split(y, frac, seed + s)[1][:-1 if other >= 2 else None].tolist())
             for s in range(12)}
    helds = {tuple(i for i in h if i < n) for h in helds}
    assert len(helds) >= 2


@settings(max_examples=8)
@given(seed=SEEDS, C=st.integers(2, 3), per=st.integers(5, 9), E=st.integers(1, 3),
       penalties=st.lists(st.sampled_from([0.0, 1e-3, 1e-2, 0.1, 1.0, 10.0]), min_size=1, max_size=3, unique=True),
       heldout=st.floats(0.2, 0.5), split_seed=st.integers(0, 5))
def test_sweep_scores_each_penalty_on_the_held_out_part(seed, C, per, E, penalties, heldout, split_seed):
    x, y = _problem(seed, C * per, E, C)
    x = x * 5 + 3  # far from standardised: the sweep must standardise (by the fitting part)
    fits, real = [], lp.fit_logistic_regression

    def record(xf, yf, num_classes, lam, **kw):
        W, b = real(xf, yf, num_classes, lam, **kw)
        fits.append((xf, yf, lam, W, b))
        return W, b
    with mock.patch.object(lp, "fit_logistic_regression", record):
        best, scores = lp.sweep_logistic_regression(x, y, C, penalties, heldout=heldout, max_iter=15, seed=split_seed,
                                                    log=lambda *a: None)
    fit_idx, held_idx = lp.stratified_split(y, heldout, split_seed)
    mean = x[fit_idx].mean(0)
    std = ((x[fit_idx] - mean).pow(2).mean(0)).sqrt()
    xh = (x[held_idx] - mean) / std
    assert [lam for *_, lam, _, _ in fits] == sorted(penalties, reverse=True)
    assert set(scores) == {repr(float(p)) for p in penalties}
    for xf, yf, lam, W, b in fits:
        torch.testing.assert_close(xf, (x[fit_idx] - mean) / std)
        assert torch.equal(yf, y[fit_idx])
        pred = (xh @ W.T + b).argmax(1)
        assert scores[repr(float(lam))] == pytest.approx((pred == y[held_idx]).double().mean().item())
    top = max(scores.values())
    assert best == max(p for p in penalties if scores[repr(float(p))] == top)


@settings(max_examples=60)
@given(values=st.lists(st.floats(0, 1e9, allow_subnormal=False), min_size=1, max_size=5),
       pads=st.lists(st.sampled_from(["", " ", "  ", "\t"]), min_size=12, max_size=12),
       empties=st.integers(0, 2))
def test_parse_penalties_reads_comma_separated_non_negative_numbers(values, pads, empties):
    tokens = [pads[i % 12] + repr(v) + pads[(i + 5) % 12] for i, v in enumerate(values)] + [" "] * empties
    assert lp.parse_penalties(",".join(tokens)) == values
    assert lp.parse_penalties(None) is None


@settings(max_examples=40)
@given(values=st.lists(st.floats(0, 100), max_size=3),
       bad=st.sampled_from(["-1", "-0.5", "nan", "inf", "-inf", "1e999", "abc", "0.1.2", "1;2", ""]),
       at=st.integers(0, 3))
def test_parse_penalties_refuses_a_bad_value_by_the_flags_name(values, bad, at):
    tokens = [repr(v) for v in values]
    tokens.insert(min(at, len(tokens)), bad)
    if not bad:
        tokens = [" ", ""]
    with pytest.raises(ValueError, match="^--penalties: "):
        lp.parse_penalties(",".join(tokens))


@settings(max_examples=30)
@given(depth=st.integers(0, 3), name=st.sampled_from(["--out", "out", "--result"]), parts=st.lists(NAMES, min_size=4,
                                                                                                    max_size=4))
def test_check_writable_file_takes_new_paths_and_refuses_folders_and_files_as_folders(depth, name, parts):
    with _tmp() as d:
        path = os.path.join(d, *parts[:depth], "r.json")
        lp.check_writable_file(name, path)  # the missing folders are the run's to create
        assert not os.path.exists(os.path.join(d, parts[0])) or depth == 0
        os.makedirs(os.path.join(d, *parts[:depth]), exist_ok=True)
        lp.check_writable_file(name, path)
        with pytest.raises(ValueError, match=f"^{re.escape(name)}: .* is a folder"):
            lp.check_writable_file(name, os.path.join(d, *parts[:depth]) if depth else d)
        _touch(os.path.join(d, "file"))
        with pytest.raises(ValueError, match=f"^{re.escape(name)}: cannot write"):
            lp.check_writable_file(name, os.path.join(d, "file", *parts[:depth], "r.json"))


@pytest.fixture(scope="module")
def probe_dirs(tmp_path_factory):
    """An ImageNet-layout folder (two classes, one with two images: files listing only needs their names) and a
    checkpoint file (never read: every refusal below comes before the encoder is loaded)."""
    root = tmp_path_factory.mktemp("probe_flags")
    for rel in ("train/a/0.png", "train/a/1.png", "train/b/0.png", "val/a/0.png", "val/b/0.png"):
        _touch(str(root / "data" / rel))
    _touch(str(root / "ck.pth.tar"))
    _touch(str(root / "a_file"))
    (root / "folder").mkdir()
    return root


_FLAG_ERRORS = {  # flag: (strategy of bad argv tails, error)
    "--heldout": (st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0), st.just(math.nan)).map(
        lambda v: [f"--heldout={v!r}"]), ValueError),
    "--max-iter": (st.integers(-5, 0).map(lambda v: [f"--max-iter={v}"]), ValueError),
    "--penalties": (st.sampled_from(["-1", "0.1,-0.01", "x", ",", "nan", "inf"]).map(lambda v: [f"--penalties={v}"]),
                    ValueError),
    "--last-k": (st.integers(-3, 0).map(lambda v: [f"--last-k={v}"]), ValueError),
    "--batch-size": (st.integers(-3, 0).map(lambda v: [f"--batch-size={v}"]), ValueError),
    "--workers": (st.integers(-5, -1).map(lambda v: [f"--workers={v}"]), ValueError),
    "--lambd": (st.one_of(st.floats(0, 1).map(lambda v: ["--lambd", repr(v)]),  # project: not its flag
                          st.sampled_from(["0", "-1", "nan", "inf"]).map(lambda v: ["--protocol", "official",
                                                                                    f"--lambd={v}"])), ValueError),
    "--device": (st.sampled_from(["bogus", "gpu", "cuda:x"]).map(lambda v: ["--device", v]), ValueError),
}


@pytest.mark.parametrize("flag", sorted(_FLAG_ERRORS) + ["official_penalties", "official_heldout", "--out",
                                                         "--cache-dir", "--checkpoint", "--data"])
@settings(max_examples=6)
@given(data=st.data())
def test_main_refuses_each_bad_flag_by_name_before_any_extraction(probe_dirs, flag, data):
    root = probe_dirs
    argv = ["--checkpoint", str(root / "ck.pth.tar"), "--data", str(root / "data"), "--cache-dir",
            str(root / "cache"), "--out", str(root / "out" / "r.json"), "--quiet"]
    err = ValueError
    if flag in _FLAG_ERRORS:
        strategy, err = _FLAG_ERRORS[flag]
        tail = data.draw(strategy)
    elif flag.startswith("official_"):
        name = flag.split("_")[1]
        tail = ["--protocol", "official", "--" + name, "0.1"]
        flag = "--" + name
    elif flag == "--out":
        tail = ["--out", str(root / "folder")]
    elif flag == "--cache-dir":
        tail = ["--cache-dir", str(root / data.draw(st.sampled_from(["a_file", "a_file/below"])))]
    else:
        tail, err = [flag, str(root / ("missing" + data.draw(NAMES)))], FileNotFoundError
    if flag == "--device" and torch.cuda.is_available():
        tail = ["--device", "bogus"]

    def boom(*a, **k):
        raise AssertionError("the encoder was loaded or features extracted before the flags were checked")
    with mock.patch.object(feat, "load_encoder", boom), mock.patch.object(feat, "extract_features", boom):
        with pytest.raises(err, match=f"^{flag}: "):
            lp.main(argv + tail)
    assert not (root / "out").exists()


@pytest.mark.parametrize("argv", [[], ["--data", "d"], ["--checkpoint", "c"], ["--checkpoint", "c", "--data", "d",
                                                                              "--protocol", "other"],
                                  ["--checkpoint", "c", "--data", "d", "--encoder", "student"]])
def test_the_parser_refuses_missing_and_unknown_values_with_its_usage_status(argv, capsys):
    with pytest.raises(SystemExit) as e:
        lp.build_parser().parse_args(argv)
    assert e.value.code == 2


# ------------------------------------------------------------------------------------------------ features
_STEM = st.text(string.ascii_lowercase + string.digits + "-_", min_size=1, max_size=6)  # '_' too: the class is before the first


@st.composite
def _subset_lines(draw):
    """(file text, expected relative paths): both line formats, padding, './', backslashes, comments, blanks."""
    lines, want = [], []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["rel", "dot", "backslash", "bare", "dot_bare", "comment", "blank"]))
        c, stem = draw(NAMES), draw(_STEM)
        pad = draw(st.sampled_from(["", " ", "\t", "  "]))
        if kind == "comment":
            lines.append(pad + "#" + draw(st.text(string.printable.replace("\n", "").replace("\r", ""), max_size=8)))
            continue
        if kind == "blank":
            lines.append(pad)
            continue
        name = f"{c}_{stem}.JPEG"
        text = {"rel": f"{c}/{name}", "dot": f"./{c}/{name}", "backslash": f"{c}\\{name}", "bare": name,
                "dot_bare": f"./{name}"}[kind]
        lines.append(pad + text + draw(st.sampled_from(["", " ", "\t"])))
        want.append(f"{c}/{name}")
    return "\n".join(lines) + draw(st.sampled_from(["", "\n"])), want


@settings(max_examples=60)
@given(case=_subset_lines())
def test_read_subset_reads_both_line_formats(case):
    text, want = case
    with _tmp() as d:
        path = os.path.join(d, "sub.txt")
        with open(path, "w") as fh:
            fh.write(text)
        if not want:
            with pytest.raises(ValueError, match="^--subset: .* lists no images"):
                feat.read_subset(path)
        else:
            assert feat.read_subset(path) == want
        with pytest.raises(FileNotFoundError, match="^--subset: no such file"):
            feat.read_subset(os.path.join(d, "absent.txt"))


_EXTS = [e for e in IMG_EXTENSIONS] + [".txt", ".json", ".jpgx", ".npy", ""]


@st.composite
def _split_tree(draw):
    """{class: [file names]} (distinct class names, each file name with an image extension or another)."""
    classes = draw(st.lists(NAMES, min_size=1, max_size=4, unique=True))
    tree = {}
    for c in classes:
        names = draw(st.lists(_STEM, max_size=4, unique=True))
        tree[c] = [n + draw(st.sampled_from(_EXTS)).upper() if draw(st.booleans()) else n + draw(st.sampled_from(_EXTS))
                   for n in names]
        tree[c] = sorted(set(tree[c]))
    return tree


def _is_image(name):
    return name.lower().endswith(tuple(IMG_EXTENSIONS))


@settings(max_examples=40)
@given(tree=_split_tree(), extra=st.lists(NAMES, max_size=2), seed=SEEDS, subset_mask=st.lists(st.booleans(),
                                                                                                min_size=16, max_size=16))
def test_list_images_lists_the_image_files_with_the_given_classes_indices(tree, extra, seed, subset_mask):
    with _tmp() as d:
        for c, names in tree.items():
            os.makedirs(os.path.join(d, c))
            for n in names:
                _touch(os.path.join(d, c, n))
            _touch(os.path.join(d, c, "nested", "deep.png"))  # one level only: not an image of c
        _touch(os.path.join(d, ".hidden", "x.png"))  # not a class
        _touch(os.path.join(d, "loose.png"))  # not in a class folder
        found = sorted(tree)
        images = [(f"{c}/{n}", c) for c in found for n in tree[c] if _is_image(n)]
        if not images:
            with pytest.raises(ValueError, match="^--data: no images"):
                feat.list_images(d)
            return
        samples, classes = feat.list_images(d)
        assert classes == found
        assert samples == sorted((rel, found.index(c)) for rel, c in images)
        # another class order (the training split's, with classes absent here): its indices
        given_classes = [c for c in extra if c not in tree] + found
        perm = torch.randperm(len(given_classes), generator=_gen(seed)).tolist()
        given_classes = [given_classes[i] for i in perm]
        samples, classes = feat.list_images(d, classes=given_classes)
        assert classes == given_classes
        assert samples == sorted((rel, given_classes.index(c)) for rel, c in images)
        if len(found) > 1:
            with pytest.raises(ValueError, match=r"^--data: .* classes absent from the training split"):
                feat.list_images(d, classes=found[1:])
        sub = [rel for (rel, _), keep in zip(images, subset_mask) if keep] or [images[0][0]]
        assert feat.list_images(d, subset=sub)[0] == sorted((rel, found.index(rel.split("/")[0])) for rel in sub)
        with pytest.raises(FileNotFoundError, match="^--subset: 1 listed image"):
            feat.list_images(d, subset=sub + [f"{found[0]}/absent.png"])


def _png(path, w, h, seed, mode="RGB"):
    from PIL import Image
    g = _gen(seed)
    arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    img = Image.fromarray(arr)
    if mode == "L":
        img = img.convert("L")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path)
    return arr


@FOLDERS
@settings(max_examples=25)
@given(img_size=st.integers(2, 20), w=st.integers(2, 40), h=st.integers(2, 40), seed=SEEDS,
       protocol=st.sampled_from(["project", "official"]), mode=st.sampled_from(["RGB", "L"]), label=st.integers(0, 9))
def test_eval_transform_resizes_the_short_side_centre_crops_and_normalises(img_size, w, h, seed, protocol, mode,
                                                                           label):
    from PIL import Image
    with _tmp() as d:
        _png(os.path.join(d, "c", "x.png"), w, h, seed, mode)
        ds = feat.ImageList(d, [("c/x.png", label)], img_size, protocol)
        assert len(ds) == 1
        x, got_label = ds[0]
        img = Image.open(os.path.join(d, "c", "x.png")).convert("RGB")
        short = round(img_size * 256 / 224) if protocol == "project" else (256 if img_size == 224 else img_size)
        resample = Image.BICUBIC if protocol == "project" else Image.BILINEAR
        if w <= h:
            nw, nh = short, int(short * h / w)
        else:
            nw, nh = int(short * w / h), short
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), resample)
        top, left = int(round((nh - img_size) / 2.0)), int(round((nw - img_size) / 2.0))
        arr = np.asarray(img.crop((left, top, left + img_size, top + img_size)), np.float32) / 255
        want = (torch.from_numpy(arr).permute(2, 0, 1) - MEAN) / STD
        assert got_label == label and x.dtype == torch.float32 and x.shape == (3, img_size, img_size)
        torch.testing.assert_close(x, want, rtol=0, atol=1e-5)


def _complete_step(folder, step):
    path = os.path.join(folder, f"step_{step:08d}")
    _touch(os.path.join(path, "meta.json"), b"{}")
    _touch(os.path.join(path, ".metadata"))
    return path


@settings(max_examples=30)
@given(steps=st.lists(st.integers(0, 10 ** 6), min_size=1, max_size=4, unique=True),
       incomplete=st.lists(st.integers(0, 10 ** 7), max_size=3), under=st.booleans(), name=NAMES)
def test_check_checkpoint_path_resolves_a_run_to_its_newest_complete_checkpoint(steps, incomplete, under, name):
    with _tmp() as d:
        run = os.path.join(d, "run")
        folder = os.path.join(run, "checkpoints") if under else run
        paths = {s: _complete_step(folder, s) for s in steps}
        for s in incomplete:  # a step folder whose save did not finish (no .metadata)
            if s not in paths:
                _touch(os.path.join(folder, f"step_{s:08d}", "meta.json"), b"{}")
        newest = paths[max(steps)]
        assert feat.check_checkpoint_path(run) == newest
        assert feat.check_checkpoint_path(newest) == newest
        ident = feat.checkpoint_identity(run)
        st_ = os.stat(os.path.join(newest, "meta.json"))
        assert ident == {"path": os.path.realpath(os.path.join(newest, "meta.json")), "size": st_.st_size,
                         "mtime_ns": st_.st_mtime_ns}
        os.makedirs(os.path.join(d, "empty", f"step_{steps[0]:08d}"))
        with pytest.raises(ValueError, match="^--checkpoint: .* a folder without a complete training checkpoint"):
            feat.check_checkpoint_path(os.path.join(d, "empty"))
        with pytest.raises(FileNotFoundError, match="^--checkpoint: no such file or folder"):
            feat.check_checkpoint_path(os.path.join(d, name + ".pth.tar"))
        f = os.path.join(d, name + ".pt")
        _touch(f, os.urandom(8))
        assert feat.check_checkpoint_path(f) == f


@pytest.mark.parametrize("kind", ["dict", "list", "tensor", "garbage", "empty", "safetensors", "bad_safetensors"])
@settings(max_examples=4)
@given(seed=SEEDS, keys=st.lists(NAMES, min_size=1, max_size=4, unique=True))
def test_read_checkpoint_returns_the_dict_or_names_the_flag(seed, keys, kind):
    g = _gen(seed)
    obj = {k: torch.randn(2, 3, generator=g) for k in keys}
    with _tmp() as d:
        path = os.path.join(d, "ck.safetensors" if "safetensors" in kind else "ck.pt")
        if kind == "dict":
            torch.save({**obj, "epoch": 3}, path)
        elif kind == "list":
            torch.save(list(obj.values()), path)
        elif kind == "tensor":
            torch.save(obj[keys[0]], path)
        elif kind == "safetensors":
            from safetensors.torch import save_file
            save_file(obj, path)
        else:
            _touch(path, b"" if kind == "empty" else b"\x00junk" + bytes(torch.randint(0, 256, (20,), generator=g)
                                                                         .tolist()))
        if kind in ("dict", "safetensors"):
            got = feat.read_checkpoint(path)
            assert set(got) == set(obj) | ({"epoch"} if kind == "dict" else set())
            assert all(torch.equal(got[k], v) for k, v in obj.items())
        else:
            with pytest.raises(ValueError, match="^--checkpoint: "):
                feat.read_checkpoint(path)


_KEY = st.lists(st.text(string.ascii_lowercase, min_size=1, max_size=5), min_size=1, max_size=3).map(".".join)


@settings(max_examples=60)
@given(seed=SEEDS, keys=st.lists(_KEY, min_size=1, max_size=4, unique=True), which=st.sampled_from(["target",
                                                                                                    "context"]),
       layout=st.sampled_from(["flat", "nested", "prefixed"]), module=st.booleans(), both=st.booleans())
def test_select_state_dict_finds_the_requested_encoder(seed, keys, which, layout, module, both):
    assume(not any(k.startswith(("module", "encoder", "target")) for k in keys))
    g = _gen(seed)
    mine, other = "target_encoder" if which == "target" else "encoder", "encoder" if which == "target" else "target_encoder"
    want = {k: torch.randn(2, generator=g) for k in keys}
    theirs = {k: torch.randn(2, generator=g) for k in keys}
    pre = "module." if module else ""
    if layout == "flat":
        obj = {pre + k: v for k, v in want.items()}
        obj["epoch"] = 7  # not a tensor: left out
    elif layout == "nested":
        obj = {mine: {pre + k: v for k, v in want.items()}, "opt": 1}
        if both:
            obj[other] = {pre + k: v for k, v in theirs.items()}
    else:
        obj = {f"{pre}{mine}.{k}": v for k, v in want.items()}
        if both:
            obj.update({f"{pre}{other}.{k}": v for k, v in theirs.items()})
    got = feat._select_state_dict(obj, which, "ck.pt")
    assert set(got) == set(want) and all(got[k] is want[k] for k in want)
    if layout == "nested":  # only the other encoder's nested dict: refused, naming --encoder
        with pytest.raises(ValueError, match=f"^--encoder: {which} requested but ck.pt has no '{mine}'"):
            feat._select_state_dict({other: theirs}, which, "ck.pt")
    if layout == "prefixed":
        with pytest.raises(ValueError, match=f"^--encoder: {which} requested but ck.pt has no '{mine}.' keys"):
            feat._select_state_dict({f"{pre}{other}.{k}": v for k, v in theirs.items()}, which, "ck.pt")


@pytest.mark.parametrize("change", ["ckpt_mtime", "ckpt_size", "ckpt_path", "file_mtime", "file_size", "label", "drop",
                                    "rename", "split_dir", "setting_value", "setting_added", "none"])
@settings(max_examples=5)
@given(seed=SEEDS, n=st.integers(2, 4), settings_=st.dictionaries(NAMES, st.one_of(st.integers(), NAMES,
                                                                                     st.booleans()),
                                                                   min_size=1, max_size=4))
def test_cache_key_changes_with_every_input_and_only_then(seed, n, settings_, change):
    g = _gen(seed)
    with _tmp() as d:
        split = os.path.join(d, "split")
        samples = []
        for i in range(n):
            rel = f"c{i % 2}/img{i}.png"
            _touch(os.path.join(split, rel), bytes(torch.randint(0, 256, (5 + i,), generator=g).tolist()))
            samples.append((rel, i % 2))
        ck = os.path.join(d, "ck.pth.tar")
        _touch(ck, b"weights")
        os.utime(ck, ns=(10 ** 18, 10 ** 18))
        key = feat.cache_key(ck, split, samples, settings_)
        assert re.fullmatch("[0-9a-f]{64}", key)
        # stable: again, the same settings in another order, the identity taken earlier instead of the path
        assert feat.cache_key(ck, split, list(samples), dict(reversed(list(settings_.items())))) == key
        assert feat.cache_key(feat.checkpoint_identity(ck), split, samples, settings_) == key
        args = [ck, split, list(samples), dict(settings_)]
        i = int(torch.randint(0, n, (), generator=g))
        target = os.path.join(split, samples[i][0])
        if change == "ckpt_mtime":
            os.utime(ck, ns=(10 ** 18 + 1, 10 ** 18 + 1))
        elif change == "ckpt_size":
            _touch(ck, b"weights!")
            os.utime(ck, ns=(10 ** 18, 10 ** 18))
        elif change == "ckpt_path":
            args[0] = os.path.join(d, "copy.pth.tar")
            _touch(args[0], b"weights")
            os.utime(args[0], ns=(10 ** 18, 10 ** 18))
        elif change == "file_mtime":
            st_ = os.stat(target)
            os.utime(target, ns=(st_.st_atime_ns, st_.st_mtime_ns + 1))
        elif change == "file_size":
            st_ = os.stat(target)
            _touch(target, open(target, "rb").read() + b"!")
            os.utime(target, ns=(st_.st_atime_ns, st_.st_mtime_ns))
        elif change == "label":
            args[2][i] = (samples[i][0], samples[i][1] + 1)
        elif change == "drop":
            del args[2][i]
        elif change == "rename":
            new = samples[i][0].replace("img", "pic")
            os.rename(target, os.path.join(split, new))
            args[2][i] = (new, samples[i][1])
        elif change == "split_dir":
            import shutil
            args[1] = os.path.join(d, "split2")
            shutil.copytree(split, args[1], copy_function=shutil.copy2)
        elif change == "setting_value":
            k = sorted(settings_)[0]
            args[3][k] = [settings_[k]]
        elif change == "setting_added":
            args[3]["zz_" + sorted(settings_)[0]] = 1
        new_key = feat.cache_key(*args)
        assert (new_key == key) == (change == "none")


@settings(max_examples=30)
@given(parts=st.lists(NAMES, min_size=1, max_size=3), link=st.booleans(), data=st.binary(max_size=40))
def test_checkpoint_identity_is_the_real_path_size_and_mtime(parts, link, data):
    with _tmp() as d:
        path = os.path.join(d, *parts) + ".pth.tar"
        _touch(path, data)
        os.utime(path, ns=(123, 456789))
        given_path = path
        if link:
            given_path = os.path.join(d, "link.pth.tar")
            os.symlink(path, given_path)
        assert feat.checkpoint_identity(given_path) == {"path": os.path.realpath(path), "size": len(data),
                                                        "mtime_ns": 456789}


@settings(max_examples=30)
@given(parts=st.lists(NAMES, min_size=1, max_size=3))
def test_check_cache_dir_creates_the_folder_and_refuses_a_file(parts):
    with _tmp() as d:
        cache = os.path.join(d, *parts)
        feat.check_cache_dir(cache)
        assert os.path.isdir(cache)
        feat.check_cache_dir(cache)  # an existing folder is fine
        _touch(os.path.join(d, "f"))
        for bad in (os.path.join(d, "f"), os.path.join(d, "f", *parts)):
            with pytest.raises(ValueError, match="^--cache-dir: "):
                feat.check_cache_dir(bad)


@settings(max_examples=40)
@given(gpu=st.booleans(), index=st.integers(0, 7), protocol=st.sampled_from(["project", "official"]),
       bad=st.sampled_from(["gpu", "cuda:x", "bogus", "", "CPU:", "meta", "cpu:1"]))
def test_resolve_device_and_feature_precision(gpu, index, protocol, bad):
    with mock.patch.object(torch.cuda, "is_available", lambda: gpu):
        assert feat.resolve_device("auto") == torch.device("cuda" if gpu else "cpu")
        assert feat.resolve_device("cpu") == torch.device("cpu")
        if gpu:
            assert feat.resolve_device(f"cuda:{index}") == torch.device("cuda", index)
        else:
            for name in ("cuda", f"cuda:{index}"):
                with pytest.raises(ValueError, match="^--device: 'cuda' requested but no CUDA GPU"):
                    feat.resolve_device(name)
        with pytest.raises(ValueError, match="^--device: expected auto, cpu, cuda or cuda:N"):
            feat.resolve_device(bad)
    for dev in (torch.device("cpu"), torch.device("cuda", index)):
        want = "bf16" if protocol == "project" and dev.type == "cuda" else "fp32"
        assert feat.feature_precision(protocol, dev) == want
    with pytest.raises(ValueError, match="^--protocol: "):
        feat.feature_precision("vissl", torch.device("cpu"))


@settings(max_examples=12)
@given(seed=SEEDS, depth=st.integers(1, 3), B=st.integers(1, 3), data=st.data())
def test_encode_averages_the_last_k_layers_normalised_pooled_outputs(cpu_train, seed, depth, B, data):
    torch.manual_seed(seed)
    enc = VisionTransformer(img_size=8, patch_size=4, embed_dim=8, depth=depth, num_heads=2, mlp_ratio=2.0).double()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # a unit LayerNorm or a zero bias would hide a dropped term
    imgs = torch.randn(B, 3, 8, 8, dtype=torch.float64)
    last_k = data.draw(st.integers(1, depth))
    with torch.no_grad():
        pooled = []
        for d in range(depth - last_k + 1, depth + 1):  # the encoder cut after block d: its forward's mean
            cut = copy.deepcopy(enc)
            cut.blocks = cut.blocks[:d]
            pooled.append(cut(imgs).mean(1))
        want = sum(pooled) / last_k
        got = feat.encode(enc, imgs, last_k)
    assert got.shape == (B, 8)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for bad, err in ((0, ValueError), (depth + data.draw(st.integers(1, 3)), ValueError), (1.0, TypeError),
                     (True, TypeError)):
        with pytest.raises(err, match="^--last-k: "):
            feat.encode(enc, imgs, bad)


# ------------------------------------------------------------------------------------------------ data
@settings(max_examples=30)
@given(length=st.integers(1, 6), img_size=st.integers(2, 10), num_classes=st.integers(1, 5),
       seed=st.integers(-10, 2 ** 40), data=st.data())
def test_synthetic_images_are_a_function_of_the_seed_and_index(length, img_size, num_classes, seed, data):
    ds = SyntheticImages(length, img_size, num_classes, seed)
    assert len(ds) == length
    i = data.draw(st.integers(0, length - 1))
    torch.manual_seed(data.draw(SEEDS))
    img, label = ds[i]
    assert img.shape == (3, img_size, img_size) and img.dtype == torch.float32 and torch.isfinite(img).all()
    assert label == i % num_classes and img.std() > 0
    torch.manual_seed(data.draw(SEEDS))  # the global generator plays no part
    again, _ = SyntheticImages(length, img_size, num_classes, seed)[i]
    assert torch.equal(img, again)
    assert not torch.equal(img, SyntheticImages(length, img_size, num_classes, seed + 1)[i][0])
    if length > 1:
        j = data.draw(st.integers(0, length - 1).filter(lambda j: j != i))
        assert not torch.equal(img, ds[j][0])
    for bad in (length, -1, -length - 1):
        with pytest.raises(IndexError):
            ds[bad]


@settings(max_examples=40)
@given(name=st.sampled_from(["length", "img_size", "num_classes", "seed"]),
       value=st.sampled_from([0, -1, 2.5, True, "3", None]))
def test_synthetic_images_refuse_a_bad_argument_by_name(name, value):
    kw = dict(length=4, img_size=8, num_classes=2, seed=0)
    if name == "seed" and isinstance(value, int) and not isinstance(value, bool):
        value = 0.5  # any int is a seed
    kw[name] = value
    err = ValueError if isinstance(value, int) and not isinstance(value, bool) else TypeError
    with pytest.raises(err, match=f"^{name}: "):
        SyntheticImages(**kw)


@st.composite
def _image_tree(draw):
    """{class: [(file, kind)]} with kind 'image', 'other' (non-image extension) or 'nested' (in a sub-folder)."""
    tree = {}
    for c in draw(st.lists(NAMES, min_size=1, max_size=4, unique=True)):
        files = draw(st.lists(_STEM, max_size=3, unique=True))
        tree[c] = [(f + draw(st.sampled_from(IMG_EXTENSIONS + (".txt", ".PNG", ".Jpeg", ".pdf"))),
                    draw(st.sampled_from(["flat", "flat", "nested"]))) for f in files]
    return tree


@settings(max_examples=40)
@given(tree=_image_tree(), train=st.booleans(), name=st.sampled_from(["data", "root"]))
def test_scan_image_folder_labels_every_image_by_its_sorted_class_folder(tree, train, name):
    with _tmp() as d:
        base = os.path.join(d, "train") if train else d
        if train:
            os.makedirs(os.path.join(d, "val", "zzz"))
            _touch(os.path.join(d, "val", "zzz", "v.png"))
        want = []
        classes = sorted(tree)
        for c, files in tree.items():
            os.makedirs(os.path.join(base, c), exist_ok=True)
            for f, where in files:
                path = os.path.join(base, c, *(["sub"] if where == "nested" else []), f)
                _touch(path)
                if _is_image(f):
                    want.append((path, classes.index(c)))
        _touch(os.path.join(base, ".ipynb_checkpoints", "x.png"))  # hidden: no class
        _touch(os.path.join(base, "loose.png"))
        if not want:
            with pytest.raises(ConfigError, match=f"^{name}: folder .* holds no images"):
                scan_image_folder(d, name)
            return
        samples, got_classes = scan_image_folder(d, name)
        assert got_classes == classes
        assert sorted(samples) == sorted(want)
        assert [label for _, label in samples] == sorted(label for _, label in samples)  # class by class
        flat = [(p, label) for p, label in samples if os.path.dirname(p) == os.path.join(base, classes[label])]
        assert flat == sorted(flat, key=lambda s: (s[1], s[0]))  # a class's own files in name order


@pytest.mark.parametrize("kind", ["missing", "file", "number", "empty"])
@settings(max_examples=4)
@given(name=st.sampled_from(["data", "root"]))
def test_scan_image_folder_names_a_bad_folder(kind, name):
    with _tmp() as d:
        root = {"missing": os.path.join(d, "absent"), "file": os.path.join(d, "f"), "number": 3, "empty": d}[kind]
        _touch(os.path.join(d, "f"))
        os.makedirs(os.path.join(d, "cls"))
        err = TypeError if kind == "number" else ConfigError
        with pytest.raises(err, match=f"^{name}: "):
            scan_image_folder(root, name)


class _Pixels:
    """A transform that returns the image's pixels and one draw of torch's global generator (the augmentation
    stream the dataset seeds per sample)."""

    def __call__(self, img):
        return torch.from_numpy(np.asarray(img).copy()), float(torch.rand(()))


@FOLDERS
@settings(max_examples=25)
@given(readable=st.lists(st.booleans(), min_size=1, max_size=6), classes=st.integers(1, 3), seed=SEEDS,
       max_sub=st.integers(1, 8), data=st.data())
def test_image_folder_substitutes_unreadable_files_and_seeds_each_sample(readable, classes, seed, max_sub, data):
    from PIL import Image
    n = len(readable)
    with _tmp() as d:
        files = []  # in the dataset's order: class folders sorted, then file names sorted
        for k, ok in enumerate(readable):
            c = f"c{k % classes}"
            files.append((c, f"{k:02d}.png", ok))
        files.sort()
        class_names = sorted({c for c, _, _ in files})
        pixels = []
        for j, (c, f, ok) in enumerate(files):
            path = os.path.join(d, c, f)
            if ok:
                arr = np.full((3, 4, 3), j * 10 + 1, np.uint8)
                arr[0, 0] = (seed + j) % 256
                os.makedirs(os.path.dirname(path), exist_ok=True)
                Image.fromarray(arr).save(path)
                pixels.append(arr)
            else:
                _touch(path, b"not an image at all")
                pixels.append(None)
        if not any(readable):
            with pytest.raises(RuntimeError, match="consecutive unreadable images"):
                ImageFolderDataset(d, _Pixels(), seed=seed, max_substitutions=max_sub)[0]
            return
        ds = ImageFolderDataset(d, _Pixels(), seed=seed, max_substitutions=max_sub)
        assert len(ds) == n and ds.classes == class_names
        i = data.draw(st.integers(0, n - 1))
        tries = min(max_sub, n)
        k = next((k for k in range(tries) if files[(i + k) % n][2]), None)
        state = torch.get_rng_state()
        if k is None:
            first = os.path.join(d, *files[i][:2])
            with pytest.raises(RuntimeError, match=rf"^data: {tries} consecutive unreadable images from index {i} "
                                                   rf".*the first {re.escape(first)} \("):
                ds[i]
            return
        (x, draw), label, skipped = ds[i]
        j = (i + k) % n
        assert skipped == k and label == class_names.index(files[j][0])
        assert np.array_equal(x.numpy(), pixels[j])
        assert torch.equal(torch.get_rng_state(), state)  # the global generator is left as it was
        assert ds[i][0][1] == draw  # the same sample, the same augmentation
        # another index, epoch or seed: another augmentation stream
        others = {draw}
        for e in (1, 2):
            ds.set_epoch(e)
            others.add(ds[i][0][1])
        ds.set_epoch(0)
        for i2 in range(n):
            if i2 != i and files[i2][2]:
                others.add(ds[i2][0][1])
        others.add(ImageFolderDataset(d, _Pixels(), seed=seed + 1, max_substitutions=max_sub)[i][0][1])
        assert len(others) == 3 + sum(1 for i2 in range(n) if i2 != i and files[i2][2]) + 1
        for bad in (n, -1):
            with pytest.raises(IndexError):
                ds[bad]


@settings(max_examples=80)
@given(n=st.integers(1, 40), R=st.integers(1, 4), bs=st.integers(1, 5), seed=st.integers(0, 1000),
       epoch=st.integers(0, 50), shuffle=st.booleans(), data=st.data())
def test_resumable_sampler_resumes_any_batch_and_the_ranks_cover_the_epoch(n, R, bs, seed, epoch, shuffle, data):
    ds = list(range(n))
    if shuffle:  # the official sampler's order: a permutation drawn from seed + epoch
        order = torch.randperm(n, generator=_gen(seed + epoch)).tolist()
    else:
        order = list(range(n))
    total = (n // R) * R  # drop-last: the tail past a multiple of the world size sits out
    per_rank, seen = [], []
    for rank in range(R):
        s = ResumableDistributedSampler(ds, num_replicas=R, rank=rank, batch_size=bs, seed=seed, shuffle=shuffle)
        s.set_epoch(epoch)
        mine = list(s)
        assert mine == order[rank:total:R] and len(s) == n // R
        per_rank.append(mine)
        seen += mine
    assert sorted(seen) == sorted(order[:total]) and len(set(seen)) == len(seen)
    rank = data.draw(st.integers(0, R - 1))
    start = data.draw(st.integers(0, n // R // bs + 2))
    s = ResumableDistributedSampler(ds, num_replicas=R, rank=rank, batch_size=bs, seed=seed, shuffle=shuffle)
    s.set_epoch(epoch, start_batch=start)
    assert list(s) == per_rank[rank][start * bs:] and len(s) == max(0, n // R - start * bs)
    s.set_epoch(epoch)  # back to the start of the epoch
    assert list(s) == per_rank[rank]


@settings(max_examples=20)
@given(n=st.integers(8, 40), R=st.integers(1, 3), seed=st.integers(0, 1000), epoch=st.integers(0, 50))
def test_resumable_sampler_reshuffles_each_epoch(n, R, seed, epoch):
    def order(e):
        s = ResumableDistributedSampler(list(range(n)), num_replicas=R, rank=0, batch_size=1, seed=seed)
        s.set_epoch(e)
        return list(s)
    assert order(epoch) == order(epoch)
    assert len({tuple(order(e)) for e in range(epoch, epoch + 3)}) == 3


@settings(max_examples=40)
@given(seed=SEEDS, skips=st.lists(st.integers(0, 5), min_size=1, max_size=6), counted=st.booleans(),
       epoch=st.integers(0, 9), start=st.integers(0, 9))
def test_skip_counting_collate_strips_and_sums_the_skip_counts(seed, skips, counted, epoch, start):
    g = _gen(seed)
    batch = [(torch.randn(3, 2, 2, generator=g), int(torch.randint(0, 9, (), generator=g)), s) for s in skips]
    given_batch = batch if counted else [b[:2] for b in batch]

    class Masks:
        def __init__(self):
            self.calls, self.epochs = [], []

        def __call__(self, b):
            self.calls.append(b)
            return (torch.stack([s[0] for s in b]), torch.tensor([s[1] for s in b])), "enc", "pred"

        def set_epoch(self, e, s):
            self.epochs.append((e, s))
    masks = Masks()
    collate = SkipCountingCollate(masks)
    imgs, enc, pred, skipped = collate(given_batch)
    (passed,) = masks.calls
    assert [len(s) for s in passed] == [2] * len(batch)
    assert all(p[0] is b[0] and p[1] == b[1] for p, b in zip(passed, batch))
    assert torch.equal(imgs, torch.stack([b[0] for b in batch])) and (enc, pred) == ("enc", "pred")
    assert skipped == (sum(skips) if counted else 0)
    collate.set_epoch(epoch, start)
    assert masks.epochs == [(epoch, start)]


_GOOD_CROP = st.tuples(st.floats(0.01, 1.0), st.floats(0.01, 1.0)).map(lambda p: (min(p), max(p)))
_BAD_TRANSFORM_ARGS = st.one_of(
    st.tuples(st.just("img_size"), st.one_of(st.integers(max_value=0)), st.just(ValueError)),
    st.tuples(st.just("img_size"), st.one_of(st.floats(1, 100), st.just(True), st.just("8"), st.just(None)),
              st.just(TypeError)),
    st.tuples(st.just("crop_scale"), st.one_of(
        st.tuples(st.floats(max_value=0.0), st.floats(0.01, 1.0)),
        st.tuples(st.floats(0.01, 1.0), st.floats(1.0, exclude_min=True)),
        st.tuples(st.floats(0.5, 1.0), st.floats(0.01, 0.5, exclude_max=True)),
        st.tuples(st.just(math.nan), st.floats(0.01, 1.0))), st.just(ValueError)),
    st.tuples(st.just("crop_scale"), st.one_of(
        st.just(0.5), st.just("ab"), st.tuples(st.floats(0.1, 1.0)), st.tuples(st.floats(0.1, 0.5), st.floats(0.5, 1),
                                                                                 st.floats(0.5, 1)),
        st.tuples(st.just(True), st.just(1.0)), st.tuples(st.just("0.3"), st.just(1.0)), st.just({0.3, 1.0})),
        st.just(TypeError)),
    st.tuples(st.just("color_jitter"), st.one_of(st.floats(max_value=0.0, exclude_max=True),
                                                 st.floats(min_value=2.5, exclude_min=True), st.just(math.nan)),
              st.just(ValueError)),
    st.tuples(st.just("color_jitter"), st.one_of(st.just(True), st.just("1"), st.just(None), st.just([0.5])),
              st.just(TypeError)))


@FOLDERS
@settings(max_examples=80)
@given(bad=_BAD_TRANSFORM_ARGS, img_size=st.integers(1, 512), crop=_GOOD_CROP, jitter=st.floats(0, 2.5),
       as_list=st.booleans())
def test_check_transform_args_refuses_each_bad_value_by_name(bad, img_size, crop, jitter, as_list):
    from stop_kernels.data.transforms import check_transform_args
    kw = dict(img_size=img_size, crop_scale=list(crop) if as_list else crop, color_jitter=jitter)
    check_transform_args(**kw)  # good values pass
    name, value, err = bad
    kw[name] = value
    with pytest.raises(err, match=f"^{name}: "):
        check_transform_args(**kw)
    with pytest.raises(err, match=f"^{name}: "):
        make_transforms(kw["img_size"], kw["crop_scale"], color_jitter=kw["color_jitter"])


@FOLDERS
@settings(max_examples=25)
@given(img_size=st.integers(1, 24), crop=_GOOD_CROP, w=st.integers(1, 40), h=st.integers(1, 40), seed=SEEDS,
       hflip=st.booleans(), jitter=st.floats(0, 2.5), blur=st.booleans(), gray=st.booleans())
def test_make_transforms_gives_a_normalised_square_float_image(img_size, crop, w, h, seed, hflip, jitter, blur, gray):
    from PIL import Image
    arr = (torch.rand(h, w, 3, generator=_gen(seed)) * 255).to(torch.uint8).numpy()
    t = make_transforms(img_size, crop, hflip=hflip, color_jitter=jitter, gaussian_blur=blur, grayscale=gray)
    torch.manual_seed(seed)
    x = t(Image.fromarray(arr))
    assert x.shape == (3, img_size, img_size) and x.dtype == torch.float32 and torch.isfinite(x).all()
    # normalised pixels of [0, 1]: within ((0 - mean) / std, (1 - mean) / std) per channel
    assert (x >= (0 - MEAN) / STD - 1e-5).all() and (x <= (1 - MEAN) / STD + 1e-5).all()


_PARTS = st.lists(st.integers(-2 ** 62, 2 ** 62), max_size=4)


@settings(max_examples=150)
@given(name=st.text(min_size=0, max_size=10), other=st.text(min_size=0, max_size=10), parts=_PARTS, more=_PARTS)
def test_stream_seed_is_a_pure_63_bit_function_distinct_per_stream_and_parts(name, other, parts, more):
    s = stream_seed(name, *parts)
    assert isinstance(s, int) and 0 <= s < 2 ** 63
    assert stream_seed(name, *parts) == s
    assert stream_seed(name, *[np.int64(p) for p in parts]) == s  # numpy integers are the same numbers
    torch.Generator().manual_seed(s)
    if more != parts:
        assert stream_seed(name, *more) != s
    if parts != parts[::-1]:  # the parts' order matters (epoch 1, item 2 is not epoch 2, item 1)
        assert stream_seed(name, *parts[::-1]) != s
    if other != name:
        assert stream_seed(other, *parts) != s


@settings(max_examples=30)
@given(parts=st.lists(st.integers(0, 1000), min_size=1, max_size=3), pos=st.integers(0, 2))
def test_stream_seed_spreads_neighbouring_items(parts, pos):
    """Neighbouring items (index i and i+1, …) of one stream get seeds that differ in many bits, and the 64
    items around one part are all distinct."""
    pos = min(pos, len(parts) - 1)
    seeds = []
    for d in range(64):
        p = list(parts)
        p[pos] += d
        seeds.append(stream_seed("augment", *p))
    assert len(set(seeds)) == 64
    flips = [bin(a ^ b).count("1") for a, b in zip(seeds, seeds[1:])]
    assert sum(flips) / len(flips) > 20  # ~31.5 for unrelated 63-bit numbers
    assert len({s >> 60 for s in seeds}) > 1  # the top bits are used


# ------------------------------------------------------------------------------------------------ packing
_LENGTHS = st.lists(st.integers(1, 5), min_size=1, max_size=4)


@settings(max_examples=60)
@given(lengths=st.lists(_LENGTHS, min_size=1, max_size=3), K=st.integers(0, 6), B=st.integers(1, 4))
def test_is_ragged_and_mean_tokens(lengths, K, B):
    ragged = [[torch.arange(n) for n in ls] for ls in lengths]
    assert packing.is_ragged(ragged) and packing.is_ragged(tuple(ragged))
    assert packing.mean_tokens(ragged) == pytest.approx(sum(lengths[0]) / len(lengths[0]))
    rect = [torch.zeros(B, K, dtype=torch.long) for _ in lengths]
    assert not packing.is_ragged(rect) and packing.mean_tokens(rect) == float(K)
    assert not packing.is_ragged([]) and not packing.is_ragged(None) and not packing.is_ragged(ragged[0])
    assert packing.mean_tokens([[]]) == 0.0


_RAGGED_DEFECTS = ["ok", "count", "tensor", "float", "2d", "empty", "high", "negative"]


def _ragged(seed, lengths, P, defect):
    """B 1-D index tensors within [0, P) with one ``defect``; returns (masks, error, name suffix)."""
    g = _gen(seed)
    masks = [torch.randint(0, P, (n,), generator=g, dtype=torch.int64 if seed % 2 else torch.int32) for n in lengths]
    i = seed % len(lengths)
    if defect == "count":
        return masks[:-1] if len(masks) > 1 else masks * 2, ValueError, ""
    if defect == "tensor":
        return torch.stack([torch.zeros(1, dtype=torch.long)] * len(lengths)), ValueError, ""
    if defect == "float":
        masks[i] = masks[i].float()
        return masks, TypeError, f"[{i}]"
    if defect == "2d":
        masks[i] = masks[i][None]
        return masks, ValueError, f"[{i}]"
    if defect == "empty":
        masks[i] = masks[i][:0]
        return masks, ValueError, f"[{i}]"
    if defect in ("high", "negative"):
        masks[i] = masks[i].clone()
        masks[i][-1] = P if defect == "high" else -1
        return masks, ValueError, f"[{i}]"
    return masks, None, ""


@settings(max_examples=80)
@given(seed=SEEDS, lengths=_LENGTHS, P=st.integers(1, 16), defect=st.sampled_from(_RAGGED_DEFECTS),
       name=st.sampled_from(["ctx_idx", "masks", "m"]))
def test_check_ragged_names_the_bad_image(seed, lengths, P, defect, name):
    masks, err, where = _ragged(seed, lengths, P, defect)
    if err is None:
        got = packing.check_ragged(name, tuple(masks), len(lengths), P)
        assert isinstance(got, list) and len(got) == len(masks) and all(a is b for a, b in zip(got, masks))
        return
    with pytest.raises(err, match=f"^{re.escape(name + where)}: "):
        packing.check_ragged(name, masks, len(lengths), P)


@settings(max_examples=60)
@given(seed=SEEDS, lengths=_LENGTHS, P=st.integers(1, 16), npred=st.integers(1, 4), data=st.data())
def test_check_target_blocks_names_the_bad_block_and_image(seed, lengths, P, npred, data):
    blocks = [_ragged(seed + k, lengths, P, "ok")[0] for k in range(npred)]
    got = packing.check_target_blocks("tgt_idx", blocks, len(lengths), P)
    assert len(got) == npred and all(all(a is b for a, b in zip(gk, bk)) for gk, bk in zip(got, blocks))
    for empty in ([], (), None, torch.zeros(0)):
        with pytest.raises(TypeError, match="^tgt_idx: expected a non-empty list of target blocks"):
            packing.check_target_blocks("tgt_idx", empty, len(lengths), P)
    k = data.draw(st.integers(0, npred - 1))
    defect = data.draw(st.sampled_from(_RAGGED_DEFECTS[1:]))
    blocks[k], err, where = _ragged(seed, lengths, P, defect)
    with pytest.raises(err, match=f"^{re.escape(f'tgt_idx[{k}]' + where)}: "):
        packing.check_target_blocks("tgt_idx", blocks, len(lengths), P)


@settings(max_examples=100)
@given(ctx=st.lists(st.integers(1, 6), min_size=1, max_size=4), data=st.data())
def test_predictor_layout_is_each_images_context_then_its_block(ctx, data):
    B = len(ctx)
    npred = data.draw(st.integers(1, 3))
    tgt = [[data.draw(st.integers(1, 5)) for _ in range(B)] for _ in range(npred)]
    # the rows fed to the predictor, labelled: context rows ('c', b, j) then masked rows ('t', k, b, j) in
    # (k, b, t) order; packed sequence s = k·B + b is [context of b ; block k of b]
    rows = [("c", b, j) for b in range(B) for j in range(ctx[b])] + \
           [("t", k, b, j) for k in range(npred) for b in range(B) for j in range(tgt[k][b])]
    where = {r: i for i, r in enumerate(rows)}
    seqs = [[("c", b, j) for j in range(ctx[b])] + [("t", k, b, j) for j in range(tgt[k][b])]
            for k in range(npred) for b in range(B)]
    packed = [r for s in seqs for r in s]
    lay = packing.predictor_layout(ctx, tgt, "cpu")
    assert lay.src.tolist() == [where[r] for r in packed]
    assert lay.tgt_rows.tolist() == [i for i, r in enumerate(packed) if r[0] == "t"]
    assert [packed[i][1:] for i in lay.tgt_rows.tolist()] == [r[1:] for r in rows if r[0] == "t"]  # (k, b, t)
    cu = lay.cu_seqlens.tolist()
    assert lay.cu_seqlens.dtype == torch.int32 and len(cu) == npred * B + 1
    assert cu[0] == 0 and cu[-1] == len(packed) and all(a < b for a, b in zip(cu, cu[1:]))
    assert [b - a for a, b in zip(cu, cu[1:])] == [len(s) for s in seqs]
    assert lay.max_seqlen == max(len(s) for s in seqs)
    k = data.draw(st.integers(0, npred - 1))
    bad = [list(t) for t in tgt]
    bad[k] = bad[k] + [1] if data.draw(st.booleans()) or B == 1 else bad[k][:-1]
    with pytest.raises(ValueError, match=rf"^tgt_idx\[{k}\]: expected {B} per-image masks"):
        packing.predictor_layout(ctx, bad, "cpu")


# ------------------------------------------------------------------------------- defects found (fixed since)
def test_accuracy_refuses_a_chunk_below_one():
    g = _gen(0)
    x, W, b = torch.randn(6, 2, generator=g), torch.randn(2, 2, generator=g), torch.randn(2, generator=g)
    y = (x @ W.T + b).argmax(1)  # every prediction right: the accuracy is 1.0
    for chunk in (-1, 0):
        with pytest.raises(ValueError, match="^chunk: "):
            lp.accuracy(W, b, x, y, chunk=chunk)


def test_fit_refuses_a_chunk_below_one():
    x, y = _problem(0, 12, 3, 2)
    with pytest.raises(ValueError, match="^chunk: "):
        lp.fit_logistic_regression(x, y, 2, 0.1, chunk=-1, max_iter=20)


def test_relative_gap_bound_refuses_a_zero_penalty_by_name():
    x, y = _problem(0, 8, 2, 2)
    with pytest.raises(ValueError, match="penalty"):
        lp.relative_gap_bound(x, y, torch.zeros(2, 2, dtype=torch.float64), 0.0)


def test_classifier_settings_of_the_wrong_type_are_named():
    for kw, flag in ((dict(heldout="0.2"), "--heldout"), (dict(penalties=["0.1"]), "--penalties")):
        with pytest.raises((TypeError, ValueError), match=f"^{flag}: "):
            lp.check_classifier_settings(**kw)


def test_stratified_split_refuses_a_seed_that_is_no_integer_by_name():
    """A float seed reached torch's Generator.manual_seed and its raw RuntimeError (a numpy int its TypeError "an
    integer is required"): a non-integer is refused by name, and a numpy int is the same seed as the Python int."""
    y = torch.tensor([0, 0, 1, 1, 1])
    with pytest.raises(TypeError, match="^seed: "):
        lp.stratified_split(y, 0.5, seed=1.5)
    assert [t.tolist() for t in lp.stratified_split(y, 0.5, seed=np.int64(3))] == \
        [t.tolist() for t in lp.stratified_split(y, 0.5, seed=3)]
