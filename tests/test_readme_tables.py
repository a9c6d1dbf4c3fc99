"""The README's performance tables are generated from the committed GPU results files
(``benchmarks/readme_tables.py``): they match those files, a hand edit is caught, and the anchor rows
quote ANCHORS.md."""
import json
import pathlib
import re
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import readme_tables  # noqa: E402

ANCHORS = REPO.parent / "shared" / "ANCHORS.md"


def test_readme_tables_match_their_results_files(capsys):
    text = (REPO / "README.md").read_text()
    kinds = [m.group(1) for m in readme_tables.MARKER.finditer(text)]
    assert sorted(kinds) == ["attention", "step", "stop"], kinds
    assert readme_tables.main(["--check"]) == 0, capsys.readouterr().err


def test_a_hand_edited_table_fails_the_check(tmp_path, capsys):
    text = (REPO / "README.md").read_text()
    step = text[text.index("<!-- table: step"):]
    ms = re.search(r"\| \*\*(\d+\.\d)\*\* \|", step).group(1)  # the default step's ms/step, in the step table
    edited = text.replace(f"| **{ms}** |", f"| **{float(ms) - 10:.1f}** |", 1)
    assert edited != text
    readme = tmp_path / "README.md"
    readme.write_text(edited)
    assert readme_tables.main(["--check", "--readme", str(readme)]) == 1
    assert "['step']" in capsys.readouterr().err
    assert readme_tables.main(["--write", "--readme", str(readme)]) == 0
    assert readme.read_text() == text


def test_step_rows_from_an_e2e_step_json():
    table = readme_tables.step_table("default=benchmarks/results/h200-run3/call3/e2e_step_compiled.json#fast",
                                     "reference=benchmarks/results/h200-run3/call3/e2e_step_compiled.json#reference")
    lines = table.splitlines()
    # e2e_step_compiled.json: fast 167.94 ms, 381.1 images/s; reference 173.55 ms, 368.8 images/s
    assert lines[2].startswith("| **this pipeline, the defaults") and "| **167.9** | **381.1** |" in lines[2]
    assert lines[3].startswith("| this pipeline's reference path") and "| 173.6 | 368.8 |" in lines[3]
    assert len(lines) == 4 + len(readme_tables.ANCHOR_ROWS)
    with pytest.raises(ValueError, match="no result for path 'fast_mixed'"):
        readme_tables.step_table("default=benchmarks/results/h200-run3/call3/e2e_step_compiled.json#fast_mixed")


def test_step_rows_from_the_current_e2e_harness(tmp_path):
    # benchmarks/e2e_step.py today: results named "name", peak memory in "peak_gib", failed paths kept
    res = [{"name": "reference", "ms_per_step": 150.04, "images_per_s": 426.55, "tflops": 294.05, "mfu": 0.2973,
            "peak_gib": 24.64},
           {"name": "fast_levers", "error": "RuntimeError: capture failed"}]
    f = tmp_path / "e2e_step.json"
    f.write_text(json.dumps({"gpu": "NVIDIA H200", "results": res}))
    table = readme_tables.step_table(f"reference={f}#reference")
    assert "| **150.0** | **426.6** | **294.1** | **29.7 %** | **24.6** |" in table
    with pytest.raises(ValueError, match="no result for path 'fast_levers'"):
        readme_tables.step_table(f"default={f}#fast_levers")
    # the anchor rows are an H200's: another card's step is refused, not tabled beside them
    f.write_text(json.dumps({"gpu": "NVIDIA H100 80GB HBM3", "results": res}))
    with pytest.raises(ValueError, match="ran on 'NVIDIA H100 80GB HBM3'"):
        readme_tables.step_table(f"reference={f}#reference")


def test_stop_table_says_which_backend_did_not_run(tmp_path):
    d = json.loads((REPO / "benchmarks/results/h200-run2/gpu_cuda.json").read_text())
    rows = d["timings"]["rows"]
    d["timings"]["rows"] = [r for r in rows if r["impl"] != "cuda"]           # extension not built
    d["timings"]["rows"] = [({"impl": "triton", "error": "RuntimeError: boom"} if r["impl"] == "triton" else r)
                            for r in d["timings"]["rows"]]
    f = tmp_path / "gpu_cuda.json"
    f.write_text(json.dumps(d))
    lines = readme_tables.stop_table(str(f)).splitlines()
    assert lines[2] == "| CUDA C++ (default when built) | not run | | | |"
    assert lines[3] == "| Triton | error: RuntimeError: boom | | | |"
    assert len(lines) == 2 + len(readme_tables.STOP_ROWS)


def test_stop_table_refuses_a_run_cut_before_its_timings(tmp_path):
    """gpu_cuda.py writes gpu_cuda.json after its tests too: a cuda section cut there leaves no timings, which is
    said with the file's name (it was a KeyError)."""
    d = json.loads((REPO / "benchmarks/results/h200-run2/gpu_cuda.json").read_text())
    del d["timings"]
    f = tmp_path / "gpu_cuda.json"
    f.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=f"stop table: {f} has no timings"):
        readme_tables.stop_table(str(f))


def test_step_sources_must_name_a_known_row():
    with pytest.raises(ValueError, match="ROW=PATH"):
        readme_tables.step_table("benchmarks/results/h200-run3/call3/train_eager.out")
    with pytest.raises(ValueError, match="ROW=PATH"):
        readme_tables.step_table("fastest=benchmarks/results/h200-run3/call3/train_eager.out")


@pytest.mark.skipif(not ANCHORS.is_file(), reason=f"{ANCHORS} is absent (../shared not beside the checkout)")
def test_anchor_rows_quote_anchors_md():
    rows = {}
    for line in ANCHORS.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"[\d.]+", cells[1]):
            rows.setdefault(cells[0], cells[1:])
    official = next(v for k, v in rows.items() if k.startswith("official StoP code"))
    compiled = next(v for k, v in rows.items() if k.startswith("+ torch.compile of each transformer block"))
    (_, *stop), (_, *best) = readme_tables.ANCHOR_ROWS
    assert stop == official and best == compiled, (readme_tables.ANCHOR_ROWS, official, compiled)


def _stop_source(tmp_path, gpu, dtype, R, E, D, fwdbwd_ms):
    f = tmp_path / "gpu_cuda.json"
    f.write_text(json.dumps({"env": {"gpu": gpu}, "timings": {
        "shape": {"R": R, "E": E, "D": D, "P": 256, "dtype": dtype},
        "rows": [{"impl": "cuda", "fwd_ms": 0.5, "fwdbwd_ms": fwdbwd_ms, "fwdbwd_peak_extra_mib": 40.84}]}}))
    return str(f)


@pytest.mark.parametrize("dtype, elt", [("float32", 4), ("float16", 2), ("bfloat16", 2)])
def test_stop_table_limit_is_the_byte_floor_when_bytes_dominate(tmp_path, dtype, elt):
    """Many narrow rows: byte-bound. The floor's traffic is the forward's ψ rows read and output written
    (2·R·D), W read (D·E) and the int64 indices (8·R), then the backward's gradient read (R·D) and dW
    written and read again (2·D·E), at H200's measured 4.23 TB/s; a time 10× that floor shows as 10×."""
    R, E, D = 1_000_000, 4, 4
    floor_ms = (elt * (2 * R * D + D * E) + 8 * R + elt * (R * D + 2 * D * E)) / 4.23e12 * 1e3
    assert 4 * R * E * D / 707e12 * 1e3 < floor_ms / 10  # the FLOP time is far below it
    lines = readme_tables.stop_table(_stop_source(tmp_path, "NVIDIA H200", dtype, R, E, D, 10 * floor_ms)).splitlines()
    assert lines[2] == f"| CUDA C++ (default when built) | 0.500 | {10 * floor_ms:.3f} | 40.8 MiB | 10× |"


def test_stop_table_limit_is_the_flop_floor_when_flops_dominate(tmp_path):
    """Wide matmuls: FLOP-bound at 707 TFLOP/s (the forward's n·Wᵀ and the backward's gᵀ·n: 2·2·R·E·D)."""
    R, E, D = 4096, 4096, 4096
    floor_ms = 4 * R * E * D / 707e12 * 1e3
    lines = readme_tables.stop_table(_stop_source(tmp_path, "NVIDIA H200", "bfloat16", R, E, D, 3 * floor_ms)).splitlines()
    assert lines[2].endswith("| 3× |"), lines[2]


def test_stop_table_refuses_a_card_without_limits(tmp_path):
    """A published ratio must be against the card that ran: no silent fallback to the H200's limits."""
    with pytest.raises(ValueError, match="no card limits for 'NVIDIA A100-SXM4-80GB'"):
        readme_tables.stop_table(_stop_source(tmp_path, "NVIDIA A100-SXM4-80GB", "float32", 8, 4, 4, 1.0))


def test_attention_table_cells(tmp_path):
    """Per shape: best SDPA / Triton ms (the SDPA backend named unless cuDNN) and the ratio, from the eager or
    the graph columns; a column that was not measured says so; head dims below 64 are the predictor's."""
    summary = [{"shape": [256, 16, 116, 24], "fwd_eager_ms": [0.075, "sdpa-cudnn", 0.0876, 0.856],
                "fwdbwd_eager_ms": [0.3558, "sdpa-flash", 0.4388, 0.811],
                "fwd_graph_ms": [0.05, "sdpa-efficient", 0.04, 1.25]},
               {"shape": [64, 12, 196, 64], "fwd_eager_ms": [0.1, "sdpa-cudnn", 0.2, 0.5]}]
    f = tmp_path / "gpu_attention.json"
    f.write_text(json.dumps({"summary": summary}))
    eager = readme_tables.attention_table(str(f)).splitlines()
    assert eager[2] == "| predictor (256, 16, 116, 24) | 0.075 / 0.088 | 0.86 | 0.356 (flash) / 0.439 | 0.81 |"
    assert eager[3] == "| encoder (64, 12, 196, 64) | 0.100 / 0.200 | 0.50 | not measured |  |"
    graph = readme_tables.render("attention", [str(f), "timer=graph"]).splitlines()
    assert graph[2] == "| predictor (256, 16, 116, 24) | 0.050 (efficient) / 0.040 | 1.25 | not measured |  |"
    # a misspelt timer or option is an error, not a table of "not measured" over measured rows
    with pytest.raises(ValueError, match="timer must be 'eager' or 'graph', got 'grpah'"):
        readme_tables.render("attention", [str(f), "timer=grpah"])
    for opt in ("timr=graph", "graph"):
        with pytest.raises(ValueError, match=r"options are timer=eager\|graph"):
            readme_tables.render("attention", [str(f), opt])
    # a run that timed the models' path (Triton on the packed QKV buffer) gets its forward+backward column
    summary[0]["fwdbwd_graph_ms"] = [0.367, "sdpa-cudnn", 0.243, 1.51]
    summary[0]["qkv_fwdbwd_graph_ms"] = [0.367, "sdpa-cudnn", 0.206, 1.78]
    f.write_text(json.dumps({"summary": summary}))
    graph = readme_tables.render("attention", [str(f), "timer=graph"]).splitlines()
    assert graph[0].endswith("| fwd+bwd SDPA / Triton on the QKV buffer ms | × |") and graph[1].count("---") == 7
    assert graph[2] == ("| predictor (256, 16, 116, 24) | 0.050 (efficient) / 0.040 | 1.25 | 0.367 / 0.243 | 1.51 | "
                        "0.367 / 0.206 | 1.78 |")
    assert graph[3] == "| encoder (64, 12, 196, 64) | not measured |  | not measured |  | not measured |  |"


def test_step_rows_take_the_last_measurement(tmp_path):
    """A path measured twice in one e2e_step.json (a rerun appends) is tabled from its last result, and a
    train.py --benchmark output is read from its last JSON line (the result, after any earlier one)."""
    res = [{"name": "fast", "ms_per_step": 200.0, "images_per_s": 320.0, "tflops": 200.0, "mfu": 0.2, "peak_gib": 20.0},
           {"name": "fast", "ms_per_step": 150.0, "images_per_s": 426.7, "tflops": 294.0, "mfu": 0.297, "peak_gib": 24.6}]
    f = tmp_path / "e2e_step.json"
    f.write_text(json.dumps({"gpu": "NVIDIA H200", "results": res}))
    assert "| **150.0** | **426.7** |" in readme_tables.step_table(f"default={f}#fast")
    out = tmp_path / "train.out"
    first = dict(res[0], gpu="NVIDIA H200", peak_mem_gib=20.0)
    last = dict(res[1], gpu="NVIDIA H200", peak_mem_gib=24.6)
    out.write_text("step 0 ...\n" + json.dumps(first) + "\nlog line\n" + json.dumps(last) + "\n")
    table = readme_tables.step_table(f"default={f}#fast", f"eager_triton={out}")
    assert table.splitlines()[3] == ("| this pipeline, eager blocks, Triton attention (`--compile false`) | 150.0 | "
                                     "426.7 | 294.0 | 29.7 % | 24.6 |")


def test_step_rows_show_both_peaks_and_cells_stay_one_line(tmp_path):
    """A step row shows the allocated peak with the reserved one beside it, where the source has both: a path
    replayed from CUDA graphs allocates in pools the allocated peak leaves out (run 7: 10.4 against 29.6 GiB), so
    the allocated figure alone would flatter it. An error text becomes one table cell: one line, no column
    separator (a CUDA error spans lines)."""
    common = {"tflops": 370.0, "mfu": 0.37, "ms_per_step": 117.0, "images_per_s": 547.0}
    src = tmp_path / "e2e_step.json"
    src.write_text(json.dumps({"gpu": "NVIDIA H200", "results": [
        {"name": "fast", "peak_gib": 23.86, "peak_reserved_gib": 27.78, **common},
        {"name": "fast_cg", "peak_gib": 10.4, "peak_reserved_gib": 29.57, "cudagraph_recordings": 560, **common},
        {"name": "old", "peak_gib": 23.9, **common}]}))
    table = readme_tables.step_table(f"default={src}#fast", f"cuda_graph_trees={src}#fast_cg", f"reference={src}#old")
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and "ANCHORS" not in ln][2:]
    assert [r.rstrip(" |").rsplit("| ", 1)[1] for r in rows] == ["**23.9 (27.8)**", "10.4 (29.6)", "23.9"]
    assert readme_tables.md_cell("CUDA error: an illegal | access\nCUDA kernel errors might be") == \
        "CUDA error: an illegal \\| access CUDA kernel errors might be"
