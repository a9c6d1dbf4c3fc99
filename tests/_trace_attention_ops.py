"""Trace the attention ops the way Inductor does, on a machine without a GPU (run by
tests/test_attention_inductor_trace.py in a subprocess; prints one JSON line).

On CUDA the ``stop_kernels::flash_attn_*`` ops are ``torch.library.triton_op``s: AOTAutograd traces
their bodies with fake tensors and symbolic sizes, each launch becoming a
``triton_kernel_wrapper_functional`` node whose ``tensors_to_clone`` lists the tensors torch's
kernel analysis (TTIR of the kernel) believes the kernel writes. Those are copied around the launch
in the compiled graph, and a written *input* is scattered back into the graph's input. This script
needs no GPU: Triton's active driver is replaced by one that reports an sm_90 target (TTIR only is
generated, nothing is launched: ``stop_kernels.devtools.offline_driver``) and the tensors are fake
CUDA tensors.
"""
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # real JITFunctions: the objects Inductor traces

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch._dynamo.source import ConstantSource  # noqa: E402
from torch._functorch.aot_autograd import aot_function  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv  # noqa: E402

from stop_kernels.devtools import offline_driver  # noqa: E402
from stop_kernels.ops import attention as A  # noqa: E402


def _launches(gm):
    """[(kernel name, sorted tensors_to_clone)] of the graph's Triton launches, and the other ops."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    out, other = [], []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if "triton_kernel_wrapper" in str(node.target):
            kern = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            out.append([kern.fn.__name__, sorted(node.kwargs.get("tensors_to_clone", []))])
        else:
            other.append(str(node.target))
    return out, other


def trace(N: int, D: int, varlen: bool, packed: bool = True):
    shape_env = ShapeEnv()
    mode = FakeTensorMode(shape_env=shape_env)
    sym = shape_env.create_symbol(N, ConstantSource("N"), dynamic_dim=DimDynamic.DYNAMIC)
    n = shape_env.create_symintnode(sym, hint=N)
    H, B = 4, 3
    graphs = []

    def grab(gm, _inputs):
        graphs.append(gm)
        return gm

    with mode:
        if varlen:
            qkv = torch.empty(B * n, 3, H, D, dtype=torch.bfloat16, device="cuda")
            do = torch.empty(B * n, H, D, dtype=torch.bfloat16, device="cuda")
            cu = torch.empty(B + 1, dtype=torch.int32, device="cuda")
        else:
            qkv = torch.empty(B, n, 3, H, D, dtype=torch.bfloat16, device="cuda")
            do = torch.empty(B, n, H, D, dtype=torch.bfloat16, device="cuda")
            cu = None

        def seqlen(qkv):  # a size of the traced input (a SymInt the tracer knows)
            return qkv.shape[0] // B if varlen else qkv.shape[1]

        ops = torch.ops.stop_kernels

        def fwd(qkv, *cu_):
            c = cu_[0] if cu_ else None
            if packed:
                return ops.flash_attn_qkv_fwd(qkv, c, seqlen(qkv), 0.25)
            return ops.flash_attn_fwd(*qkv.unbind(-3), c, seqlen(qkv), 0.25)

        def bwd(do, qkv, o, lse, *cu_):
            c = cu_[0] if cu_ else None
            if packed:
                return ops.flash_attn_qkv_bwd(do, qkv, o, lse, c, seqlen(qkv), 0.25)
            return ops.flash_attn_bwd(do, *qkv.unbind(-3), o, lse, c, seqlen(qkv), 0.25)

        extra = (cu,) if varlen else ()
        o, lse = aot_function(fwd, fw_compiler=grab, dynamic=True)(qkv, *extra)
        aot_function(bwd, fw_compiler=grab, dynamic=True)(do, qkv, o, lse, *extra)
    (fl, fo), (bl, bo) = (_launches(g) for g in graphs)
    return {"fwd": fl, "bwd": bl, "other_ops": sorted(set(fo + bo)),
            "guards": [str(g.expr).replace(str(sym), "N") for g in shape_env.guards],
            "shape": [str(s).replace(str(sym), "N") for s in o.shape]}


if __name__ == "__main__":
    res = {"inductor_launches": A.INDUCTOR_LAUNCHES}
    with offline_driver(90, "cuda"):  # Triton's target for the TTIR the analysis generates
        for N, D, varlen, packed in [(116, 24, False, True), (150, 24, False, True), (74, 80, False, True),
                                     (40, 24, True, True), (150, 24, False, False)]:
            name = f"{'qkv' if packed else 'q_k_v'}_N{N}_D{D}_{'varlen' if varlen else 'batched'}"
            res[name] = trace(N, D, varlen, packed)
    print(json.dumps(res))
