"""The GPU session's harness on the CPU: the step benchmarks (benchmarks/profile_step.py, e2e_step.py: a
variant's keys reach the trainer's config, every e2e path runs a step), gpu_all.sh's packing, and the
StoP and attention scripts rehearsed at toy sizes. Timings here mean nothing; what is checked is that
the GPU session measures the configurations it names and brings its results back; and the host-side
arithmetic of the harness (e2e ratios, card limits, median timers, peak memory, forced SDPA backends)."""
import json
import os
import sys
import time

import pytest
import torch

from _train_helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import e2e_step  # noqa: E402
import profile_step  # noqa: E402

from stop_kernels.ops import attention as A  # noqa: E402
from stop_kernels.training import distributed as D  # noqa: E402
from stop_kernels.training.config import ConfigError, parse_config  # noqa: E402
from stop_kernels.training.loop import Trainer, synthetic_batches  # noqa: E402


def _gpu_all(tmp_path, *sections, **env):
    """Run benchmarks/gpu_all.sh ``sections`` with $OUT and its scratch folder under ``tmp_path`` (and
    ``env`` on top): returns ($OUT, the scratch folder)."""
    import os
    import subprocess
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OUT": str(out), "GPU_WORK": str(work), **env,
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_all.sh"), *sections], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return out, work


TINY_EXTRA = ("--img-size 32 --patch-size 8 --min-keep 0 --pred-depth 1 --pred-emb-dim 96 --tensorboard false "
              "--device cpu")


def _cfg(spec: str, model: str = "vit_h"):
    v = profile_step.parse_variant(spec)
    return v, parse_config(profile_step.variant_argv(v, model, 64, "/tmp/unused"))


def test_variant_keys_reach_the_config():
    # compile=0 must mean eager even where the recipe (vit_h) turns compile on
    _, cfg = _cfg("a:compile=0")
    assert not cfg.compile and cfg.attention == "auto" and cfg.attention_policy == "" and not cfg.combo_kernels
    v, cfg = _cfg(f"fast_sdpa:{e2e_step.PATHS['fast_sdpa']}+compile=1+overlap=1+graph=1+combo=1+bf16res=1"
                  "+cppwrap=1+mk=1+mode=max-autotune-no-cudagraphs")
    assert v["input"] == "auto" and cfg.compile and cfg.overlap_target and cfg.cuda_graph_target and cfg.combo_kernels
    assert cfg.multi_kernel and not _cfg("a:compile=1")[1].multi_kernel
    # cppwrap left out: the config decides (vit_huge's recipe turns the C++ host code on for compiled blocks only)
    assert cfg.cpp_wrapper and not _cfg("a:compile=1+cppwrap=0")[1].cpp_wrapper
    assert _cfg("a:compile=1")[1].cpp_wrapper and not _cfg("a:compile=0")[1].cpp_wrapper
    assert not _cfg("a:compile=1", model="vit_small")[1].cpp_wrapper
    assert _cfg("a:compile=1+scope=stack+cppwrap=0")[1].compile_scope == "stack" and cfg.compile_scope == "block"
    assert cfg.bf16_residual and not _cfg("a:compile=1")[1].bf16_residual
    assert cfg.attention_policy == "compiled:24=sdpa" and cfg.compile_mode == "max-autotune-no-cudagraphs"
    _, cfg = _cfg(f"r:{e2e_step.PATHS['reference']}")
    assert cfg.attention == "sdpa"
    # the CUDA-graph trees' paths turn the recipe's C++ host code off, which the mode refuses
    for name in ("fast_cg", "fast_cg_stack", "fast_cg_levers"):  # (the last one read below)
        _, cfg = _cfg(f"{name}:{e2e_step.PATHS[name]}+compile=1")
        assert cfg.compile_mode == "reduce-overhead" and not cfg.cpp_wrapper, name
    assert cfg.combo_kernels and cfg.multi_kernel and cfg.bf16_residual and cfg.fused_target_gelu
    assert not cfg.cuda_graph_target
    with pytest.raises(ConfigError, match="^cpp_wrapper: does not combine with compile_mode 'reduce-overhead'"):
        _cfg("x:compile=1+mode=reduce-overhead")
    with pytest.raises(ValueError, match="unknown key"):
        profile_step.parse_variant("x:attn=sdpa")
    # a switch takes 0 or 1: "compile=true" once meant eager blocks, silently
    for spec in ("x:compile=true", "x:graph=yes", "x:overlap", "x:combo=on", "x:bf16res=2", "x:cppwrap=true", "x:mk=yes",
                 "x:tgelu=true"):
        with pytest.raises(ValueError, match="takes 0 or 1"):
            profile_step.parse_variant(spec)
    with pytest.raises(ValueError, match="input takes one of"):
        profile_step.parse_variant("x:input=fused")
    with pytest.raises(ConfigError, match="attention_policy"):
        _cfg("x:policy=compiled:24=cudnn")
    with pytest.raises(ConfigError, match="^compile_scope: expected one of"):
        _cfg("x:compile=1+scope=model")
    # a base's policy and a lever's both apply (gpu_all.sh's enc80 on the fast_sdpa base); a key in both is
    # refused where the trainer reads it; any other key given twice is refused by the parser, not replaced
    _, cfg = _cfg("x:compile=1+policy=compiled:24=sdpa+policy=compiled_train:80=triton")
    assert cfg.attention_policy == "compiled:24=sdpa;compiled_train:80=triton"
    with pytest.raises(ConfigError, match="attention_policy"):
        _cfg("x:compile=1+policy=compiled:24=sdpa+policy=compiled:24=triton")
    for spec in ("x:compile=1+compile=0", "x:attention=sdpa+attention=triton", "x:cppwrap=1+cppwrap=0"):
        with pytest.raises(ValueError, match="set twice"):
            profile_step.parse_variant(spec)


def test_trainer_applies_attention_policy_around_the_step(cpu_train, tmp_path):
    from _train_helpers import tiny_args
    cfg = parse_config(tiny_args(out=str(tmp_path), attention_policy="compiled:24=triton"))
    info = D.init_distributed(cfg)
    tr = Trainer(cfg, info, None)
    seen = []
    tr.models.predictor.register_forward_hook(lambda *_: seen.append(A.get_auto_policy()))
    before = A.get_auto_policy()
    imgs, me, mp = synthetic_batches(cfg, 1, cfg.batch_size, info.device, cfg.seed)[0]
    loss = tr.step(imgs, me, mp, (cfg.lr, cfg.weight_decay, cfg.ema_start))
    assert torch.isfinite(loss).all()
    assert seen == [{**before, ("compiled", 24): "triton"}]
    assert A.get_auto_policy() == before


def test_profile_categories_name_the_projects_kernels():
    """The fused StoP input's Triton kernels were counted as 'other' (only the Philox one matched)."""
    for name in ("_project_kernel", "_noise_weight_grad_kernel", "_pos_noise_kernel", "_philox_normal_kernel",
                 "void stop_embed_fwd_kernel<OpBf16, 3>(...)", "void stop_embed_dw_kernel<OpBf16, 2>(...)"):
        assert profile_step.category(name) == "stop_input", name
    for name in ("_attn_fwd_kernel", "_attn_bwd_fused_kernel", "cudnn_generated_fort_native_sdpa_sm90"):
        assert profile_step.category(name) == "attention", name
    # run 5 counted the patch embedding's cuDNN convolution as attention (its name holds "cudnn")
    conv = ("void cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816fprop_optimized_bf16_128x128_32x5_nhwc_"
            "align8>(cutl")
    assert profile_step.category(conv) == "conv"
    assert profile_step.category("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7") == "attention"
    assert profile_step.category("triton_poi_fused_convert_element_type_3") == "elementwise"


def test_idle_by_launch_charges_each_gap_to_the_phase_that_launched_the_work_after_it():
    """_gpu_common.idle_by_launch (profile_step.py's "GPU idle before the work of each step phase"): the gaps between
    merged busy stretches, each charged to the innermost host range open when the kernel that ends the gap was
    launched (not the range the host is in while the GPU idles: a host ahead of the GPU is in later phases by then),
    and counted as waiting for the host where that kernel was launched after the GPU went idle; nothing before the
    first kernel or after the last."""
    from _gpu_common import idle_by_launch
    ranges = [(0, 100, "A"), (100, 200, "B"), (200, 1000, "optimizer")]  # the host issues A then B, then moves on
    # the GPU runs A's kernels later (300-335; the last two overlap, one busy stretch), then B's two, launched at 150
    # and 160, long before the GPU reached them, then one kernel without a link to its launch
    kernels = [(300, 310, 10), (315, 330, 20), (325, 335, 30), (340, 345, 150), (700, 710, 160), (720, 730, None)]
    got = idle_by_launch(kernels, ranges)
    # gaps: 310-315 (ended by A's kernel launched at 20), 335-340 and 345-700 (by B's), 710-720 (no link); all queued
    assert got == {"A": {"idle_us": 5.0, "host_us": 0.0}, "B": {"idle_us": 360.0, "host_us": 0.0},
                   "launch unknown": {"idle_us": 10.0, "host_us": None}}, got
    late = [(0, 10, 0), (50, 60, 5), (70, 80, 65)]  # the second queued before the GPU idled (at 10), the third after
    assert idle_by_launch(late, [(0, 100, "predictor")]) == {"predictor": {"idle_us": 50.0, "host_us": 10.0}}
    assert idle_by_launch(late, []) == {"outside the ranges": {"idle_us": 50.0, "host_us": 10.0}}
    assert idle_by_launch([(0, 5, 0)], ranges) == {} and idle_by_launch([], ranges) == {}


def test_gpu_busy_time_counts_kernels_on_two_streams_once():
    """_gpu_common.gpu_busy_ms (profile_step.py's busy ms, beside the kernels' summed "GPU ms"): the union of the
    kernels' intervals per iteration. With overlap_target the target encoder's kernels run beside the main stream's,
    and their summed time (1.6 ms here) exceeds the time the GPU was busy (1.0 ms); annotations are left out."""
    from types import SimpleNamespace
    from _gpu_common import gpu_busy_ms, kernel_times
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def ev(name, start, end, device=cuda):
        return SimpleNamespace(name=name, device_type=device, id=0,
                               time_range=SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start))
    events = [ev("main_gemm", 0, 1000), ev("side_gemm", 100, 700), ev("late", 1500, 1600),
              ev("## step: loss ##", 0, 2000), ev("cudaLaunchKernel", 0, 5, cpu)]
    prof = SimpleNamespace(events=lambda: events)
    assert round(sum(t for t, _ in kernel_times(prof, 1).values()), 6) == 1.7
    assert gpu_busy_ms(prof, 1) == 1.1 and gpu_busy_ms(prof, 2) == 0.55


def test_a_failing_profile_keeps_the_paths_timing(tmp_path, monkeypatch):
    """profile_step.py: an exception in the profiled steps' analysis (after the timed steps) is recorded as the path's
    profile_error beside its ms/step, images/s and peaks; it replaced the whole record, so a 75-150 s ViT-H path was
    lost after its timing had succeeded (a review before run 8)."""
    def boom(*a, **k):
        raise RuntimeError("stand-in failure in the profile's analysis")
    monkeypatch.setattr(profile_step, "gpu_idle_by_phase", boom)
    args = profile_step.build_parser().parse_args([
        "--model", "vit_tiny", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--mask-batches", "1",
        "--profile-steps", "1", "--no-isolate", "--variants", "a:compile=0",
        "--extra", "--img-size 32 --patch-size 8 --min-keep 0 --pred-depth 1 --pred-emb-dim 96 --tensorboard false "
                   "--device cpu", "--out", str(tmp_path)])
    _, (res,) = profile_step.run_variants(args)
    assert "error" not in res and res["ms_per_step"] > 0 and res["images_per_s"] > 0 and res["warmup_steps"] >= 1
    assert "stand-in failure" in res["profile_error"] and "gpu_ms_per_step" not in res


def test_e2e_loss_cell_flags_a_path_that_trains_differently():
    """e2e_step.py's last-loss column: each path's relative difference from the reference's, flagged past
    LOSS_AGREEMENT (a kernel computing wrong in the step), and "n/a" where the warm-ups differ in length (the CUDA-graph
    trees take three passes per batch: run 7's fast_cg ended at 0.0108 against 0.0386 for that reason alone)."""
    ref = dict(final_loss=0.03864, warmup_steps=8)
    assert e2e_step.loss_cell(ref, ref) == "0.03864"
    assert e2e_step.loss_cell(dict(final_loss=0.03867, warmup_steps=8), ref) == "0.03867 (+7.8e-04)"
    assert e2e_step.loss_cell(dict(final_loss=0.0395, warmup_steps=8), ref).endswith("(+2.2e-02 **differs**)")
    assert "n/a: 18 warm-up steps against 8" in e2e_step.loss_cell(dict(final_loss=0.0108, warmup_steps=18), ref)
    assert e2e_step.loss_cell(dict(final_loss=0.04), None) == "0.04"


def test_gpu_idle_by_phase_links_kernels_to_their_launches_and_places_the_hosts_waits():
    """_gpu_common.gpu_idle_by_phase: kernels (GPU-timeline annotations left out) linked to the runtime calls that
    launched them by their correlation id, against the step's phase ranges, per iteration; each host wait for the
    GPU (a synchronisation, a full launch queue) counted in the phase it ran in."""
    from types import SimpleNamespace

    from _gpu_common import gpu_idle_by_phase
    CUDA, CPU = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def ev(name, start, end, device=CPU, id=0):
        return SimpleNamespace(name=name, device_type=device, id=id, time_range=SimpleNamespace(
            start=start, end=end, elapsed_us=lambda: end - start))
    events = [ev("## step: predictor ##", 0, 1000), ev("## step: predictor ##", 0, 1000, CUDA),  # its GPU twin
              ev("## step: loss ##", 1000, 2000),
              ev("cuLaunchKernel", 10, 12, id=7), ev("k1", 100, 200, CUDA, id=7),
              ev("cudaLaunchKernel", 20, 22, id=8), ev("k2", 400, 500, CUDA, id=8),  # queued: a GPU-side gap
              ev("cuLaunchKernelEx", 1200, 1210, id=9), ev("k3", 1600, 1700, CUDA, id=9),  # after the GPU idled
              ev("aten::mm", 5, 30, id=9),  # an op whose id equals a correlation id: not a launch
              ev("cudaDeviceSynchronize", 1100, 1500), ev("Command Buffer Full", 200, 300)]
    got = gpu_idle_by_phase(SimpleNamespace(events=lambda: events), 2, "## step: ")
    # gaps: 200-400 ended by k2 (launched at 20 in the predictor: queued), 500-1600 by k3 (launched at 1200 in the
    # loss, after the GPU went idle at 500: the GPU waited for the host)
    assert got == {"loss": {"idle_ms": 0.55, "host_ms": 0.55, "waits": {"cudaDeviceSynchronize": [0.5, 0.2]}},
                   "predictor": {"idle_ms": 0.1, "host_ms": 0.0, "waits": {"Command Buffer Full": [0.5, 0.05]}}}, got
    assert list(got) == ["loss", "predictor"]  # largest idle first


def test_gpu_clocks_samples_nvidia_smi_while_the_block_runs(tmp_path, monkeypatch):
    """_gpu_common.gpu_clocks (profile_step.py's clocks and power during the timed steps: did the busier CUDA-graph
    path run its kernels at lower clocks?): nvidia-smi called with the query it parses, again and again while the
    block runs and never after, every sample summarised, unparsable lines skipped; without nvidia-smi the reason,
    never an exception."""
    from _gpu_common import CLOCK_FIELDS, gpu_clocks
    fake = tmp_path / "nvidia-smi"
    log = tmp_path / "calls"
    fake.write_text(f"""#!/bin/sh
echo "$@" >> {log}
echo "1980, 2619, 650.5, 60"
echo "[N/A], [N/A], [N/A], [N/A]"
echo "1755, 2619, 699.5, 66"
""")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with gpu_clocks(3, period_ms=20) as clocks:
        time.sleep(0.5)
        assert clocks == {}  # filled on exit
    calls = log.read_text().splitlines()
    assert len(calls) >= 2 and all(c.split() == [f"--query-gpu={','.join(CLOCK_FIELDS)}", "--format=csv,noheader,nounits",
                                                 "-i", "3"] for c in calls), calls
    assert clocks == {"samples": 2 * len(calls), "sm_mhz_mean": 1867.5, "sm_mhz_min": 1755.0, "mem_mhz_mean": 2619.0,
                      "power_w_mean": 675.0, "power_w_max": 699.5, "temp_c_max": 66.0}
    time.sleep(0.2)
    assert len(log.read_text().splitlines()) == len(calls)  # the sampler stopped with the block
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with gpu_clocks(0) as clocks:
        pass
    assert clocks == {"error": "nvidia-smi not found"}


def test_step_phases_are_profiler_ranges_only_when_asked(cpu_train, tmp_path):
    """metrics.step_phase: each phase of a training step is a record_function range named for profile_step.py's
    GPU-idle attribution while annotate_step_phases is on, and no range (no host cost) otherwise."""
    from torch.profiler import ProfilerActivity, profile

    from _train_helpers import tiny_args
    from stop_kernels.training import metrics
    cfg = parse_config(tiny_args(out=str(tmp_path)))
    info = D.init_distributed(cfg)
    tr = Trainer(cfg, info, None)
    imgs, me, mp = synthetic_batches(cfg, 1, cfg.batch_size, info.device, cfg.seed)[0]
    sched = (cfg.lr, cfg.weight_decay, cfg.ema_start)

    def phases():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            tr.step(imgs, me, mp, sched)
        return [e.name for e in prof.events() if e.name.startswith(metrics.STEP_PHASE_PREFIX)]
    assert phases() == []
    metrics.annotate_step_phases(True)
    try:
        names = phases()
    finally:
        metrics.annotate_step_phases(False)
    assert sorted(names) == sorted(f"{metrics.STEP_PHASE_PREFIX}{p} ##" for p in metrics.STEP_PHASES), names
    with pytest.raises(ValueError, match="^name: a step phase is one of"):
        metrics.annotate_step_phases(True)
        try:
            metrics.step_phase("forward")
        finally:
            metrics.annotate_step_phases(False)


def test_e2e_paths_run_a_step_on_cpu(tmp_path, capsys):
    # the interpreter as conftest sets it: the fast_triton path forces the Triton kernels
    out = tmp_path / "e2e"
    rc = e2e_step.main(["--model", "vit_tiny", "--batch-size", "4", "--steps", "1", "--warmup", "1",
                        "--mask-batches", "1", "--no-compile", "--paths", ",".join(e2e_step.PATHS), "--profile-steps", "1",
                        "--extra", TINY_EXTRA, "--out", str(out)])
    assert rc in (0, None)
    data = json.loads((out / "e2e_step.json").read_text())
    assert data["torch"] == torch.__version__ and isinstance(data["env"], dict)  # run_header: what ran
    res = data["results"]
    assert [r["name"] for r in res] == list(e2e_step.PATHS)
    # each path ran in its own process (--isolate, the default), which wrote its own record
    assert all((out / f"variant_{name}" / "profile_step.json").exists() for name in e2e_step.PATHS)
    errors = {r["name"]: r["error"] for r in res if "error" in r}
    # run eagerly (--no-compile), fast_stack's compiled stacks, fast_levers' combo kernels and fast_cg's CUDA-graph
    # trees have nothing to act on: those paths are refused by name at their config check (fast_levers' GPU-only keys are refused by
    # the Trainer, test_training_speed), the others run
    assert list(errors) == ["fast_stack", "fast_unrolled", "fast_levers", "fast_cg", "fast_cg_levers",
                            "fast_cg_stack", "fast_overlap"], errors
    assert all(errors[n].startswith("ConfigError: compile_mode: applies to compiled blocks only")
               for n in ("fast_cg", "fast_cg_levers")), errors
    assert errors["fast_cg_stack"].startswith("ConfigError: compile_"), errors
    assert errors["fast_unrolled"].startswith("ConfigError: compile_scope: applies to compiled blocks only"), errors
    assert errors["fast_stack"].startswith("ConfigError: compile_scope: applies to compiled blocks only"), errors
    assert errors["fast_levers"].startswith("ConfigError: combo_kernels: applies to compiled blocks only"), errors
    assert errors["fast_overlap"].startswith("ConfigError: overlap_target:"), errors
    res = [r for r in res if "error" not in r]
    by = {r["name"]: r for r in res}
    assert by["fast_sdpa"]["policy"] == "compiled:24=sdpa" and by["reference"]["input"] == "unfused"
    assert all(r["ms_per_step"] > 0 and r["compile"] == "0" for r in res)
    # every path is built from the same seed and runs the same batches: on the CPU (no compile) fast and
    # fast_sdpa run the same kernels, so their losses are equal unless the harness reseeds or reorders
    # between variants (the reference path draws its StoP noise from torch.randn, not the Philox stream)
    losses = {r["name"]: r["final_loss"] for r in res}
    assert all(0 < x < 10 for x in losses.values()), losses
    assert abs(losses["fast"] - losses["fast_sdpa"]) <= 1e-4 * losses["fast"], losses
    # the card's floors that the profile's categories are read against
    assert all(set(r["floors_ms"]) == {"matmul", "attention", "optimizer"} and min(r["floors_ms"].values()) > 0
               for r in res)
    printed = capsys.readouterr().out
    assert "ratio_fast_sdpa_over_reference" in printed and "top host ops" in printed
    assert all(r["top_host_ops"] for r in res)
    # no GPU timeline on the CPU: no gap to attribute, but the section is there
    assert all(r["gpu_idle_ms"] == {} for r in res) and "GPU idle before the work of each step phase" in printed
    assert all(r["gpu_clocks"] == {} for r in res) and "SM MHz mean (min), W mean" in printed  # (no GPU to sample)


def test_a_variant_process_that_dies_leaves_an_error_record(tmp_path, capsys):
    """--isolate: a child that exits without its record (here: a train.py flag it refuses before any
    variant runs) becomes an error result carrying the end of its output; the parent carries on."""
    out = tmp_path / "p"
    rc = profile_step.main(["--model", "vit_tiny", "--batch-size", "2", "--steps", "1", "--warmup", "0",
                            "--profile-steps", "0", "--variants", "a:compile=0,b:compile=0",
                            "--extra=--no-such-flag", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "profile_step.json").read_text())["results"]
    assert [r["name"] for r in res] == ["a", "b"]
    assert all(r["error"].startswith("variant process exited with 2: ") and "--no-such-flag" in r["error"]
               for r in res), res
    assert "  [a] " in capsys.readouterr().out  # the child's output, echoed with its name


@pytest.mark.parametrize("when", ["import", "steps"])
@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
def test_an_interrupted_run_leaves_no_variant_process(tmp_path, sig, when):
    """gpu_all.sh ends a section with SIGINT to the script (and ``timeout`` may send SIGKILL): the variant's own
    process must end with it, not run on (and hold the GPU) into the next section. SIGKILL runs none of the
    parent's Python, so only the kernel's parent-death signal can end the variant there; in its steps the variant
    prints nothing, so no broken pipe ends it either (a variant left so ran for 25 minutes once)."""
    import os
    import select
    import signal
    import subprocess
    import time
    out = tmp_path / "p"
    parent = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "profile_step.py"), "--model=vit_tiny",
                               "--batch-size=2", "--variants=a:compile=0", "--warmup=0", "--steps=100000",
                               "--profile-steps=0", f"--extra={TINY_EXTRA}", f"--out={out}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def children():  # the variant process: the one whose command names its own output folder
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if f"--out={out}/variant_a".encode() in cmd:
                found.append(int(pid))
        return found
    deadline = time.time() + 120
    while not children() and time.time() < deadline:
        time.sleep(0.2)
    assert children(), "the variant process never started"
    if when == "import":
        time.sleep(0.5)
    else:  # the variant's last line before its (silent) steps, echoed by the parent
        seen, deadline = b"", time.time() + 120
        while b"no CUDA GPU" not in seen and time.time() < deadline:
            if select.select([parent.stdout], [], [], 1.0)[0]:
                chunk = os.read(parent.stdout.fileno(), 65536)
                assert chunk, f"the parent ended before the variant's steps: {seen.decode()[-2000:]}"
                seen += chunk
        assert b"no CUDA GPU" in seen, seen.decode()[-2000:]
        time.sleep(1.0)
    parent.send_signal(getattr(signal, sig))
    parent.communicate(timeout=60)
    deadline = time.time() + 10
    while children() and time.time() < deadline:
        time.sleep(0.2)
    assert children() == []


def test_attention_sweep_writes_its_fastest_configs(tmp_path, monkeypatch):
    """gpu_attention.py's variants sweep → best_configs.json: the fastest measured config per
    (kind, N bucket, head dim, split), batched and packed, loadable by the attention module, so the e2e section of the
    same GPU session runs them inside compiled graphs (STOP_KERNELS_ATTN_CONFIGS)."""
    import gpu_attention as G
    fast = dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2, HEADS=1, PERSIST=1)
    slow = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, HEADS=1)
    bwd = dict(VARIANT="fused", BLOCK_N=16, num_warps=4, num_stages=1)
    rows = [dict(shape=[256, 16, 116, 24], kind="fwd", config=slow, split_d=True, ms=0.068, timer="graph"),
            dict(shape=[256, 16, 116, 24], kind="fwd", config=fast, split_d=True, ms=0.041, timer="graph"),
            dict(shape=[256, 16, 116, 24], kind="fwd", config=slow, split_d=True, error="OutOfResources"),
            # timed eagerly after a failed capture: its host time makes it incomparable, not faster
            dict(shape=[256, 16, 116, 24], kind="fwd", config=dict(slow, BLOCK_M=32), split_d=True, ms=0.030,
                 timer="eager"),
            dict(shape=[256, 16, 116, 24], kind="bwd", config=bwd, split_d=True, ms=0.2, timer="eager")]
    monkeypatch.setitem(G.RESULTS, "variants", rows)
    best = G.best_configs()
    # the batched picks, and the same for packed runs at that bucket (the sweep times batched only)
    assert best == {("fwd", 128, 24, torch.bfloat16, packed, True): cfg
                    for cfg, packed in ((fast, False), (fast, True))} | {
                    ("bwd", 128, 24, torch.bfloat16, packed, True): bwd for packed in (False, True)}
    monkeypatch.setattr(A, "_TUNE_CACHE", {})
    monkeypatch.setattr(A, "_PLANS", {})
    path = str(tmp_path / "best_configs.json")
    assert A.save_tuned_configs(path, best) == 4 and A._TUNE_CACHE == {}
    assert A.load_tuned_configs(path) == 4 and A._TUNE_CACHE == best


def test_gpu_script_returns_its_results_within_the_device_tools_limits(tmp_path):
    # the device tool brings back at most 8 files from $OUT, at most 2 folders down: gpu_all.sh packs
    # every section's files into one archive after each section, so a call cut off still returns them.
    # Section "env" fails here (no nvidia-smi / GPU) but still leaves its log; "nope" is unknown.
    import os
    import tarfile
    out, _ = _gpu_all(tmp_path, "env", "nope", SEC_ENV="60")
    files = [p for p in out.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == ["log.txt", "results.tar.gz", "summary.txt"]
    summary = (out / "summary.txt").read_text()
    assert "env: rc=" in summary and "unknown section nope" in summary
    with tarfile.open(out / "results.tar.gz") as tar:
        names = {os.path.normpath(n) for n in tar.getnames()}
        log = tar.extractfile("./env.log").read().decode()
    assert {"summary.txt", "env.log"} <= names
    assert f"{sys.version.split()[0]} {torch.__version__}" in log  # its python line ran and was captured
    assert "=================== summary" in (out / "log.txt").read_text()


def test_attention_rates_and_summary_from_the_timed_rows(monkeypatch):
    """gpu_attention.py's timing rows → rates → summary: TFLOP/s and GB/s from the graph (GPU) time, from the
    eager time only where the capture failed; bf16 bytes (fwd 4e, fwd+bwd 12e + 2·lse); per column the fastest
    SDPA backend over Triton (× > 1: Triton faster); Triton's graph time over its byte floor at the card's TB/s."""
    import gpu_attention as G
    shape = (256, 16, 116, 24)
    ms = {"triton": dict(fwd_eager_ms=0.09, fwdbwd_eager_ms=0.44, fwd_graph_ms=0.04, fwdbwd_graph_ms=0.30),
          # the models' path: the QKV buffer's gradient written by the kernel (no stack of dq, dk, dv)
          "triton-qkv": dict(fwd_eager_ms=0.09, fwdbwd_eager_ms=0.40, fwd_graph_ms=0.04, fwdbwd_graph_ms=0.25),
          "sdpa-cudnn": dict(fwd_eager_ms=0.08, fwdbwd_eager_ms=0.36, fwd_graph_ms=0.05, fwdbwd_graph_ms=0.33),
          # its forward+backward capture failed: those rates come from its eager time
          "sdpa-flash": dict(fwd_eager_ms=0.12, fwdbwd_eager_ms=0.35, fwd_graph_ms=0.07,
                             fwdbwd_graph_error="RuntimeError: capture failed")}
    monkeypatch.setattr(G, "SHAPES", [shape])
    monkeypatch.setattr(G, "_impls", lambda: {k: k for k in ms})
    monkeypatch.setattr(G, "_time_impl", lambda f, *a, **k: dict(ms[f]))
    monkeypatch.setattr(G, "PEAK_TBPS", 4.23)
    monkeypatch.setitem(G.RESULTS, "timing", [])
    monkeypatch.setitem(G.RESULTS, "errors", [])
    G.timing(1e9)
    assert G.RESULTS["errors"] == []
    B, H, N, D = shape
    e, lse = B * N * H * D * 2, B * N * H * 4
    work = {"fwd": (4 * B * H * N * N * D, 4 * e), "fwdbwd": (3.5 * 4 * B * H * N * N * D, 12 * e + 2 * lse)}
    by = {r["impl"]: r for r in G.RESULTS["timing"]}
    for impl, mode, timer in (("triton", "fwd", "graph"), ("triton", "fwdbwd", "graph"),
                              ("sdpa-flash", "fwd", "graph"), ("sdpa-flash", "fwdbwd", "eager")):
        t_s = ms[impl][f"{mode}_{timer}_ms"] * 1e-3
        flops, nbytes = work[mode]
        r = by[impl]
        assert r[f"{mode}_rates_from"] == timer, (impl, mode)
        assert r[f"{mode}_tflops"] == round(flops / t_s / 1e12, 1), (impl, mode)
        assert r[f"{mode}_gbps"] == round(nbytes / t_s / 1e9), (impl, mode)
    (s,) = G._summary()
    assert s["fwd_eager_ms"] == (0.08, "sdpa-cudnn", 0.09, pytest.approx(0.08 / 0.09))
    assert s["fwdbwd_eager_ms"] == (0.35, "sdpa-flash", 0.44, pytest.approx(0.35 / 0.44))
    assert s["fwd_graph_ms"] == (0.05, "sdpa-cudnn", 0.04, pytest.approx(1.25))
    assert s["fwdbwd_graph_ms"] == (0.33, "sdpa-cudnn", 0.30, pytest.approx(1.1))  # flash's capture failed
    assert s["qkv_fwdbwd_graph_ms"] == (0.33, "sdpa-cudnn", 0.25, pytest.approx(1.32))  # never an SDPA's own best
    for mode in ("fwd", "fwdbwd"):
        floor_ms = work[mode][1] / 4.23e12 * 1e3
        assert s[f"{mode}_vs_limit"] == pytest.approx(ms["triton"][f"{mode}_graph_ms"] / floor_ms), mode


def test_gpu_script_header_names_its_sections_and_default():
    """gpu_all.sh's usage line lists every section it has (and no other), and what a call without
    arguments runs: the default list is the usage's, less the sections it says are left out."""
    import re
    text = (REPO / "benchmarks" / "gpu_all.sh").read_text()
    listed = re.search(r"^#\s+bash benchmarks/gpu_all.sh \[sections\.\.\.\]\s+sections: (.*)$", text, re.M).group(1).split()
    left_out = re.search(r"^#\s+\(default: all but (.*), in that order\)$", text, re.M)
    assert left_out, "the usage must say which sections a call without arguments leaves out"
    left_out = re.split(r", | and ", left_out.group(1))
    default = re.search(r"^SECTIONS=\$\{\*:-(.*)\}$", text, re.M).group(1).split()
    arms = re.findall(r"^    ([a-z][\w-]*)\) ", text, re.M)
    assert sorted(arms) == sorted(listed), (arms, listed)
    assert default == [s for s in listed if s not in left_out], (default, listed, left_out)


def test_gpu_script_header_commands_parse(monkeypatch):
    """The commands gpu_all.sh's header hands a GPU session (the two-call plan, the later sessions) name only
    variables the script reads and flags and variant keys the step scripts and train.py take: a misspelt
    variable silently runs the default, and a bad flag costs the call it is in."""
    import re
    import shlex
    lines = (REPO / "benchmarks" / "gpu_all.sh").read_text().splitlines()[1:]
    n = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    header = re.sub(r"\\\n\s*", " ", "\n".join(line[1:] for line in lines[:n]))  # joined at the backslashes
    readers = "\n".join(lines[n:]) + (REPO / "benchmarks" / "_gpu_common.py").read_text()
    names = set(re.findall(r"(?<![\w$])([A-Z][A-Z0-9_]*)=", header))
    assert {"SEC_E2E", "SEC_TESTS_NEW", "PROFILE_BASE"} <= names, names
    assert not [v for v in names if not re.search(r"(\$\{?|environ\.get\(\")" + v + r"\b", readers)]

    class Parsed(Exception):
        pass

    def parsed(args, *a, **k):  # the scripts' first step after their own checks: build each variant's config
        for spec in args.variants.split(","):
            v = profile_step.parse_variant(spec)
            parse_config(profile_step.variant_argv(v, args.model, args.batch_size, "/tmp/unused") + args.extra.split())
        raise Parsed
    monkeypatch.setattr(profile_step, "run_variants", parsed)
    commands = re.findall(r"python benchmarks/(e2e_step|profile_step)\.py (.*)", header)
    assert len(commands) >= 2, header
    for script, argv in commands:
        with pytest.raises(Parsed):
            {"e2e_step": e2e_step, "profile_step": profile_step}[script].main(shlex.split(argv.replace("$OUT", "/tmp")))


def test_gpu_script_sections_name_valid_variants_and_paths():
    """The step sections of gpu_all.sh itself (not the header): the e2e section's default paths are
    e2e_step.py's, and every profile variant, on each PROFILE_BASE the header offers, builds a config the
    trainer accepts; a misspelt key or path there costs the GPU call it runs in."""
    import re
    text = (REPO / "benchmarks" / "gpu_all.sh").read_text()
    paths = re.search(r"--paths \$\{E2E_PATHS:-([\w,]+)\}", text).group(1).split(",")
    assert paths and set(paths) <= set(e2e_step.PATHS), paths
    # the baseline, then the paths no GPU has timed (the trees with the GPU-time levers, the second stream alone, the
    # levers with the C++ host code: fast_overlap before fast_levers, whose warm-up took 121 s in run 6), then run 7's
    # trees and the default again: a section cut by its limit (a compiled ViT-H path takes 75-150 s) keeps the
    # untried ones
    assert paths[:6] == ["reference", "fast_cg_levers", "fast_overlap", "fast_levers", "fast_cg", "fast"], paths
    specs = re.search(r'profile\).*?--variants "([^"]+)"', text, re.S).group(1)
    bases = ("compile=1", "compile=1+policy=compiled:24=sdpa", "compile=1+attention=triton")  # the header's
    assert all(b + " (" in text or b + ";" in text for b in bases)
    for base in bases:
        for spec in specs.replace("$PB", base).split(","):
            v, cfg = _cfg(spec)
            assert cfg.compile, spec
    assert "pyhost:$PB+cppwrap=0" in specs and "stack:$PB+scope=stack+cppwrap=0" in specs
    assert "cg:$PB+mode=reduce-overhead+cppwrap=0" in specs
    assert "unrolled:$PB+scope=unrolled" in specs
    assert "enc80:$PB+policy=compiled_train:80=triton" in specs
    _, cfg = _cfg("enc80:compile=1+policy=compiled:24=sdpa+policy=compiled_train:80=triton")
    assert cfg.attention_policy == "compiled:24=sdpa;compiled_train:80=triton"  # the base's policy kept


def test_profile_report_reads_each_category_against_its_floor(capsys):
    import argparse
    r = {"name": "fast", "ms_per_step": 120.0, "host_ms_per_step": 40.0, "images_per_s": 533.3, "tflops": 360.0,
         "peak_gib": 23.9, "gpu_ms_per_step": 118.0,
         "categories_ms": {"matmul": 75.0, "attention": 12.6, "optimizer": 7.1, "elementwise": 23.3},
         "floors_ms": {"matmul": 60.0, "attention": 3.15, "optimizer": 6.12}}
    profile_step.print_report("NVIDIA H200", argparse.Namespace(model="vit_h", batch_size=64), [r])
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| fast")]
    assert len(rows) == 2
    cells = [c.strip() for c in rows[1].strip("|").split("|")]
    # columns: variant, 5 step columns, GPU ms (the floors' sum), then the categories in name order
    assert cells[0] == "fast: floor (×)" and cells[6] == "69.27"
    assert cells[7:] == ["3.15 (4.0×)", "", "60.0 (1.2×)", "6.12 (1.2×)"]


def test_gpu_script_on_a_warm_machine_keeps_no_stale_section_and_no_checkpoint(tmp_path):
    # a second call on the same machine (same scratch folder): a section it reruns starts empty (no earlier
    # call's results passed off as this call's), the earlier calls' other sections stay, set-aside training
    # checkpoints stay out of the archive, and the summary keeps one block per call
    import os
    import tarfile
    res = tmp_path / "work" / "results"
    (res / "env").mkdir(parents=True)
    (res / "env" / "stale.json").write_text("{}")              # from an earlier call's env section
    (res / "attn").mkdir()
    (res / "attn" / "best_configs.json").write_text("{}")      # an earlier call's attn results
    ck = res / "train" / "run_smoke" / "checkpoints.replaced-20261126-000000" / "step_3"
    ck.mkdir(parents=True)
    (ck / "__0_0.distcp").write_bytes(os.urandom(1 << 20))
    (res / "profile").mkdir()
    (res / "profile" / "trace.bin").write_bytes(os.urandom(16 << 20))  # would make the archive too big
    (res / "profile" / "profile_step.json").write_text("{}")
    (res / "summary.txt").write_text("== call earlier\nattn: rc=0, 100s\n")
    out, _ = _gpu_all(tmp_path, "env", SEC_ENV="60")
    with tarfile.open(out / "results.tar.gz") as tar:
        names = {os.path.normpath(n) for n in tar.getnames()}
    assert "env/stale.json" not in names and "env.log" in names
    assert "attn/best_configs.json" in names
    assert not [n for n in names if "distcp" in n or "checkpoints" in n], names
    # over 15 MiB: only the text results go back, and the summary says so
    assert "profile/trace.bin" not in names and "profile/profile_step.json" in names
    assert (out / "results.tar.gz").stat().st_size < 15 << 20
    summary = (out / "summary.txt").read_text()
    assert summary.startswith("== call earlier\nattn: rc=0") and "== call " in summary.splitlines()[2]
    assert "env: rc=" in summary and "pack: archive over 15 MiB" in summary


def test_gpu_sections_stop_and_attn_rehearse_on_the_cpu(tmp_path, monkeypatch):
    """gpu_all.sh's `stop` and `attn` sections with STOP_KERNELS_REHEARSE=1: gpu_stop_embed.py and
    gpu_attention.py run every section at toy sizes through the Triton interpreter. A Python error in
    a section costs a GPU session its numbers; here it fails the test. Their correctness checks
    must pass, and the attention sweep's best_configs.json must load."""
    import tarfile
    out, _ = _gpu_all(tmp_path, "stop", "attn", STOP_KERNELS_REHEARSE="1", SEC_STOP="240", SEC_ATTN="240",
                      BUDGET_STOP="230", BUDGET_ATTN="230")
    summary = (out / "summary.txt").read_text()
    assert "stop: rc=0" in summary and "attn: rc=0" in summary, summary
    res = tmp_path / "res"
    with tarfile.open(out / "results.tar.gz") as tar:
        tar.extractall(res, filter="data")
    stop = json.loads((res / "stop" / "gpu_stop_embed.json").read_text())
    attn = json.loads((res / "attn" / "gpu_attention.json").read_text())
    for name, got in (("stop", stop), ("attn", attn)):
        assert got["env"]["gpu"].startswith("CPU rehearsal"), name
        assert got["errors"] == [], (name, got["errors"])
        assert got["correctness"] and all(c["ok"] for c in got["correctness"]), (name, got["correctness"])
    assert {r_["impl"] for r_ in stop["timing"]} == {"fused", "fused-trusted", "fused-op", "eager"}
    assert [c for c in stop["config_sweep"] if c["ms"] is not None]
    # the breakdown's host side: the time to queue a call, and the host ops under the profiler (aten ops on the CPU)
    assert set(stop["breakdown_host"]) == {"fused-trusted", "fused-op", "eager"}, stop["breakdown_host"]
    for host in stop["breakdown_host"].values():
        assert host["host_ms_per_call"] > 0 and host["top_host_ops"], host
        assert all(t >= 0 and n >= 0 and isinstance(k, str) for t, n, k in host["top_host_ops"]), host
    assert any(r_["impl"] == "triton" and "error" not in r_ for r_ in attn["timing"])
    assert {v["kind"] for v in attn["variants"] if "ms" in v} == {"fwd", "bwd"}
    # the key mask in the dot timed on and off at head dim 24 (the rehearsal's (2, 2, 20, 24)), before the sweep
    ab = {(v["kind"], v["dot_mask"]) for v in attn["variants"] if "dot_mask" in v and "ms" in v}
    assert ab == {("fwd", True), ("fwd", False), ("bwd", True), ("bwd", False)}, attn["variants"]
    # and the fused backward's lse loads (one element per thread, or one per column), backward only
    ab = {(v["kind"], v["column_loads"]) for v in attn["variants"] if "column_loads" in v and "ms" in v}
    assert ab == {("bwd", True), ("bwd", False)}, attn["variants"]
    monkeypatch.setattr(A, "_TUNE_CACHE", {})
    monkeypatch.setattr(A, "_PLANS", {})
    assert A.load_tuned_configs(str(res / "attn" / "best_configs.json")) > 0


# ------------------------------------------------------------------------------------------------
# e2e_step.py: what each path turns on, and the ratios it reports
# ------------------------------------------------------------------------------------------------
def test_e2e_paths_turn_on_their_levers():
    """Each e2e path is the configuration its docstring names: the attention backend, the StoP input,
    the head-dim-24 policy (fast_sdpa's, the default before run 6), the context encoder's Triton attention
    (compiled_train:80, in the two levers paths), for fast_levers the six opt-in step levers (and
    each lever only there, but for the four GPU-time levers in fast_cg_levers, the target encoder's fused GELU in
    fast_tgelu and its second stream in fast_overlap), the CUDA-graph trees in the fast_cg paths only, and the C++ host code of the
    ViT-H recipe everywhere but in the reference, fast_py, fast_stack and the CUDA-graph paths."""
    levers = ("combo_kernels", "multi_kernel", "bf16_residual", "cuda_graph_target", "overlap_target",
              "fused_target_gelu", "cpp_wrapper")
    want = {"reference": ("sdpa", "unfused", ""), "fast": ("auto", "auto", ""), "fast_py": ("auto", "auto", ""),
            "fast_stack": ("auto", "auto", ""), "fast_unrolled": ("auto", "auto", ""),
            "fast_triton": ("triton", "auto", ""), "fast_sdpa": ("auto", "auto", "compiled:24=sdpa"),
            "fast_levers": ("auto", "auto", "compiled_train:80=triton"), "fast_cg": ("auto", "auto", ""),
            "fast_cg_levers": ("auto", "auto", "compiled_train:80=triton"),
            "fast_cg_stack": ("auto", "auto", ""), "fast_tgelu": ("auto", "auto", ""),
            "fast_overlap": ("auto", "auto", "")}
    assert set(e2e_step.PATHS) == set(want)
    graphs = ("fast_cg", "fast_cg_levers", "fast_cg_stack")
    for name, (attention, inp, policy) in want.items():
        v, cfg = _cfg(f"{name}:{e2e_step.PATHS[name]}+compile=1")
        assert (cfg.attention, v["input"], cfg.attention_policy) == (attention, inp, policy), name
        on = ([name in ("fast_levers", "fast_cg_levers")] * 3 + [name == "fast_levers", name in ("fast_levers", "fast_overlap")]
              + [name in ("fast_tgelu", "fast_cg_levers", "fast_levers")] + [name not in ("reference", "fast_py", "fast_stack") + graphs])
        assert [getattr(cfg, k) for k in levers] == on, name
        assert cfg.compile_scope == {"fast_stack": "stack", "fast_unrolled": "unrolled",
                                     "fast_cg_stack": "stack"}.get(name, "block"), name
        assert (cfg.compile_mode == "reduce-overhead") is (name in graphs), name


def test_every_bench_e2e_step_case_is_a_valid_config():
    """Each (path, compiled) case that benchmarks/bench_e2e_step.py collects builds a config the trainer
    accepts: a case the config refuses (fast_levers' combo kernels on eager blocks) fails on every GPU run
    of `pytest benchmarks/ --benchmark-only` instead of timing anything."""
    import os
    import subprocess
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                        str(REPO / "benchmarks" / "bench_e2e_step.py")], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    ids = [ln.split("[", 1)[1].rstrip("]") for ln in r.stdout.splitlines() if "test_train_step_speed[" in ln]
    assert ids, r.stdout + r.stderr
    seen = set()
    for case in ids:
        path, mode = case.rsplit("-", 1)
        assert path in e2e_step.PATHS and mode in ("compiled", "eager"), case
        _cfg(f"{path}:{e2e_step.PATHS[path]}+compile={int(mode == 'compiled')}")  # raises ConfigError if refused
        seen.add(path)
    assert seen == set(e2e_step.PATHS)  # every path is still benchmarked


@pytest.mark.parametrize("flag, value", [("--steps", "0"), ("--steps", "two"), ("--profile-steps", "-1"),
                                         ("--batch-size", "0"), ("--mask-batches", "0"), ("--warmup", "-2")])
def test_step_scripts_refuse_bad_counts(flag, value, capsys):
    """A count out of range is a usage error naming the flag, before any variant is built (--steps 0 was a
    ZeroDivisionError in every variant, after its build and warm-up, and the script exited 0)."""
    for main in (profile_step.main, e2e_step.main):
        with pytest.raises(SystemExit) as e:
            main([flag, value, "--out", "/nonexistent/unused"])
        assert e.value.code == 2 and f"argument {flag}:" in capsys.readouterr().err


def test_e2e_step_refuses_variants(monkeypatch, capsys):
    """e2e_step.py runs its named paths: a --variants (profile_step.py's flag, on the parser it shares) is a usage
    error, not silently replaced by the --paths variants."""
    monkeypatch.setattr(profile_step, "run_variants", lambda *a, **k: pytest.fail("ran variants"))
    with pytest.raises(SystemExit) as e:
        e2e_step.main(["--variants", "mine:compile=1+attention=triton", "--paths", "reference", "--out", "/nonexistent"])
    assert e.value.code == 2 and "--variants: e2e_step.py runs the paths that --paths names" in capsys.readouterr().err


def test_step_budget_counts_from_the_scripts_start(tmp_path, monkeypatch, capsys):
    """--budget-s counts the script's imports too: gpu_all.sh gives the e2e section's paths its limit less 70 s, and a
    clock started after importing torch and the pipeline (10-20 s) let a path start with less than 70 s left."""
    import time
    started = []

    def run_variant(v, args, info):
        started.append(v["name"])
        return {**v, "images_per_s": 1.0}
    monkeypatch.setattr(profile_step, "run_variant", run_variant)
    monkeypatch.setattr(profile_step, "T_START", time.perf_counter() - 30)  # the imports took 30 s
    args = profile_step.build_parser().parse_args(["--model", "vit_tiny", "--variants", "a:compile=0,b:compile=0",
                                                   "--budget-s", "20", "--out", str(tmp_path), "--extra", "--device cpu",
                                                   "--no-isolate"])  # (run_variant patched in this process)
    profile_step.run_variants(args)
    assert started == [] and "[skip a: budget]" in capsys.readouterr().out
    monkeypatch.setattr(profile_step, "T_START", time.perf_counter())
    profile_step.run_variants(args)
    assert started == ["a", "b"]


def test_step_timing_is_the_timed_steps_to_the_last_sync(cpu_train, tmp_path, monkeypatch):
    """profile_step.run_variant on a clock that a queued step moves 1 s and a synchronisation 0.5 s (the GPU
    finishing the queue): the time per step runs from after the warm-up's sync to after the last timed step's
    sync, images/s is every timed image over it, TFLOP/s and MFU are the steps' FLOPs over it (MFU of the card's
    peak), and the floors take the steps' mean token counts."""
    import types
    clock = [0.0]
    monkeypatch.setattr(profile_step, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    class Timed(Trainer):
        def step(self, *a, **k):
            clock[0] += 1.0
            return super().step(*a, **k)
    monkeypatch.setattr(profile_step, "Trainer", Timed)
    monkeypatch.setattr(profile_step, "_sync", lambda info: clock.__setitem__(0, clock[0] + 0.5))
    lengths = iter([7.0, 3.0, 9.0, 5.0])  # context, target mean tokens of the first timed step, then the second's
    monkeypatch.setattr(profile_step, "mean_tokens", lambda masks: next(lengths))
    monkeypatch.setattr(profile_step, "step_flops", lambda cfg, batch, c, t: 1e12 * (c + t))
    seen = {}

    def floors(cfg, batch, n_ctx, n_tgt, **kw):
        seen.update(batch=batch, n_ctx=n_ctx, n_tgt=n_tgt)
        return {"matmul": 1.0}
    monkeypatch.setattr(profile_step, "step_floors_ms", floors)
    args = profile_step.build_parser().parse_args(["--model", "vit_tiny", "--batch-size", "4", "--steps", "2",
                                                   "--warmup", "1", "--mask-batches", "1", "--profile-steps", "0",
                                                   "--variants", "a:compile=0+input=unfused", "--extra", TINY_EXTRA,
                                                   "--out", str(tmp_path), "--no-isolate"])
    _, (r,) = profile_step.run_variants(args)
    assert "error" not in r, r
    dt = 2 * 1.0 + 0.5  # two queued steps, then the sync that waits for them
    assert r["ms_per_step"] == 1e3 * dt / 2 and r["host_ms_per_step"] == 1e3 * 2.0 / 2
    assert r["images_per_s"] == round(4 * 2 / dt, 1)
    flops = 1e12 * (7 + 3 + 9 + 5)
    assert r["tflops"] == round(flops / dt / 1e12, 1)
    assert r["mfu"] == round(flops / dt / 1e12 / 989.0, 4)  # the datasheet peak (models.flops), not 707
    assert seen == dict(batch=4, n_ctx=pytest.approx(8.0), n_tgt=pytest.approx(4.0))


def test_e2e_ratios_over_the_reference(tmp_path, monkeypatch, capsys):
    """images/s of each path over the reference's (a failed path is left out), the headline ratio being
    fast's; the variants passed on carry each path's keys and the compile flag."""
    seen = {}
    res = [{"name": "reference", "images_per_s": 400.0}, {"name": "fast", "images_per_s": 500.0},
           {"name": "fast_sdpa", "images_per_s": 450.0}, {"name": "fast_levers", "error": "RuntimeError: x"}]
    for r in res[:3]:
        r.update(ms_per_step=1.0, tflops=1.0, mfu=0.1, peak_gib=1.0, final_loss=1.0)

    def run_variants(args, json_name):
        seen["variants"] = args.variants
        return "NVIDIA H200", [dict(r) for r in res]
    monkeypatch.setattr(profile_step, "run_variants", run_variants)
    paths = ["reference", "fast", "fast_sdpa", "fast_levers"]
    assert e2e_step.main(["--paths", ",".join(paths), "--out", str(tmp_path)]) == 0
    assert seen["variants"] == ",".join(f"{n}:{e2e_step.PATHS[n]}+compile=1" for n in paths)
    data = json.loads((tmp_path / "e2e_step.json").read_text())
    assert data["ratio"] == 1.25 and data["gpu"] == "NVIDIA H200"
    by = {r["name"]: r for r in data["results"]}
    assert by["fast_sdpa"]["ratio_over_reference"] == 1.125 and "ratio_over_reference" not in by["reference"]
    assert '{"ratio_fast_over_reference": 1.25}' in capsys.readouterr().out
    e2e_step.main(["--paths", "reference,fast", "--no-compile", "--out", str(tmp_path)])
    assert seen["variants"] == ",".join(f"{n}:{e2e_step.PATHS[n]}+compile=0" for n in ("reference", "fast"))


# ------------------------------------------------------------------------------------------------
# _gpu_common.py: the card limits, sections, timers and memory measurement of the GPU scripts
# ------------------------------------------------------------------------------------------------
def test_card_limits_per_card():
    """H200: the measured matmul and copy rates of ANCHORS.md; H100: the same matmul rate, the copy rate
    scaled by HBM3's 3.35 TB/s over HBM3e's 4.8; another card: refused when strict, else the H200's."""
    import _gpu_common as G
    assert G.card_limits("NVIDIA H200") == (707.0, 4.23)
    tflops, tbps = G.card_limits("NVIDIA H100 80GB HBM3")
    assert tflops == 707.0 and tbps == pytest.approx(4.23 * 3.35 / 4.8, rel=1e-12)
    with pytest.raises(ValueError, match="'NVIDIA A100-SXM4-80GB'"):
        G.card_limits("NVIDIA A100-SXM4-80GB", strict=True)
    for name in ("NVIDIA H100 PCIe", "NVIDIA H100 NVL"):  # other SM counts, clocks and memory than the SXM's
        with pytest.raises(ValueError, match=name):
            G.card_limits(name, strict=True)
    assert G.card_limits("NVIDIA A100-SXM4-80GB") == (707.0, 4.23)


def test_section_records_the_error_and_lets_the_script_go_on(capsys):
    import _gpu_common as G
    results = {"errors": []}
    section = G.make_section(results, lambda: 12.0)

    @section("boom")
    def fails():
        raise RuntimeError("kernel exploded")

    @section("fine")
    def works(x):
        return x + 1
    assert fails() is None and works(1) == 2
    assert [e["section"] for e in results["errors"]] == ["boom"]
    assert "RuntimeError: kernel exploded" in results["errors"][0]["traceback"]
    assert "=== boom (t = 12s) ===" in capsys.readouterr().out


def test_timers_take_the_median(monkeypatch):
    """bench / bench_graph return triton's median (return_mode, or quantiles=[0.5] on an older triton);
    the rehearsal times a second call after a first one."""
    import triton.testing
    import _gpu_common as G
    monkeypatch.setattr(G, "REHEARSE", False)  # the GPU branch, whatever this process's environment
    calls = []

    def fake(name, old):
        def f(fn, **kw):
            if old and "return_mode" in kw:
                raise TypeError("unexpected keyword argument 'return_mode'")
            calls.append((name, kw))
            return 1.5
        return f
    for old in (False, True):
        calls.clear()
        monkeypatch.setattr(triton.testing, "do_bench", fake("eager", old))
        monkeypatch.setattr(triton.testing, "do_bench_cudagraph", fake("graph", old))
        assert G.bench(lambda: None, warmup=3, rep=7) == 1.5 and G.bench_graph(lambda: None, rep=9) == 1.5
        mode = {"quantiles": [0.5]} if old else {"return_mode": "median"}
        assert calls == [("eager", dict(warmup=3, rep=7, grad_to_none=None, **mode)),
                         ("graph", dict(rep=9, grad_to_none=None, **mode))]
    import types
    clock, cost_s = [0.0], iter([5.0, 0.25])  # the first call compiles
    monkeypatch.setattr(G, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(G, "REHEARSE", True)
    assert G.bench(lambda: clock.__setitem__(0, clock[0] + next(cost_s))) == 250.0


def test_peak_memory_beyond_inputs(monkeypatch):
    """Peak allocated during fn() minus what was allocated before (the peak reset first), in MiB."""
    import _gpu_common as G
    monkeypatch.setattr(G, "REHEARSE", False)  # the GPU branch, whatever this process's environment
    events = []
    mib = 2 ** 20
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: events.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: events.append("reset"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: events.append("base") or 100 * mib)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: events.append("peak") or 148 * mib)
    assert G.peak_mib_beyond_inputs(lambda: events.append("fn")) == 48.0
    assert events[:4] == ["sync", "reset", "base", "fn"] and events[-1] == "peak"


def test_kernel_times_counts_kernels_per_iteration_and_leaves_out_annotations():
    """The profile aggregation of profile_step.py and gpu_stop_embed.py's breakdown: GPU ms and launches
    per iteration of each kernel, from the device events only; host ops and the GPU-timeline ranges of
    host annotations (compiled-graph calls, optimizer steps) are not kernels and would double-count."""
    import types

    import _gpu_common as G
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def ev(name, us, dev=cuda):
        return types.SimpleNamespace(name=name, device_type=dev,
                                     time_range=types.SimpleNamespace(elapsed_us=lambda: us))
    events = [ev("gemm_a", 30.0), ev("gemm_a", 50.0), ev("gemm_a", 40.0), ev("gemm_a", 80.0),
              ev("_noise_weight_grad_kernel", 90.0), ev("_noise_weight_grad_kernel", 70.0),
              ev("aten::mm", 500.0, cpu), ev("## Call CompiledFxGraph abc ##", 900.0),
              ev("Optimizer.step#AdamW.step", 700.0), ev("ProfilerStep#3", 600.0)]
    got = G.kernel_times(types.SimpleNamespace(events=lambda: events), 2)
    assert got == {"gemm_a": (pytest.approx(0.1), 2), "_noise_weight_grad_kernel": (pytest.approx(0.08), 1)}


def test_stop_embed_contenders_of_the_cuda_benchmarks(monkeypatch):
    """benchmarks/_official_stop.py's stop_embed peers, shared by gpu_cuda.py and bench_cuda.py: the unfused
    official rows ψ[idx] + n·Wᵀ + b (n from torch.randn), and the Triton backend by name, whose error is
    raised: both scripts once retried a TypeError with the default backend, "auto", which on a GPU with the
    extension built is the CUDA kernels, timed under Triton's name."""
    import _official_stop as O
    from stop_kernels.ops import stop_embed as SE
    g = torch.Generator().manual_seed(0)
    pos, w, b = torch.randn(16, 8, generator=g), torch.randn(8, 12, generator=g), torch.randn(8, generator=g)
    idx = torch.randint(0, 16, (2, 3), generator=g)
    torch.manual_seed(1)
    got = O.official_stop_embed(pos, idx, w, b, 0.5)
    torch.manual_seed(1)
    torch.testing.assert_close(got, (torch.randn(2, 3, 12) * 0.5) @ w.T + b + pos[idx])
    # the Triton kernels (interpreter here) draw the same Philox noise as the reference for one seed
    torch.manual_seed(2)
    tri = O.triton_stop_embed(pos, idx, w, b, 0.5)
    torch.manual_seed(2)
    torch.testing.assert_close(tri, SE.stop_embed(pos, idx, w, b, noise_std=0.5, backend="reference"))
    calls = []

    def named(*a, backend="auto", **kw):
        calls.append(backend)
        if backend == "triton":
            raise TypeError("a kernel argument")
        return tri
    monkeypatch.setattr(SE, "stop_embed", named)
    with pytest.raises(TypeError, match="a kernel argument"):
        O.triton_stop_embed(pos, idx, w, b, 0.5)
    assert calls == ["triton"]


def test_stop_embed_sweep_times_the_untimed_swap_configs_first():
    """gpu_stop_embed.py's config sweep (cut by the section's budget, which keeps TIMING_RESERVE_S for the timing
    pass) takes the forward's SWAP_AB configs first and then the others, each group in the autotune list's order."""
    import gpu_stop_embed as G
    from stop_kernels.ops import stop_embed as se
    order = G._sweep_order(se._FWD_CONFIGS)
    swapped = [c for c in se._FWD_CONFIGS if c.kwargs["SWAP_AB"]]
    assert swapped and order == swapped + [c for c in se._FWD_CONFIGS if not c.kwargs["SWAP_AB"]]
    # the timing pass's contenders (≈ 15 s) and then the compiled peer, which needs 45 s of the budget, fit
    assert 45 + 15 <= G.TIMING_RESERVE_S < 120


def test_stop_embed_rates_against_the_work_of_the_issue(monkeypatch):
    """gpu_stop_embed.py's work and rates: forward 2·(B·Nc + npred·B·Nt)·E·D FLOPs, bf16 ctx + fp32 W + fp32
    output bytes (ANCHORS.md at the ViT-H sizes: ≈ 15.2 GFLOP, ≈ 60 MB); the backward adds dctx and dW and
    their traffic. A timed row's GB/s and TFLOP/s are those over its ms, and × roofline its time over the
    larger of the byte and FLOP times at the card's ceilings."""
    import gpu_stop_embed as G
    B, NC, NT, NPRED, E, D = G.B, G.NC, G.NT, G.NPRED, G.E, G.D
    rows, out = B * NC + NPRED * B * NT, NPRED * B * (NC + NT) * D * 4
    fwd = (B * NC * E * 2 + D * E * 4 + out, 2 * rows * E * D)
    bwd = (out + 2 * B * NC * E * 2 + 2 * D * E * 4, 2 * B * NC * E * D + 2 * rows * E * D)
    assert G.work(False) == pytest.approx(fwd, rel=1e-12)
    assert G.work(True) == pytest.approx((fwd[0] + bwd[0], fwd[1] + bwd[1]), rel=1e-12)
    if (B, NC, NT, NPRED, E, D) == (64, 74, 42, 4, 1280, 384):  # not a rehearsal's toy sizes
        assert fwd[1] == pytest.approx(15.2e9, rel=2e-3) and fwd[0] == pytest.approx(59.7e6, rel=2e-3)
    monkeypatch.setitem(G.RESULTS, "timing", [])
    monkeypatch.setattr(G, "PEAK_TBPS", 4.23)
    monkeypatch.setattr(G, "PEAK_TFLOPS", 707.0)
    for kind, bwd_too in (("forward", False), ("forward+backward", True)):
        G._record("fused", kind, "cudagraph", 0.25)
        r = G.RESULTS["timing"][-1]
        nbytes, flops = G.work(bwd_too)
        floor_s = max(nbytes / 4.23e12, flops / 707e12)
        assert r["GB/s"] == pytest.approx(nbytes / 0.25e-3 / 1e9, rel=1e-12)
        assert r["TFLOP/s"] == pytest.approx(flops / 0.25e-3 / 1e12, rel=1e-12)
        assert r["bw_frac"] == pytest.approx(nbytes / 0.25e-3 / 4.23e12, rel=1e-12)
        assert r["flop_frac"] == pytest.approx(flops / 0.25e-3 / 707e12, rel=1e-12)
        assert r["x_roofline"] == pytest.approx(0.25e-3 / floor_s, rel=1e-12)


def test_official_predictor_input_is_the_official_codes(official_fixture, monkeypatch):
    """benchmarks/_official_stop.py's baseline path builds the predictor input that the official StoP code
    builds: on the official fixture's weights, encoder output, masks and drawn noise (n = σ·randn in the encoder
    width), equal to the input of the predictor that reproduces the official outputs (test_official_fixtures):
    rows k·B + b = context of image b (Linear + ψ[ctx_idx]), then its k-th target block (Linear(n) + ψ[tgt])."""
    import _official_stop as O
    from stop_kernels import load_official_checkpoint
    case = official_fixture("official_stop_small.pt")
    cfg = case["config"]
    pred = load_official_checkpoint(case["checkpoint"], num_heads=cfg["heads"], noise_mode="learned",
                                    noise_std=cfg["noise"]).predictor.eval()
    ctx, (ctx_idx,), tgt, noise = case["encoder_out"], case["masks_enc"], case["masks_pred"], case["stop_noise"]
    with torch.no_grad():
        want = pred.assemble(ctx, [ctx_idx], tgt, noise=torch.stack(noise))
    drawn = iter(noise)

    def randn(*shape, **kw):  # the official draw, as σ·randn: hand back the fixture's n / σ
        n = next(drawn)
        assert tuple(shape) == tuple(n.shape), (shape, n.shape)
        return n / cfg["noise"]
    monkeypatch.setattr(torch, "randn", randn)
    emb = pred.predictor_embed
    with torch.no_grad():
        got = O.official_predictor_input(ctx, ctx_idx, tgt, emb.weight, emb.bias,
                                         pred.predictor_pos_embed.reshape(-1, emb.weight.shape[0]), cfg["noise"])
    assert next(drawn, None) is None  # one draw per target block
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["flash", "efficient", "cudnn", "math", None])
def test_sdpa_fn_forces_its_backend_on_bnhd_inputs(name, monkeypatch):
    """[B, N, H, Dh] in and out (SDPA's [B, H, N, Dh] transposes around it), equal to the reference
    attention, under exactly the named SDPA backend (None: PyTorch's choice, nothing forced)."""
    import torch.nn.attention as TA
    from torch.nn.attention import SDPBackend
    import _gpu_common as G
    from stop_kernels import reference
    forced = []
    real = TA.sdpa_kernel

    def spy(backends):
        forced.append(list(backends))
        return real([SDPBackend.MATH])  # every backend name runs on the CPU's math kernel here
    monkeypatch.setattr(TA, "sdpa_kernel", spy)
    q, k, v = torch.randn(3, 2, 7, 3, 16).unbind(0)
    out = G.sdpa_fn(name)(q, k, v)
    torch.testing.assert_close(out, reference.attention(q, k, v), rtol=1e-5, atol=1e-5)
    want = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    assert forced == ([] if name is None else [[want[name]]])


def test_cuda_timings_keep_every_row_when_one_backward_fails(tmp_path):
    """gpu_cuda.py's rows survive an implementation whose forward was timed and whose backward raised (a row with
    fwd_ms and an error, no fwdbwd_ms): the speed-ups against the unfused path once raised a KeyError inside the
    timings' finally, so the report had no timings at all and readme_tables.py's stop table could not be made."""
    import gpu_cuda
    import readme_tables
    ok = dict(fwd_peak_extra_mib=1.0, fwdbwd_peak_extra_mib=2.0, fwd_tflops=1.0)
    rows = [dict(impl="cuda", fwd_ms=0.2, fwdbwd_ms=0.6, **ok), dict(impl="unfused", fwd_ms=0.1, fwdbwd_ms=0.4, **ok),
            dict(impl="triton", fwd_ms=0.2, fwd_peak_extra_mib=1.0, error="OutOfResources: shared memory")]
    report = {"env": {"gpu": "NVIDIA H200"}}
    gpu_cuda._finish(report, rows, 100)
    by = {r["impl"]: r for r in report["timings"]["rows"]}
    assert by["cuda"]["fwd_speedup_vs_unfused"] == 0.5 and by["cuda"]["fwdbwd_speedup_vs_unfused"] == 0.67
    assert by["triton"]["fwd_speedup_vs_unfused"] == 0.5 and "fwdbwd_speedup_vs_unfused" not in by["triton"]
    # the unfused path's own backward failing: forward ratios only
    report2 = {"env": {"gpu": "NVIDIA H200"}}
    gpu_cuda._finish(report2, [dict(impl="cuda", fwd_ms=0.2, fwdbwd_ms=0.6, **ok),
                               dict(impl="unfused", fwd_ms=0.1, error="RuntimeError: x")], 100)
    assert report2["timings"]["rows"][0]["fwd_speedup_vs_unfused"] == 0.5
    assert "fwdbwd_speedup_vs_unfused" not in report2["timings"]["rows"][0]
    assert "| cuda | 0.2000 | 0.6000 |" in gpu_cuda.write(report, tmp_path)
    (tmp_path / "gpu_cuda.json").write_text(json.dumps(report))
    table = readme_tables.stop_table(str(tmp_path / "gpu_cuda.json"))
    assert "| Triton | error: OutOfResources: shared memory |" in table and "| CUDA C++ (default when built) | 0.200 |" in table


def test_cuda_timings_rates_and_peaks_beyond_the_inputs(monkeypatch):
    """gpu_cuda.py's per-backend row on a simulated allocator: the forward's TFLOP/s is the n·Wᵀ FLOPs
    (ANCHORS.md: 10.6 GFLOP at the ViT-H sizes) over its median time, and each peak is the most allocated
    during the call minus what was allocated before it, the output kept (in MiB)."""
    import gpu_cuda
    assert gpu_cuda.FWD_FLOPS == 2 * 4 * 64 * 42 * 1280 * 384 == pytest.approx(10.6e9, rel=3e-3)
    mib = 2 ** 20
    mem = {"now": 100 * mib, "peak": 100 * mib}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: mem.update(peak=mem["now"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: mem["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: mem["peak"])

    def op(p, i, w, b):  # a transient 30 MiB (50 MiB with the backward's graph), then a 10 MiB output kept
        mem["peak"] = max(mem["peak"], mem["now"] + (50 if torch.is_grad_enabled() else 30) * mib)
        mem["now"] += 10 * mib
        return p[i] + w.sum(1) * 0 + b  # [.., D], with a grad for p, w and b
    times = iter([0.5, 1.5])  # the forward's median ms, then the forward+backward's
    monkeypatch.setattr(gpu_cuda, "_bench", lambda fn: (fn(), next(times))[1])
    g = torch.Generator().manual_seed(0)
    pos, w, b = (torch.randn(*s_, generator=g).requires_grad_() for s_ in ((16, 8), (8, 12), (8,)))
    idx = torch.randint(0, 16, (2, 3), generator=g)
    rows = []
    gpu_cuda._time_all({"cuda": op}, rows, pos, idx, w, b, torch.randn(2, 3, 8, generator=g), 1e9)
    (r,) = rows
    assert "error" not in r, r
    assert (r["fwd_ms"], r["fwdbwd_ms"]) == (0.5, 1.5)
    assert r["fwd_tflops"] == round(1e9 / 0.5e-3 / 1e12, 1)
    assert (r["fwd_peak_extra_mib"], r["fwdbwd_peak_extra_mib"]) == (30.0, 50.0)


def _gpu_only_tests(path):
    """The test ids of ``path`` that only a CUDA GPU runs: a test, or its "cuda" parameter, marked
    ``skipif(<a condition with a "not <something about CUDA>">)``, written out or through a module-level name
    (``cuda = pytest.mark.skipif(not torch.cuda.is_available(), ...)``, ``needs_cuda = pytest.mark.skipif(
    bool(GPU_REASON), ...)`` where GPU_REASON holds ``... if not HAS_GPU``). The module-level names a condition uses
    are read as what they were assigned (three levels); ``skipif(CUDA)`` (a CPU-only test) has no such "not", and a
    condition that mentions the Triton interpreter (a test that also runs there) is not GPU-only either."""
    import ast
    tree = ast.parse(path.read_text())
    assigned = {n.targets[0].id: n.value for n in tree.body
                if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name)}

    def expanded(node, depth=3) -> str:
        text = ast.unparse(node)
        names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and n.id in assigned}
        return text + "".join(" " + expanded(assigned[n], depth - 1) for n in sorted(names)) if depth else text

    def not_cuda(node, depth=3) -> bool:  # a "not <about CUDA>" in node or in what the names it uses hold
        if any(isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.Not) and "cuda" in expanded(n.operand).lower()
               for n in ast.walk(node)):
            return True
        return depth > 0 and any(not_cuda(assigned[n.id], depth - 1) for n in ast.walk(node)
                                 if isinstance(n, ast.Name) and n.id in assigned)

    def gpu_only(mark) -> bool:
        if isinstance(mark, ast.Name) and mark.id in assigned:  # an alias of a mark
            mark = assigned[mark.id]
        if not (isinstance(mark, ast.Call) and ast.unparse(mark.func).endswith("mark.skipif") and mark.args):
            return False
        return not_cuda(mark.args[0]) and "interpret" not in expanded(mark.args[0]).lower()
    ids = []
    for fn in tree.body:
        if not (isinstance(fn, ast.FunctionDef) and fn.name.startswith("test_")):
            continue
        if any(gpu_only(d) for d in fn.decorator_list):
            ids.append(fn.name)
        for p in (n for d in fn.decorator_list for n in ast.walk(d)):
            if (isinstance(p, ast.Call) and ast.unparse(p.func).endswith("pytest.param") and p.args
                    and any(k.arg == "marks" and gpu_only(k.value) for k in p.keywords)):
                ids.append(f"{fn.name}[{ast.literal_eval(p.args[0])}]")
    return ids


def test_gpu_script_runs_every_gpu_only_test():
    """Each test that only a GPU runs is run by gpu_all.sh: its file is in the `tests` section, or in `tests-new`
    with a name that the section's -k expression selects. The GPU twins of the bf16 residual stream and of the
    combo kernels (two of fast_levers' levers) were in neither: test_training_speed.py is only in tests-new, and
    its -k named neither test."""
    import re
    from _pytest.mark.expression import Expression
    text = (REPO / "benchmarks" / "gpu_all.sh").read_text()

    def arm(name):
        return re.search(rf"^    {name}\) (?:[^\n]*\n\s*)?section {name} .*?;;", text, re.M | re.S).group(0)
    full = set(re.findall(r"tests/\w+\.py", arm("tests")))
    new_arm = arm("tests-new")
    new = set(re.findall(r"tests/\w+\.py", new_arm))
    expr = Expression.compile(re.search(r'-k "([^"]+)"', new_arm).group(1))
    missed = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        rel = f"tests/{path.name}"
        for test_id in _gpu_only_tests(path):
            words = {test_id.lower(), path.stem.lower(), "tests"}
            if rel in full or (rel in new and expr.evaluate(lambda s, **_: any(s.lower() in w for w in words))):
                continue
            missed.append(f"{rel}::{test_id}")
    assert _gpu_only_tests(REPO / "tests" / "test_training_speed.py")  # the detection finds the GPU tests
    assert not missed, f"GPU-only tests that gpu_all.sh never runs: {missed}"


def test_gpu_scripts_budget_counts_their_imports():
    """gpu_stop_embed.py's and gpu_attention.py's --budget-s (gpu_all.sh: the section's limit less 20 s) counts from
    the script's start: their clocks started after torch, triton and the kernels were imported, seconds of the limit
    that the budget did not see."""
    import os
    import subprocess
    code = ("import sys, time; t0 = time.time(); sys.path.insert(0, 'benchmarks'); import {m}; "
            "print({m}.T0 - t0, time.time() - {m}.T0)")
    for m in ("gpu_stop_embed", "gpu_attention", "gemm_in_graph"):  # (gemm_in_graph's: audit, session 30)
        r = subprocess.run([sys.executable, "-c", code.format(m=m)], cwd=REPO, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
        before, after = map(float, r.stdout.split()[-2:]) if r.returncode == 0 else pytest.fail(r.stderr[-2000:])
        assert before < after, (m, before, after)  # the clock starts before the imports, not after them


def test_host_overhead_script_times_each_setup_and_reports_refusals(tmp_path):
    """benchmarks/host_overhead.py (the host time of the compile set-ups, results/cpu-host/): each set-up it
    can run gives a time per pass and per block, one torch refuses gives its error as the row, and the files
    name the machine and the command."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import host_overhead
    assert host_overhead.main(["--depth", "2", "--passes", "1", "--setups", "eager,stack,stack + C++ host code",
                               "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "host_overhead.json").read_text())
    rows = {r["setup"]: r for r in data["rows"]}
    assert rows["eager"]["ms_per_pass"] > 0 and rows["stack"]["us_per_block"] == pytest.approx(
        rows["stack"]["ms_per_pass"] / 2 * 1e3, rel=1e-2)
    assert "invoke_subgraph" in rows["stack + C++ host code"]["error"]  # torch has no C++ call for the region
    md = (tmp_path / "host_overhead.md").read_text()
    assert "torch " + torch.__version__ in md and "--depth 2" in md and "| stack + C++ host code | fails:" in md
    with pytest.raises(SystemExit):
        host_overhead.main(["--setups", "eager,jit", "--out", str(tmp_path)])


def test_stop_host_script_counts_each_paths_ops_and_leaves_the_library_as_it_was(tmp_path):
    """benchmarks/stop_host.py (the StoP predictor input's host cost per eager call, results/cpu-host/): the fused
    path's aten ops and Triton launches per call and the official path's, a time per call for each, the tensor
    memory of each at the ViT-H shapes, and every stand-in (stubbed launches, trusted index values, the SM count,
    the eager twins, TRITON_INTERPRET) undone afterwards."""
    import os
    sys.path.insert(0, str(REPO / "benchmarks"))
    import stop_host

    from stop_kernels import _checks as chk
    from stop_kernels.ops import stop_embed as se
    from stop_kernels.ops import predictor_input as pi
    state = lambda: (se._launch, chk.index_range, se._num_sms, se.custom_op_bypass_ok, pi.custom_op_bypass_ok,  # noqa: E731
                     os.environ.get("TRITON_INTERPRET"))
    before = state()
    assert stop_host.main(["--calls", "3", "--out", str(tmp_path)]) == 0
    assert state() == before
    memory = {r["path"]: r for r in json.loads((tmp_path / "stop_host.json").read_text())["memory"]}
    # the fused forward allocates its output and W's bf16 copy; its backward g's masked rows, the context groups'
    # sum, dW's partials (6 splits of fp32 D x E on 132 SMs) and their sum: tests/test_predictor_input.py
    assert memory["fused"]["output_MiB"] == 43.5 and 44.4 < memory["fused"]["forward_MiB"] < 44.6
    assert 68.9 < memory["fused"]["forward_backward_MiB"] < 69.1
    assert any(op == "empty" and shape == [6, 384, 1280] for _, op, shape, _ in memory["fused"]["live_at_peak"])
    assert memory["official"]["forward_MiB"] > 3 * memory["official"]["output_MiB"]
    rows = {(r["path"], r["kind"]): r for r in json.loads((tmp_path / "stop_host.json").read_text())["rows"]}
    fused, official = rows[("fused", "forward+backward")], rows[("official", "forward+backward")]
    # one Triton launch forward (context and StoP rows together), one backward (all of dW)
    assert rows[("fused", "forward")]["triton_launches"] == 1 and fused["triton_launches"] == 2
    assert official["triton_launches"] == 0 and official["ops"].count("randn") == stop_host.TOY_SIZES["npred"]
    assert fused["aten_ops"] == len(fused["ops"]) < official["aten_ops"] / 2
    assert all(r["us_per_call"] > 0 for r in rows.values())
    md = (tmp_path / "stop_host.md").read_text()
    assert "torch" in md and "| fused | forward+backward |" in md


def test_allocations_at_peak_replays_the_allocator_trace():
    """_gpu_common.allocations_at_peak (gpu_stop_embed.py's trace of what is live at a forward+backward's peak, run 7's
    untraced 170.5 MiB): frees count when requested, blocks allocated before the trace are skipped, the live set is the
    one at the highest point, named by the innermost frame outside torch and triton."""
    from _gpu_common import allocations_at_peak

    def frames(*names):
        return [{"filename": f, "line": i + 1, "name": "fn"} for i, f in enumerate(names)]
    MiB = 2 ** 20
    trace = [
        {"action": "free_requested", "addr": 9, "size": 64 * MiB},                      # allocated before the trace
        {"action": "alloc", "addr": 1, "size": 40 * MiB, "frames": frames("/x/torch/nn/f.py", "/r/ops/a.py")},
        {"action": "alloc", "addr": 2, "size": 20 * MiB, "frames": frames("/r/ops/b.py")},
        {"action": "alloc", "addr": 3, "size": 2 ** 10, "frames": frames("/r/ops/c.py")},  # under min_bytes
        {"action": "free_requested", "addr": 2, "size": 20 * MiB},
        {"action": "free_completed", "addr": 2, "size": 20 * MiB},
        {"action": "alloc", "addr": 4, "size": 10 * MiB, "frames": frames("/y/triton/k.py", "/r/ops/d.py")},
    ]
    got = allocations_at_peak(trace)
    assert got["peak_MiB"] == 60.0
    assert got["live_at_peak"] == [[40.0, "a.py:2 fn"], [20.0, "b.py:1 fn"]]


def test_gpu_section_gemm_rehearses_on_the_cpu(tmp_path):
    """gpu_all.sh's `gemm` section (benchmarks/gemm_in_graph.py: the step's GEMMs eagerly and from CUDA graphs, the
    check of run 7's slower GEMMs under the trees) with STOP_KERNELS_REHEARSE=1: every row timed, none failed."""
    import tarfile
    out, _ = _gpu_all(tmp_path, "gemm", STOP_KERNELS_REHEARSE="1", SEC_GEMM="120")
    assert "gemm: rc=0" in (out / "summary.txt").read_text()
    res = tmp_path / "res"
    with tarfile.open(out / "results.tar.gz") as tar:
        tar.extractall(res, filter="data")
    rows = json.loads((res / "gemm" / "gemm_in_graph.json").read_text())["rows"]
    assert [r["gemm"] for r in rows] == ["fwd", "dx", "dw"], rows  # the context encoder's layer: both backward GEMMs
    assert all(r["eager_ms"] > 0 and "error" not in r and "trees_kernels" in r for r in rows), rows
    md = (res / "gemm" / "gemm_in_graph.md").read_text()
    assert md.count("\n| context qkv ") == 3 and all(ln.count(" | ") == 8 for ln in md.splitlines() if ln.startswith("| "))


def test_gluon_experiment_checks_each_config_and_times_only_the_right_ones(tmp_path):
    """benchmarks/gluon_stop_forward.py's GPU run, its logic on the CPU (Gluon has no interpreter, so the Gluon launches
    are stand-ins; the library's Triton kernels run in the interpreter at run 7's tuned configs): forward, then dW,
    each against float64 and the library's output; a config equal to float64 is timed, one that leaves elements
    unwritten, raises or is wrong is reported with a diagnosis and not timed; the rows are written as they finish."""
    import gluon_stop_dw as DW
    import gluon_stop_forward as G
    from stop_kernels.ops.philox import philox_normal
    sizes = dict(R=70, E=64, D=48, P=16)
    tried = []

    def noise(seed):
        return philox_normal(seed, sizes["R"], sizes["E"], G.SIGMA).to(torch.bfloat16).double()

    def forward(out, idx, pos, w, b, seed, cfg):
        tried.append(("forward", cfg))
        exact = noise(seed) @ w.double().t() + b.double() + pos.double()[idx]
        k = G.CONFIGS.index(cfg)
        if k == 0:
            out[0] = exact.float()
        elif k == 1:
            out[0, :5] = exact[:5].float()  # the other rows left unwritten (NaN)
        elif k == 2:
            raise RuntimeError("stand-in launch failure")
        else:
            out[0] = 1.5 * exact.float()

    def dw(partial, g, w, seed, cfg):
        tried.append(("dW", cfg))
        exact = g.double().t() @ noise(seed)
        partial.zero_()
        partial[0] = exact.float() if cfg == DW.CONFIGS[0] else -exact.float()

    rows = G.gpu_run(str(tmp_path), 1e9, sizes=sizes, device="cpu", run={"forward": forward, "dW": dw},
                     timer=lambda fn: (fn(), 1.25)[1])
    assert [r["kind"] for r in rows] == ["forward"] * 5 + ["dW"] * 3
    lib, right, unwritten, failed, wrong, dw_lib, dw_right, dw_wrong = rows
    # (the kernels round their fp32 noise to bf16, float64 its own: an element on a rounding boundary goes either
    # way, one bf16 step, and dW's 70-row sums at these toy sizes cancel down to a small scale)
    for r, tol in ((lib, 1e-3), (dw_lib, 1e-2)):
        assert r["rel_err_vs_f64"] < tol and r["ms"] == 1.25 and "rel_err_vs_triton" not in r, r
    assert right["rel_err_vs_f64"] < 1e-5 and right["rel_err_vs_triton"] < 1e-3 and right["ms"] == 1.25
    assert unwritten["unwritten"] == (sizes["R"] - 5) * sizes["D"] and "ms" not in unwritten
    assert unwritten["diagnosis"]["nan"] == unwritten["unwritten"]
    assert "stand-in launch failure" in failed["error"] and "ms" not in failed and "diagnosis" not in failed
    assert wrong["rel_err_vs_f64"] > 0.1 and "ms" not in wrong and "diagnosis" not in right
    d = wrong["diagnosis"]  # 1.5 × everything: every tile and row block wrong, neither part simply missing
    assert len(d["max_by_dtile"]) == 1 and min(d["max_by_rowblock"]) > 0.01 and d["frac_wrong"] > 0.5, d
    assert not d["gemm_missing"] and not d["epilogue_missing"], d
    assert dw_right["rel_err_vs_f64"] < 1e-5 and dw_right["rel_err_vs_triton"] < 1e-2 and dw_right["ms"] == 1.25
    assert dw_wrong["rel_err_vs_f64"] > 1 and "ms" not in dw_wrong and "gemm_missing" not in dw_wrong["diagnosis"]
    # each config launched, the right ones again by their timers
    assert tried == ([("forward", G.CONFIGS[0])] * 2 + [("forward", c) for c in G.CONFIGS[1:]]
                     + [("dW", DW.CONFIGS[0])] * 2 + [("dW", c) for c in DW.CONFIGS[1:]]), tried
    saved = json.loads((tmp_path / "gluon_stop_forward.json").read_text())
    assert [r["impl"] for r in saved["rows"]] == [r["impl"] for r in rows] and saved["env"]["sizes"] == sizes
    assert (tmp_path / "gluon_stop_forward.md").read_text().count("\n| gluon ") == len(G.CONFIGS) + len(DW.CONFIGS)
    with pytest.raises(TypeError, match="weight"):
        G.check_args(torch.empty(1, 4, 8), torch.zeros(4, dtype=torch.int64), torch.empty(4, 8),
                     torch.empty(8, 64), None)
    with pytest.raises(ValueError, match="weight: E a multiple of 32"):
        G.check_args(torch.empty(1, 4, 8), torch.zeros(4, dtype=torch.int64), torch.empty(4, 8),
                     torch.empty(8, 40, dtype=torch.bfloat16), None)
