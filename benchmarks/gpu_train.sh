#!/usr/bin/env bash
# One-GPU training benchmark of the full pipeline (issue 5): ViT-H/14 at 224, batch 64, 4 target blocks,
# bf16, one rank (no FSDP: sharding auto), through `torchrun ... train.py --benchmark 20`:
#   1. the defaults of the vit_h recipe: torch.compile of every block, attention "auto" (SDPA inside
#      the compiled blocks), the fused StoP input
#   2. eager blocks (--compile false; attention "auto" = the Triton kernels)
#   3. if time is left: a short real training run on synthetic data (vit_small, 6 steps, data loader with
#      workers, DCP checkpoints, safetensors export), then --resume from its step-3 checkpoint; prints both
#      loss sequences (checks NCCL + DCP + resume on the GPU)
# Warm-up: max(--benchmark-warmup, --benchmark-batches) steps run every mask batch of the pool once, so the
# timed steps are the steady state. Each run prints one JSON line; they are collected in
# $OUT/gpu_train.jsonl with the logs next to them.
# Budget: <= 4 minutes in all: each run has its own timeout (COMPILE_LIMIT=130 s, EAGER_LIMIT=90 s, including
# process start, Triton JIT and torch.compile), the smoke run only uses what is left of 235 s.
#
#   OUT=/some/dir bash benchmarks/gpu_train.sh        # default OUT: benchmarks/results
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
PY=${PYTHON:-python}
RUN="$PY -m torch.distributed.run --standalone --nproc_per_node=1"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
BENCH_ARGS=${BENCH_ARGS:-"--model vit_h --batch-size 64 --benchmark 20"}   # the issue's setting

{
  echo "# gpu_train.sh $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: n/a"
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} | tee "$OUT/gpu_train_env.txt"

: > "$OUT/gpu_train.jsonl"
bench() {  # name timeout args...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s, elapsed $(elapsed)s): train.py $BENCH_ARGS $*"
  timeout -k 10 "$limit" $RUN train.py $BENCH_ARGS --out "$OUT/run_$name" "$@" \
      > "$OUT/bench_$name.out" 2> "$OUT/bench_$name.log"
  local rc=$?
  tail -n 5 "$OUT/bench_$name.log"
  local line
  line=$(grep '^{' "$OUT/bench_$name.out" | tail -n 1)
  if [ -n "$line" ]; then
    echo "$line" | tee -a "$OUT/gpu_train.jsonl"
    echo "$line" > "$OUT/bench_$name.json"
  else
    echo "{\"run\": \"$name\", \"error\": \"exit $rc, no result (see bench_$name.log)\"}" | tee -a "$OUT/gpu_train.jsonl"
  fi
}

bench default "${COMPILE_LIMIT:-130}"
bench eager "${EAGER_LIMIT:-90}" --compile false

LEFT=$(( 235 - $(elapsed) ))
if [ "$LEFT" -ge 45 ]; then
  echo "== smoke: vit_small 64 px, 6 steps (checkpoints at 3 and 6), then resume from 3 (elapsed $(elapsed)s)"
  SMOKE="--model vit_small --img-size 64 --patch-size 8 --batch-size 32 --steps 6 --ckpt-every 3 --keep-ckpts 3 --log-every 1 --num-workers 2 --out $OUT/smoke"
  ( timeout -k 5 $(( LEFT / 2 )) $RUN train.py $SMOKE &&
    cp "$OUT/smoke/log.jsonl" "$OUT/smoke/log_full.jsonl" && rm -rf "$OUT/smoke/checkpoints/step_00000006" &&
    timeout -k 5 $(( LEFT / 2 )) $RUN train.py $SMOKE --resume ) > "$OUT/smoke.log" 2>&1
  echo "smoke exit $?"; grep -E "^(step|checkpoint|resumed|exported|done)" "$OUT/smoke.log" | tail -n 14
  [ -f "$OUT/smoke/log_full.jsonl" ] && $PY - "$OUT/smoke" <<'PYEOF' || true
import json, sys
d = sys.argv[1]
a = [json.loads(l)["loss"] for l in open(f"{d}/log_full.jsonl")]
b = [json.loads(l)["loss"] for l in open(f"{d}/log.jsonl")]
print("smoke losses uninterrupted", [round(x, 5) for x in a])
print("smoke losses resumed      ", [round(x, 5) for x in b], "max |diff|", max(abs(x - y) for x, y in zip(a, b)))
PYEOF
else
  echo "== smoke skipped: ${LEFT}s left"
fi
echo "== total $(elapsed)s; results in $OUT/gpu_train.jsonl"
