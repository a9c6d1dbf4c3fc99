#!/usr/bin/env bash
# One prepared GPU session: build, correctness on the GPU, benchmarks. Each section writes its files to
# $WORK/results/<section>/ (WORK: GPU_WORK, default /tmp/stop_kernels_gpu_work, kept between calls on a
# warm machine, so a later call finds an earlier one's attn/best_configs.json); after every section the
# folder's contents are packed into $OUT/results.tar.gz, written atomically, so a call cut off at its limit still
# brings back every finished section. The device tool returns at most 8 files from $OUT, hence one
# archive and not the tree: $OUT holds results.tar.gz, log.txt (the whole output) and summary.txt.
# A short table is printed last. Unpack with
#   tar xzf <files_at>/results.tar.gz -C benchmarks/results/<card>-runN/
#
#   bash benchmarks/gpu_all.sh [sections...]     sections: env build tests-new tests stop attn cuda train train-eager profile host gemm gluon e2e bench
#                                                 (default: all but train-eager, profile, host, gemm and gluon, in that order)
# TESTS_NEW_FILES narrows tests-new to some of its files (a later call resumes where a cut one ended), E2E_PATHS
# the e2e section to some of its paths.
# Each section runs under its own time limit (seconds, env SEC_<NAME>; SIGINT, then SIGKILL 10 s
# later), so one failure or hang costs only its own slot.
# Before a GPU session: STOP_KERNELS_REHEARSE=1 bash benchmarks/gpu_all.sh stop attn runs those two sections
# on the CPU at toy sizes (benchmarks/_gpu_common.py; tests/test_benchmark_harness.py does it in CI).
#
# Run 7 (2026-11-28, results/h200-run7/) ran run 6's plan at 85e01c3. CUDA-graph trees (fast_cg) took 114.74 ms/step
# against the defaults' 117.37 and the reference's 120.19, side by side: GPU-bound now (115.1 ms of kernels, the
# GEMMs 5.4 ms slower inside the graphs), 29.6 GiB reserved. fast_cg_levers stopped at its first block: multi-kernels
# loaded from Inductor's FX-graph cache with the Python host code (torch 2.11 + triton 3.6); apply_compile sets
# TORCHINDUCTOR_DISABLE_MULTI_KERNEL_CACHE to 1 with multi_kernel since. StoP: fused op 0.303 ms fwd+bwd GPU time
# (run 6: 0.352), the SWAP_AB forward 0.107 ms (predicted 0.045-0.07), the compiled peer skipped by the sweep's
# budget (TIMING_RESERVE_S 25 -> 70 since). Attention: the key-stationary backward lost (0.163 against 0.146 ms).
# GPU tests: 92 passed, 4 failed on two wrong test claims (a cuBLASLt memset counted as a kernel; dψ's index_add_
# atomics compared bit for bit), both fixed since; the run ended inside test_attention.py.
# The next plan, unmeasured, sized to a 15-minute device budget: one machine start (≈ 90 s) and two calls, the second
# sent at once after the first (a warm machine is given back after 30 s idle): 90 + 440 + 360 = 890 s at the
# limits. Ask for kind nvidia-h200 in both calls (runs 1-7 and ANCHORS.md are H200 numbers).
#   1. (timeout_s 440) SEC_E2E=420 bash benchmarks/gpu_all.sh e2e
#      The ViT-H step, in this order (a path starts only while 140 s of the limit are left; runs 6 and 7's paths
#      took 75-150 s): reference; fast_cg_levers (the trees with the GPU-time levers, the multi-kernel fix; predicted
#      100-108 ms/step: the levers' GPU savings on top of run 7's 115.1 ms of kernels); fast_overlap (the target
#      encoder on a second stream alone: its kernels can fill the ~10 ms of gaps per step between the defaults'
#      kernels, NOTES.md; before fast_levers, whose warm-up took 121 s in run 6, so that the limit reaches it);
#      fast_levers (the six opt-in levers with the C++ host code; run 6 lost 35 ms to combo kernels now pointwise
#      only). Both levers paths also send the context encoder's head dim 80 to the Triton attention (policy
#      compiled_train:80=triton; run 7's microbenchmark: 0.107 against 0.146 ms forward+backward at N = 74, so up to
#      ~1.2 ms less attention per step over 32 blocks; in run 7's step cuDNN's context calls took ~0.094 ms each, so
#      the saving may be smaller: read it from the attention category); fast_cg (run 7: 114.74, to see the trees'
#      GEMM slowdown again side by side); fast, fast_tgelu, then the rest, which the limit will not reach. Read each
#      path's GPU ms (and the busy ms in brackets: the figure for fast_overlap, whose two streams' kernels overlap),
#      its matmul category, its reserved peak (issue 8: no more than the reference's), its last loss against the
#      reference's (the attention kernels of the thirty-third and thirty-fourth sessions run first here, before call
#      2's bit-for-bit tests: a difference past 2e-3 is flagged), the graphed target's replays, its GPU idle before
#      each step phase's work (queued gaps against waits for the host, with the host's waits) and its SM clock and
#      power while timed (the e2e table's last column): run 7's defaults idled ~10 ms per step with the host ~30 ms
#      ahead, and the trees ran every category slower (clocks at the power limit, or cuBLAS's workspace). A path
#      whose profile fails keeps its timing (profile_error).
#   2. (timeout_s 360, sent at once) SEC_TESTS_NEW=70 TESTS_NEW_FILES="
#      tests/test_attention.py::test_key_mask_in_the_dot_equals_the_select_bit_for_bit
#      tests/test_attention.py::test_flat_grid_equals_the_3d_grid_bit_for_bit
#      tests/test_attention.py::test_column_vector_loads_equal_the_plain_load_bit_for_bit
#      tests/test_training_basics.py::test_skip_nonfinite_grads_on_cuda
#      tests/test_training_speed.py::test_compiled_block_with_lever_equals_eager
#      tests/test_training_speed.py::test_overlapped_target_trains_like_serial
#      tests/test_training_speed.py::test_cuda_graph_target_trains_like_eager
#      tests/test_predictor_input.py::test_eager_path_equals_the_custom_op_bit_for_bit
#      tests/test_stop_embed.py::test_eager_path_equals_the_custom_op_bit_for_bit
#      tests/test_linear_gelu.py::test_cuda_autocast_casts_like_linear_and_runs_one_kernel
#      tests/test_training_reduce_overhead.py tests/test_fast_path_loss_curve.py" SEC_STOP=145 BUDGET_STOP=130
#      SEC_GLUON=55 SEC_ATTN=85 BUDGET_ATTN=70 bash benchmarks/gpu_all.sh tests-new stop gluon attn (5 s of the 360
#      left for packing). The tests in that order, the ones no GPU has passed first: run 7's call 2 reached 31 tests
#      in 73 s (pytest runs a file's tests together, at the file's first mention).
#      The GPU tests: the attention's key mask in the dot, its 3-D grids and its lse column loads, bit for bit against
#      the select, the flat grid and the plain load on the hardware (thirty-third and thirty-fourth sessions);
#      skip_nonfinite_grads' fused CUDA AdamW skip; the multi-kernel cache fix (the second block's graphs now really
#      come from Inductor's FX-graph cache, a review found they did not); the two tests run 7 failed (fixed since);
#      the target encoder on a second stream and CUDA-graphed against the serial step (no GPU has run them; their
#      losses are now read after all steps are queued, so a missing stream wait shows).
#      Then stop, with 70 s of its budget kept from the sweep for the timing pass, so the compiled unfused peer (the
#      issue's 3x) is timed side by side at last (BUDGET_STOP 130: its untimed correctness part took ~70 s in run 7,
#      and the peer starts only before budget - 45 s), and with what is live at the fused op's forward+backward peak,
#      by allocating line (run 7: 170.5 MiB against run 6's 99.6; the md's "Live at the ... peak" table). The op's own
#      tensors now peak at 69.0 MiB (devtools.AllocationTrace on the CPU, results/cpu-host/), so the rest is what
#      cuBLAS or the dW launch allocate below the dispatcher (~76 MiB in run 7). Its op timings include the dW loop
#      without a division per row (thirty-fourth session; NOTES.md predicts 5-12 us off run 7's 0.088 ms dW). Then
#      gluon (thirty-fifth session): the StoP noise rows' forward and dW with each step's noise generated while the
#      previous step's wgmmas run (benchmarks/gluon_stop_forward.py and gluon_stop_dw.py, Gluon kernels no GPU has
#      run yet): each output against float64 and against the library kernel, then its GPU time beside the library
#      kernel's (run 7: 0.1075 ms forward, 0.088 dW), configs in order while 45 s of the script's budget last (after
#      stop, whose builds leave the library kernels in Triton's cache; NOTES.md predicts 0.035-0.06 ms forward and
#      0.025-0.045 dW if they are right; a wrong one gets a diagnosis). Last, attn: issue 4's timings at the
#      predictor and encoder shapes against every SDPA backend, and first in its variants the predictor's default forward and
#      backward with the key mask in the dot and without (rows with dot_mask; NOTES.md predicts the forward 0.0606 ->
#      0.052-0.057 ms), then the default backward (the one-pass kernel at N = 116 and 74) with the lse loads of the
#      thirty-fourth session and without (rows with column_loads). (Every section is packed every 20 s while it runs,
#      so a call the device tool cuts still brings back its rows.)
#   Later session: SEC_GEMM=80 bash benchmarks/gpu_all.sh gemm: the step's GEMMs eagerly, replayed from a
#   torch.cuda.graph and from Inductor's trees, with the cuBLAS kernels each runs, the target encoder's forward GEMMs
#   first (the 256x128 bias kernel ran 172 times per step under the trees against 118): the check of the trees' 5.4 ms
#   GEMM slowdown (benchmarks/gemm_in_graph.py, rows written as they finish; NOTES.md, run 7).
#   Later session: SEC_ATTN=240 bash benchmarks/gpu_all.sh attn (the rest of the attention sweep), and the
#   profile section below.
#   Not in the plan (measured in runs 2, 4 and 5, unchanged since): build and cuda (the CUDA C++ StoP kernels:
#   `stop_embed(backend="auto")` prefers them when built; run 5: 0.63 ms fwd+bwd against Triton's 1.65 and
#   unfused 0.47 (do_bench)). Re-run them after a change to csrc/.
#   After a run: unpack results.tar.gz into benchmarks/results/<card>-runN/ (with a README saying what ran), point the
#   README's table markers at the new files and run `python benchmarks/readme_tables.py --write`.
#   Later session: SEC_PROFILE=500 PROFILE_BASE=<the e2e winner's keys> bash benchmarks/gpu_all.sh profile
#   (the base must set none of the keys the variants set: mode, cppwrap, scope, policy or a lever; profile_step.py
#   refuses a key set twice before any variant runs. fast_cg's keys, for one, are the cg variant's)
#   (the step levers on top of the winning path, whose base has the ViT-H recipe's C++ host code: cppwrap=0
#   (Python host code), scope=stack+cppwrap=0 (one compiled graph per model's block stack), scope=unrolled
#   (the stack inlined into one graph, with the C++ host code), graph=1 (CUDA-graphed target), overlap=1 (target on a
#   second stream), combo=1 (Inductor's combo kernels: a block's weight casts share launches),
#   mk=1 (Inductor's multi-kernel reductions: ViT-H's LayerNorms one-pass where faster), bf16res=1 (the blocks' residual stream in bf16),
#   mode=max-autotune-no-cudagraphs (Inductor's GEMM templates), enc80 (policy compiled_train:80=triton: the Triton
#   attention for the context encoder, which trains, alone, so that its share of the levers paths is read apart)); PROFILE_BASE is
#   compile=1 (fast), compile=1+policy=compiled:24=sdpa (fast_sdpa) or compile=1+attention=triton;
#   ATTN_CONFIGS=benchmarks/results/<card>-runN/attn/best_configs.json gives it the attention configs
#   that the earlier session measured fastest (keep that file with the run's results).
#   Optional, with time left in a call: SEC_HOST=150 bash benchmarks/gpu_all.sh host (the host time per block of
#   each compile set-up on the GPU machine, where the C++ host code also replaces the Triton launchers; the CPU
#   numbers are in results/cpu-host/).
#   Unmeasured since the twelfth session: what gradient accumulation costs per image (smaller GEMMs per
#   micro-batch): python benchmarks/e2e_step.py --model vit_h --batch-size 128 --paths fast --extra '--grad-accum 2'
#   against the same at --batch-size 64 without it (images/s should stay within a few %).
#   Unmeasured since the thirteenth session: the step with the predictor's StoP rows from the CUDA C++ kernels
#   (after `build`, which builds stop_kernels._C in place) against the Triton assembly, same process:
#   python benchmarks/profile_step.py --model vit_h --batch-size 64 --steps 10 --out "$OUT/input" \
#     --variants "triton_input:compile=1+input=triton,cuda_input:compile=1+input=cuda"
set -u
OUT=${OUT:-/tmp/stop_kernels_gpu}
WORK=${GPU_WORK:-/tmp/stop_kernels_gpu_work}
RES=$WORK/results
mkdir -p "$OUT" "$RES"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET
SECTIONS=${*:-env build tests-new tests stop attn cuda train e2e bench}
SUMMARY=$RES/summary.txt  # one block per call (a warm machine keeps the earlier calls' results)
echo "== call $(date -u +%FT%TZ): $SECTIONS" >> "$SUMMARY"
MAX_PACK=$((15 * 1024 * 1024))  # a returned file is at most 16 MiB

pack() {  # every result so far -> $OUT/results.tar.gz (renamed into place: never half-written); the
  # training runs' checkpoints and exports (also set-aside ones: checkpoints.replaced-*) stay behind. Its own
  # temporary name: the background packer of a running section and the pack after it may overlap
  local tmp=$OUT/.results.tar.gz.tmp.$BASHPID quiet=${1:-}  # quiet: the background packer (no summary lines)
  # (tar's status 1 is "a file changed as we read it", which a running section's files do; 2 and more: no archive)
  tar czf "$tmp" -C "$RES" --exclude='checkpoints*' --exclude='export*' --exclude='*.safetensors' \
      --exclude='*.distcp' --exclude='*.pt' . ; [ $? -le 1 ] || { rm -f "$tmp"; return; }
  if [ "$(stat -c%s "$tmp")" -gt "$MAX_PACK" ]; then  # too big to come back: keep the text results only
    [ -n "$quiet" ] || echo "pack: archive over 15 MiB; kept only JSON/MD/log/txt files under 4 MiB" | tee -a "$SUMMARY"
    # (-size -4096k: find rounds -4M up to whole MiB, so it meant "3 MiB or less")
    (cd "$RES" && find . -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.log' \
       -o -name '*.txt' -o -name '*.out' \) -size -4096k -print0 | tar czf "$tmp" --null -T -) \
      || { rm -f "$tmp"; return; }
  fi
  mv -f "$tmp" "$OUT/results.tar.gz"
  cp -f "$SUMMARY" "$OUT/summary.txt"
}

section() {  # section NAME LIMIT COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  rm -rf "${RES:?}/$name" "$RES/$name.log"  # a rerun section's results are this call's, never a stale copy
  echo "=================== $name (limit ${limit}s)"
  # packed every 20 s while it runs too: the scripts write rows as they finish, and a call cut off by the device
  # tool's limit (not by this section's) still brings back what the section had written by then
  # (the sleep runs in the background and the loop waits for it: a TERM then ends the loop at once, where a
  # foreground sleep would hold the trap for up to 20 s unless pkill, which an image may lack, killed it)
  ( s=; trap '[ -n "$s" ] && kill $s; exit 0' TERM; while :; do sleep 20 & s=$!; wait $s; pack quiet; done ) \
    > /dev/null 2>&1 &
  local packer=$!
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee "$RES/$name.log"
  local rc=${PIPESTATUS[0]}
  kill "$packer" 2> /dev/null; wait "$packer" 2> /dev/null
  rm -f "$OUT"/.results.tar.gz.tmp.*  # (a background pack cut mid-way: never returned as a file of its own)
  echo "$name: rc=$rc, $(( $(date +%s) - t0 ))s" | tee -a "$SUMMARY"
  pack
}

attn_configs() {  # for one command: the attention configs file, ATTN_CONFIGS=<path> (e.g. a committed
  # results/<card>-runN/attn/best_configs.json), else the one the attn section of this call wrote
  # (compiled graphs cannot tune: without a file they run the first candidate)
  if [ -n "${ATTN_CONFIGS:-}" ]; then echo "STOP_KERNELS_ATTN_CONFIGS=$ATTN_CONFIGS"
  elif [ -f "$RES/attn/best_configs.json" ]; then echo "STOP_KERNELS_ATTN_CONFIGS=$RES/attn/best_configs.json"; fi
}

for s in $SECTIONS; do
  case $s in
    env) section env ${SEC_ENV:-20} bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv;
         python -c "import torch, triton, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__,
           torch.cuda.get_device_name() if torch.cuda.is_available() else \"no CUDA device\")"' ;;
    build) section build ${SEC_BUILD:-240} bash -c '[ -d /usr/local/cuda/include ] && export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda};
           set -o pipefail; MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 python setup.py build_ext --inplace 2>&1 | tail -20 || exit 1;
           python -c "import stop_kernels; print(stop_kernels.backends())"' ;;
    # (a call that builds the extension needs it: its tests fail instead of skipping when it did not build)
    tests) case " $SECTIONS " in *" build "*) export STOP_KERNELS_REQUIRE_CUDA_EXT=1 ;; esac
           section tests ${SEC_TESTS:-240} python -m pytest -v -p no:cacheprovider \
           tests/test_philox.py tests/test_stop_embed.py tests/test_predictor_input.py tests/test_attention.py \
           tests/test_cuda_backend.py ;;
    tests-new) section tests-new ${SEC_TESTS_NEW:-260} python -m pytest -v -p no:cacheprovider \
           ${TESTS_NEW_FILES:-tests/test_linear_gelu.py tests/test_philox.py tests/test_stop_embed.py tests/test_predictor_input.py \
           tests/test_attention.py tests/test_training_reduce_overhead.py tests/test_training_speed.py \
           tests/test_fast_path_loss_curve.py tests/test_training_basics.py} \
           -k "(reduce_overhead_replays or every_candidate or twin or qkv or policy or trains_like or inductor_launches or head_dim or graph or very_negative or one_pass or persistent or inference or bf16_residual_losses or (lever_equals_eager and cuda) or (stack_steps_equal and cuda) or bit_for_bit or cuda_autocast or autocast_gradients or no_context_or_no_target or cuda_epilogue or one_kernel or fused_target_gelu_losses or nonfinite_grads_on_cuda) and not compiles_a_models_blocks" ;;
    stop) section stop ${SEC_STOP:-200} python benchmarks/gpu_stop_embed.py --out "$RES/stop" --budget-s ${BUDGET_STOP:-170} ;;
    attn) section attn ${SEC_ATTN:-240} python benchmarks/gpu_attention.py --out "$RES/attn" --budget-s ${BUDGET_ATTN:-200} ;;
    cuda) section cuda ${SEC_CUDA:-150} python benchmarks/gpu_cuda.py --out "$RES/cuda" ;;
    train) section train ${SEC_TRAIN:-300} bash -c "OUT=$RES/train bash benchmarks/gpu_train.sh" ;;
    train-eager) section train-eager ${SEC_TRAIN:-120} python -m torch.distributed.run --standalone --nproc_per_node=1 \
           train.py --model vit_h --batch-size 64 --benchmark ${TRAIN_STEPS:-20} --compile false \
           --out "$RES/train-eager" ;;
    profile) # the levers one at a time on PROFILE_BASE, the unmeasured ones first (a variant takes 75-150 s:
           # one call reaches the first four or five); a variant starts only while 140 s of the limit are left
           PB=${PROFILE_BASE:-compile=1}
           section profile ${SEC_PROFILE:-420} env $(attn_configs) python benchmarks/profile_step.py --model vit_h --batch-size 64 \
           --budget-s $(( ${SEC_PROFILE:-420} - 140 )) \
           --variants "base:$PB,cg:$PB+mode=reduce-overhead+cppwrap=0,enc80:$PB+policy=compiled_train:80=triton,tgelu:$PB+tgelu=1,graph:$PB+graph=1,combo:$PB+combo=1,mk:$PB+mk=1,overlap:$PB+overlap=1,bf16res:$PB+bf16res=1,pyhost:$PB+cppwrap=0,stack:$PB+scope=stack+cppwrap=0,unrolled:$PB+scope=unrolled,autotune:$PB+mode=max-autotune-no-cudagraphs" \
           --warmup 8 --mask-batches 6 --steps 10 --profile-steps 2 --top 25 --out "$RES/profile" ;;
    host) section host ${SEC_HOST:-150} python benchmarks/host_overhead.py --device cuda --out "$RES/host" ;;
    gemm) section gemm ${SEC_GEMM:-120} python benchmarks/gemm_in_graph.py --out "$RES/gemm" --budget-s $(( ${SEC_GEMM:-120} - 40 )) ;;
    gluon) section gluon ${SEC_GLUON:-60} python benchmarks/gluon_stop_forward.py --out "$RES/gluon" \
           --budget-s $(( ${SEC_GLUON:-60} - 10 )) ;;
    e2e) # a path starts only while 140 s of the limit are left (a compiled ViT-H path takes 75-135 s in run 5, the
         # C++ host code's the longest): a path cut mid-way gives nothing, a skipped one leaves the others' table
         section e2e ${SEC_E2E:-300} env $(attn_configs) python benchmarks/e2e_step.py --model vit_h --batch-size 64 --steps 20 \
           --budget-s $(( ${SEC_E2E:-300} - 140 )) \
           --paths ${E2E_PATHS:-reference,fast_cg_levers,fast_overlap,fast_levers,fast_cg,fast,fast_tgelu,fast_cg_stack,fast_sdpa,fast_py,fast_stack,fast_triton,fast_unrolled} --profile-steps ${E2E_PROFILE:-2} --top 25 \
           --out "$RES/e2e" ;;
    bench) section bench ${SEC_BENCH:-420} python -m pytest ${BENCH_FILES:-benchmarks/} --benchmark-only -q -p no:cacheprovider --ignore=benchmarks/bench_e2e_step.py \
           --benchmark-json "$RES/pytest_benchmark.json" --benchmark-min-rounds 20 --benchmark-max-time 0.5 ;;
    *) echo "unknown section $s" | tee -a "$SUMMARY" ;;
  esac
done
pack
echo "=================== summary"
cat "$SUMMARY"
for f in "$RES"/*/*.md; do if [ -f "$f" ]; then echo "--- $f"; cat "$f"; fi; done
