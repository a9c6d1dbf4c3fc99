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

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _ptxas_available() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


@pytest.mark.skipif(not _ptxas_available(), reason="triton's bundled ptxas (backends/nvidia/bin) is missing")
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
    # the context encoder's default forward (N = 74, Dh 80, the one-tile 128x128 config with 8 warps)
    # runs two CTAs per SM (128 registers): the key loop it never ran cost it 230, and wrapping the
    # per-program body in an `if` instead of returning early cost 8 more registers and the second CTA
    ctx = [r for r in attn if r["kernel"] == "attn fwd encoder ctx N=74 Dh=80"][0]
    assert ctx["config"]["BLOCK_M"] == ctx["config"]["BLOCK_N"] == 128 and ctx["ctas_per_sm"] >= 2, ctx
    for r in full_d:
        if r["config"]["BLOCK_M"] == 64:
            assert r["loop_bar"] <= 48 and r["loop_instrs"] <= 1200, r


_LOOP_SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   FFMA R2, R2, R3, R4 ;
        /*0020*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0030*/               @P0 BRA `(.L_x_0) ;
        /*0040*/                   EXIT ;
.L_x_1:
        /*0050*/                   BRA `(.L_x_1);
"""


def test_sass_loop_stats_loop_and_loopless():
    """The main loop is the longest backward branch; a kernel with only the end-of-kernel BRA to itself
    has no loop and reports the whole kernel."""
    from stop_kernels.devtools import sass_loop_stats
    assert sass_loop_stats(_LOOP_SASS) == {"loop_instrs": 3, "loop_bar": 1, "loop_local": 0, "has_loop": True}
    loopless = _LOOP_SASS.replace("@P0 BRA `(.L_x_0) ;", "STL [R1], R2 ;")
    assert sass_loop_stats(loopless) == {"loop_instrs": 6, "loop_bar": 1, "loop_local": 1, "has_loop": False}
    assert sass_loop_stats("")["loop_instrs"] is None
