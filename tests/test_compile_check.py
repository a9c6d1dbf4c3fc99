"""Every Triton kernel that stop_kernels/ops launches, in every config its launch wrapper can choose
(representative constexpr variants: benchmarks/compile_check.py), compiled for sm_90a without a GPU:
it compiles, has no register spills or other local memory (except the listed known spills of this
Triton version) and fits an H100/H200 block's 227 KB of shared memory. CI has no GPU and runs the
kernels in the interpreter, which compiles nothing; this is where a kernel that would not compile,
spill or fit on the GPU is caught."""
import json
import os
import subprocess
import sys

import pytest
import torch

from _bench_scripts import ROOT, import_bench_script, nvidia_tools_available


@pytest.fixture
def check_module(monkeypatch):
    return import_bench_script(monkeypatch, "compile_check")


def test_entry_kernels_are_the_launched_jit_functions(check_module):
    """The kernel list that coverage is checked against is found in the sources (device helpers such as
    philox4x32_10 or _fwd_rows are called by other jit functions and are not entry points)."""
    names = check_module.entry_kernels()
    assert set(names) == {"_project_kernel", "_noise_weight_grad_kernel", "_pos_noise_kernel",
                          "_philox_normal_kernel", "_attn_fwd_kernel", "_attn_bwd_fused_kernel",
                          "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"}, names


def test_ci_scope_covers_every_kernel_and_every_config(check_module):
    """Every launched kernel is compiled; every autotune config of the StoP kernels that the prune keeps for
    bf16 and for fp32; every attention forward and backward candidate of the lists CI covers."""
    from stop_kernels.ops import attention as A
    from stop_kernels.ops import stop_embed as S
    specs = check_module.all_specs("ci")  # (unique_specs then drops the ones that compile to the same kernel)
    assert {s.kernel for s in specs} == set(check_module.entry_kernels())

    def configs(kernel, label_start):
        return sorted({str(s.config) for s in specs if s.kernel == kernel and s.label.startswith(label_start)})

    def all_of(config_list):
        return sorted(str(dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)) for c in config_list)
    # (D_TILES = 4 at D = 512: the prune drops it at the predictor's D = 384)
    assert configs("_project_kernel", "noise, bf16") == all_of(S._FWD_CONFIGS)
    assert configs("_noise_weight_grad_kernel", "bf16") == all_of(S._DW_CONFIGS)
    # dW with the predictor input's context rows in the same launch (HAS_CTX): every config too
    assert sorted({str(s.config) for s in specs if s.kernel == "_noise_weight_grad_kernel"
                   and s.label.startswith("bf16") and s.label.endswith("context rows")}) == all_of(S._DW_CONFIGS)
    assert configs("_project_kernel", "context, W bf16") == all_of(S._FWD_CONFIGS[:-1])
    assert configs("_pos_noise_kernel", "mask token, W bf16") == all_of(S._POS_CONFIGS)
    # float32 W: its own lists (the 16-bit tiles spilled registers with fp32 operands)
    assert configs("_project_kernel", "noise, fp32") == all_of(S._FWD_CONFIGS_FP32)
    assert configs("_project_kernel", "context, fp32") == all_of(S._FWD_CONFIGS_FP32)
    assert configs("_noise_weight_grad_kernel", "fp32") == all_of(S._DW_CONFIGS_FP32)
    for case in check_module.CI_ATTN_CASES:
        N, Dh = check_module.BUCKET_N[case.bucket], case.head_dim
        fwd = [s.config for s in specs if s.kernel == "_attn_fwd_kernel" and s.label == case.label()]
        want = A._fwd_candidates(N, Dh, dtype=case.dtype)
        assert fwd == (want[:1] if case.candidates == "first" else want), case
        bwd = [s.config for s in specs if s.kernel in ("_attn_bwd_fused_kernel", "_attn_bwd_dq_kernel")
               and s.label == case.label()]
        bwd_all = A._bwd_candidates(N, Dh, dtype=case.dtype)
        want = {"all": bwd_all, "first": bwd_all[:1], "fwd": []}[case.candidates]
        assert bwd == want, case


def test_ci_scope_covers_every_float32_attention_candidate(check_module):
    """float32 attention has its own candidate lists: CI compiles every candidate of them (the 16-bit
    defaults it ran before spilled 2.4–11 KB per thread), at the widest head dim and at the smallest bucket."""
    fp32 = [c for c in check_module.CI_ATTN_CASES if c.dtype == torch.float32]
    assert {c.candidates for c in fp32} == {"all"}
    assert max(c.head_dim for c in fp32) == 128 and min(c.bucket for c in fp32) == 16


def test_match_restricts_the_specs(check_module, capsys):
    """--match REGEX keeps the specs whose 'kernel [label]' contains it (--list shows which)."""
    assert check_module.main(["--list", "--match", r"_project_kernel \[noise, fp32\]"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.startswith("_project_kernel | noise, fp32 |") for line in lines), lines


def test_verdict_allows_exactly_the_known_spills(check_module):
    """A known spill passes only while it spills; an unknown spill, a compile error or too much shared memory
    fails (even for a listed config); a listed config that was not compiled fails."""
    C = check_module
    row = lambda label, problem: dict(kernel="k", label=label, config={"BLOCK_M": 64}, problem=problem)  # noqa: E731
    spill = "local memory (register spills or a stack frame): stack 16 B, local 0 B"
    known = {C._key("k", "a", {"BLOCK_M": 64})}
    assert C.verdict([row("a", spill), row("b", None)], known) == []
    assert len(C.verdict([row("a", spill), row("b", spill)], known)) == 1                  # unknown spill
    assert "no longer spills" in C.verdict([row("a", None)], known)[0]                      # fixed: update the list
    assert "was not compiled" in C.verdict([row("b", None)], known)[0]
    assert len(C.verdict([row("a", "does not compile: CompilationError: x")], known)) == 1
    assert len(C.verdict([row("a", "shared memory 240000 B > 232448 B")], known)) == 1


@pytest.mark.skipif(not nvidia_tools_available("ptxas", "cuobjdump"), reason="triton's bundled ptxas / cuobjdump (backends/nvidia/bin) is missing")
def test_every_kernel_config_compiles_for_sm90a(tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    out = tmp_path / "rows.json"
    jobs = str(min(4, os.cpu_count() or 1))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compile_check.py"), "--jobs", jobs,
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    rows = json.load(open(out))
    assert len(rows) >= 100 and all(r["regs"] for r in rows if "regs" in r), rows[:3]
    assert {r["kernel"] for r in rows} >= {"_pos_noise_kernel", "_philox_normal_kernel", "_attn_bwd_fused_kernel"}
