"""Pictures: training curves, the StoP positional similarity maps (the paper's Figure 5), benchmark charts.

    python -m stop_kernels.plots curves runs/stop/log.jsonl runs/ijepa/log.jsonl --labels StoP I-JEPA --out curves.png
    python -m stop_kernels.plots simmaps --checkpoint in1k_vith14_ep300.pth.tar --out simmap.png
    python -m stop_kernels.plots simmaps --model vit_tiny --img-size 64 --patch-size 8 --out simmap.png  # fresh
    python -m stop_kernels.plots bench bench.json --out bench.png

Figures are drawn on matplotlib's Agg canvas (``matplotlib.figure.Figure``, never pyplot, so nothing
global changes and no display is needed) and saved as PNG files of exactly ``--width`` × ``--height``
pixels.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import _checks as chk

CURVE_FIELDS = (("loss", "loss"), ("lr", "learning rate"), ("images_per_s", "images / s"))
CURVES_SIZE = (1500, 450)
SIMMAP_SIZE = (1200, 620)
BENCH_PANEL = (420, 340)  # per subplot; see bench_size
BENCH_BAR_PX = 22  # per bar of a panel, at least (an 8-pt label's line)


def _figure(width: int, height: int, dpi: int):
    """A matplotlib Figure of ``width`` × ``height`` pixels on the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    for name, v in (("width", width), ("height", height), ("dpi", dpi)):
        if not isinstance(v, int) or v < 16:
            raise ValueError(f"--{name}: expected an integer >= 16, got {v!r}")
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _check_out(out: str) -> None:
    """Called before anything is read or drawn: a bad name is refused without the work (or matplotlib)."""
    if not out.lower().endswith(".png"):
        raise ValueError(f"--out: expected a .png file name, got {out!r}")


def _save(fig, out: str) -> str:
    _check_out(out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, format="png", dpi=fig.dpi)
    return out


# ----------------------------------------------------------------------------------------------
# training curves
# ----------------------------------------------------------------------------------------------
def read_log(path: str) -> List[Dict[str, Any]]:
    """The records of a training JSONL log (one JSON object per line) that carry a ``step``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"log: no such file: {path}")
    records = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"log: {path}:{lineno} is not JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"log: {path}:{lineno} is not a JSON object")
            if "step" in rec:
                records.append(rec)
    if not records:
        raise ValueError(f"log: {path} is empty (no records with a 'step'); expected the JSONL log of a training run")
    return records


def _series(records: Sequence[Mapping[str, Any]], field: str) -> Tuple[List[float], List[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(field)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def plot_curves(logs: Sequence[str], out: str, *, labels: Optional[Sequence[str]] = None,
                fields: Sequence[Tuple[str, str]] = CURVE_FIELDS, width: int = CURVES_SIZE[0],
                height: int = CURVES_SIZE[1], dpi: int = 100, title: Optional[str] = None) -> str:
    """Loss, learning rate and images/s against step, one panel each, every run overlaid.

    Args:
        logs: JSONL training logs (records ``{"step", "loss", "lr", "images_per_s", …}``).
        labels: one legend label per log (default: the log's folder name).
    Returns ``out``, a ``width`` × ``height`` PNG.
    """
    _check_out(out)
    if not logs:
        raise ValueError("logs: expected at least one JSONL log")
    if labels is not None and len(labels) != len(logs):
        raise ValueError(f"--labels: expected one label per log ({len(logs)}), got {len(labels)}")
    runs = [read_log(p) for p in logs]
    legend = len(runs) > 1 or labels is not None  # (one run named by nobody needs no legend)
    labels = list(labels) if labels is not None else [os.path.basename(os.path.dirname(os.path.abspath(p))) or p
                                                      for p in logs]
    fig = _figure(width, height, dpi)
    axes = fig.subplots(1, len(fields))
    axes = [axes] if len(fields) == 1 else list(axes)
    for ax, (field, name) in zip(axes, fields):
        drawn = False
        for recs, label in zip(runs, labels):
            xs, ys = _series(recs, field)
            if xs:
                ax.plot(xs, ys, label=label, linewidth=1.4)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, f"no '{field}' in the logs", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if field == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    if legend:
        axes[0].legend(fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out)


# ----------------------------------------------------------------------------------------------
# StoP similarity maps (Figure 5)
# ----------------------------------------------------------------------------------------------
def predictor_tables_from_checkpoint(path: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(ψ [P, D], A [D, E])``: the predictor's positional table and context projection
    (``predictor_embed.weight``) from an official ``.pth.tar``, a training run of this project (its folder), or
    any torch / safetensors file holding a predictor state dict (under ``predictor``, or flat with
    ``predictor.`` / ``module.`` prefixes)."""
    from .eval.features import read_checkpoint
    obj = read_checkpoint(path)
    sd = obj["predictor"] if isinstance(obj.get("predictor"), Mapping) else obj
    flat = {}
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            for prefix in ("module.", "predictor."):
                k = k[len(prefix):] if k.startswith(prefix) else k
            flat[k] = v
    missing = [k for k in ("predictor_pos_embed", "predictor_embed.weight") if k not in flat]
    if missing:
        raise ValueError(f"--checkpoint: {path} has no predictor tensors {missing}; expected an official I-JEPA / StoP "
                         "checkpoint (with a 'predictor' state dict)")
    A = flat["predictor_embed.weight"].float()
    psi = flat["predictor_pos_embed"].float().reshape(-1, A.shape[0])
    return psi, A


def fresh_predictor_tables(model: str, img_size: int, patch_size: int, pred_emb_dim: int = 384,
                           seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(ψ [P, D], A [D, E])`` of a freshly initialised predictor for the encoder preset ``model``."""
    from .models.predictor import VisionTransformerPredictor
    from .models.vit import VIT_PRESETS, grid_size, resolve_model_name

    spec = VIT_PRESETS[resolve_model_name(model)]
    g = grid_size(img_size, patch_size)
    torch.manual_seed(seed)
    # depth 0: only ψ and A matter here, the blocks would be initialised for nothing
    pred = VisionTransformerPredictor(num_patches=g * g, embed_dim=spec.embed_dim, predictor_embed_dim=pred_emb_dim,
                                      depth=0, num_heads=1)
    return pred.predictor_pos_embed.detach().clone(), pred.predictor_embed.weight.detach().clone()


def parse_queries(texts: Sequence[str], grid: int) -> List[Tuple[int, int]]:
    """``["r,c", …]`` → ``[(row, col), …]``, each inside the ``grid`` × ``grid`` patch grid."""
    out = []
    for t in texts:
        m = re.fullmatch(r"\s*(-?\d+)\s*,\s*(-?\d+)\s*", t)
        if not m:
            raise ValueError(f"--queries: expected 'row,col', got {t!r}")
        r, c = int(m.group(1)), int(m.group(2))
        if not (0 <= r < grid and 0 <= c < grid):
            raise ValueError(f"--queries: {t!r} lies outside the {grid}×{grid} patch grid")
        out.append((r, c))
    if not out:
        raise ValueError("--queries: expected at least one 'row,col'")
    return out


def default_queries(grid: int) -> List[Tuple[int, int]]:
    """A corner, an off-centre and the central position."""
    return [(0, 0), (grid // 4, (3 * grid) // 4), (grid // 2, grid // 2)]


@torch.no_grad()
def similarity_maps(psi: torch.Tensor, A: torch.Tensor, queries: Sequence[Tuple[int, int]], *,
                    noise_std: float = 0.25, samples: int = 64, seed: int = 0,
                    chunk: int = 16) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity of the positional embedding at each query to every grid position.

    Deterministic: ``cos(ψ_q, ψ_j)``. Stochastic (StoP): ``E_n cos(ψ̂_q, ψ̂_j)`` with
    ``ψ̂ = ψ + A n``, ``n ~ N(0, σ² I_E)`` drawn independently for every position (as each masked
    token gets its own noise), averaged over ``samples`` draws. (The predictor also adds the bias
    of ``predictor_embed`` and, without StoP, the mask token; both are omitted from both maps.)

    Args:
        psi: ``[P, D]`` with P = g² (row-major grid); A: ``[D, E]``; queries: ``(row, col)`` pairs.
    Returns:
        ``(det, sto)``, each ``[Q, g, g]`` float32.
    """
    P, D = psi.shape
    g = int(round(P ** 0.5))
    if g * g != P:
        raise ValueError(f"psi: expected a square grid of positions, got {P} rows")
    if A.dim() != 2 or A.shape[0] != D:
        raise ValueError(f"A: expected [{D}, E] (predictor_embed.weight), got {tuple(A.shape)}")
    if samples < 1:
        raise ValueError(f"--samples: expected >= 1, got {samples}")
    if not 0 <= noise_std < math.inf:  # (NaN fails this too)
        raise ValueError(f"--noise-std: expected a finite value >= 0, got {noise_std}")
    q = torch.tensor([r * g + c for r, c in queries])
    psi, A = psi.double(), A.double()
    det = F.normalize(psi[q], dim=-1) @ F.normalize(psi, dim=-1).t()  # [Q, P]
    gen = torch.Generator().manual_seed(seed)
    acc = torch.zeros(len(queries), P, dtype=torch.float64)
    for s in range(0, samples, chunk):
        k = min(chunk, samples - s)
        n = torch.randn(k, P, A.shape[1], generator=gen, dtype=torch.float64) * noise_std
        hat = F.normalize(psi + n @ A.t(), dim=-1)  # [k, P, D]
        acc += torch.einsum("kqd,kpd->qp", hat[:, q], hat)
    sto = acc / samples
    return det.float().reshape(-1, g, g), sto.float().reshape(-1, g, g)


FRESH_PREDICTOR = dict(model="vit_tiny", img_size=64, patch_size=8, pred_emb_dim=384)  # simmaps without a checkpoint


def plot_simmaps(out: str, *, checkpoint: Optional[str] = None, model: Optional[str] = None,
                 img_size: Optional[int] = None, patch_size: Optional[int] = None,
                 pred_emb_dim: Optional[int] = None, queries: Optional[Sequence[str]] = None,
                 noise_std: float = 0.25, samples: int = 64, seed: int = 0, width: int = SIMMAP_SIZE[0],
                 height: int = SIMMAP_SIZE[1], dpi: int = 100, title: Optional[str] = None) -> str:
    """The paper's Figure 5 as a PNG: row 1 deterministic ψ, row 2 stochastic ψ̂, one column per query.

    The predictor comes from ``checkpoint`` or, without one, is freshly initialised for
    ``model`` / ``img_size`` / ``patch_size`` / ``pred_emb_dim`` (defaults :data:`FRESH_PREDICTOR`);
    with a checkpoint those are its own, and giving them is an error (they would be ignored).
    """
    _check_out(out)
    fresh = dict(model=model, img_size=img_size, patch_size=patch_size, pred_emb_dim=pred_emb_dim)
    given = [k for k, v in fresh.items() if v is not None]
    if checkpoint and given:
        raise ValueError(f"--{given[0].replace('_', '-')}: sizes a fresh predictor only; the checkpoint "
                         f"{checkpoint} has its own (drop {', '.join('--' + k.replace('_', '-') for k in given)})")
    model, img_size, patch_size, pred_emb_dim = (FRESH_PREDICTOR[k] if v is None else v for k, v in fresh.items())
    if checkpoint:
        psi, A = predictor_tables_from_checkpoint(checkpoint)
        source = os.path.basename(checkpoint)
    else:
        psi, A = fresh_predictor_tables(model, img_size, patch_size, pred_emb_dim, seed)
        source = f"fresh {model} predictor (img {img_size}, patch {patch_size})"
    g = int(round(psi.shape[0] ** 0.5))
    qs = parse_queries(queries, g) if queries else default_queries(g)
    det, sto = similarity_maps(psi, A, qs, noise_std=noise_std, samples=samples, seed=seed)
    lo = float(min(det.min(), sto.min()))
    fig = _figure(width, height, dpi)
    axes = fig.subplots(2, len(qs), squeeze=False)
    im = None
    for j, (r, c) in enumerate(qs):
        for i, (maps, name) in enumerate(((det, "deterministic ψ"), (sto, "stochastic ψ̂ (StoP)"))):
            ax = axes[i][j]
            im = ax.imshow(maps[j].numpy(), vmin=lo, vmax=1.0, cmap="viridis", interpolation="nearest")
            ax.plot([c], [r], marker="x", color="red", markersize=7, mew=2)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"query ({r}, {c})", fontsize=10)
            if j == 0:
                ax.set_ylabel(name, fontsize=10)
    fig.suptitle(title or f"cosine similarity of predictor positions to a query: {source}, σ={noise_std:g}, "
                          f"{samples} samples", fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.88, top=0.88, bottom=0.04, wspace=0.08, hspace=0.1)
    cax = fig.add_axes([0.9, 0.1, 0.02, 0.7])
    fig.colorbar(im, cax=cax)
    return _save(fig, out)


# ----------------------------------------------------------------------------------------------
# benchmark chart
# ----------------------------------------------------------------------------------------------
def read_benchmarks(path: str) -> List[Dict[str, Any]]:
    """The ``benchmarks`` list of a pytest-benchmark JSON file (``--benchmark-json``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"bench: no such file: {path}")
    if os.path.getsize(path) == 0:  # what `pytest benchmarks/ --benchmark-json` leaves where every benchmark skipped
        raise ValueError(f"bench: {path} is empty: pytest-benchmark writes nothing when no benchmark ran (the "
                         f"suites in benchmarks/ skip without CUDA)")
    data = chk.read_json(path, "bench")
    benches = data.get("benchmarks") if isinstance(data, dict) else None
    if not isinstance(benches, list):
        raise ValueError(f"bench: {path} has no 'benchmarks' list; expected pytest-benchmark's --benchmark-json output")
    benches = [b for b in benches if isinstance(b, dict) and isinstance(b.get("stats"), dict) and "name" in b]
    if not benches:
        raise ValueError(f"bench: {path} holds no benchmark results")
    return benches


def _spread(stats: Mapping[str, Any], stat: str) -> Tuple[float, float]:
    """Error bar ``(below, above)`` for ``stat``: ± stddev for the mean, the quartiles for the median."""
    v = float(stats[stat])
    if stat == "mean" and "stddev" in stats:
        return float(stats["stddev"]), float(stats["stddev"])
    if stat == "median" and "q1" in stats and "q3" in stats:
        return max(v - float(stats["q1"]), 0.0), max(float(stats["q3"]) - v, 0.0)
    return 0.0, 0.0


BENCH_STATS = ("mean", "median", "min", "max")  # times in seconds (pytest-benchmark's ops, rounds … are not)


def group_benchmarks(benches: Sequence[Mapping[str, Any]], stat: str = "mean"
                     ) -> Dict[str, List[Tuple[str, float, float, float]]]:
    """``{group: [(label, value s, error below s, error above s), …]}``. The group is the benchmark's
    ``group`` field, else its name before ``[`` (parametrised tests), else its name up to the last
    ``_``; the label is the parameter id or the rest of the name. A test parametrised by ``impl`` (this project's
    suites) is one workload per value of its other parameters: the group is the name with those values (shape, forward
    or forward+backward, eager or graph), the label the ``impl``, so a speed-up compares one workload's
    implementations only (a forward's bar was set against a forward+backward's). Error bars: ± stddev for the mean,
    quartiles for the median, none otherwise."""
    if stat not in BENCH_STATS:
        raise ValueError(f"--stat: expected one of {list(BENCH_STATS)} (a time), got {stat!r}")
    groups: Dict[str, List[Tuple[str, float, float, float]]] = {}
    for b in benches:
        name = b["name"]
        if stat not in b["stats"]:
            raise ValueError(f"--stat: benchmark {name} has no '{stat}' (has {sorted(b['stats'])})")
        if not float(b["stats"][stat]) > 0:
            raise ValueError(f"--stat: benchmark {name} has {stat} = {b['stats'][stat]!r}; expected a time > 0")
        base, _, param = name.partition("[")
        param = param.rstrip("]")
        params = b.get("params") or {}
        if not b.get("group") and isinstance(params, dict) and "impl" in params:
            rest = ", ".join(f"{k}={v}" for k, v in params.items() if k != "impl")
            group, label = (f"{base} [{rest}]" if rest else base), str(params["impl"])
        elif b.get("group"):
            group, label = str(b["group"]), (param or base)
        elif param:
            group, label = base, param
        else:
            group, _, label = base.rpartition("_")
            group, label = (group, label) if group else (base, base)
        groups.setdefault(group, []).append((label, float(b["stats"][stat]), *_spread(b["stats"], stat)))
    return groups


def bench_size(n_groups: int, ncols: int = 3, bars: int = 0) -> Tuple[int, int]:
    """Default figure size in pixels for ``n_groups`` panels (at most ``ncols`` per row) of up to ``bars`` bars,
    at least two panels wide (the one-line title does not fit over a single panel), and tall enough for a
    readable label per bar (:data:`BENCH_BAR_PX`)."""
    cols = min(ncols, n_groups)
    rows = math.ceil(n_groups / cols)
    panel_h = max(BENCH_PANEL[1], BENCH_BAR_PX * bars + 120)
    return BENCH_PANEL[0] * max(cols, 2), panel_h * rows + 50


def _unit(seconds: float) -> Tuple[str, float]:
    for unit, scale in (("s", 1.0), ("ms", 1e3), ("µs", 1e6)):
        if seconds * scale >= 1.0:
            return unit, scale
    return "ns", 1e9


def plot_bench(path: str, out: str, *, stat: str = "mean", baseline: str = "reference", ncols: int = 3,
               width: Optional[int] = None, height: Optional[int] = None, dpi: int = 100,
               title: Optional[str] = None) -> str:
    """One panel per benchmark group: a horizontal bar per op (``stat`` time with ± stddev) and its speed
    relative to the group's baseline (grey: the first entry whose label contains ``baseline``, else the
    slowest). Returns ``out``, a PNG of ``width`` × ``height`` pixels (default :func:`bench_size`)."""
    _check_out(out)
    if not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"--cols: expected a positive integer, got {ncols!r}")
    benches = read_benchmarks(path)
    groups = group_benchmarks(benches, stat)
    dw, dh = bench_size(len(groups), ncols, max(len(items) for items in groups.values()))
    fig = _figure(width or dw, height or dh, dpi)
    cols = min(ncols, len(groups))
    rows = math.ceil(len(groups) / cols)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    for ax, (group, items) in zip(axes.flat, sorted(groups.items())):
        labels = [it[0] for it in items]
        vals = [it[1] for it in items]
        lo = [it[2] for it in items]
        hi = [it[3] for it in items]
        base_i = next((i for i, lab in enumerate(labels) if baseline and baseline.lower() in lab.lower()),
                      max(range(len(vals)), key=vals.__getitem__))
        base = vals[base_i]
        unit, scale = _unit(max(vals))
        ys = list(range(len(items)))
        colors = ["#888888" if i == base_i else "#1f77b4" for i in ys]
        ax.barh(ys, [v * scale for v in vals], xerr=[[e * scale for e in lo], [e * scale for e in hi]],
                color=colors, capsize=3, error_kw={"elinewidth": 0.8})
        ax.set_yticks(ys)
        ax.set_yticklabels(labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"{stat} time ({unit})", fontsize=9)
        ax.set_title(group, fontsize=10)
        right = max(v + e for v, e in zip(vals, hi)) * scale
        ax.set_xlim(0, right * 1.6)
        for y, v, e in zip(ys, vals, hi):
            ax.text((v + e) * scale, y, f"  {v * scale:.3g} {unit}  ×{base / v:.2f}", va="center", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    info = {}
    try:
        info = json.load(open(path)).get("machine_info", {}) or {}
    except (OSError, ValueError, AttributeError):
        pass
    cpu = (info.get("cpu") or {}).get("brand_raw") if isinstance(info.get("cpu"), dict) else None
    fig.suptitle(title or f"{os.path.basename(path)} ({stat}): ×speed-up against the grey bar ('{baseline}', else "
                          "the slowest)" + (f"; {cpu}" if cpu else ""), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return _save(fig, out)


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stop_kernels.plots", description="Write PNG figures.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def size(sp, w, h):
        sp.add_argument("--width", type=int, default=w, help="pixels" + (f" (default {w})" if w else ""))
        sp.add_argument("--height", type=int, default=h, help="pixels" + (f" (default {h})" if h else ""))
        sp.add_argument("--dpi", type=int, default=100)
        sp.add_argument("--title")

    c = sub.add_parser("curves", help="loss, lr and images/s against step from JSONL training logs")
    c.add_argument("logs", nargs="+", help="log.jsonl files, overlaid")
    c.add_argument("--labels", nargs="+", help="one legend label per log")
    c.add_argument("--out", default="curves.png")
    size(c, *CURVES_SIZE)

    s = sub.add_parser("simmaps", help="StoP positional similarity maps (paper Figure 5)")
    s.add_argument("--checkpoint", help="official .pth.tar, a training run's folder (its newest checkpoint) or "
                                        "a file with a predictor state dict; omitted: a freshly initialised predictor")
    fp = FRESH_PREDICTOR
    s.add_argument("--model", help=f"encoder preset of a fresh predictor (its width E; default {fp['model']})")
    s.add_argument("--img-size", type=int, help=f"image size of a fresh predictor (default {fp['img_size']})")
    s.add_argument("--patch-size", type=int, help=f"patch size of a fresh predictor (default {fp['patch_size']})")
    s.add_argument("--pred-emb-dim", type=int, help=f"predictor width D of a fresh predictor (default "
                                                    f"{fp['pred_emb_dim']})")
    s.add_argument("--queries", nargs="+", help="query positions 'row,col' (default: corner, off-centre, centre)")
    s.add_argument("--noise-std", type=float, default=0.25, help="σ of the StoP noise (0.2 for the ViT-H recipe)")
    s.add_argument("--samples", type=int, default=64, help="noise draws averaged for the stochastic maps")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="simmap.png")
    size(s, *SIMMAP_SIZE)

    b = sub.add_parser("bench", help="bar chart of a pytest-benchmark JSON file, each op against its peers")
    b.add_argument("json", help="pytest --benchmark-json output")
    b.add_argument("--stat", default="mean", choices=BENCH_STATS, help="mean | median | min | max (default mean)")
    b.add_argument("--baseline", default="reference", help="label substring of each group's baseline bar "
                                                             "(default 'reference'; else the slowest)")
    b.add_argument("--cols", type=int, default=3, help="panels per row")
    b.add_argument("--out", default="bench.png")
    size(b, None, None)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    if a.cmd == "curves":
        out = plot_curves(a.logs, a.out, labels=a.labels, width=a.width, height=a.height, dpi=a.dpi, title=a.title)
    elif a.cmd == "simmaps":
        out = plot_simmaps(a.out, checkpoint=a.checkpoint, model=a.model, img_size=a.img_size,
                           patch_size=a.patch_size, pred_emb_dim=a.pred_emb_dim, queries=a.queries,
                           noise_std=a.noise_std, samples=a.samples, seed=a.seed, width=a.width, height=a.height,
                           dpi=a.dpi, title=a.title)
    else:
        out = plot_bench(a.json, a.out, stat=a.stat, baseline=a.baseline, ncols=a.cols, width=a.width,
                         height=a.height, dpi=a.dpi, title=a.title)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from stop_kernels._checks import run_command
    run_command(main, "python -m stop_kernels.plots")  # a bad argument or file: one error line, status 2
