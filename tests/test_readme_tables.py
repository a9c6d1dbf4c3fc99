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
    edited = text.replace("| **120.6** |", "| **110.6** |", 1)  # the default step's ms/step
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
