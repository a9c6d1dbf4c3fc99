"""Process-group setup from the ``torchrun`` environment, and the device mesh for FSDP2.

``torchrun`` exports ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` and
``MASTER_ADDR``/``MASTER_PORT``; :func:`init_distributed` reads them and starts NCCL on GPUs or gloo
on CPUs. Started without torchrun (``python train.py``) it runs as a single process with no process
group, unless FSDP is asked for explicitly, in which case a one-process group is created on a free
local port so the same code path runs.

Mesh layouts (:func:`build_mesh`):

* ``full``   1-D mesh ``("dp_shard",)`` over all ranks: every parameter sharded across the whole job.
* ``hybrid`` 2-D mesh ``("dp_replicate", "dp_shard")`` = (nodes, GPUs per node): sharded within a
  node, replicated across nodes (HSDP: all-gathers stay on NVLink, only gradient all-reduces cross nodes).
* ``none``   with several ranks: 2-D mesh (world, 1), i.e. replicated everywhere (DDP semantics through
  FSDP2); with one rank: no FSDP at all.
"""
from __future__ import annotations

import datetime
import math
import os
import socket
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .config import ConfigError, TrainConfig


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: Optional[str]      # None: no process group
    owns_group: bool            # this module created the group (and destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}: expected an integer in the environment, got {value!r}") from None


def _env_timeout_min(name: str = "STOP_KERNELS_DIST_TIMEOUT_MIN", default: float = 30.0) -> float:
    """The collective timeout in minutes (fractions allowed), > 0."""
    value = os.environ.get(name, "").strip()
    try:
        minutes = float(value) if value else default
    except ValueError:
        minutes = float("nan")
    if not (math.isfinite(minutes) and minutes > 0):
        raise ConfigError(f"{name}: expected a number of minutes > 0 in the environment, got {value!r}")
    return minutes


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def resolve_device(cfg: TrainConfig, local_rank: int = 0) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but no CUDA GPU is visible")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(f"device: LOCAL_RANK={local_rank} but only {count} CUDA device(s) are visible")
    return torch.device("cuda", local_rank)


def resolve_sharding(cfg: TrainConfig, world_size: int) -> str:
    """``auto``: FSDP2 ``full`` over several ranks, ``none`` on one.

    On one rank sharding saves no memory and costs time: FSDP2's per-parameter copy-in/copy-out and
    gradient reduction made a ViT-H/14 step 263 ms instead of 157 ms on an H200
    (benchmarks/results/h200-run3).
    """
    if cfg.sharding == "auto":
        return "full" if world_size > 1 else "none"
    return cfg.sharding


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: TrainConfig) -> DistInfo:
    """Start the process group when launched by torchrun (or when FSDP is requested in one process)."""
    if dist.is_available() and dist.is_initialized():
        return _callers_group(cfg)
    rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    device = resolve_device(cfg, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(minutes=_env_timeout_min())
    sharding = resolve_sharding(cfg, world)
    if launched_by_torchrun():
        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=timeout, **kw)
        return DistInfo(rank, world, local_rank, local_world, device, backend, True)
    if world != 1:
        missing = [v for v in ("RANK", "MASTER_ADDR") if v not in os.environ]
        raise ConfigError(f"WORLD_SIZE={world} without {' and '.join(missing)}: launch with torchrun")
    if sharding == "none":
        return DistInfo(0, 1, 0, 1, device, None, False)
    # FSDP requested in a plain single process: a one-rank group on a free local port
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            timeout=timeout)
    return DistInfo(0, 1, 0, 1, device, backend, True)


def _callers_group(cfg: TrainConfig) -> DistInfo:
    """A process group the caller started (``mp.spawn`` and ``init_process_group``, a notebook): the ranks are the
    group's; this process's GPU is LOCAL_RANK's where that is set, else the caller's current CUDA device (its own
    ``torch.cuda.set_device``, which is kept); the GPUs per node are LOCAL_WORLD_SIZE, without which hybrid
    sharding cannot be laid out."""
    rank, world = dist.get_rank(), dist.get_world_size()
    on_gpu = resolve_device(cfg, 0).type == "cuda"
    local_rank = _env_int("LOCAL_RANK", torch.cuda.current_device() if on_gpu else 0)
    if "LOCAL_WORLD_SIZE" not in os.environ and resolve_sharding(cfg, world) == "hybrid":
        raise ConfigError("sharding: 'hybrid' needs LOCAL_WORLD_SIZE (the GPUs per node) in the environment when "
                          "the process group was started by the caller")
    device = resolve_device(cfg, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return DistInfo(rank, world, local_rank, _env_int("LOCAL_WORLD_SIZE", world), device, dist.get_backend(), False)


def shutdown(info: DistInfo) -> None:
    if info.owns_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def build_mesh(sharding: str, info: DistInfo):
    """The DeviceMesh for ``sharding`` (None: no FSDP)."""
    if sharding == "none" and info.world_size == 1:
        return None
    if not info.distributed:
        raise ConfigError(f"sharding: {sharding!r} needs a process group (launch with torchrun)")
    from torch.distributed.device_mesh import init_device_mesh
    dev = info.device.type
    W = info.world_size
    if sharding == "full":
        return init_device_mesh(dev, (W,), mesh_dim_names=("dp_shard",))
    if sharding == "hybrid":
        per_node = info.local_world_size
        if per_node < 1 or W % per_node:
            raise ConfigError(f"sharding: 'hybrid' needs WORLD_SIZE ({W}) to be a multiple of LOCAL_WORLD_SIZE "
                              f"({per_node})")
        return init_device_mesh(dev, (W // per_node, per_node), mesh_dim_names=("dp_replicate", "dp_shard"))
    return init_device_mesh(dev, (W, 1), mesh_dim_names=("dp_replicate", "dp_shard"))


def barrier(info: DistInfo) -> None:
    if info.distributed:
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def all_reduce_mean_(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """In-place mean over ranks (asynchronous on the device: no host synchronisation)."""
    if info.distributed and info.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(info.world_size)
    return t


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank."""
    if not info.distributed or info.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(problem: Optional[str], info: DistInfo) -> Optional[str]:
    """A check that may fail on some ranks only (a path one node does not see), seen alike on every rank: the
    first failing rank's message, naming the failing ranks, or None when none failed. Every rank calls it
    (one collective), so all of them stop together; a rank that stopped alone would leave the others to fail
    or wait (NCCL: for the whole collective timeout) in their next collective."""
    if not info.distributed or info.world_size == 1:
        return problem
    gathered: list = [None] * info.world_size
    dist.all_gather_object(gathered, problem)
    failed = [r for r, p in enumerate(gathered) if p is not None]
    if not failed:
        return None
    return (f"{gathered[failed[0]]} (on rank{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))} "
            f"of {info.world_size})")


def all_reduce_int(value: int, info: DistInfo) -> int:
    """Sum of an integer over ranks (host value; synchronises)."""
    if not info.distributed or info.world_size == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=info.device)
    dist.all_reduce(t)
    return int(t.item())


def _all_reduce_host(values, info: DistInfo, op) -> list:
    if not info.distributed or info.world_size == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def all_reduce_sum(values, info: DistInfo) -> list:
    """Element-wise sums over ranks of a list of host numbers, as float64 (host values; synchronises)."""
    return _all_reduce_host(values, info, dist.ReduceOp.SUM)


def all_reduce_max(values, info: DistInfo) -> list:
    """Element-wise maxima over ranks of a list of host numbers, as float64 (host values; synchronises)."""
    return _all_reduce_host(values, info, dist.ReduceOp.MAX)
