"""Every plot command writes a non-empty PNG of the expected pixel size; bad inputs give clear errors."""
import json
import math
import struct

import pytest
import torch

from stop_kernels import plots
from stop_kernels.models import vit_predictor
from stop_kernels.models.official import official_state_dict


def png_size(path):
    """(width, height) from the PNG signature and IHDR chunk."""
    data = open(path, "rb").read(32)
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def write_log(path, n=20, loss0=1.0, extra_lines=()):
    with open(path, "w") as fh:
        for s in range(n):
            fh.write(json.dumps({"step": s, "epoch": 0, "loss": loss0 * math.exp(-s / 10), "lr": 1e-3 * min(1, s / 5),
                                 "wd": 0.04, "momentum": 0.996, "images_per_s": 100.0 + s}) + "\n")
        for line in extra_lines:
            fh.write(line + "\n")
    return str(path)


@pytest.mark.needs("matplotlib")
# ----------------------------------------------------------------------------------------------
# curves
# ----------------------------------------------------------------------------------------------
def test_curves_png(tmp_path):
    a = write_log(tmp_path / "a.jsonl", extra_lines=['{"event": "done"}', ""])  # records without step are skipped
    b = write_log(tmp_path / "b.jsonl", n=15, loss0=0.8)
    out = tmp_path / "curves.png"
    assert plots.main(["curves", a, b, "--labels", "StoP", "I-JEPA", "--out", str(out)]) == 0
    assert out.stat().st_size > 5000 and png_size(out) == plots.CURVES_SIZE
    out2 = tmp_path / "sub" / "small.png"
    plots.main(["curves", a, "--width", "640", "--height", "240", "--out", str(out2)])
    assert png_size(out2) == (640, 240)
    assert plots.read_log(a)[-1]["step"] == 19


def test_curves_bad_inputs(tmp_path):
    good = write_log(tmp_path / "good.jsonl")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        plots.plot_curves([str(tmp_path / "missing.jsonl")], str(tmp_path / "x.png"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl is empty"):
        plots.main(["curves", good, str(empty), "--out", str(tmp_path / "x.png")])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "lo\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2 is not JSON"):
        plots.read_log(str(broken))
    with pytest.raises(ValueError, match="--labels"):
        plots.plot_curves([good], str(tmp_path / "x.png"), labels=["a", "b"])
    with pytest.raises(ValueError, match="--out"):
        plots.plot_curves([good], str(tmp_path / "x.jpg"))


def test_a_bad_out_name_is_refused_before_anything_is_drawn(tmp_path, monkeypatch):
    """Each plot refuses a non-PNG --out before it reads or draws anything: it used to draw the whole figure
    first, and without matplotlib (optional: the torch 2.11 GPU venv) the bad name gave a ModuleNotFoundError."""
    def no_figure(*a, **k):
        raise AssertionError("a figure was drawn")
    monkeypatch.setattr(plots, "_figure", no_figure)
    bad = str(tmp_path / "x.jpg")
    for call in (lambda: plots.plot_curves([str(tmp_path / "missing.jsonl")], bad),
                 lambda: plots.plot_simmaps(bad, model="vit_tiny", img_size=32, patch_size=8, pred_emb_dim=64),
                 lambda: plots.plot_bench(str(tmp_path / "none.json"), bad)):
        with pytest.raises(ValueError, match=r"^--out: expected a \.png file name, got '.*x\.jpg'"):
            call()


# ----------------------------------------------------------------------------------------------
# similarity maps
# ----------------------------------------------------------------------------------------------
def test_similarity_maps_math():
    psi, A = plots.fresh_predictor_tables("vit_tiny", 32, 8, pred_emb_dim=64)
    assert psi.shape == (16, 64) and A.shape == (64, 192)
    qs = [(0, 0), (1, 2)]
    det, sto = plots.similarity_maps(psi, A, qs, noise_std=0.0, samples=2)
    assert det.shape == sto.shape == (2, 4, 4)
    torch.testing.assert_close(det, sto)
    torch.testing.assert_close(det[0, 0, 0], torch.tensor(1.0))
    torch.testing.assert_close(det[1, 1, 2], torch.tensor(1.0))
    # noise makes every other position less similar on average, the query itself stays at 1
    _, sto = plots.similarity_maps(psi, A * 20, qs, noise_std=0.5, samples=32)
    torch.testing.assert_close(sto[0, 0, 0], torch.tensor(1.0))
    off = torch.ones(4, 4, dtype=torch.bool)
    off[0, 0] = False
    assert (sto[0][off] < det[0][off]).float().mean() > 0.9
    with pytest.raises(ValueError, match="A: expected"):
        plots.similarity_maps(psi, A.t(), qs)


@pytest.mark.needs("matplotlib")
def test_simmaps_png_fresh_and_from_checkpoint(tmp_path):
    out = tmp_path / "fresh.png"
    assert plots.main(["simmaps", "--model", "vit_tiny", "--img-size", "32", "--patch-size", "8",
                       "--pred-emb-dim", "64", "--samples", "4", "--out", str(out)]) == 0
    assert out.stat().st_size > 5000 and png_size(out) == plots.SIMMAP_SIZE
    # an official-layout checkpoint: module. prefixes, [1, P, D] position table
    torch.manual_seed(0)
    pred = vit_predictor(num_patches=16, embed_dim=192, num_heads=3, predictor_embed_dim=96, depth=1)
    sd = official_state_dict(pred)
    ckpt = tmp_path / "tiny.pth.tar"
    torch.save({"encoder": {}, "predictor": sd, "target_encoder": {}, "epoch": 1}, ckpt)
    psi, A = plots.predictor_tables_from_checkpoint(str(ckpt))
    torch.testing.assert_close(psi, pred.predictor_pos_embed)
    torch.testing.assert_close(A, pred.predictor_embed.weight.detach())
    out = tmp_path / "ckpt.png"
    plots.main(["simmaps", "--checkpoint", str(ckpt), "--queries", "0,0", "3,3", "--samples", "4",
                "--width", "800", "--height", "500", "--out", str(out)])
    assert png_size(out) == (800, 500)


def test_simmaps_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="--queries: '9,0' lies outside the 4×4 patch grid"):
        plots.plot_simmaps(str(tmp_path / "x.png"), model="vit_tiny", img_size=32, patch_size=8, pred_emb_dim=64,
                           queries=["9,0"])
    with pytest.raises(ValueError, match="--queries: expected 'row,col'"):
        plots.parse_queries(["3"], 4)
    with pytest.raises(FileNotFoundError, match="--checkpoint: no such file"):
        plots.plot_simmaps(str(tmp_path / "x.png"), checkpoint=str(tmp_path / "none.pth.tar"))
    torch.save({"encoder": {"w": torch.zeros(2)}}, tmp_path / "enc.pt")
    with pytest.raises(ValueError, match="no predictor tensors"):
        plots.plot_simmaps(str(tmp_path / "x.png"), checkpoint=str(tmp_path / "enc.pt"))
    with pytest.raises(ValueError, match="model"):
        plots.plot_simmaps(str(tmp_path / "x.png"), model="vit_enormous")
    with pytest.raises(ValueError, match="^--img-size: sizes a fresh predictor only"):  # was silently ignored
        plots.main(["simmaps", "--checkpoint", str(tmp_path / "enc.pt"), "--img-size", "224", "--out",
                    str(tmp_path / "x.png")])
    with pytest.raises(ValueError, match="^--model: .*drop --model, --pred-emb-dim"):
        plots.plot_simmaps(str(tmp_path / "x.png"), checkpoint=str(tmp_path / "enc.pt"), model="vit_huge",
                           pred_emb_dim=384)
    with pytest.raises(ValueError, match="--noise-std"):  # NaN drew all-NaN maps
        plots.plot_simmaps(str(tmp_path / "x.png"), model="vit_tiny", img_size=32, patch_size=8, pred_emb_dim=64,
                           noise_std=float("nan"))


# ----------------------------------------------------------------------------------------------
# benchmark chart
# ----------------------------------------------------------------------------------------------
def bench_entry(name, mean, group=None):
    stats = {"min": mean * 0.9, "max": mean * 1.2, "mean": mean, "stddev": mean * 0.05, "median": mean,
             "q1": mean * 0.95, "q3": mean * 1.05, "rounds": 10, "iterations": 1}
    param = name.partition("[")[2].rstrip("]") or None
    return {"group": group, "name": name, "fullname": f"benchmarks/test_x.py::{name}", "param": param,
            "params": {"impl": param} if param else None, "stats": stats, "extra_info": {}}


def write_bench(path):
    data = {"machine_info": {"node": "test", "cpu": {"brand_raw": "Test CPU"}}, "commit_info": {},
            "benchmarks": [bench_entry("test_attention[reference]", 2e-3, "attention"),
                           bench_entry("test_attention[triton]", 4e-4, "attention"),
                           bench_entry("test_attention[sdpa]", 6e-4, "attention"),
                           bench_entry("test_stop_embed[reference]", 3e-5),
                           bench_entry("test_stop_embed[fused]", 1e-5),
                           bench_entry("test_loss_reference", 1e-6),
                           bench_entry("test_loss_fused", 5e-7)],
            "datetime": "2025-01-01T00:00:00", "version": "4.0.0"}
    path.write_text(json.dumps(data))
    return str(path)


def test_bench_grouping(tmp_path):
    groups = plots.group_benchmarks(plots.read_benchmarks(write_bench(tmp_path / "bench.json")))
    assert sorted(groups) == ["attention", "test_loss", "test_stop_embed"]
    assert [g[0] for g in groups["attention"]] == ["reference", "triton", "sdpa"]
    assert [g[0] for g in groups["test_loss"]] == ["reference", "fused"]
    label, value, lo, hi = groups["test_stop_embed"][1]
    assert (label, value) == ("fused", 1e-5) and lo == hi == pytest.approx(5e-7)


@pytest.mark.needs("matplotlib")
def test_bench_png(tmp_path):
    src = write_bench(tmp_path / "bench.json")
    out = tmp_path / "bench.png"
    assert plots.main(["bench", src, "--out", str(out)]) == 0
    assert out.stat().st_size > 5000 and png_size(out) == plots.bench_size(3)
    out2 = tmp_path / "bench_median.png"
    plots.main(["bench", src, "--stat", "median", "--cols", "2", "--width", "900", "--height", "700",
                "--out", str(out2)])
    assert png_size(out2) == (900, 700)


def test_bench_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="bench: no such file"):
        plots.plot_bench(str(tmp_path / "none.json"), str(tmp_path / "x.png"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        plots.plot_bench(str(bad), str(tmp_path / "x.png"))
    bad.write_text("")  # what `pytest benchmarks/ --benchmark-json` leaves without CUDA (every benchmark skipped)
    with pytest.raises(ValueError, match=r"bad\.json is empty: pytest-benchmark writes nothing when no benchmark ran"):
        plots.main(["bench", str(bad), "--out", str(tmp_path / "x.png")])
    bad.write_text(json.dumps({"benchmarks": []}))
    with pytest.raises(ValueError, match="holds no benchmark results"):
        plots.plot_bench(str(bad), str(tmp_path / "x.png"))
    bad.write_text(json.dumps({"results": []}))
    with pytest.raises(ValueError, match="no 'benchmarks' list"):
        plots.plot_bench(str(bad), str(tmp_path / "x.png"))
    src = write_bench(tmp_path / "bench.json")
    with pytest.raises(ValueError, match="--stat"):
        plots.plot_bench(src, str(tmp_path / "x.png"), stat="p99")
    # pytest-benchmark's non-time stats (ops/s, rounds) would be drawn as seconds, speed-ups inverted
    for stat in ("ops", "rounds"):
        with pytest.raises(ValueError, match="--stat: expected one of"):
            plots.plot_bench(src, str(tmp_path / "x.png"), stat=stat)
    zero = json.loads(open(src).read())
    zero["benchmarks"][0]["stats"]["mean"] = 0.0
    bad.write_text(json.dumps(zero))
    with pytest.raises(ValueError, match="expected a time > 0"):
        plots.plot_bench(str(bad), str(tmp_path / "x.png"))
    assert plots.bench_size(1)[0] == 2 * plots.BENCH_PANEL[0]  # the title needs two panels' width


# ----------------------------------------------------------------------------------------------
# mutation audit: the drawn numbers are the data's (figures captured before saving)
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions save (a list; the files are written as usual)."""
    figs, real = [], plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, out: figs.append(fig) or real(fig, out))
    return figs


@pytest.mark.needs("matplotlib")
def test_curves_draw_each_log_against_its_steps(tmp_path, drawn):
    """Every panel draws each run's (step, value) pairs under that run's own label: logged every 10 steps,
    so an x axis of record indices would be wrong; a record without the field is left out."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"step": 10 * s, "loss": 2.0 - 0.1 * s, "lr": 1e-4 * s, "images_per_s": 50.0 + s})
                         + "\n" for s in range(6)))
    b.write_text("".join(json.dumps({"step": 5 + 3 * s, "loss": 1.0 + 0.05 * s, "lr": 2e-4}) + "\n" for s in range(4)))
    plots.plot_curves([str(a), str(b)], str(tmp_path / "c.png"), labels=["run A", "run B"])
    axes = drawn[0].axes
    assert [ax.get_title() for ax in axes] == ["loss", "learning rate", "images / s"]
    for ax, field in zip(axes, ("loss", "lr", "images_per_s")):
        lines = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()}
        for label, path in (("run A", a), ("run B", b)):
            recs = [json.loads(line) for line in path.read_text().splitlines()]
            pts = [(r["step"], r[field]) for r in recs if field in r]
            if pts:
                assert lines[label] == ([p[0] for p in pts], pytest.approx([p[1] for p in pts])), (field, label)
            else:
                assert label not in lines


@pytest.mark.needs("matplotlib")
def test_simmaps_draw_each_query_map_and_marker(tmp_path, drawn):
    """Column j shows query j's deterministic (row 1) and stochastic (row 2) map with a red cross at (col, row)
    of the image, on one colour scale from the lowest value of both rows to 1."""
    psi, A = plots.fresh_predictor_tables("vit_tiny", 32, 8, pred_emb_dim=64)
    qs = ["0,0", "1,3", "3,1"]
    plots.plot_simmaps(str(tmp_path / "s.png"), model="vit_tiny", img_size=32, patch_size=8, pred_emb_dim=64,
                       queries=qs, samples=8, noise_std=0.5)
    det, sto = plots.similarity_maps(psi, A, [(0, 0), (1, 3), (3, 1)], noise_std=0.5, samples=8)
    # independently: cosine of the query row of psi with every row, laid out row-major
    cos = torch.nn.functional.cosine_similarity(psi[:, None].double(), psi[None].double(), dim=-1)
    lo = min(float(det.min()), float(sto.min()))
    assert float(sto.min()) < float(det.min())  # so a scale taken from the deterministic row alone is wrong
    img_axes = [ax for ax in drawn[0].axes if ax.images]
    assert len(img_axes) == 6
    grid = {(ax.get_subplotspec().rowspan.start, ax.get_subplotspec().colspan.start): ax for ax in img_axes}
    for j, (r, c) in enumerate([(0, 0), (1, 3), (3, 1)]):
        for i, maps in enumerate((det, sto)):
            ax = grid[(i, j)]
            im = ax.images[0]
            torch.testing.assert_close(torch.as_tensor(im.get_array()), maps[j])
            assert im.get_clim() == pytest.approx((lo, 1.0))
            (cross,) = ax.get_lines()
            assert (list(cross.get_xdata()), list(cross.get_ydata())) == ([c], [r])
        torch.testing.assert_close(torch.as_tensor(grid[(0, j)].images[0].get_array()),
                                   cos[r * 4 + c].reshape(4, 4).float())


def test_simmap_tables_from_a_flat_predictor_file_and_queries_on_the_edge(tmp_path):
    """A flat predictor state dict with 'predictor.' (and 'module.') prefixes loads; a query on the grid's
    last row/column is inside, one past it is outside."""
    torch.manual_seed(0)
    pred = vit_predictor(num_patches=16, embed_dim=192, num_heads=3, predictor_embed_dim=96, depth=1)
    sd = {"module.predictor." + k: v for k, v in pred.state_dict().items()}
    torch.save(sd, tmp_path / "flat.pt")
    psi, A = plots.predictor_tables_from_checkpoint(str(tmp_path / "flat.pt"))
    torch.testing.assert_close(psi, pred.predictor_pos_embed)
    torch.testing.assert_close(A, pred.predictor_embed.weight.detach())
    assert plots.parse_queries(["3,3", " 0 , 3 "], 4) == [(3, 3), (0, 3)]
    for bad in ("4,0", "0,4", "-1,0"):
        with pytest.raises(ValueError, match="lies outside the 4×4 patch grid"):
            plots.parse_queries([bad], 4)


@pytest.mark.needs("matplotlib")
def test_bench_bars_speedups_and_baseline(tmp_path, drawn):
    """Bar lengths are the times in the panel's unit, the grey bar is the baseline (the label containing
    'reference' wherever it is listed, else the slowest), and each label reads baseline / time."""
    data = {"machine_info": {}, "benchmarks": [
        bench_entry("test_op[fused]", 4e-4, "op"), bench_entry("test_op[reference]", 2e-3, "op"),
        bench_entry("test_op[eager]", 1e-3, "op"),
        bench_entry("test_k[a]", 3e-5, "k"), bench_entry("test_k[b]", 6e-5, "k"),
        bench_entry("test_k[c]", 1.5e-5, "k")]}
    src = tmp_path / "b.json"
    src.write_text(json.dumps(data))
    plots.plot_bench(str(src), str(tmp_path / "b.png"))
    panels = {ax.get_title(): ax for ax in drawn[0].axes if ax.get_visible()}
    want = {"op": ("ms", [0.4, 2.0, 1.0], 1, [5.0, 1.0, 2.0]), "k": ("µs", [30.0, 60.0, 15.0], 1, [2.0, 1.0, 4.0])}
    for group, (unit, widths, grey, speedups) in want.items():
        ax = panels[group]
        assert ax.get_xlabel() == f"mean time ({unit})"
        bars = ax.patches
        assert [p.get_width() for p in bars] == pytest.approx(widths)
        greys = [i for i, p in enumerate(bars) if p.get_facecolor()[:3] == pytest.approx((0x88 / 255,) * 3)]
        assert greys == [grey]
        texts = [t.get_text() for t in ax.texts]
        assert [float(t.split("×")[1]) for t in texts] == pytest.approx(speedups, abs=0.01)
    assert plots._unit(1e-3) == ("ms", 1e3) and plots._unit(1.0) == ("s", 1.0)


def test_bench_median_uses_its_own_value_and_asymmetric_quartiles():
    """--stat median: the bar is the median (not the mean) and the error bar runs down to q1 and up to q3."""
    e = bench_entry("test_x[a]", 1e-3)
    e["stats"].update(median=8e-4, q1=7e-4, q3=1.1e-3)
    ((label, v, lo, hi),) = plots.group_benchmarks([e], "median")["test_x"]
    assert (label, v) == ("a", 8e-4) and (lo, hi) == (pytest.approx(1e-4), pytest.approx(3e-4))
    ((_, v, lo, hi),) = plots.group_benchmarks([e], "min")["test_x"]
    assert v == pytest.approx(0.9e-3) and lo == hi == 0.0


def test_simmaps_help_names_every_checkpoint_form():
    """``--help`` lists what ``--checkpoint`` takes, as docs/evaluation.md does: a run folder too."""
    sub = next(a for a in plots.build_parser()._actions if a.dest == "cmd")
    text = sub.choices["simmaps"].format_help()
    assert "run's folder" in text and ".pth.tar" in text


@pytest.mark.parametrize("module, argv", [
    ("stop_kernels.plots", ["simmaps", "--checkpoint", "/nonexistent/enc.pt"]),
    ("stop_kernels.eval.linear_probe", ["--checkpoint", "/nonexistent/enc.pt", "--data", "/nonexistent/images"]),
])
def test_command_line_user_errors_are_one_line(module, argv):
    """A bad argument or file given to the plotting and probing commands is one line, '<prog>: error: ...', and
    status 2, as train.py and to-official report theirs; it was a traceback."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"python -m {module}: error: --") and "Traceback" not in r.stderr, r.stderr


def test_bench_groups_one_workload_per_panel_by_its_impl_parameter(tmp_path):
    """The project's suites parametrise ``impl`` beside the workload (shape, forward or forward+backward, eager or
    graph) and set no group: every bar of a test went into one panel, a forward's speed-up was taken against a
    forward+backward bar, and bench_attention's 140 bars shared one 340-px panel (audit, session 30)."""
    entries = []
    for wb, t in (("False", 1.0), ("True", 3.0)):
        for impl, f in (("gemm", 1.0), ("conv", 2.0)):
            e = bench_entry(f"test_patch_embed[{'forward+backward' if wb == 'True' else 'forward'}-{impl}]", t * f * 1e-3)
            e["params"] = {"impl": impl, "with_backward": wb == "True"}
            entries.append(e)
    groups = plots.group_benchmarks(entries)
    assert sorted(groups) == ["test_patch_embed [with_backward=False]", "test_patch_embed [with_backward=True]"]
    for items in groups.values():
        assert [it[0] for it in items] == ["gemm", "conv"]
        assert items[1][1] / items[0][1] == pytest.approx(2.0)   # each panel's speed-up is its own workload's
    tall = plots.bench_size(2, 3, bars=140)[1]
    assert tall >= 140 * plots.BENCH_BAR_PX and plots.bench_size(2, 3, bars=2) == plots.bench_size(2)
