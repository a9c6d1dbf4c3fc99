#!/usr/bin/env python
"""The README's performance tables, generated from the results files of a GPU run (never typed by hand).

    python benchmarks/readme_tables.py            # print every table the README's markers name
    python benchmarks/readme_tables.py --write    # rewrite those tables in README.md
    python benchmarks/readme_tables.py --check    # exit 1 if README.md differs from its results files

A generated table sits in README.md between two markers, the first naming the table's kind and its
sources (paths relative to the repository root):

    <!-- table: stop benchmarks/results/h200-run2/gpu_cuda.json -->
    | ... |
    <!-- /table -->

Kinds:
- ``stop``: ``stop_embed`` per backend, from ``gpu_cuda.json`` (``benchmarks/gpu_cuda.py``): forward and
  forward+backward time, peak memory beyond the inputs, and how far forward+backward is from the
  card's limit (max of FLOP time and byte time at the card's ceilings, ``_gpu_common.card_limits``).
- ``attention``: best SDPA backend against the Triton kernels per shape, from ``gpu_attention.json``
  (``benchmarks/gpu_attention.py``); ``timer=graph`` takes the CUDA-graph (kernel) times instead of
  the eager ones. Where the run timed the models' path (Triton on the packed QKV buffer), a column of its
  forward+backward follows.
- ``step``: the training step, one row per source, written ``ROW=PATH`` with ROW one of
  :data:`STEP_ROWS` (the first row is the defaults, in bold). PATH is the output of
  ``train.py --benchmark`` (its last JSON line), or ``e2e_step.json#PATH_NAME`` for one path of
  ``benchmarks/e2e_step.py``. Then the anchor rows of the official code measured on an H200
  (:data:`ANCHOR_ROWS`, from ANCHORS.md).

After a GPU run: point the markers at the new results folder and run ``--write``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from _gpu_common import card_limits, md_cell  # noqa: E402

MARKER = re.compile(r"^<!-- table: (\w+)((?: \S+)*) -->\n(.*?)^<!-- /table -->\n", re.M | re.S)

STOP_ROWS = {  # impl in gpu_cuda.json -> the README's label, in the README's order
    "cuda": "CUDA C++ (default when built)",
    "triton": "Triton",
    "unfused": "unfused PyTorch (randn + Linear + gather)",
    "unfused_compiled": "unfused, `torch.compile`",
}

STEP_ROWS = {  # ROW of a step source -> the README's label
    "default": "this pipeline, the defaults: compiled blocks (SDPA inside), fused StoP input",
    "default_cpp": "this pipeline, the defaults: compiled blocks (SDPA inside, Inductor's C++ host code), fused StoP input",
    "default_mixed": "this pipeline, the defaults: compiled blocks (Triton attention at the predictor's head dim 24, SDPA "
                     "at the encoders' 80; Inductor's C++ host code), fused StoP input",
    "compiled_sdpa": "this pipeline, compiled blocks with SDPA at every head dim (`--attention-policy compiled:24=sdpa`, "
                     "the default before run 6)",
    "python_host": "this pipeline, compiled blocks with Inductor's Python host code (`--cpp-wrapper false`)",
    "compiled_triton": "this pipeline, compiled blocks, Triton attention (`--attention triton`)",
    "eager_triton": "this pipeline, eager blocks, Triton attention (`--compile false`)",
    "compiled_mixed": "this pipeline, compiled blocks, Triton attention for the predictor's head dim 24 "
                      "(`--attention-policy compiled:24=triton`)",
    "reference": "this pipeline's reference path: SDPA, unfused StoP input, per-block compile "
                 "(the strongest official baseline, rebuilt)",
    # e2e_step.py's paths since the twenty-second session (labels ready for the run that measures them)
    "cuda_graph_trees": "this pipeline, the defaults with the compiled blocks replayed from CUDA-graph trees "
                        "(`--compile-mode reduce-overhead --cpp-wrapper false`)",
    "cuda_graph_trees_levers": "this pipeline, CUDA-graph trees plus combo kernels, multi-kernel reductions, the bf16 "
                               "residual stream, the target encoder's GELU in its fc1 GEMM and the Triton attention "
                               "for the context encoder (`--combo-kernels --multi-kernel --bf16-residual "
                               "--fused-target-gelu --attention-policy compiled_train:80=triton`)",
    "cuda_graph_trees_stack": "this pipeline, CUDA-graph trees over one compiled graph per block stack "
                              "(`--compile-scope stack`)",
    "levers": "this pipeline, the defaults plus the opt-in levers (combo kernels, multi-kernel reductions, bf16 "
              "residual stream, graphed target encoder on a second stream, fused target GELU, Triton attention for "
              "the context encoder: `--attention-policy compiled_train:80=triton`)",
    "target_gelu": "this pipeline, the defaults with the target encoder's GELU in its fc1 GEMM (`--fused-target-gelu`)",
}

# ANCHORS.md (../shared), "Training step" table, one NVIDIA H200: (label, ms/step, images/s, peak GiB).
# tests/test_readme_tables.py checks these against ANCHORS.md where ../shared is present.
ANCHOR_ROWS = [
    ("official StoP code (ANCHORS.md, same card)", "323.8", "198", "18.1"),
    ("official I-JEPA + SDPA + fused AdamW + foreach EMA + per-block compile (ANCHORS.md)", "125.4", "510", "24.2"),
]


def _load(path: str):
    with open(os.path.join(REPO, path)) as fh:
        return json.load(fh)


def stop_table(source: str) -> str:
    """``stop_embed`` forward / forward+backward per backend (gpu_cuda.json)."""
    d = _load(source)
    if "timings" not in d:  # gpu_cuda.py writes the file after its tests too: a run cut before the timings
        raise ValueError(f"stop table: {source} has no timings (its run stopped before them)")
    tm = d["timings"]
    s = tm["shape"]
    R, E, D = s["R"], s["E"], s["D"]
    tflops, tbps = card_limits(d["env"]["gpu"], strict=True)
    elt = 2 if s["dtype"] in ("bfloat16", "float16") else 4
    # forward: ψ[idx] + n·Wᵀ + b; backward: dW = gᵀ·n (noise regenerated), db, dψ
    flops = 2 * 2 * R * E * D
    nbytes = elt * (2 * R * D + D * E) + 8 * R + elt * (R * D + 2 * D * E)
    limit_ms = max(flops / (tflops * 1e12), nbytes / (tbps * 1e12)) * 1e3
    rows = {r["impl"]: r for r in tm["rows"]}
    lines = ["| implementation | fwd ms | fwd+bwd ms | peak beyond inputs (fwd+bwd) | vs limit (fwd+bwd) |",
             "| --- | --- | --- | --- | --- |"]
    for impl, label in STOP_ROWS.items():
        r = rows.get(impl)
        if r is None:  # not run (e.g. the CUDA extension not built): said, not dropped
            lines.append(f"| {label} | not run | | | |")
            continue
        if "fwdbwd_ms" not in r:
            lines.append(f"| {label} | error: {md_cell(r.get('error', 'no forward+backward time'))} | | | |")
            continue
        lines.append(f"| {label} | {r['fwd_ms']:.3f} | {r['fwdbwd_ms']:.3f} | {r['fwdbwd_peak_extra_mib']:.1f} MiB | "
                     f"{r['fwdbwd_ms'] / limit_ms:.0f}× |")
    return "\n".join(lines) + "\n"


def _shape_label(shape) -> str:
    B, H, N, Dh = shape
    return f"{'predictor' if Dh < 64 else 'encoder'} ({B}, {H}, {N}, {Dh})"


def attention_table(source: str, timer: str = "eager") -> str:
    """Best SDPA backend vs Triton per shape (gpu_attention.json ``summary``); × > 1: Triton faster."""
    if timer not in ("eager", "graph"):  # another name matches no column: every cell would say "not measured"
        raise ValueError(f"attention table: timer must be 'eager' or 'graph', got {timer!r}")
    d = _load(source)
    # the models' path, Triton on the packed QKV buffer (attention_qkv), where the run timed it (run 6 on)
    qkv = any(f"qkv_fwdbwd_{timer}_ms" in s for s in d["summary"])
    lines = ["| shape (B, H, N, Dh) | fwd SDPA / Triton ms | × | fwd+bwd SDPA / Triton ms | × |"
             + (" fwd+bwd SDPA / Triton on the QKV buffer ms | × |" if qkv else ""),
             "| --- | --- | --- | --- | --- |" + (" --- | --- |" if qkv else "")]

    def cells(s, col):
        if col not in s:
            return ["not measured", ""]
        best, impl, tri, x = s[col]
        name = impl.replace("sdpa-", "")
        sd = f"{best:.3f}" + ("" if name == "cudnn" else f" ({name})")
        return [f"{sd} / {tri:.3f}", f"{x:.2f}"]
    for s in d["summary"]:
        row = cells(s, f"fwd_{timer}_ms") + cells(s, f"fwdbwd_{timer}_ms") + (cells(s, f"qkv_fwdbwd_{timer}_ms") if qkv else [])
        lines.append(f"| {_shape_label(s['shape'])} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _step_result(path: str) -> dict:
    """One measured step: ``FILE#NAME`` (a path of e2e_step.json) or the last JSON line of FILE."""
    path, _, name = path.partition("#")
    if name:  # e2e_step.json: results named "name" (run 3's harness: "path"), peak in "peak_gib"
        found = [r for r in _load(path)["results"] if r.get("name", r.get("path")) == name and "error" not in r]
        if not found:
            raise ValueError(f"step table: {path} has no result for path {name!r}")
        r = dict(found[-1])
        r.setdefault("peak_mem_gib", r.get("peak_gib"))
        r.setdefault("gpu", _load(path).get("gpu", r.get("gpu")))
        return r
    with open(os.path.join(REPO, path)) as fh:
        return json.loads([ln for ln in fh.read().splitlines() if ln.startswith("{")][-1])


def step_table(*sources: str) -> str:
    """The training step per configuration (train.py --benchmark JSON lines), then the anchors."""
    lines = ["| configuration | ms/step | images/s | TFLOP/s | MFU (of 989) | peak GiB allocated (reserved) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for i, spec in enumerate(sources):
        row, sep, path = spec.partition("=")
        if not sep or row not in STEP_ROWS:
            raise ValueError(f"step table: source {spec!r} is not ROW=PATH with ROW one of {sorted(STEP_ROWS)}")
        r = _step_result(path)
        if "H200" not in str(r.get("gpu")):  # the anchor rows below are H200 numbers
            raise ValueError(f"step table: {path} ran on {r.get('gpu')!r}; the anchor rows are an H200's (ANCHORS.md)")
        # both peaks, where the source has both: a path replayed from CUDA graphs allocates in the graphs' private
        # pools, which the allocator's peak after warm-up leaves out (run 7: 10.4 GiB against 29.6 reserved)
        peak = f"{r['peak_mem_gib']:.1f}" + (f" ({r['peak_reserved_gib']:.1f})" if r.get("peak_reserved_gib") else "")
        cells = [STEP_ROWS[row], f"{r['ms_per_step']:.1f}", f"{r['images_per_s']:.1f}", f"{r['tflops']:.1f}",
                 f"{100 * r['mfu']:.1f} %", peak]
        if i == 0:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    for label, ms, ips, gib in ANCHOR_ROWS:
        lines.append(f"| {label} | {ms} | {ips} | | | {gib} |")
    return "\n".join(lines) + "\n"


def render(kind: str, args) -> str:
    if kind == "stop":
        return stop_table(*args)
    if kind == "attention":
        opts = dict(a.partition("=")[::2] for a in args[1:])
        if set(opts) - {"timer"}:
            raise ValueError(f"attention table: options are timer=eager|graph, got {args[1:]}")
        return attention_table(args[0], **opts)
    if kind == "step":
        return step_table(*args)
    raise ValueError(f"unknown table kind {kind!r} (stop, attention, step)")


def update(text: str) -> tuple[str, list]:
    """README text with every marked table regenerated, and the kinds that changed."""
    changed = []

    def sub(m):
        kind, args = m.group(1), m.group(2).split()
        table = render(kind, args)
        if table != m.group(3):
            changed.append(kind)
        return f"<!-- table: {kind}{m.group(2)} -->\n{table}<!-- /table -->\n"
    return MARKER.sub(sub, text), changed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="rewrite the tables in the README")
    g.add_argument("--check", action="store_true", help="exit 1 if the README's tables differ from their sources")
    ap.add_argument("--readme", default=os.path.join(REPO, "README.md"))
    a = ap.parse_args(argv)
    with open(a.readme) as fh:
        text = fh.read()
    if not MARKER.search(text):
        print(f"{a.readme}: no '<!-- table: ... -->' markers", file=sys.stderr)
        return 1
    new, changed = update(text)
    if a.check:
        if changed:
            print(f"{a.readme}: tables differ from their results files: {changed} "
                  "(python benchmarks/readme_tables.py --write)", file=sys.stderr)
            return 1
        print(f"{a.readme}: every table matches its results files")
        return 0
    if a.write:
        tmp = a.readme + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(new)
        os.replace(tmp, a.readme)
        print(f"{a.readme}: rewrote {changed or 'nothing (already current)'}")
        return 0
    for m in MARKER.finditer(new):
        print(f"<!-- table: {m.group(1)}{m.group(2)} -->\n{m.group(3)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
