"""Apply activation checkpointing, torch.compile and FSDP2 to the three I-JEPA models (torchtitan order).

For each of the context encoder, the predictor and the target encoder:

1. activation checkpointing (``ac="block"``) wraps every transformer block of the encoder and the
   predictor (not the target encoder, which runs without gradients) with the non-reentrant
   ``checkpoint_wrapper``: block inputs are kept, everything inside is recomputed in the backward;
2. ``compile=True`` replaces every block by ``torch.compile(block)`` (one compiled graph per block
   kind and grad mode, reused by all blocks of a model: three graphs in all; the encoder's and the
   predictor's with dynamic shapes, since their sequence lengths change every batch, the target
   encoder's static); with ``compile_scope="stack"`` or ``"unrolled"`` each model's block loop is one
   compiled graph instead (:func:`compile_stack`; one process, no FSDP, no AC);
3. FSDP2 ``fully_shard`` on every block, then on the model root, with a mixed-precision policy of
   bf16 parameters (gathered once per unshard) and fp32 gradient reduction; the sharded fp32 master
   weights and the optimizer state stay fp32.

The target encoder is sharded exactly like the encoder, so its local shards line up one to one
with the encoder's and the EMA update runs on the local shards with foreach ops, no communication.

State-dict names: the wrappers add ``_checkpoint_wrapped_module.`` / ``_orig_mod.`` to module paths;
``torch.distributed.checkpoint.state_dict`` removes them, and :func:`clean_name` does the same for
code that walks ``named_parameters()``.
"""
from __future__ import annotations

import logging
import os
from typing import Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from ..models.official import clean_name
from .config import ConfigError, TrainConfig

log = logging.getLogger(__name__)

def block_list(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of an encoder (``blocks``) or a predictor (``predictor_blocks``)."""
    for attr in ("blocks", "predictor_blocks"):
        blocks = getattr(model, attr, None)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise TypeError(f"model: {type(model).__name__} has no 'blocks' or 'predictor_blocks' ModuleList")


def _raise_recompile_limit(limit: int = 64) -> None:
    """Blocks of three models, two grad modes and dynamic sequence lengths need more than the default 8 entries."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < limit:
            setattr(cfg, name, limit)
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * limit)
    elif hasattr(cfg, "accumulated_cache_size_limit"):
        cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, 4 * limit)


def apply_ac(model: nn.Module) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    blocks = block_list(model)
    for i, blk in enumerate(blocks):
        # the blocks draw no random numbers, so the RNG state need not be saved for recomputation
        blocks[i] = checkpoint_wrapper(blk, preserve_rng_state=False)


# Inductor's switch that keeps reductions out of combo kernels (torch 2.11 on; absent before, where combo
# kernels take reductions in and the switch cannot be asked for).
COMBO_POINTWISE_ONLY = "combo_kernels_pointwise_only"
NO_MULTI_KERNEL_PICK_CACHE = "TORCHINDUCTOR_DISABLE_MULTI_KERNEL_CACHE"


def apply_compile(model: nn.Module, dynamic: Optional[bool] = None, mode: str = "default",
                  combo_kernels: bool = False, cpp_wrapper: bool = False, multi_kernel: bool = False,
                  scope: str = "block") -> None:
    """``torch.compile`` every block (in place in its ModuleList) in Inductor ``mode``; FSDP2 hooks stay
    outside the graphs.

    ``scope="stack"`` / ``"unrolled"``: one compiled graph for the whole block stack instead (:func:`compile_stack`).

    ``combo_kernels``: Inductor's horizontal fusion, which launches independent small kernels together
    (a block's bf16 casts of its weights: 13 → 7 Triton launches per block forward with torch 2.11,
    13 → 9 with 2.14, read from the generated host code). Pointwise kernels only
    (``combo_kernels_pointwise_only``, torch ≥ 2.11): in GPU run 6 (H200) combos that took in the
    backward's reductions ran 0.9 ms per ViT-H encoder block (28.8 ms of a 141 ms step) and 0.5 ms per
    predictor block, where the kernels they combine take a few µs each.
    ``cpp_wrapper``: Inductor writes each graph's host code (buffer allocation, size checks, every
    kernel launch) in C++ instead of Python; for a step whose host time exceeds its GPU time (GPU run 4:
    every compiled ViT-H path), at the cost of a C++ compile per graph.
    ``multi_kernel``: Inductor's ``triton.multi_kernel``. A row reduction over more than 1024 elements
    (ViT-H's LayerNorms over 1280 features) is otherwise one looped kernel, which reads each row twice
    (statistics, then normalisation); with the switch Inductor also compiles the one-pass (persistent)
    kernel that holds the row in registers, times both on the first call and keeps the faster. Narrower
    rows (the predictor's 384), one-pass without the switch, get the same timed choice with it.
    torch.compile takes either a mode or options, so with any switch the mode is passed as the
    options it stands for.

    ``mode="reduce-overhead"``: Inductor's CUDA-graph trees replay each compiled graph, forward and backward:
    no host code, allocation or launch per kernel, only Dynamo's guards and the tree's input checks per block
    call. With dynamic shapes the tree records one graph per distinct sequence length (at ViT-H, 3000 sampled
    batches held 64 context lengths and 49 predictor lengths), each once: Inductor's warning past 8 lengths is
    turned off, since that count is the design here, not a symptom."""
    _raise_recompile_limit()
    if mode == "reduce-overhead":
        from torch._inductor import config as inductor_config
        if hasattr(inductor_config.triton, "cudagraph_dynamic_shape_warn_limit"):  # (read when a call records)
            inductor_config.triton.cudagraph_dynamic_shape_warn_limit = None
    if cpp_wrapper:
        check_cpp_compiler()
    if multi_kernel:
        # A graph Inductor loads from its FX-graph cache builds its multi-kernels afresh, and each one's lookup of its
        # saved pick hashes Triton's JITFunction, whose lock is None there with torch 2.11 + triton 3.6 (GPU run 7:
        # TypeError, the path stopped). Without the saved pick the first call times the kernels again, as when new.
        os.environ.setdefault(NO_MULTI_KERNEL_PICK_CACHE, "1")
    kw = {"mode": None if mode == "default" else mode}
    switches = inductor_switches(combo_kernels, cpp_wrapper, multi_kernel)
    if switches:
        from torch._inductor import list_mode_options
        kw = {"options": {**list_mode_options(mode, dynamic), **switches}}
    blocks = block_list(model)
    if scope != "block":
        compile_stack(blocks, dynamic, nested=scope == "stack", **kw)
        return
    for i, blk in enumerate(blocks):
        blocks[i] = torch.compile(blk, dynamic=dynamic, **kw)


def inductor_switches(combo_kernels: bool = False, cpp_wrapper: bool = False, multi_kernel: bool = False) -> dict:
    """The Inductor options the config keys ``combo_kernels``, ``cpp_wrapper`` and ``multi_kernel`` stand for
    (see :func:`apply_compile`); a key left off passes nothing, so Inductor's own default stays in force."""
    from torch._inductor import config as inductor_config
    switches = {k: v for k, v, on in (("combo_kernels", True, combo_kernels), ("cpp_wrapper", True, cpp_wrapper),
                                      ("triton.multi_kernel", 1, multi_kernel)) if on}
    if combo_kernels and hasattr(inductor_config, COMBO_POINTWISE_ONLY):
        switches[COMBO_POINTWISE_ONLY] = True
    return switches


def cudagraph_skips() -> int:
    """How many compiled graphs Inductor has run without CUDA graphs in this process (every one on a CPU; on a GPU,
    a graph with an op or an input a CUDA graph cannot hold): the check that ``compile_mode: reduce-overhead``
    took effect."""
    from torch._dynamo.utils import counters
    return int(counters["inductor"]["cudagraph_skips"])


def cudagraph_recordings(device: torch.device) -> Optional[int]:
    """How many CUDA graphs Inductor's CUDA-graph tree on ``device`` holds (one per compiled graph call and length
    recorded): the positive check that ``compile_mode: reduce-overhead`` took effect, next to
    :func:`cudagraph_skips`. 0 off CUDA or before any recording; None where the tree's internals (read here, not a
    public API) are not the ones of torch 2.11–2.14."""
    if device.type != "cuda":
        return 0
    try:
        from torch._inductor import cudagraph_trees
        manager = cudagraph_trees.get_manager(device.index or 0, create_if_none_exists=False)
        if manager is None or manager.roots is None:
            return 0
        count, nodes = 0, [node for group in manager.roots.values() for node in group]
        while nodes:
            node = nodes.pop()
            count += 1
            nodes.extend(child for group in node.children.values() for child in group)
        return count
    except (ImportError, AttributeError, TypeError):
        return None


def check_cpp_compiler() -> None:
    """``cpp_wrapper`` compiles each graph's host code with the system C++ compiler (Inductor's search: the one
    ``$CXX`` names, else g++). Without one, the first step would fail deep inside Inductor after the models were
    built; this refuses at set-up instead, by name (the ViT-H recipe turns the key on)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # another torch layout: Inductor reports a missing compiler itself at the first step
        return
    try:
        get_cpp_compiler()
    except Exception as e:
        raise ConfigError("cpp_wrapper: Inductor's C++ host code needs a C++ compiler (g++, or the one $CXX names) "
                          f"and found none ({type(e).__name__}); install one, or pass --cpp-wrapper false") from None


def compile_stack(blocks: nn.ModuleList, dynamic: Optional[bool] = None, nested: bool = True, **compile_kw) -> None:
    """One compiled graph for ``blocks`` run in order (config key ``compile_scope: stack`` or ``unrolled``), set as
    ``blocks.compiled_run``, which :func:`stop_kernels.models.vit.run_blocks` calls instead of its loop.

    With one compiled graph per block, every block call of a step pays Dynamo's guard check and
    AOTAutograd's wrapper on the host, forward and backward (ViT-H: 76 forward and 44 backward calls per
    step); with the stack compiled, each model pass pays them once.
    - ``nested`` (``stack``): the block's forward is a nested compile region, so Inductor compiles it once
      and the stack calls it per block. Inductor's C++ host code cannot call such a region (torch 2.14).
    - not ``nested`` (``unrolled``): every block's forward is inlined into one graph, 32 copies at ViT-H. It
      compiles for longer (the kernels are shared: same source), and the C++ host code can run it.

    The blocks' forwards are called directly, without their module hooks: no FSDP (its all-gathers are block
    hooks) and no per-block activation checkpointing; the Trainer and the config refuse those. Python floats
    (the blocks' scales and LayerNorm eps) are specialised while the stack is traced: as symbolic floats they
    break the region's graph (torch 2.14)."""
    scope = "stack" if nested else "unrolled"
    if nested and not hasattr(torch.compiler, "nested_compile_region"):
        raise ConfigError(f"compile_scope: 'stack' needs torch.compiler.nested_compile_region, which torch "
                          f"{torch.__version__} lacks; use compile_scope unrolled or block")
    kinds = {type(b) for b in blocks}
    if len(kinds) != 1:
        raise ValueError(f"compile_scope: {scope!r} needs blocks of one class, got {sorted(k.__name__ for k in kinds)}")
    forward = kinds.pop().forward
    region = torch.compiler.nested_compile_region(forward) if nested else forward

    def run(x, *args):
        for blk in blocks:
            x = region(blk, x, *args)
        return x
    compiled = torch.compile(run, dynamic=dynamic, **compile_kw)

    specialise = {"specialize_float": True} if hasattr(torch._dynamo.config, "specialize_float") else {}

    def compiled_run(x, *args):
        with torch._dynamo.config.patch(**specialise):
            return compiled(x, *args)
    blocks.compiled_run = compiled_run


def mixed_precision(precision: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)


def apply_fsdp(model: nn.Module, mesh, precision: str, *, forward_only: bool = False) -> None:
    """``fully_shard`` every block and the root.

    Models with a backward keep the last block gathered after the forward (its backward follows
    immediately), and on a one-rank mesh keep every block gathered (resharding would free nothing
    but the bf16 copy and cost a second gather in the backward); FSDP2 reshards them all at the end
    of the backward, so the optimizer and the EMA see the sharded fp32 parameters. A forward-only
    model (the target encoder) must reshard everything after the forward: its parameters change
    by the EMA between steps, and an unsharded copy kept across steps would be stale.
    """
    from torch.distributed.fsdp import fully_shard
    mp = mixed_precision(precision)
    blocks = block_list(model)
    n = len(blocks)
    multi = mesh.size() > 1
    for i, blk in enumerate(blocks):
        reshard = True if forward_only else (multi and i < n - 1)
        fully_shard(blk, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=True)


def parallelize(models, cfg: TrainConfig, mesh, precision: str):
    """Apply AC (``cfg.ac``), compile (``cfg.compile``) and FSDP2 (when ``mesh`` is not None) in place.

    ``models`` is a :class:`~stop_kernels.training.loop.JEPAModels`; returns it.
    """
    if cfg.ac == "block":
        apply_ac(models.encoder)
        apply_ac(models.predictor)
    if cfg.compile:
        # context and target-block lengths change every batch: compile those graphs with dynamic
        # shapes once instead of a static graph first and a dynamic one at the first change; the target
        # encoder always sees all patches of a fixed batch and gets a static graph
        kw = dict(mode=cfg.compile_mode, combo_kernels=cfg.combo_kernels, cpp_wrapper=cfg.cpp_wrapper,
                  multi_kernel=cfg.multi_kernel, scope=cfg.compile_scope)
        apply_compile(models.encoder, dynamic=True, **kw)
        apply_compile(models.predictor, dynamic=True, **kw)
        apply_compile(models.target_encoder, dynamic=False, **kw)
    if mesh is not None:
        apply_fsdp(models.encoder, mesh, precision)
        apply_fsdp(models.predictor, mesh, precision)
        apply_fsdp(models.target_encoder, mesh, precision, forward_only=True)
    return models


def paired_parameters(target: nn.Module, online: nn.Module) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Target/online parameter pairs matched by (clean) name, checked for equal (local) shapes."""
    t = {clean_name(n): p for n, p in target.named_parameters()}
    o = {clean_name(n): p for n, p in online.named_parameters()}
    if set(t) != set(o):
        raise ValueError(f"target_encoder: parameter names differ from the encoder's: "
                         f"{sorted(set(t) ^ set(o))[:6]}")
    names = sorted(t)
    for n in names:
        if t[n].shape != o[n].shape:
            raise ValueError(f"target_encoder: {n} has shape {tuple(t[n].shape)}, encoder {tuple(o[n].shape)}")
    return [t[n] for n in names], [o[n] for n in names]


def count_parameters(modules: Iterable[nn.Module]) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def describe(cfg: TrainConfig, mesh, precision: str) -> str:
    parts: List[str] = []
    if mesh is None:
        parts.append("no FSDP")
    else:
        shape = tuple(mesh.shape) if hasattr(mesh, "shape") else tuple(mesh.mesh.shape)
        parts.append(f"FSDP2 mesh {dict(zip(mesh.mesh_dim_names or (), shape))}")
    if precision == "bf16":
        parts.append("bf16 params + autocast, fp32 master weights and reductions" if mesh is not None
                     else "bf16 autocast, fp32 weights")
    else:
        parts.append("fp32")
    parts.append(f"AC {cfg.ac}")
    if cfg.compile:
        extra = [m for m in (cfg.compile_mode if cfg.compile_mode != "default" else "",
                             "combo kernels" if cfg.combo_kernels else "",
                             "C++ host code" if cfg.cpp_wrapper else "",
                             "multi-kernel reductions" if cfg.multi_kernel else "") if m]
        what = {"stack": "compiled block stacks", "unrolled": "compiled block stacks (unrolled)"}.get(cfg.compile_scope,
                                                                                                   "compiled blocks")
        parts.append(what + (f" ({', '.join(extra)})" if extra else ""))
    if cfg.bf16_residual:
        parts.append("bf16 residual stream")
    if cfg.fused_target_gelu:
        parts.append("target encoder's GELU in its fc1 GEMM (tanh form)")
    if cfg.cuda_graph_target:
        parts.append("CUDA-graphed target encoder")
    if cfg.overlap_target:
        parts.append("target encoder on a second stream")
    return ", ".join(parts)


__all__ = ["parallelize", "apply_ac", "apply_compile", "apply_fsdp", "clean_name", "block_list",
           "paired_parameters", "mixed_precision", "count_parameters", "describe", "cudagraph_skips",
           "cudagraph_recordings"]
