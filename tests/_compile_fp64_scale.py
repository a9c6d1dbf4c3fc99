"""Compile the attention kernels for sm_90 (no GPU) with their float scalar argument typed fp64, as
Inductor types a Python float when it launches a user-defined Triton kernel from a compiled graph
(run by tests/test_attention_inductor_trace.py in a subprocess; prints one JSON line).

Triton's own launcher types the same argument fp32, so the eager path never saw this: in GPU run 4 the
fp64 scale promoted the forward's running max m_i to fp64 inside the key loop and Triton refused the
loop ("Loop-carried variable m_i has initial type fp32 but is re-assigned to fp64"); without a loop
the kernels compiled but computed their scores in fp64. Per kernel and config: whether it compiled,
and the TTIR lines that touch f64 besides the argument itself and its one conversion to f32.
"""
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # real JITFunctions, compiled (nothing is launched)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stop_kernels.devtools import _jit_function, offline_driver  # noqa: E402
from stop_kernels.ops import attention as A  # noqa: E402

_PTRS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "DO": "*bf16", "DQ": "*bf16", "DK": "*bf16",
         "DV": "*bf16", "LSE": "*fp32", "DELTA": "*fp32", "CU": "*i32"}
_FLOATS = ("scale", "scale_log2")
_COMMON = dict(HEAD_DIM=80, BD0=64, BD1=16, ALIGN=8, VARLEN=False, DOT_MASK=False, PREC="tf32", UPCAST=False)
_DH24 = dict(_COMMON, HEAD_DIM=24, BD0=32, BD1=0, DOT_MASK=True)  # the predictor's: the key mask in the dot
CASES = {  # name: (kernel, constexprs): the encoder's head dim 80, with and without a key loop, and head dim 24
    "fwd one tile": (A._attn_fwd_kernel, dict(_COMMON, BLOCK_M=128, BLOCK_N=128, HEADS=1, ONE_TILE=True,
                                               PERSISTENT=False, GRID3=True)),
    "fwd key loop": (A._attn_fwd_kernel, dict(_COMMON, BLOCK_M=128, BLOCK_N=64, HEADS=1, ONE_TILE=False,
                                               PERSISTENT=False, GRID3=False)),
    "fwd one tile dot mask": (A._attn_fwd_kernel, dict(_DH24, BLOCK_M=64, BLOCK_N=128, HEADS=1, ONE_TILE=True,
                                                        PERSISTENT=False, GRID3=True)),
    "bwd fused loop": (A._attn_bwd_fused_kernel, dict(_COMMON, BLOCK_Q=128, BLOCK_N=64, PERSISTENT=False,
                                                       GRID2=True, GRAD_GROUP=3, THREADS=256)),
    "bwd one pass dot mask": (A._attn_bwd_fused_kernel, dict(_DH24, BLOCK_Q=128, BLOCK_N=128, PERSISTENT=False,
                                                              GRID2=False, GRAD_GROUP=3, THREADS=256)),
    "bwd dq": (A._attn_bwd_dq_kernel, dict(_COMMON, BLOCK_M=64, BLOCK_N=64, GRID3=True, GRAD_GROUP=3)),
    "bwd dkdv": (A._attn_bwd_dkdv_kernel, dict(_COMMON, BLOCK_M=64, BLOCK_N=64, GRID3=False, GRAD_GROUP=3)),
}


def compile_case(kernel, constexprs, float_type="fp64"):
    fn = _jit_function(kernel)
    names = fn.arg_names
    sig = {n: "constexpr" if n in constexprs else _PTRS.get(n, float_type if n in _FLOATS else "i32")
           for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    with offline_driver(90, "cpu"):
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 2})
    lines = [ln.strip() for ln in compiled.asm["ttir"].splitlines() if "f64" in ln]
    # the argument (function signature / its loc) and its conversion to f32 are expected
    other = [ln for ln in lines if not (ln.startswith("tt.func") or "arith.truncf" in ln or ln.startswith("#loc"))]
    return {"compiled": True, "f64_lines": other}


if __name__ == "__main__":
    res = {}
    for name, (kernel, consts) in CASES.items():
        try:
            res[name] = compile_case(kernel, consts)
        except Exception as e:  # the compiler's refusal is the finding
            res[name] = {"compiled": False, "error": "\n".join(str(e).splitlines()[-3:])[-600:]}
    print(json.dumps(res))
