"""The compiled-graph path of the attention ops (issue 4 / issue 8): what Inductor sees.

On CUDA the ``stop_kernels::flash_attn_*`` ops are ``torch.library.triton_op``s, so Inductor traces
their bodies and emits the Triton launches itself (no Python op, plan lookup or Triton launcher per
call in a compiled graph). Two things can silently make that slow or wrong, and both are decided
at trace time, so they are checked here without a GPU (``_trace_attention_ops.py`` in a
subprocess, an sm_90 TTIR target, fake CUDA tensors, a symbolic sequence length):

* torch's kernel analysis must see only the real outputs as written (O and LSE; d(qkv) once, or
  dQ/dK/dV; δ between the two backward launches): any other tensor it believes written is copied
  around every launch, and a written graph input (q's storage, cu_seqlens) is scattered back into
  it. A pointer passed into a jit helper whose results address a store counts as written: this
  test caught ``_seq_bounds(CU, ...)`` doing exactly that.
* the traced graph must stay dynamic in N: the only guards are the bucket bounds of the config
  choice (``16 < N <= 32 < ...``), so a training run compiles once per N bucket, not per length.

* Inductor's generated host code (``--inductor``: the codegen runs with the CUDA device queries
  answered as an H100's, and stops once the wrapper code exists) allocates the outputs and launches
  the kernels, with no Python op call and no copy around them.
* in a whole compiled block (LayerNorm, QKV Linear, attention, projection, MLP; forward, bf16
  autocast), the attention kernel reads the QKV addmm's output and writes the projection's input
  in place: no copy around it.

The GPU half (the compiled code runs, results equal to eager, no recompilation within a bucket) is
in ``test_attention.py`` (CUDA-only tests).
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.skipif(not hasattr(torch.library, "triton_op"),
                                reason=f"torch {torch.__version__} has no torch.library.triton_op")


def _script_json(name: str, *args: str, timeout: int = 600):
    """Run ``tests/<name>`` outside the Triton interpreter (real JITFunctions, an sm_90 target, no GPU)
    and return the JSON line it prints last."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, os.path.join(HERE, name), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def traced():
    return _script_json("_trace_attention_ops.py")


def test_ops_are_triton_ops_outside_the_interpreter(traced):
    assert traced["inductor_launches"] is True


@pytest.mark.parametrize("case, fwd, bwd", [
    ("qkv_N116_D24_batched", [["_attn_fwd_kernel", ["LSE", "O"]]], [["_attn_bwd_fused_kernel", ["DQ"]]]),
    ("qkv_N116_D24_batched_keys", [["_attn_fwd_kernel", ["LSE", "O"]]], [["_attn_bwd_fused_kernel", ["DQ"]]]),
    ("qkv_N150_D24_batched", [["_attn_fwd_kernel", ["LSE", "O"]]],
     [["_attn_bwd_dq_kernel", ["DELTA", "DQ"]], ["_attn_bwd_dkdv_kernel", ["DK"]]]),
    ("qkv_N74_D80_batched", [["_attn_fwd_kernel", ["LSE", "O"]]], [["_attn_bwd_fused_kernel", ["DQ"]]]),
    ("qkv_N40_D24_varlen", [["_attn_fwd_kernel", ["LSE", "O"]]], [["_attn_bwd_fused_kernel", ["DQ"]]]),
    ("qkv_N40_D24_varlen_persistent", [["_attn_fwd_kernel", ["LSE", "O"]]], [["_attn_bwd_fused_kernel", ["DQ"]]]),
    ("q_k_v_N150_D24_batched", [["_attn_fwd_kernel", ["LSE", "O"]]],
     [["_attn_bwd_dq_kernel", ["DELTA", "DQ"]], ["_attn_bwd_dkdv_kernel", ["DK", "DV"]]]),
])
def test_only_outputs_are_written(traced, case, fwd, bwd):
    """Each launch's written tensors are exactly its outputs (packed: d(qkv) through one argument)."""
    got = traced[case]
    assert got["fwd"] == fwd
    assert got["bwd"] == bwd
    # no copies or scatters into inputs around the launches: size arithmetic, views, allocations only
    assert all(op.startswith("<built-in function") or op in (
        "aten.empty.memory_format", "aten.sym_size.int", "aten.sym_stride.int", "aten.unbind.int")
        for op in got["other_ops"]), got["other_ops"]


@pytest.mark.parametrize("case, upper", [("qkv_N116_D24_batched", 128), ("qkv_N150_D24_batched", 256),
                                         ("qkv_N40_D24_varlen", 64), ("qkv_N116_D24_batched_keys", 128)])
def test_dynamic_in_the_sequence_length(traced, case, upper):
    """Only bucket-bound guards: N stays symbolic (no Eq(N, ...) specialisation)."""
    got = traced[case]
    lower = [f"N > {b}" for b in (16, 32, 64, 128) if b < upper]
    assert sorted(got["guards"]) == sorted(lower + [f"N <= {upper}"]), got["guards"]
    assert any("N" in d for d in got["shape"])


def test_a_symbolic_head_dim_is_specialised(traced):
    """torch.compile(dynamic=True) of a function of the QKV buffer makes its head dim symbolic too: the
    ops trace (GPU run 4: the config cache could not hash the SymInt) with a guard on the head dim
    and the same launches as with a static one; N stays symbolic."""
    got, static = traced["qkv_N116_D24_batched_symbolic_d"], traced["qkv_N116_D24_batched"]
    assert got["fwd"] == static["fwd"] and got["bwd"] == static["bwd"]
    assert "Eq(D, 24)" in got["guards"], got["guards"]
    assert sorted(g for g in got["guards"] if "D" not in g) == sorted(static["guards"]), got["guards"]


@pytest.fixture(scope="module")
def inductor_code():
    return _script_json("_trace_attention_ops.py", "--inductor", timeout=900)


def _launch_lines(code: str):
    return [line.strip().split(".run(")[0] for line in code.splitlines() if ".run(" in line]


@pytest.mark.parametrize("case, fwd, bwd", [
    ("N116_D24", ["_attn_fwd_kernel_0"], ["_attn_bwd_fused_kernel_0"]),
    ("N150_D24", ["_attn_fwd_kernel_0"], ["_attn_bwd_dq_kernel_0", "_attn_bwd_dkdv_kernel_1"]),
    ("N74_D80", ["_attn_fwd_kernel_0"], ["_attn_bwd_fused_kernel_0"]),
    ("N116_D24_persistent", ["_attn_fwd_kernel_0"], ["_attn_bwd_fused_kernel_0"]),
])
def test_inductor_host_code_is_just_the_launches(inductor_code, case, fwd, bwd):
    """Inductor's generated host code for the ops (an H100 as the pretended target): it allocates the
    outputs and launches our kernels, nothing else — no Python op call, no clone or copy kernel, and
    the q/k/v views of the packed input go to the kernels as reinterpretations of it."""
    for kind, kernels in (("fwd", fwd), ("bwd", bwd)):
        code = inductor_code[case][kind]
        assert _launch_lines(code) == kernels, code
        assert "stop_kernels" not in code and "clone" not in code and ".copy_(" not in code, code
        assert "reinterpret_tensor(arg" in code
        # N stays symbolic: read from the input's size at run time and passed to every launch
        # (torch 2.14 writes `s = arg0_1.size()[1]`, torch 2.11 — the GPU image — `s = arg0_1_size[1]`)
        m = re.search(r"(\w+) = arg\d+_1(?:\.size\(\)|_size)\[1\]", code)
        assert m, code
        assert all(m.group(1) in line for line in code.splitlines() if ".run(" in line), code
        if case.endswith("_persistent"):  # a constant grid: the pretended H100's 132 SMs x PERSIST 1
            assert all(", 132, 1, 1, stream=" in line for line in code.splitlines() if ".run(" in line), code


def _top_level_args(call: str):
    """The comma-separated arguments of the call that starts at ``call``'s first '(' (nested
    parentheses kept together)."""
    body, depth, args, cur = call[call.index("(") + 1:], 0, [], ""
    for ch in body:
        if ch == "(":
            depth += 1
        elif ch == ")":
            if depth == 0:
                break
            depth -= 1
        if ch == "," and depth == 0:
            args.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return args + [cur.strip()] if cur.strip() else args


@pytest.mark.parametrize("case", ["block_N116_W384", "block_N74_W1280", "block_N116_W384_combo",
                                  "block_N116_W384_bf16res"])
def test_compiled_block_feeds_attention_without_copies(inductor_code, case):
    """A whole compiled block (bf16 autocast, Triton attention; the predictor's and ViT-H's widths):
    the attention kernel reads q, k, v as views of the QKV addmm's output and writes O where the
    output projection's addmm reads it, so the compiled step has no copy around the attention, the
    property the Triton path's speed in a compiled step rests on (``e2e_step.py`` paths fast_mixed and
    fast_triton)."""
    code = inductor_code[case]["fwd"]
    launches = [line.strip() for line in code.splitlines() if "_attn_fwd_kernel" in line and ".run(" in line]
    assert len(launches) == 1, code
    args = _top_level_args(launches[0])
    qkv_bufs = {re.match(r"reinterpret_tensor\((buf\d+),", a).group(1) for a in args[:3]}
    assert len(qkv_bufs) == 1, args[:3]
    (qkv_buf,) = qkv_bufs
    assert re.search(rf"extern_kernels\.addmm\(.*out={qkv_buf}\)", code), (qkv_buf, code)
    o_buf = args[3]
    assert re.fullmatch(r"buf\d+", o_buf), args[3]
    assert re.search(rf"extern_kernels\.addmm\([^\n]*reinterpret_tensor\({o_buf}, ", code), (o_buf, code)
    assert "stop_kernels" not in code and "clone" not in code and ".copy_(" not in code, code
    assert len(re.findall(r"extern_kernels\.addmm\(", code)) == 4, code  # qkv, proj, fc1, fc2


def _weight_cast_launches(code: str):
    """The launches that read only the block's parameters (graph inputs arg1_1 … ; arg0_1 is x): the
    bf16 casts of the fp32 weights and biases. [(kernel, [parameter indices])]."""
    out = []
    for line in code.splitlines():
        if ".run(" in line:
            args = [int(a) for a in re.findall(r"\barg(\d+)_1\b", line)]
            if args and 0 not in args:
                out.append((line.strip().split(".run(")[0], args))
    return out


def test_combo_kernels_launch_a_blocks_weight_casts_together(inductor_code):
    """Config key ``combo_kernels`` (Inductor's horizontal fusion): under bf16 autocast a compiled block
    casts each of its 8 fp32 weights and biases (QKV, projection, fc1, fc2) to bf16 in a kernel of its
    own, in every call. With combo kernels the casts that are ready at the same point share a launch,
    with the same 4 GEMMs and one attention kernel: the 8 casts take 2 launches and the block forward 7
    Triton launches instead of 13 with torch 2.11 (the GPU image), 4 and 9 with torch 2.14."""
    from stop_kernels.backends import _version
    plain_code = inductor_code["block_N116_W384"]["fwd"]
    combo_code = inductor_code["block_N116_W384_combo"]["fwd"]
    plain, combo = _weight_cast_launches(plain_code), _weight_cast_launches(combo_code)
    assert len(plain) == 8 and all(len(a) == 1 for _, a in plain), plain
    assert len(_launch_lines(plain_code)) == 13
    cast = sorted(i for _, a in combo for i in a)
    assert cast == sorted(a[0] for _, a in plain), (plain, combo)  # the same 8 parameters
    got = (len(combo), len(_launch_lines(combo_code)))
    want = {(2, 11): (2, 7), (2, 14): (4, 9)}.get(_version(torch.__version__))
    if want:  # the versions read so far
        assert got == want, got
    else:  # another torch: fewer launches all the same
        assert got[0] <= 4 and got[1] <= 9, got
    assert sum("_attn_fwd_kernel" in k for k in _launch_lines(combo_code)) == 1


def test_combo_kernels_key_keeps_reductions_apart(inductor_code):
    """GPU run 6 (H200): with Inductor's combo kernels the backward's independent reductions (bias and
    LayerNorm-weight gradients) were merged into one launch per block that ran 0.9 ms per ViT-H encoder block.
    The config key ``combo_kernels`` therefore asks for pointwise combos only: two independent column sums
    keep the launches they have without combo kernels, where combo kernels alone merge some of them."""
    plain = _launch_lines(inductor_code["reductions"]["fwd"])
    keyed = _launch_lines(inductor_code["reductions_combo"]["fwd"])
    merged = _launch_lines(inductor_code["reductions_combo_all"]["fwd"])
    assert len(plain) >= 2 and all(k.startswith(("triton_red", "triton_per")) for k in plain), plain
    assert len(keyed) == len(plain), (plain, keyed)
    assert len(merged) < len(plain), (plain, merged)  # the case shows the merge the key prevents


def _cpp_launches(code: str):
    """The kernels the C++ host code's entry function launches, in order (``call_<kernel>(`` lines)."""
    entry = code[code.index("void inductor_entry_impl("):]
    return re.findall(r"^\s*call_(\w+)\(", entry, flags=re.M)


@pytest.mark.parametrize("case", ["N116_D24", "N150_D24"])
def test_cpp_wrapper_launches_the_attention_ops_from_cpp(inductor_code, case):
    """The ops alone under ``cpp_wrapper``: the forward and the backward (one-pass at N <= 128, the
    dQ and dK/dV launches above) are the same launches from C++ as from the Python host code."""
    for kind in ("fwd", "bwd"):
        py, cpp = inductor_code[case][kind], inductor_code[case + "_cpp"][kind]
        assert "def call(self, args)" not in cpp
        assert _cpp_launches(cpp) == _launch_lines(py), (kind, _cpp_launches(cpp), _launch_lines(py))


def test_cpp_wrapper_block_launches_the_same_kernels_from_cpp(inductor_code):
    """Config key ``cpp_wrapper`` (on in the ViT-H recipe; ``e2e_step.py`` path fast, against fast_py): Inductor writes a compiled block's
    host code in C++. It must launch the Python host code's kernels, the Triton attention (a
    user-defined kernel of a ``triton_op``) among them, in the same order, and call cuBLAS for the same
    4 GEMMs, with no Python left in the per-call path (GPU run 4: every compiled step host-bound)."""
    py, cpp = inductor_code["block_N116_W384"]["fwd"], inductor_code["block_N116_W384_cpp"]["fwd"]
    assert "def call(self, args)" not in cpp and ".run(" not in cpp
    assert _cpp_launches(cpp) == _launch_lines(py), (_cpp_launches(cpp), _launch_lines(py))
    assert _cpp_launches(cpp).count("_attn_fwd_kernel_0") == 1
    assert len(re.findall(r"aoti_torch_cuda_addmm_out\(", cpp)) == len(re.findall(r"extern_kernels\.addmm\(", py)) == 4


def _activation_buffers(code: str):
    """dtype of every [4·N, 384]-shaped activation buffer the block allocates, and of what it returns."""
    dtypes = re.findall(r"(buf\d+) = empty_strided_cuda\(\((?:4, s\d+|4\*s\d+), 384\), .*?, torch\.(\w+)\)", code)
    ret = re.search(r"return \((buf\d+), \)", code).group(1)
    return dict(dtypes), ret


def test_bf16_residual_keeps_the_blocks_stream_in_bf16(inductor_code):
    """Config key ``bf16_residual`` (``models.vit.run_blocks``): under autocast the block's residual
    stream is fp32, so its final residual add writes a new fp32 [B, N, W] buffer (and LayerNorm 1 and 2
    read 4-byte x). With the stream cast to bf16 once before the first block, every activation buffer of
    width W is bf16 and the final residual add runs in place on the projection's output: ≈ 34 instead
    of ≈ 42 bytes per token and width in the block's elementwise kernels (benchmarks/NOTES.md)."""
    plain, plain_ret = _activation_buffers(inductor_code["block_N116_W384"]["fwd"])
    assert plain[plain_ret] == "float32", (plain, plain_ret)
    code = inductor_code["block_N116_W384_bf16res"]["fwd"]
    bf16, _ = _activation_buffers(code)
    assert bf16 and set(bf16.values()) == {"bfloat16"}, bf16
    ret = re.search(r"return \((buf\d+), \)", code).group(1)
    assert re.search(rf"{ret} = reinterpret_tensor\(buf\d+, \(4, s\d+, 384\)", code), code  # in place


def test_fused_target_gelu_leaves_no_gelu_kernel(inductor_code):
    """Config key ``fused_target_gelu`` (``models.vit.MLP.gelu_epilogue``, the target encoder's blocks, ViT-H's
    256 tokens): fc1 becomes one ``aten._addmm_activation`` call (cuBLASLt with bias and GELU in the epilogue),
    whose output fc2's GEMM reads directly; the elementwise GELU kernel, which read and wrote the [T, 5120]
    activation after the GEMM, is gone. The other 3 GEMMs and every other launch stay; the C++ host code calls
    the op through its C shim (no Python)."""
    plain, fused = inductor_code["block_N256_W1280"]["fwd"], inductor_code["block_N256_W1280_gelu"]["fwd"]
    assert "_addmm_activation" not in plain and len(re.findall(r"extern_kernels\.addmm\(", plain)) == 4
    calls = re.findall(r"(buf\d+) = torch\.ops\.aten\._addmm_activation\.default\(.*use_gelu=True\)", fused)
    assert len(calls) == 1 and len(re.findall(r"extern_kernels\.addmm\(", fused)) == 3, fused
    fc2 = re.findall(r"extern_kernels\.addmm\(buf\d+, (buf\d+), ", fused)  # the one GEMM fed by an activation as is
    alias = dict(re.findall(r"^\s*(buf\d+) = (buf\d+)$", fused, flags=re.M))  # (torch 2.11 names the output twice)
    assert [alias.get(b, b) for b in fc2] == calls, (fc2, calls)
    assert len(_launch_lines(fused)) == len(_launch_lines(plain)) - 1, (_launch_lines(plain), _launch_lines(fused))
    cpp = inductor_code["block_N256_W1280_gelu_cpp"]["fwd"]
    assert len(re.findall(r"aoti_torch_cuda__addmm_activation\(", cpp)) == 1
    assert len(re.findall(r"aoti_torch_cuda_addmm_out\(", cpp)) == 3 and "def call(self, args)" not in cpp


@pytest.fixture(scope="module")
def fp64_scale():
    return _script_json("_compile_fp64_scale.py")


def test_kernels_compile_with_the_scale_as_inductor_types_it(fp64_scale):
    """Inductor passes the softmax scale (a Python float) as an fp64 argument where Triton's launcher
    passes fp32. Every kernel must still compile, with and without a key loop, and do its math in
    fp32: no TTIR line touches f64 but the argument and its conversion (GPU run 4: the forward's key
    loop failed to compile under torch.compile, and the loop-free kernels computed in fp64)."""
    assert set(fp64_scale) == {"fwd one tile", "fwd key loop", "fwd one tile dot mask", "bwd fused loop",
                               "bwd one pass dot mask", "bwd dq", "bwd dkdv"}
    for name, r in fp64_scale.items():
        assert r["compiled"], (name, r.get("error"))
        assert r["f64_lines"] == [], (name, r["f64_lines"][:5])


def _layer_norm_launches(code: str):
    """The kernels of a block forward that read a row of width W twice or once: [(name, kind)], kind
    ``red`` (a looped reduction: the row's statistics in one loop, the normalisation in a second pass
    over it) or ``per`` (persistent: the row held in registers, read once), or ``multi`` (a multi-kernel
    choosing between the kernels listed after it)."""
    return re.findall(r"\b(triton_(red|per)_fused\w*|multi_kernel_\d+)\.run\(", code)


def test_multi_kernel_offers_vit_h_layer_norms_in_one_pass(inductor_code):
    """Config key ``multi_kernel`` (Inductor's ``triton.multi_kernel``): at ViT-H's width (1280, above Inductor's
    one-pass limit of 1024 features) both LayerNorms of a compiled block forward are looped reductions that read
    the fp32 row twice (run 5: 5.9 ms of the step, 1.4–2.1× their byte floor). With the key each becomes a
    multi-kernel over the looped kernel and a persistent one that reads the row once, timed on the first call.
    The predictor's width (384) is one-pass without the key; with it, its LayerNorms are timed the same way."""
    for width, kind in (("W1280", "red"), ("W384", "per")):
        case = {"W1280": "block_N74_W1280", "W384": "block_N116_W384"}[width]
        plain = _layer_norm_launches(inductor_code[case]["fwd"])
        assert len(plain) == 2 and all(k == kind for _, k in plain), (width, plain)
        mk_code = inductor_code[case + "_mk"]["fwd"]
        launched = [name for name, _ in _layer_norm_launches(mk_code)]
        assert len(launched) == 2 and all(n.startswith("multi_kernel_") for n in launched), (width, launched)
        for name in launched:
            choices = re.search(rf"^{name} = async_compile\.multi_kernel\('{name}', \[([^\]]*)\]", mk_code, re.M)
            assert choices, mk_code
            assert sorted(re.findall(r"triton_(red|per)_fused", choices.group(1))) == ["per", "red"], choices.group(1)
        # the rest of the block is launched as before (kernel numbers aside)
        def rest(code):
            return [re.sub(r"_\d+$", "", n) for n in _launch_lines(code)
                    if not re.match(r"multi_kernel_|triton_(red|per)_", n)]
        assert rest(mk_code) == rest(inductor_code[case]["fwd"]), width


def test_no_traced_graph_would_run_without_cuda_graphs(inductor_code):
    """``compile_mode: reduce-overhead`` replays the compiled blocks from CUDA graphs only where Inductor's lowering
    finds nothing a CUDA graph cannot hold. Every graph traced here (the attention ops forward and backward, the
    predictor's and ViT-H's block forwards with each lever, the backward's reductions) lowers without such a
    reason: no host synchronisation, no CPU tensor, no op tagged cudagraph-unsafe, no data-dependent size. The
    run-time checks (inputs mutated outside the tree's memory) are the GPU test's
    (``test_reduce_overhead_replays_train_like_default_compiled_blocks``: no graph skipped)."""
    blockers = inductor_code["cudagraph_blockers"]
    n_graphs = sum(len(v) for k, v in inductor_code.items() if isinstance(v, dict) and k != "cudagraph_blockers")
    assert len(blockers) == n_graphs >= 20, (len(blockers), n_graphs)
    assert not any(blockers), [b for b in blockers if b]
