"""Trace the attention ops the way Inductor does, on a machine without a GPU (run by
tests/test_attention_inductor_trace.py in a subprocess; prints one JSON line). With ``--inductor``:
Inductor's generated host code for the ops (``inductor_wrapper``) and for the forward of a whole
compiled transformer block around them (``inductor_block_wrapper``).

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
import re
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
from stop_kernels.training.parallelize import inductor_switches  # noqa: E402


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


def _symbolic_n(N: int):
    """A fake-tensor mode whose shape environment has one dynamic size N (hint ``N``):
    (shape_env, mode, the sympy symbol, the SymInt)."""
    shape_env = ShapeEnv()
    mode = FakeTensorMode(shape_env=shape_env)
    sym = shape_env.create_symbol(N, ConstantSource("N"), dynamic_dim=DimDynamic.DYNAMIC)
    return shape_env, mode, sym, shape_env.create_symintnode(sym, hint=N)


PERSISTENT_FWD = dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2, HEADS=1, PERSIST=1)
PERSISTENT_BWD = dict(VARIANT="fused", BLOCK_N=128, num_warps=8, num_stages=2, PERSIST=1)
KEYS_BWD = dict(VARIANT="keys", BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=1)  # every key, 32-query blocks


def trace(N: int, D: int, varlen: bool, packed: bool = True, fwd_cfg=None, bwd_cfg=None, symbolic_d=False):
    """``symbolic_d``: the head dim a dynamic size too (torch.compile(dynamic=True) of a function of the
    packed input itself); the kernels need it as a constant, so the ops specialise it (guard D == its value)."""
    shape_env, mode, sym, n = _symbolic_n(N)
    if symbolic_d:
        sym_d = shape_env.create_symbol(D, ConstantSource("D"), dynamic_dim=DimDynamic.DYNAMIC)
        D = shape_env.create_symintnode(sym_d, hint=D)
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
        with A._force_config(fwd=fwd_cfg, bwd=bwd_cfg):
            o, lse = aot_function(fwd, fw_compiler=grab, dynamic=True)(qkv, *extra)
            aot_function(bwd, fw_compiler=grab, dynamic=True)(do, qkv, o, lse, *extra)
    (fl, fo), (bl, bo) = (_launches(g) for g in graphs)
    return {"fwd": fl, "bwd": bl, "other_ops": sorted(set(fo + bo)),
            "guards": [str(g.expr).replace(str(sym), "N").replace(str(sym_d) if symbolic_d else "\0", "D")
                       for g in shape_env.guards],
            "shape": [str(s).replace(str(sym), "N") for s in o.shape]}


def _pretend_h100_for_inductor():
    """Inductor's code generation asks the CUDA runtime for the device's properties and whether Triton
    can target it; answer as an H100 would (nothing is compiled for or run on a device: the
    generated wrapper code is only read)."""
    import types

    import torch._dynamo.device_interface as dif
    import torch._inductor.compile_fx as cfx
    import torch._inductor.scheduler as sched
    props = types.SimpleNamespace(major=9, minor=0, multi_processor_count=132, name="NVIDIA H100 (offline)",
                                  total_memory=80 * 2 ** 30, warp_size=32, max_threads_per_multi_processor=2048,
                                  regs_per_multiprocessor=65536, shared_memory_per_block_optin=232448,
                                  L2_cache_size=50 * 2 ** 20, gcnArchName="", uuid="offline", clock_rate=1980000)
    torch.cuda.get_device_properties = lambda *a, **k: props
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
    torch.cuda.device_count = lambda: 1
    torch.cuda.current_device = lambda: 0
    dif.CudaInterface.get_device_properties = staticmethod(lambda *a, **k: props)
    dif.CudaInterface.get_compute_capability = staticmethod(lambda *a, **k: 90)
    dif.CudaInterface.current_device = staticmethod(lambda: 0)
    sched.has_triton = lambda: True
    cfx._check_triton_bf16_support = lambda graph: None


def _inductor(cpp_wrapper: bool = False, **config):
    """(compiler, config patch) of a graph compiled as torch.compile's Inductor backend compiles it:
    ``config`` are Inductor options; ``cpp_wrapper`` (config key ``cpp_wrapper``) reaches the compiler as
    its argument and as the options it implies."""
    import functools

    from torch._inductor.compile_fx import compile_fx_inner, get_cpp_wrapper_config
    if cpp_wrapper:
        return functools.partial(compile_fx_inner, cpp_wrapper=True), {**config, **get_cpp_wrapper_config(),
                                                                       "cpp_wrapper": True}
    return compile_fx_inner, config


def inductor_wrapper(N: int, D: int = 24, fwd_cfg=None, bwd_cfg=None, cpp_wrapper: bool = False):
    """Inductor's generated ``call`` (the host code of the compiled graph) for the packed forward op
    and for the packed backward op, with a symbolic N: which kernels it launches, which buffers it
    allocates, and whether anything is copied around the launches. ``cpp_wrapper``: the C++ host code."""
    import torch._inductor.config as inductor_config
    inner, patches = _inductor(cpp_wrapper)
    codes = []
    restore = _capture_wrapper_code(codes)
    try:
        _, mode, _, n = _symbolic_n(N)
        B, H = 4, 16
        with mode:
            qkv = torch.empty(B, n, 3, H, D, dtype=torch.bfloat16, device="cuda")
            do = torch.empty(B, n, H, D, dtype=torch.bfloat16, device="cuda")
            o = torch.empty(B, n, H, D, dtype=torch.bfloat16, device="cuda")
            lse = torch.empty(B, H, n, dtype=torch.float32, device="cuda")
        ops = torch.ops.stop_kernels
        graphs = [(lambda x: (ops.flash_attn_qkv_fwd(x, None, x.shape[1], 0.25)[0],), (qkv,)),
                  (lambda d, x, o_, l_: (ops.flash_attn_qkv_bwd(d, x, o_, l_, None, x.shape[1], 0.25),),
                   (do, qkv, o, lse))]
        for fn, args in graphs:
            try:
                with mode, A._force_config(fwd=fwd_cfg, bwd=bwd_cfg), inductor_config.patch(patches):
                    aot_function(fn, fw_compiler=inner, dynamic=True)(*args)
            except _Stop:
                pass
    finally:
        restore()
    return {"fwd": codes[0], "bwd": codes[1]}


# per graph whose host code was captured, in order: why Inductor would run it without CUDA graphs (``compile_mode:
# reduce-overhead``), empty when nothing stops it
CUDAGRAPH_BLOCKERS = []


def _cudagraph_blockers(graph) -> list:
    """The reasons Inductor's lowering of ``graph`` would give to skip CUDA graphs: a reason set while lowering, a
    CPU or second device, an op a CUDA graph cannot hold (a host synchronisation, a ``cudagraph_unsafe`` tag, data-
    dependent output sizes). The run-time checks (inputs mutated outside the graph's pool) need a GPU."""
    from torch._inductor.cudagraph_utils import check_multiple_devices_or_any_cpu_nodes
    from torch._inductor.utils import get_first_incompatible_cudagraph_node
    node = get_first_incompatible_cudagraph_node(graph.orig_gm)
    return [r for r in (graph.disable_cudagraphs_reason, check_multiple_devices_or_any_cpu_nodes(graph.device_node_mapping),
                        node is not None and f"incompatible op {node.target}") if r]


def _capture_wrapper_code(codes):
    """Make Inductor stop once a graph's host code exists, appending its ``call`` function to
    ``codes`` (with ``cpp_wrapper``: the whole C++ source) and its :func:`_cudagraph_blockers` to
    ``CUDAGRAPH_BLOCKERS``; returns the function that restores Inductor.
    The ``call`` function comes after the definitions of the multi-kernels it calls (``multi_kernel_<i> =
    async_compile.multi_kernel(...)``, the kernels each chooses from), where the config makes any."""
    from torch._inductor import graph as ind_graph

    def stop_after_codegen(self):
        CUDAGRAPH_BLOCKERS.append(_cudagraph_blockers(self))
        code = self.codegen_with_cpp_wrapper() if self.cpp_wrapper else self.codegen()
        code = code[0] if isinstance(code, tuple) else code
        code = getattr(code, "value", code)
        if not self.cpp_wrapper:
            multi = re.findall(r"^multi_kernel_\d+ = async_compile\.multi_kernel\([^\]]*\]", code, flags=re.M)
            code = "".join(m + "\n" for m in multi) + code[code.index("def call(self, args)"):code.index("runner = Runner")]
        codes.append(code)
        raise _Stop()

    real = ind_graph.GraphLowering.compile_to_module
    ind_graph.GraphLowering.compile_to_module = stop_after_codegen
    return lambda: setattr(ind_graph.GraphLowering, "compile_to_module", real)


def inductor_block_wrapper(N: int, width: int, heads: int, combo_kernels: bool = False,
                           x_dtype: torch.dtype = torch.float32, cpp_wrapper: bool = False, multi_kernel: bool = False,
                           gelu_epilogue: bool = False):
    """Inductor's host code for the forward of a whole compiled transformer block
    (``stop_kernels.models.vit.Block``: LayerNorm, QKV Linear, attention, projection, MLP) under bf16
    autocast with the Triton attention forced, a symbolic N: what a compiled block of the training
    step launches around the attention kernel. Forward only: tracing the backward runs the autograd
    engine, which needs a CUDA context (the attention backward ops alone: :func:`inductor_wrapper`).
    ``combo_kernels``: with Inductor's horizontal fusion (config key ``combo_kernels``); ``x_dtype``:
    the residual stream's dtype (bf16: config key ``bf16_residual``); ``cpp_wrapper``: the host code in
    C++ (config key ``cpp_wrapper``; the C++ source is returned, Triton kernels compiled for sm_90 on the
    way, nothing built or launched); ``multi_kernel``: with Inductor's ``triton.multi_kernel`` (config key
    ``multi_kernel``); ``gelu_epilogue``: the MLP's fc1 and GELU as one GEMM (config key ``fused_target_gelu``, the
    target encoder's blocks; the traced graph records no gradient, as the target's forward)."""
    import stop_kernels
    import torch._inductor.config as inductor_config
    from stop_kernels.models.vit import Block
    from torch._inductor.decomposition import select_decomp_table

    codes = []
    restore = _capture_wrapper_code(codes)
    try:
        _, mode, _, n = _symbolic_n(N)
        blk = Block(width, heads)
        blk.mlp.gelu_epilogue = gelu_epilogue
        names = [name for name, _ in blk.named_parameters()]
        with mode:
            params = [torch.empty(p.shape, device="cuda") for p in blk.parameters()]  # fp32 master weights
            x = torch.empty(4, n, width, device="cuda", dtype=x_dtype)
        available = torch.cuda.is_available
        torch.cuda.is_available = lambda: True  # autocast("cuda") stays off without a visible GPU
        try:
            autocast = torch.autocast("cuda", dtype=torch.bfloat16)
        finally:
            torch.cuda.is_available = available

        def fn(x, *ps):
            with autocast, stop_kernels.use_attention_backend("triton"):
                return (torch.func.functional_call(blk, dict(zip(names, ps)), (x,)),)
        try:
            # the options the trainer's config keys pass (cpp_wrapper goes through _inductor's argument)
            inner, patches = _inductor(cpp_wrapper, **inductor_switches(combo_kernels=combo_kernels,
                                                                        multi_kernel=multi_kernel))
            with mode, inductor_config.patch(patches):
                aot_function(fn, fw_compiler=inner, decompositions=select_decomp_table(),
                             dynamic=True)(x, *params)
        except _Stop:
            pass
    finally:
        restore()
    return codes[0]


def inductor_reductions_wrapper(N: int, **switches):
    """Inductor's host code for what a block backward ends with: independent column sums of bf16 gradients in
    fp32 (the bias gradients of a predictor-width block: ``[4·N, 384]`` and ``[4·N, 1536]``, symbolic N), under
    the Inductor options ``switches``: how many kernels the reductions take, i.e. whether combo kernels merge them.
    """
    import torch._inductor.config as inductor_config
    from torch._inductor.decomposition import select_decomp_table

    codes = []
    restore = _capture_wrapper_code(codes)
    try:
        _, mode, _, n = _symbolic_n(N)
        with mode:
            g1 = torch.empty(4 * n, 384, device="cuda", dtype=torch.bfloat16)
            g2 = torch.empty(4 * n, 1536, device="cuda", dtype=torch.bfloat16)

        def fn(a, b):
            return a.float().sum(0), b.float().sum(0)
        try:
            inner, patches = _inductor(False, **switches)
            with mode, inductor_config.patch(patches):
                aot_function(fn, fw_compiler=inner, decompositions=select_decomp_table(), dynamic=True)(g1, g2)
        except _Stop:
            pass
    finally:
        restore()
    return codes[0]


class _Stop(BaseException):
    """Raised once the wrapper code exists (a BaseException, so Inductor's error wrapping lets it through)."""


if __name__ == "__main__" and sys.argv[1:] == ["--inductor"]:
    _pretend_h100_for_inductor()
    with offline_driver(90, "cuda"):
        res = {f"N{N}_D{D}": inductor_wrapper(N, D) for N, D in [(116, 24), (150, 24), (74, 80)]}
        # the persistent forms: a fixed grid (SMs x PERSIST), N still symbolic inside
        res["N116_D24_persistent"] = inductor_wrapper(116, 24, PERSISTENT_FWD, PERSISTENT_BWD)
        res.update({f"N{N}_D{D}_cpp": inductor_wrapper(N, D, cpp_wrapper=True) for N, D in [(116, 24), (150, 24)]})
        # the predictor's block (width 384, 16 heads of 24) and ViT-H's (1280, 16 heads of 80)
        res.update({f"block_N{N}_W{W}": {"fwd": inductor_block_wrapper(N, W, 16)} for N, W in [(116, 384), (74, 1280)]})
        res["block_N116_W384_combo"] = {"fwd": inductor_block_wrapper(116, 384, 16, combo_kernels=True)}
        res["block_N116_W384_bf16res"] = {"fwd": inductor_block_wrapper(116, 384, 16, x_dtype=torch.bfloat16)}
        res["block_N116_W384_cpp"] = {"fwd": inductor_block_wrapper(116, 384, 16, cpp_wrapper=True)}
        res["block_N74_W1280_mk"] = {"fwd": inductor_block_wrapper(74, 1280, 16, multi_kernel=True)}
        res["block_N116_W384_mk"] = {"fwd": inductor_block_wrapper(116, 384, 16, multi_kernel=True)}
        # the target encoder's block (ViT-H, 256 tokens) with its MLP's GELU in fc1's GEMM, in Python and C++ host code
        res["block_N256_W1280"] = {"fwd": inductor_block_wrapper(256, 1280, 16)}
        res["block_N256_W1280_gelu"] = {"fwd": inductor_block_wrapper(256, 1280, 16, gelu_epilogue=True)}
        res["block_N256_W1280_gelu_cpp"] = {"fwd": inductor_block_wrapper(256, 1280, 16, gelu_epilogue=True,
                                                                          cpp_wrapper=True)}
        # a backward's independent reductions: plain, under the combo_kernels key's options, and under Inductor's
        # combo kernels alone (what the key passed before GPU run 6, where such combos ran 0.9 ms per block)
        res["reductions"] = {"fwd": inductor_reductions_wrapper(116)}
        res["reductions_combo"] = {"fwd": inductor_reductions_wrapper(116, **inductor_switches(combo_kernels=True))}
        res["reductions_combo_all"] = {"fwd": inductor_reductions_wrapper(116, combo_kernels=True)}
        res["cudagraph_blockers"] = CUDAGRAPH_BLOCKERS
        print(json.dumps(res))
    sys.exit(0)

if __name__ == "__main__":
    res = {"inductor_launches": A.INDUCTOR_LAUNCHES}
    with offline_driver(90, "cuda"):  # Triton's target for the TTIR the analysis generates
        for N, D, varlen, packed in [(116, 24, False, True), (150, 24, False, True), (74, 80, False, True),
                                     (40, 24, True, True), (150, 24, False, False)]:
            name = f"{'qkv' if packed else 'q_k_v'}_N{N}_D{D}_{'varlen' if varlen else 'batched'}"
            res[name] = trace(N, D, varlen, packed)
        res["qkv_N116_D24_batched_symbolic_d"] = trace(116, 24, False, True, symbolic_d=True)
        res["qkv_N116_D24_batched_keys"] = trace(116, 24, False, True, bwd_cfg=KEYS_BWD)
        # the persistent forms read cu_seqlens inside their item helpers: still written only O, LSE, d(qkv)
        # (their grid asks for the SM count: answered as an H100's)
        _pretend_h100_for_inductor()
        res["qkv_N40_D24_varlen_persistent"] = trace(40, 24, True, True, PERSISTENT_FWD, PERSISTENT_BWD)
    print(json.dumps(res))
