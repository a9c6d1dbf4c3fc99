"""Harness shared by the one-shot GPU scripts (benchmarks/gpu_attention.py, gpu_stop_embed.py) and
the attention benchmarks: the section decorator, the environment record, the do_bench /
do_bench_cudagraph wrappers and the forced-backend SDPA wrapper.

Each script keeps its own start time and RESULTS dict and binds them with :func:`make_section`.

Rehearsal (``STOP_KERNELS_REHEARSE=1``, no GPU needed): the scripts run every section on the CPU at
toy sizes, the Triton kernels through the interpreter, the timers on the wall clock (CUDA-graph timing
and peak memory are stand-ins). It checks the scripts, never the kernels' speed: a GPU session is
15 minutes, and a section that dies of a Python error there loses its numbers until the next one.
``DEV`` is the device the scripts allocate on and :func:`sync` their synchronisation.
"""
from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import threading
import time
import traceback
from typing import Callable, Iterator, Optional

REHEARSE = os.environ.get("STOP_KERNELS_REHEARSE") == "1"
if REHEARSE:  # before anything imports triton (the scripts import stop_kernels after this module)
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

DEV = "cpu" if REHEARSE else "cuda"


def write_json(path: str, obj) -> None:
    """``obj`` as JSON at ``path``, atomically (a temporary file renamed over it): gpu_all.sh packs the results while
    a section still runs, and a call cut right after a pack must not bring back a half-written file."""
    from stop_kernels import _checks  # (imported here: the scripts import stop_kernels after this module)
    _checks.write_json_atomic(path, obj, default=str)


def sync() -> None:
    """Wait for the GPU (nothing to wait for in a rehearsal)."""
    if not REHEARSE:
        torch.cuda.synchronize()


def make_section(results: dict, elapsed: Callable[[], float]):
    """The ``@section(name)`` decorator of a script: prints a header with ``elapsed()``, runs the
    function, and on an exception prints the traceback, appends it to ``results["errors"]`` and
    returns None (so the script goes on with the next section)."""
    def section(name):
        def deco(fn):
            def run(*a, **kw):
                print(f"\n=== {name} (t = {elapsed():.0f}s) ===", flush=True)
                try:
                    return fn(*a, **kw)
                except Exception:
                    tb = traceback.format_exc()
                    print(tb, flush=True)
                    results["errors"].append({"section": name, "traceback": tb})
            return run
        return deco
    return section


# The "card limits" the scripts measure against: a large bf16 matmul and a device-to-device copy as
# measured on an H200 (ANCHORS.md). An H100 has the same SMs and clocks (same matmul rate) but HBM3 at
# 3.35 TB/s: its copy rate is taken at the H200's measured fraction of spec (4.23 / 4.8), an estimate.
CARD_LIMITS = {"H200": (707.0, 4.23), "H100": (707.0, 4.23 / 4.8 * 3.35)}


def card_limits(gpu_name: str, strict: bool = False):
    """(TFLOP/s, TB/s) for ``gpu_name`` (H200 or H100; others get the H200's, with a warning, or a
    ``ValueError`` when ``strict``: a published table must not quote another card's limits)."""
    # (not the PCIe and NVL H100s: fewer SMs, lower clocks and, on PCIe, HBM2e: their limits are not these)
    for key, lim in CARD_LIMITS.items():
        if key in gpu_name and not any(v in gpu_name for v in ("PCIe", "NVL")):
            return lim
    if strict:
        raise ValueError(f"no card limits for {gpu_name!r} (benchmarks/_gpu_common.py CARD_LIMITS)")
    print(f"card_limits: no limits for {gpu_name!r}; using the H200's", flush=True)
    return CARD_LIMITS["H200"]


def record_env(results: dict, cudnn: bool = False, xformers: bool = False) -> dict:
    """GPU name, SM version and count, torch / triton / CUDA (and cuDNN, xformers when asked) and
    Python versions: stored as ``results["env"]``, printed one per line, returned."""
    import triton
    if REHEARSE:
        info = {"gpu": "CPU rehearsal (Triton interpreter, toy sizes: no time here means anything)",
                "torch": torch.__version__, "triton": triton.__version__}
    else:
        p = torch.cuda.get_device_properties(0)
        info = {"gpu": torch.cuda.get_device_name(0), "sm": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda}
    if cudnn:
        info["cudnn"] = torch.backends.cudnn.version()
    info["python"] = platform.python_version()
    if xformers:
        try:
            import xformers as xf
            info["xformers"] = xf.__version__
        except Exception as e:
            info["xformers"] = f"not importable ({type(e).__name__})"
    info["limits_tflops"], info["limits_tbps"] = CARD_LIMITS["H200"] if REHEARSE else card_limits(info["gpu"])
    results["env"] = info
    for k, v in info.items():
        print(f"{k}: {v}")
    return info


def bench(fn, grad_to_none=None, warmup: int = 10, rep: int = 40) -> float:
    """Eager timing: ``triton.testing.do_bench`` median ms of back-to-back calls (CPU launch cost
    included where it dominates). Rehearsal: the wall time of one call after a first one."""
    if REHEARSE:
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton
    try:
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                                             return_mode="median"))
    except TypeError:  # older triton: no return_mode
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, quantiles=[0.5]))


def bench_graph(fn, rep: int = 20, grad_to_none=None) -> float:
    """Graph timing: ``triton.testing.do_bench_cudagraph`` median ms per call of ``fn`` captured in a
    CUDA graph and replayed (GPU time only). do_bench_cudagraph runs ``fn`` eagerly first (tuning,
    compilation: never inside the capture). Rehearsal: :func:`bench` (no capture)."""
    if REHEARSE:
        return bench(fn)
    import triton
    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=rep, grad_to_none=grad_to_none, return_mode="median"))
    except TypeError:  # older triton: no return_mode
        return float(triton.testing.do_bench_cudagraph(fn, rep=rep, grad_to_none=grad_to_none, quantiles=[0.5]))


def peak_mib_beyond_inputs(fn) -> float:
    """Peak CUDA memory (MiB) that ``fn()`` allocates beyond what was allocated before it, keeping its
    result alive until after the measurement (outputs count, as they would in a model). Rehearsal:
    runs ``fn`` and reports 0."""
    if REHEARSE:
        fn()
        return 0.0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    keep = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del keep
    return peak / 2 ** 20


def allocations_at_peak(trace: list, min_bytes: int = 2 ** 19) -> dict:
    """The CUDA caching allocator's trace of one device (``torch.cuda.memory._snapshot()["device_traces"][i]``)
    replayed: ``{"peak_MiB": the most bytes live at once beyond those live before the trace,
    "live_at_peak": [[MiB, "file:line function" of the innermost frame outside torch, that is the allocating
    line of ours], ...] largest first, those of at least ``min_bytes``}``. Frees count when requested (the
    caching allocator's accounting, ``memory_allocated``, drops then); blocks freed in the trace but allocated
    before it are skipped."""
    live, cur, peak, at_peak = {}, 0, 0, {}
    for e in trace:
        action, addr, size = e.get("action"), e.get("addr"), int(e.get("size", 0))
        if action == "alloc":
            live[addr] = (size, _our_frame(e.get("frames") or []))
            cur += size
            if cur > peak:
                peak, at_peak = cur, dict(live)
        elif action == "free_requested" and addr in live:
            cur -= live.pop(addr)[0]
    rows = sorted(([round(sz / 2 ** 20, 2), where] for sz, where in at_peak.values() if sz >= min_bytes), reverse=True)
    return {"peak_MiB": round(peak / 2 ** 20, 2), "live_at_peak": rows}


def _our_frame(frames: list) -> str:
    """The first frame of a recorded stack (innermost first) outside torch's and triton's own files."""
    for f in frames:
        name = f.get("filename", "")
        if name and "/torch/" not in name and "/triton/" not in name and not name.startswith("??"):
            return f"{os.path.basename(name)}:{f.get('line')} {f.get('name', '')}"
    return "?"


def allocations_during(fn) -> dict:
    """:func:`allocations_at_peak` of ``fn()`` on the GPU (torch's memory history, Python stacks, kept on for the
    call only); ``{}`` in a rehearsal or where the history cannot be recorded."""
    if REHEARSE:
        fn()
        return {}
    sync()
    try:
        torch.cuda.memory._record_memory_history(max_entries=200000, stacks="python")
    except Exception:
        fn()
        return {}
    try:
        keep = fn()
        sync()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    del keep
    dev = torch.cuda.current_device()
    traces = snap.get("device_traces", [])
    return allocations_at_peak(traces[dev] if dev < len(traces) else [])


def md_cell(text, width: int = 80, tail: bool = False) -> str:
    """``text`` made fit for one Markdown table cell: one line, no column separator, at most ``width`` characters,
    its first ones (its last with ``tail``: a traceback's last line says the most)."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text[-width:] if tail else text[:width]


def _annotation(name: str) -> bool:
    """GPU-timeline ranges of host annotations (optimizer step, compiled-graph calls): not kernels."""
    return name.startswith("##") or "#" in name or name.startswith(("Optimizer.", "ProfilerStep"))


def kernel_times(prof, iterations: int) -> dict:
    """``{kernel name: (ms per iteration, launches per iteration)}`` from a ``torch.profiler`` run over
    ``iterations`` iterations: the kernel (device) events themselves, grouped by name (an op's "device
    time" would count its kernels a second time), host annotations left out."""
    out: dict = {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA or _annotation(e.name):
            continue
        t, n = out.get(e.name, (0.0, 0))
        out[e.name] = (t + e.time_range.elapsed_us() / 1e3 / iterations, n + 1)
    return {k: (t, n // iterations) for k, (t, n) in out.items()}


CLOCK_FIELDS = ("clocks.sm", "clocks.mem", "power.draw", "temperature.gpu")


def clock_summary(lines) -> dict:
    """``{"samples": n, "sm_mhz_mean", "sm_mhz_min", "mem_mhz_mean", "power_w_mean", "power_w_max", "temp_c_max"}``
    of ``nvidia-smi --query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv,noheader,nounits``
    lines; lines that do not parse (a "[N/A]" field, a warning) are skipped; ``{}`` when none parses."""
    rows = []
    for line in lines:
        try:
            sm, mem, power, temp = (float(x) for x in line.split(","))
        except ValueError:
            continue
        rows.append((sm, mem, power, temp))
    if not rows:
        return {}
    col = list(zip(*rows))
    mean = lambda xs: round(sum(xs) / len(xs), 1)  # noqa: E731
    return {"samples": len(rows), "sm_mhz_mean": mean(col[0]), "sm_mhz_min": min(col[0]), "mem_mhz_mean": mean(col[1]),
            "power_w_mean": mean(col[2]), "power_w_max": max(col[2]), "temp_c_max": max(col[3])}


@contextlib.contextmanager
def gpu_clocks(device_index: int, period_ms: int = 200) -> Iterator[dict]:
    """Sample the GPU's SM and memory clocks, power draw and temperature about every ``period_ms`` while the block
    runs (a background thread calling ``nvidia-smi --query-gpu`` once per sample, so no output waits in a pipe's
    buffer); the yielded dict is filled with :func:`clock_summary` on exit, or with ``{"error": why}`` where
    nvidia-smi is missing or fails. The check of whether a busier GPU (no idle gaps between kernels, as under CUDA
    graphs) ran its kernels at lower clocks (its power limit) than a gappy one. ``device_index`` is nvidia-smi's,
    which is torch's unless ``CUDA_VISIBLE_DEVICES`` renumbers the GPUs."""
    out: dict = {}
    exe = shutil.which("nvidia-smi")
    if exe is None:
        out["error"] = "nvidia-smi not found"
        yield out
        return
    cmd = [exe, f"--query-gpu={','.join(CLOCK_FIELDS)}", "--format=csv,noheader,nounits", "-i", str(device_index)]
    lines: list = []
    errors: list = []
    stop = threading.Event()

    def sample():
        while True:
            try:
                lines.extend(subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.splitlines())
            except (OSError, subprocess.SubprocessError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                return
            if stop.wait(period_ms / 1e3):
                return
    sampler = threading.Thread(target=sample, name="gpu_clocks", daemon=True)
    sampler.start()
    try:
        yield out
    finally:
        stop.set()
        sampler.join(timeout=15)
        out.update(clock_summary(list(lines)) or {"error": errors[0] if errors else "no sample parsed"})


def innermost_range(t: float, ranges) -> str:
    """The name of the innermost (latest-starting) of ``ranges`` (``(start, end, name)``) open at time ``t``, or
    ``"outside the ranges"``."""
    open_ = [(s, name) for s, e, name in ranges if s <= t < e]
    return max(open_)[1] if open_ else "outside the ranges"


def busy_stretches(kernels) -> list:
    """``[[start, end, launch]]``: the stretches of the GPU timeline where at least one of ``kernels`` (``(start, end,
    launch)``, any streams) runs, in order; ``launch`` is that of the kernel that opens the stretch."""
    merged = []
    for a, b, launch in sorted(kernels, key=lambda k: (k[0], k[1])):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b, launch])
    return merged


def gpu_busy_ms(prof, iterations: int) -> float:
    """ms per iteration during which the GPU runs at least one kernel, copy or memset, from a ``torch.profiler`` run
    over ``iterations`` iterations. Unlike the sum of the kernels' times (:func:`kernel_times`), kernels running at
    once on two streams (``overlap_target``) count once."""
    kernels = [(e.time_range.start, e.time_range.end, None) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA and not _annotation(e.name)]
    return sum(b - a for a, b, _ in busy_stretches(kernels)) / 1e3 / iterations


def idle_by_launch(kernels, ranges) -> dict:
    """Where the GPU waited, charged to the step phase that launched the work it waited for.

    ``kernels``: ``(start, end, launch)`` µs of every kernel, copy and memset on the GPU timeline, ``launch`` the host
    time of the runtime call that queued it (None where the profile does not link the two); ``ranges``: the host's
    named ranges ``(start, end, name)``, which nest. Busy stretches merge (kernels overlapping on several streams),
    and each gap between two of them goes to the phase open on the host when the kernel that ends the gap was
    launched: the innermost range then, ``"outside the ranges"`` where none was open, ``"launch unknown"`` without a
    link. Where that launch came after the GPU went idle, the GPU waited for the host (``host_us``); otherwise the
    work was queued and the gap is the GPU's own (launch latency between kernels, a wait on another stream).
    Returns ``{phase: {"idle_us": ..., "host_us": ...}}`` (``host_us`` None for ``"launch unknown"``)."""
    merged = busy_stretches(kernels)
    out: dict = {}
    for (_, gap_start, _), (gap_end, _, launch) in zip(merged, merged[1:]):
        name = "launch unknown" if launch is None else innermost_range(launch, ranges)
        row = out.setdefault(name, {"idle_us": 0.0, "host_us": None if launch is None else 0.0})
        row["idle_us"] += gap_end - gap_start
        if launch is not None and launch >= gap_start:
            row["host_us"] += gap_end - gap_start
    return out


# host calls that wait for the GPU: a synchronisation drains the launch queue, and the GPU then idles while the host
# issues the next kernels; "Command Buffer Full" is the host waiting for room in a full launch queue (the GPU behind)
HOST_WAITS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "Command Buffer Full")


def gpu_idle_by_phase(prof, iterations: int, prefix: str) -> dict:
    """:func:`idle_by_launch` of a ``torch.profiler`` run over ``iterations`` iterations, the host ranges those named
    ``prefix…`` (the step's phases: ``stop_kernels.training.metrics.step_phase``), per iteration and in ms, with the
    host's waits for the GPU (:data:`HOST_WAITS`) made in each phase: ``{phase: {"idle_ms": ..., "host_ms": ...,
    "waits": {call: [calls, ms]}}}``, largest idle first, the name's prefix and closing ``##`` cut.

    A kernel is linked to its launch by the CUDA correlation id that the profiler gives both the kernel and the
    runtime or driver call that queued it (``cudaLaunchKernel``, ``cuLaunchKernelEx``, ``cudaMemsetAsync``,
    ``cudaGraphLaunch``, ...: the host events named ``cu…``)."""
    device, ranges, waits, launches = [], [], [], {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            if not _annotation(e.name):
                device.append(e)
        elif e.name.startswith(prefix):
            ranges.append((e.time_range.start, e.time_range.end, e.name[len(prefix):].rstrip("# ").strip()))
        elif e.name in HOST_WAITS:
            waits.append(e)
        elif e.name.startswith("cu"):  # a runtime / driver call; its id is the CUDA correlation id
            launches[e.id] = e.time_range.start
    kernels = [(e.time_range.start, e.time_range.end, launches.get(e.id)) for e in device]
    out = {name: {"idle_ms": round(r["idle_us"] / 1e3 / iterations, 3),
                  "host_ms": None if r["host_us"] is None else round(r["host_us"] / 1e3 / iterations, 3), "waits": {}}
           for name, r in idle_by_launch(kernels, ranges).items()}
    for e in waits:
        row = out.setdefault(innermost_range(e.time_range.start, ranges),
                             {"idle_ms": 0.0, "host_ms": 0.0, "waits": {}})["waits"].setdefault(e.name, [0, 0.0])
        row[0] += 1
        row[1] += e.time_range.elapsed_us() / 1e3
    for row in out.values():
        row["waits"] = {k: [n / iterations, round(ms / iterations, 3)] for k, (n, ms) in row["waits"].items()}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["idle_ms"]))


def host_op_times(prof, iterations: int) -> list:
    """``[(self CPU ms per iteration, calls per iteration, op name)]`` of a ``torch.profiler`` run over
    ``iterations`` iterations, largest first: where the host time went among what the profiler records
    (aten ops, driver calls such as ``cuLaunchKernel``, ``record_function`` ranges). Python between them
    is no event: a per-call host time above their sum is interpreter time."""
    rows = [(e.self_cpu_time_total / 1e3 / iterations, e.count // iterations, e.key[:90]) for e in prof.key_averages()]
    return sorted(rows, reverse=True)


def sdpa_fn(backend_name: Optional[str]):
    """``f(q, k, v)`` for ``[B, N, H, Dh]`` inputs: ``F.scaled_dot_product_attention`` on transposed
    views with one SDPA backend forced: "flash", "efficient", "cudnn" or "math"; None: PyTorch's own
    choice (what a model calling SDPA gets, e.g. inside torch.compile)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    if backend_name is None:
        return sdpa
    be = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
          "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend_name]

    def f(q, k, v):
        with sdpa_kernel([be]):
            return sdpa(q, k, v)
    return f
