"""pytest-benchmark twin of ``benchmarks/e2e_step.py``: one I-JEPA+StoP training step, reference path vs
fast path, ViT-H/14 at 224, batch 64, 4 target blocks, bf16 autocast, one GPU (issue 8).

    python -m pytest benchmarks/bench_e2e_step.py --benchmark-only --benchmark-json=out.json

* ``reference``: the pipeline's Trainer with SDPA attention and the official unfused StoP input (Python host code);
* ``fast``: the Trainer's defaults (fused StoP input, attention "auto": in compiled blocks Triton at head dim 24,
  SDPA at 80; compiled, the ViT-H recipe's C++ host code);
* ``fast_py``: ``fast`` with Inductor's Python host code (``cpp_wrapper`` off);
* ``fast_stack``: ``fast_py`` with each model's block stack compiled as one graph (``compile_scope: stack``);
* ``fast_unrolled``: ``fast`` with each model's block stack one graph of inlined blocks (``compile_scope: unrolled``);
* ``fast_triton``: ``fast`` with the Triton attention kernels forced (also inside compiled blocks);
* ``fast_sdpa``: ``fast`` with SDPA at every head dim in compiled blocks (the default before GPU run 6);
* ``fast_levers``: ``fast`` with the opt-in step levers (combo kernels, multi-kernel reductions, bf16
  residual stream, CUDA-graphed target encoder on a second stream, the target's GELU in its fc1 GEMM);
* ``fast_cg``: ``fast`` with every compiled block replayed from CUDA graphs (``compile_mode: reduce-overhead``,
  Python host code); ``fast_cg_levers``: with combo kernels, multi-kernel reductions, the bf16 residual stream and
  the fused target GELU; ``fast_cg_stack``: with each model's block stack one graph;
* ``fast_tgelu``: ``fast`` with the target encoder's fc1, bias and GELU as one cuBLASLt GEMM.
The paths are ``e2e_step.PATHS`` (one definition for both harnesses).

Each with per-block ``torch.compile`` (the recipe default) and with eager blocks, except the paths with a
lever of the compiled blocks that the path itself turns on (``fast_stack``'s and ``fast_unrolled``'s compiled
stacks, ``fast_levers``' combo kernels and multi-kernel reductions, the CUDA-graph paths' compile mode): the config
refuses those on eager blocks, so they run compiled only (the recipe's C++ host code goes off with eager blocks). Each
round is one optimizer step (forward, backward, fused AdamW, EMA) on one of 6 mask batches, cycled; every batch runs
in the warm-up (three times under CUDA-graph trees: warm-up, recording, replay), so the rounds are the steady state
(no first-time JIT, compile or recording).
extra_info: GPU, images/s, TFLOP/s (analytic matmul FLOPs of that step), peak memory.
"""
import itertools
import os
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="the training-step benchmark needs a CUDA GPU (ViT-H/14, batch 64)")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_step import PATHS  # noqa: E402  (path name -> "attention=...+input=...")
from profile_step import parse_variant, variant_argv  # noqa: E402

POOL = 6


def _compiled_only(path: str) -> bool:
    """A path with a lever that "applies to compiled blocks only" (the config's ConfigError on eager blocks)."""
    v = parse_variant(f"{path}:{PATHS[path]}")
    return "1" in (v["combo"], v["cppwrap"], v["mk"]) or v["scope"] != "block" or v["mode"] != "default"


COMPILED_ONLY = tuple(p for p in PATHS if _compiled_only(p))
CASES = [(path, compiled) for path in PATHS for compiled in (True, False) if compiled or path not in COMPILED_ONLY]


@pytest.mark.parametrize("path, compiled", CASES,
                         ids=[f"{path}-{'compiled' if c else 'eager'}" for path, c in CASES])
def test_train_step_speed(benchmark, path, compiled, tmp_path):
    os.environ.pop("TRITON_INTERPRET", None)
    from stop_kernels.training import distributed as D
    from stop_kernels.training.config import parse_config
    from stop_kernels.training.loop import Trainer, synthetic_batches, warmup_steps
    from stop_kernels.training.metrics import step_flops

    v = parse_variant(f"{path}:{PATHS[path]}+compile={int(compiled)}")
    cfg = parse_config(variant_argv(v, "vit_h", 64, str(tmp_path)))
    info = D.init_distributed(cfg)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    tr = Trainer(cfg, info, None)
    tr.models.predictor.input_backend = v["input"]
    batches = synthetic_batches(cfg, POOL, cfg.batch_size, info.device, cfg.seed)
    sched = (cfg.lr, cfg.weight_decay, cfg.ema_start)
    for i in range(warmup_steps(cfg, 0, POOL)):  # every mask batch (JIT, cuDNN plans, compiled graphs, recordings)
        tr.step(*batches[i % POOL], sched)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    cycle = itertools.cycle(batches)

    def step():
        tr.step(*next(cycle), sched)
        torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=2 * POOL, iterations=1, warmup_rounds=0)
    t = benchmark.stats.stats.median
    flops = sum(step_flops(cfg, cfg.batch_size, b[1][0].shape[1], b[2][0].shape[1]) for b in batches) / POOL
    benchmark.extra_info.update(gpu=torch.cuda.get_device_name(0), path=path, compiled=compiled,
                                images_per_s=cfg.batch_size / t, tflops=flops / t / 1e12,
                                peak_mem_gib=torch.cuda.max_memory_allocated() / 2 ** 30)
    D.shutdown(info)
