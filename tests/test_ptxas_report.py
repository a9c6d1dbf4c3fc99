"""Resource check of the StoP forward kernel without a GPU (benchmarks/ptxas_report.py, sm_90a, bf16,
ViT-H sizes): the configs that span all of D in one program (D_TILES = 3 × 128 = 384, the design
that generates the noise once per row block) must compile without register spills; a kernel change
that makes them spill is slower on any Hopper GPU, whatever it does to correctness. The SASS of every
StoP main loop must be free of local memory, and the all-of-D forward loop must stay lean; no
attention candidate config may spill at the model's shapes. Also checks
that the tool itself (stop_kernels.devtools: offline sm_90 driver + ptxas) keeps working."""
import json
import os
import subprocess
import sys

import pytest

from _bench_scripts import ROOT, import_bench_script, nvidia_tools_available


@pytest.mark.skipif(not nvidia_tools_available("ptxas"), reason="triton's bundled ptxas (backends/nvidia/bin) is missing")
def test_kernel_configs_do_not_spill(tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "ptxas_report.py"), "--kernels", "stop,attention",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.load(open(tmp_path / "ptxas_report.json"))
    fwd = [r for r in rows if r["kernel"] == "stop fwd"]
    full_d = [r for r in fwd if r["config"]["D_TILES"] * r["config"]["BLOCK_D"] == 384]
    assert len(full_d) >= 3, fwd
    for r in full_d:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["wgmma"] + r["mma_sync"] > 0 and r["smem"] <= 227 * 1024, r  # tensor cores, fits an SM
    assert all(r["regs"] for r in rows), rows  # ptxas's verdict was found for every config
    # no local memory in any StoP main loop (spills, or the stack frame of libdevice's precise sin/cos
    # slow path that the noise must not use), and no fp32 accumulator layout round trips: the all-of-D
    # forward's loop stays near its ~900 SASS instructions / ~30 barriers (triton 3.8; it was 2248 / 101)
    for r in rows:
        if r["kernel"].startswith("stop"):
            assert r["loop_instrs"] is not None and r["loop_local"] == 0, r
    # no attention candidate the tuner may pick at the model's shapes spills (a spilling one only costs
    # tuning time at best)
    attn = [r for r in rows if r["kernel"].startswith("attn")]
    assert len(attn) >= 40, attn
    for r in attn:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["loop_local"] == 0, r
    # the context encoder's default forward (N = 74, Dh 80: 128 x 64 with 8 warps, two key blocks, since
    # the one-tile 128 x 128 computed wrong numbers on the GPU) runs two CTAs per SM
    ctx = [r for r in attn if r["kernel"] == "attn fwd encoder ctx N=74 Dh=80"][0]
    assert (ctx["config"]["BLOCK_M"], ctx["config"]["BLOCK_N"]) == (128, 64) and ctx["ctas_per_sm"] >= 2, ctx
    # the predictor's default forward (N = 116, head dim 24: one 64 x 128 tile, no key loop) scores the missing keys
    # in the dot (DOT_MASK): no select per score nor the compares feeding it, ~770 SASS instructions per warp (936
    # with the select, triton 3.8), and four CTAs per SM by registers
    pred = [r for r in attn if r["kernel"] == "attn fwd predictor N=116 Dh=24"][0]
    assert (pred["config"]["BLOCK_M"], pred["config"]["BLOCK_N"]) == (64, 128) and not pred["has_loop"], pred
    assert pred["loop_instrs"] <= 850 and pred["ctas_per_sm"] >= 4, pred
    # its default backward (the one-pass fused kernel, 8 warps) loads lse one element per thread
    # (_load_column_vector), not one predicated load per query column a thread holds: ~1000 SASS instructions per
    # warp (1104 with the per-column loads, triton 3.8), one CTA per SM as before
    bwd = [r for r in attn if r["kernel"] == "attn bwd-fused predictor N=116 Dh=24"][0]
    assert bwd["config"] == dict(VARIANT="fused", BLOCK_N=128, num_warps=8, num_stages=1) and not bwd["has_loop"], bwd
    assert bwd["loop_instrs"] <= 1040 and bwd["ctas_per_sm"] >= 1, bwd
    for r in full_d:
        if r["config"]["BLOCK_M"] == 64:
            assert r["loop_bar"] <= 48 and r["loop_instrs"] <= 1200, r
    # dW's main loop addresses a contiguous g's rows without a division (_group_rows, GROUPED off): the all-of-D
    # configs' loops stay near 784 (8 warps) and 452 (16 warps) SASS instructions, 951 and 529 with a 64-bit
    # division routine called per row (triton 3.8; 3.6 alike)
    dw_all_d = [r for r in rows if r["kernel"] == "stop dw" and r["config"]["D_TILES"] * r["config"]["BLOCK_D"] == 384
                and r["config"]["BLOCK_M"] == 64]
    assert {r["config"]["w"] for r in dw_all_d} >= {8, 16}, dw_all_d
    for r in dw_all_d:
        assert r["loop_instrs"] <= (840 if r["config"]["w"] == 8 else 480), r
    # SWAP_AB keeps the noise in the MMA's shared-memory operand, so ptxas does not serialise its wgmmas: at most
    # one wait per D tile's dot and K step (the noise-first configs wait after each wgmma with triton 3.6)
    swapped = [r for r in fwd if r["config"]["SWAP_AB"]]
    assert any(r in full_d for r in swapped) and any(r["config"]["BLOCK_D"] == 512 for r in swapped), swapped
    for r in swapped:
        assert r["wgmma"] > 0 and r["loop_wgmma_wait"] <= r["config"]["D_TILES"], r


_LOOP_SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   FFMA R2, R2, R3, R4 ;
        /*0020*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0028*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0030*/               @P0 BRA `(.L_x_0) ;
        /*0040*/                   EXIT ;
.L_x_1:
        /*0050*/                   BRA `(.L_x_1);
"""


def test_sass_loop_stats_loop_and_loopless():
    """The main loop is the longest backward branch; a kernel with only the end-of-kernel BRA to itself
    has no loop and reports the whole kernel."""
    from stop_kernels.devtools import sass_loop_stats
    assert sass_loop_stats(_LOOP_SASS) == {"loop_instrs": 4, "loop_bar": 1, "loop_local": 0, "loop_wgmma_wait": 1,
                                           "has_loop": True}
    loopless = _LOOP_SASS.replace("@P0 BRA `(.L_x_0) ;", "STL [R1], R2 ;")
    assert sass_loop_stats(loopless) == {"loop_instrs": 7, "loop_bar": 1, "loop_local": 1, "loop_wgmma_wait": 1,
                                         "has_loop": False}
    assert sass_loop_stats("")["loop_instrs"] is None


@pytest.fixture
def report_module(monkeypatch):
    return import_bench_script(monkeypatch, "ptxas_report")


@pytest.mark.parametrize("regs, warps, smem, ctas", [
    (128, 8, 64 * 1024, 2),    # registers: 65536 / (128 · 32 · 8) = 2 (shared memory would allow 3)
    (40, 4, 100 * 1024, 2),    # shared memory: 227 KB // 100 KB = 2 (registers would allow 12)
    (16, 1, 0, 32),            # neither binds: the 32-CTA cap of an SM
    (255, 4, 1024, 2),         # 65536 // 32640 = 2
])
def test_occupancy_is_the_tighter_of_registers_and_shared_memory(report_module, regs, warps, smem, ctas):
    assert report_module._occupancy(dict(regs=regs, num_warps=warps, smem=smem)) == ctas


def test_report_table_row(report_module, monkeypatch, tmp_path, capsys):
    """One row per config: registers, spills flagged when either direction spills, shared memory in KB,
    CTAs per SM, and the loop columns (a loopless kernel says so); the JSON keeps the occupancy."""
    row = dict(kernel="stop fwd", config={"BLOCK_M": 64, "w": 8}, regs=128, num_warps=8, smem=96 * 1024,
               spill_stores=0, spill_loads=8, wgmma=4, cp_async=2, loop_instrs=900, loop_bar=30, loop_local=0)
    loopless = dict(row, kernel="stop dw", spill_loads=0, has_loop=False)
    monkeypatch.setattr(report_module, "stop_rows", lambda: [dict(row), dict(loopless)])
    assert report_module.main(["--kernels", "stop", "--out", str(tmp_path)]) == 0
    lines = (tmp_path / "ptxas_report.md").read_text().splitlines()
    assert lines[-2] == "| stop fwd | BLOCK_M=64, w=8 | 128 | 0/8 **spills** | 96 | 2 | 4 | 2 | 900 / 30 / 0 |"
    assert lines[-1] == "| stop dw | BLOCK_M=64, w=8 | 128 | 0/0 | 96 | 2 | 4 | 2 | 900 (no loop: whole kernel) / 30 / 0 |"
    assert [r["ctas_per_sm"] for r in json.load(open(tmp_path / "ptxas_report.json"))] == [2, 2]
    assert lines[-1] in capsys.readouterr().out


def test_stop_rows_compile_each_config_as_tuned(report_module, monkeypatch):
    """Every autotune config of the StoP forward and dW kernels is compiled with its own block sizes, warps
    and pipeline stages (the row reports that config, not the kernel's defaults)."""
    from stop_kernels.ops import stop_embed as S
    compiled = []
    monkeypatch.setattr(report_module, "ptxas_report", lambda kernel, args, kw: compiled.append(kw) or {})
    rows = report_module.stop_rows()
    configs = list(S._FWD_CONFIGS) + list(S._DW_CONFIGS)
    assert [r["kernel"] for r in rows] == ["stop fwd"] * len(S._FWD_CONFIGS) + ["stop dw"] * len(S._DW_CONFIGS)
    for r, kw, c in zip(rows, compiled, configs):
        assert r["config"] == dict(c.kwargs, w=c.num_warps, s=c.num_stages)
        assert {k: kw[k] for k in c.kwargs} == c.kwargs and (kw["num_warps"], kw["num_stages"]) == (c.num_warps, c.num_stages)


def test_unknown_kernel_family_is_refused_before_any_compile(report_module, monkeypatch, capsys):
    """``--kernels stop,attn`` names 'attn' and the choices, before the StoP kernels' minutes of compiling
    (it was a KeyError after them)."""
    ran = []
    monkeypatch.setattr(report_module, "stop_rows", lambda: ran.append("stop") or [])
    with pytest.raises(SystemExit) as e:
        report_module.main(["--kernels", "stop,attn"])
    assert e.value.code == 2 and not ran
    assert "--kernels: unknown ['attn']; choose from ['attention', 'stop']" in capsys.readouterr().err


def test_allocation_trace_counts_new_memory_and_its_frees():
    """devtools.AllocationTrace (the StoP op's memory test and benchmarks/stop_host.py count with it): new results
    count until their storage is freed, once per storage (a view or a second result of it adds nothing); memory that
    existed before the trace counts only where an op grows it (``out=``, ``resize_``), never where an op returns it
    under another name (``_unsafe_view``, which has no alias annotation); results nested in lists count."""
    import torch

    from stop_kernels.devtools import AllocationTrace
    pre = torch.randn(8, 1024)
    with AllocationTrace() as t:
        a = torch.randn(1000)              # 4000 B
        b = a * 2                          # 4000 B, then freed
        v = b.view(10, 100)                # a view: nothing
        del b
        peak_with_b = t.peak_bytes
        del v                              # the storage is freed with its last view
        torch.ops.aten._unsafe_view(pre, (8, -1))
        parts = torch.ops.aten.split_with_sizes_copy(pre, [3, 5])  # a list of new tensors: 3 and 5 rows
    assert peak_with_b == 8000 and t.current_bytes == 4000 + 8 * 1024 * 4
    assert [n for n, *_ in t.allocations] == [4000, 4000, 3 * 1024 * 4, 5 * 1024 * 4], t.allocations
    o = torch.empty(0)
    with AllocationTrace() as t:
        torch.add(pre, 1, out=o)           # o grows from 0 to 32 KiB
        x = torch.empty(10)
        x.resize_(1000)                    # 40 B grown to 4000 B
    assert [(n, op) for n, op, *_ in t.allocations] == [(32768, "add"), (40, "empty"), (3960, "resize_")]
    assert t.current_bytes == 32768 + 4000 and len(parts) == 2 and a.numel() == 1000
