"""The command lines the project documents as runnable on a CPU, run as a user types them: a fresh interpreter
(``sys.executable``) from the repository root, with the environment of this process less ``TRITON_INTERPRET``, which
conftest sets for the tests but a user's shell does not (a command that needs it sets it itself).

The in-process tests of the scripts (tests/test_benchmark_harness.py) import them with the flag already on and the
checkout already importable, which is how ``python benchmarks/stop_host.py`` came to refuse its own fused path in a
fresh shell unnoticed. Each command here is a documented one (a script's docstring, docs/*.md), at its smallest
documented size or ``--help`` where a real run takes more than a few seconds.

Every python started here imports torch (≈ 3-4 s on a 2-core machine), so the commands the selected tests need are
started together at the module's first test, two at a time (one per core), and each test waits for its own.
"""
import concurrent.futures
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 240
WORKERS = 2


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra)
    return env


# name -> (argv after the interpreter, extra environment, run from the repository root: else from a scratch folder)
# "{tmp}" is that command's own scratch folder (its --out), made when the commands start.
COMMANDS = {
    "stop_host": (["benchmarks/stop_host.py", "--calls", "3", "--out", "{tmp}"], {}, True),
    "attention_host_overhead": (["benchmarks/gpu_attention.py", "--host-overhead"], {"TRITON_INTERPRET": "1"}, True),
    "gemm_rehearsal": (["benchmarks/gemm_in_graph.py", "--out", "{tmp}"], {"STOP_KERNELS_REHEARSE": "1"}, True),
    # `pytest benchmarks/`: the checkout is not on the path (python -m pytest from elsewhere, as the console script)
    "bench_suites": (["-m", "pytest", str(REPO / "benchmarks"), "--benchmark-only", "-q", "-p", "no:cacheprovider",
                      "-rs"], {}, False),
    "host_overhead": (["benchmarks/host_overhead.py", "--depth", "2", "--passes", "1", "--setups", "eager",
                       "--out", "{tmp}"], {}, True),
    "compile_check_list": (["benchmarks/compile_check.py", "--list"], {}, True),
    "readme_tables": (["benchmarks/readme_tables.py"], {}, True),
    "ptxas_report_help": (["benchmarks/ptxas_report.py", "--help"], {}, True),
    "gluon_compile": (["benchmarks/gluon_stop_forward.py", "--compile-only"], {"TRITON_INTERPRET": "1"}, True),
    "gpu_stop_embed_help": (["benchmarks/gpu_stop_embed.py", "--help"], {}, True),
    "e2e_step_help": (["benchmarks/e2e_step.py", "--help"], {}, True),
    "train_help": (["train.py", "--help"], {}, True),
    "linear_probe_help": (["-m", "stop_kernels.eval.linear_probe", "--help"], {}, True),
}


def _unrunnable(name):
    """Why a command is not run here (a skip reason), or None."""
    if name == "bench_suites":
        if importlib.util.find_spec("pytest_benchmark") is None:
            return "needs pytest-benchmark (--benchmark-only), not installed"
        import torch
        if torch.cuda.is_available():
            return "with CUDA the suites run their benchmarks (GPU minutes), not their skips"
    return None


def uses(*names):
    """Mark a test with the COMMANDS it reads (only those of the selected tests are run)."""
    def mark(fn):
        fn.commands = names
        return fn
    return mark


def _run(argv, env, in_repo, scratch):
    argv = [a.replace("{tmp}", scratch) for a in argv]
    r = subprocess.run([sys.executable, *argv], cwd=REPO if in_repo else scratch, env=env, capture_output=True,
                       text=True, timeout=TIMEOUT_S)
    return r, pathlib.Path(scratch)


@pytest.fixture(scope="module")
def runs(request):
    """name -> future of (CompletedProcess, its scratch folder), for the commands of this module's selected tests."""
    wanted = []
    for item in request.session.items:
        for name in getattr(getattr(item, "function", None), "commands", ()):
            if item.module is request.module and name not in wanted:
                wanted.append(name)
    with tempfile.TemporaryDirectory(prefix="documented_commands_") as root, \
            concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        futures = {}
        for name in (n for n in wanted if _unrunnable(n) is None):
            argv, extra, in_repo = COMMANDS[name]
            scratch = os.path.join(root, name)
            os.mkdir(scratch)
            futures[name] = pool.submit(_run, argv, _env(**extra), in_repo, scratch)
        yield futures


def _done(runs, name):
    if _unrunnable(name):
        pytest.skip(_unrunnable(name))
    r, scratch = runs[name].result()
    shown = " ".join(map(str, r.args[1:]))
    assert r.returncode == 0, f"python {shown} exited with {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout, scratch


@uses("stop_host")
def test_stop_host_runs_its_fused_path_from_a_fresh_shell(runs):
    """`python benchmarks/stop_host.py [--calls 3000] [--out DIR]` (its docstring) in a shell without TRITON_INTERPRET:
    the fused op's Triton path runs (launches stubbed) and is counted beside the official path. It refused its own
    fused path when the script set the flag after stop_kernels had been imported (the kernels are made interpreted
    only when the flag is on at import)."""
    out, scratch = _done(runs, "stop_host")
    assert "| fused | forward+backward |" in out and "| official | forward+backward |" in out
    rows = {(r["path"], r["kind"]): r for r in json.loads((scratch / "stop_host.json").read_text())["rows"]}
    assert rows[("fused", "forward")]["triton_launches"] == 1
    assert rows[("fused", "forward+backward")]["triton_launches"] == 2
    assert all(r["us_per_call"] > 0 for r in rows.values())


@uses("attention_host_overhead")
def test_attention_host_overhead_runs_with_the_interpreter_flag_exported(runs):
    """`python benchmarks/gpu_attention.py --host-overhead` ("CPU is enough", its docstring) in a shell that exports
    TRITON_INTERPRET=1 (as the tests and the rehearsals set it): the mode fakes the compile of real JITFunctions, so
    the script drops the flag before torch and the kernels are imported. Dropped later, after stop_kernels had
    defined the kernels interpreted, the run died in Triton's import of gluon (an AssertionError). A shell without the
    flag takes the same path, less the drop."""
    out, _ = _done(runs, "attention_host_overhead")
    assert "host overhead (fake launch, CPU)" in out
    times = re.findall(r"N=(\d+)\s+(fwd no_grad|fwd \(grad enabled\)|fwd\+bwd \([a-z]+ bwd\))\s+([\d.]+)", out)
    assert {(n, kind.split(" (")[0]) for n, kind, _ in times} >= {("16", "fwd+bwd"), ("300", "fwd no_grad")}, out
    assert all(float(us) > 0 for *_, us in times)


@uses("gemm_rehearsal")
def test_gemm_in_graph_rehearsal_writes_its_rows(runs):
    """`STOP_KERNELS_REHEARSE=1 python benchmarks/gemm_in_graph.py --out DIR` (its docstring's rehearsal): every GEMM of
    the toy layer timed and the results written. The script found stop_kernels only through an installed package
    (its results writer imports it): from a checkout that is not installed it timed every row and then died writing
    them, where the other GPU scripts put the checkout on the path themselves."""
    out, scratch = _done(runs, "gemm_rehearsal")
    rows = json.loads((scratch / "gemm_in_graph.json").read_text())["rows"]
    assert [r["gemm"] for r in rows] == ["fwd", "dx", "dw"] and all("error" not in r for r in rows), rows
    assert (scratch / "gemm_in_graph.md").read_text().count("\n| context qkv ") == 3


@uses("bench_suites")
def test_benchmark_suites_skip_without_cuda(runs):
    """`pytest benchmarks/ --benchmark-only` (README, docs/evaluation.md): without CUDA every suite skips with its
    reason; none fails to import. pytest puts only benchmarks/ on the path, so bench_attention.py and bench_cuda.py,
    which did not add the checkout, were collection errors (exit status 2) where stop_kernels is not installed."""
    out, _ = _done(runs, "bench_suites")
    assert re.search(r"\b\d+ skipped\b", out) and not re.search(r"\berrors?\b", out.splitlines()[-1]), out[-2000:]
    assert "need a CUDA GPU" in out or "needs a CUDA GPU" in out


@uses("host_overhead")
def test_host_overhead_times_a_tiny_stack(runs):
    """`python benchmarks/host_overhead.py [--device cpu] [--depth 32] [--passes 30] [--out DIR]` at its smallest: one
    set-up timed, the table printed and the JSON written."""
    out, scratch = _done(runs, "host_overhead")
    assert "| eager |" in out
    rows = json.loads((scratch / "host_overhead.json").read_text())["rows"]
    assert [r["setup"] for r in rows] == ["eager"] and rows[0]["ms_per_pass"] > 0


@uses("compile_check_list", "ptxas_report_help")
def test_offline_compile_scripts_start(runs):
    """`python benchmarks/compile_check.py --list` and `python benchmarks/ptxas_report.py --help` (no GPU needed): the
    scripts import the kernels uninterpreted and list what they would compile."""
    out, _ = _done(runs, "compile_check_list")
    assert "_project_kernel |" in out and "_attn_fwd_kernel |" in out and "_philox_normal_kernel |" in out
    out, _ = _done(runs, "ptxas_report_help")
    assert "--kernels" in out and "--out" in out


@uses("readme_tables")
def test_readme_tables_prints_the_tables(runs):
    """`python benchmarks/readme_tables.py` (print every table the README's markers name) from a fresh shell."""
    out, _ = _done(runs, "readme_tables")
    assert out.count("<!-- table: ") >= 3 and "| implementation | fwd ms |" in out


@uses("gpu_stop_embed_help", "e2e_step_help")
def test_gpu_step_scripts_parse_their_options_on_a_cpu(runs):
    """`python benchmarks/gpu_stop_embed.py --help` and `python benchmarks/e2e_step.py --help` (whose CPU modes, the
    rehearsal and the refusal per path, run in tests/test_benchmark_harness.py): their imports (_gpu_common,
    profile_step) and option parsers work in a fresh interpreter without a GPU."""
    out, _ = _done(runs, "gpu_stop_embed_help")
    assert "--budget-s" in out and "--pytest" in out
    out, _ = _done(runs, "e2e_step_help")
    assert "--paths" in out and "--profile-steps" in out


@uses("train_help", "linear_probe_help")
def test_training_and_evaluation_entry_points_start(runs):
    """`python train.py --help` and `python -m stop_kernels.eval.linear_probe --help` (docs/training.md,
    docs/evaluation.md): the flags the docs name are there."""
    out, _ = _done(runs, "train_help")
    assert all(f in out for f in ("--noise-mode", "--attention-policy", "--compile-mode", "--benchmark", "--init-from"))
    out, _ = _done(runs, "linear_probe_help")
    assert all(f in out for f in ("--checkpoint", "--subset", "--protocol", "--lambd", "--cache-dir"))


@uses("gluon_compile")
def test_gluon_experiment_builds_with_overlapped_wgmmas(runs):
    """`python benchmarks/gluon_stop_forward.py --compile-only` (no GPU; here with TRITON_INTERPRET exported, which the
    script drops before the kernels are defined): every config of the forward and of dW builds for sm_90a without
    spills, fits an SM's shared memory, and its main loop waits for wgmma groups once per K step, not once per wgmma
    (ptxas serialises them, C7515, when the accumulators are written between a wgmma and its wait: with triton 3.6
    a runtime trip count did that, 12 waits per step)."""
    out, _ = _done(runs, "gluon_compile")
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| gluon ")]
    assert len(rows) == 6 and sum("dW" in cells[0] for cells in rows) == 2, out  # 4 forward configs, 2 dW
    for cells in rows:
        regs, spills, smem, instrs, bars, waits = (int(c.strip(" |")) for c in cells[1:7])
        assert spills == 0 and smem <= 227 * 1024 and waits == 1 and 0 < instrs < 1000, cells
