"""Replay a no-grad forward from a CUDA graph: the target encoder of I-JEPA (``cuda_graph_target``).

The EMA target encoder runs every step on the same static shape (all ``(img/patch)²`` tokens of
the batch), without gradients, and only its parameters change between steps (in place, by the
EMA). Its host work — 32 ViT-H blocks of Python, Dynamo guard checks, compiled-graph calls and
kernel launches, a few milliseconds per step — is what a CUDA graph removes: the kernels are
recorded once and replayed with one call. That pays when the step is host-bound (a compiled
step can be; ``benchmarks/profile_step.py`` shows host against GPU time).

What makes the replay equal to the eager forward: the graph reads the module's parameters at
their addresses, and the EMA (``torch._foreach_lerp_``) and checkpoint loading update them in
place; the input is copied into the graph's static input buffer; the autocast state and the
input's shape/dtype are part of the key (a new key captures a new graph, at most ``max_graphs``;
beyond that the forward runs eagerly). The output is returned as a fresh tensor (a clone of the
graph's static output, which the next replay overwrites).

The capture restricts only its own thread (``capture_error_mode="thread_local"``): the DataLoader's
pin-memory thread keeps pinning the next batches while it runs.

Costs: the graph's private memory pool keeps the forward's intermediate buffers reserved (they
are not shared with the rest of the step), and the first call per key runs the forward
``warmup`` times on a side stream before capturing it (compilation, autotuning, cuDNN plans).
Only for a single GPU without FSDP (sharded parameters are gathered inside the forward).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn


class GraphedForward:
    """Call ``module(x)`` (one tensor in, one tensor out) through a CUDA graph per input signature
    (CUDA, no grad), else eagerly."""

    def __init__(self, module: nn.Module, warmup: int = 3, max_graphs: int = 2, log=None):
        self.module = module
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.log = log
        self._graphs: Dict[Tuple, Tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._pool = None
        self.captures = 0
        self.replays = 0

    @staticmethod
    def _key(x: torch.Tensor) -> Tuple:
        return (tuple(x.shape), x.dtype, x.device, torch.is_autocast_enabled("cuda"),
                torch.get_autocast_dtype("cuda"))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if (not x.is_cuda or torch.is_grad_enabled() or torch.cuda.is_current_stream_capturing()):
            return self.module(x)
        key = self._key(x)
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                return self.module(x)
            entry = self._capture(x, key)
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        self.replays += 1
        return static_out.clone()

    def _capture(self, x: torch.Tensor, key: Tuple):
        static_in = x.clone()
        # Autocast's cast cache must be off while warming up and capturing: a bf16 copy of a
        # parameter cached in the warm-up would be baked into the graph instead of the cast of the
        # live (EMA-updated) fp32 parameter.
        no_cache = torch.autocast("cuda", dtype=key[4], enabled=key[3], cache_enabled=False)
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side), no_cache:  # warm-up off the capture: compile, autotune, cuDNN plans
            for _ in range(self.warmup):
                self.module(static_in)
        torch.cuda.current_stream(x.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # "thread_local": the capture happens mid-training, while the DataLoader's pin-memory thread may
        # allocate pinned memory for the next batches; under the default "global" mode that CUDA call from
        # another thread invalidates the capture (and fails in that thread). Only this thread is restricted.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"), no_cache:
            static_out = self.module(static_in)
        if not isinstance(static_out, torch.Tensor):
            raise TypeError(f"module: GraphedForward replays modules that return one tensor; "
                            f"{type(self.module).__name__} returned {type(static_out).__name__}")
        self._graphs[key] = (graph, static_in, static_out)
        self.captures += 1
        if self.log is not None:
            self.log(f"cuda_graph_target: captured the target encoder forward for input {tuple(x.shape)} "
                     f"{x.dtype} (autocast {key[3]})")
        return self._graphs[key]
