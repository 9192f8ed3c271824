#!/usr/bin/env bash
# The GPU check, in one go (about 8 minutes on an H100/H200): NCCL/DDP end to end, then the throughput table.
#
#   bash benchmarks/gpu.sh [OUT_DIR]      # default OUT_DIR: benchmarks/results/gpu-YYYY-MM-DD
#   SIZE64=1 bash benchmarks/gpu.sh       # also the table at 64x64 (about 3 minutes more)
#
# 1. NCCL: `torchrun --nproc-per-node <GPUs present>` trains on the built-in AT&T faces (checkpoints every
#    20 steps), resumes the run for 40 more steps, and `siamkit evaluate` scores the unseen people s31-s40.
#    NCCL refuses two processes on one GPU, so the world is one process per GPU. The logs stay in OUT_DIR.
# 2. Throughput at 112x112 (benchmarks/train_throughput.py --rows gpu): six-pass and three-pass loops (fp32),
#    siamkit eager fp32, the six-pass loop in bf16, siamkit bf16 + compile, and bf16 + compile + CUDA graphs
#    (--compile-mode reduce-overhead); at 32 triplets and at the largest power-of-two batch at which the
#    six-pass fp32 loop (the most memory of any row) fits. MFU against the dense matmul rate measured in the
#    same run (fp32 with TF32 for fp32 rows, bf16 for bf16 rows); compare it with the datasheet peak.
# Each part has its own timeout, so one that hangs cannot eat the rest. Exit status: 1 if any part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCHRUN=${TORCHRUN:-$(dirname "$(command -v "$PY")")/torchrun}
OUT_DIR=${1:-benchmarks/results/gpu-$(date +%Y-%m-%d)}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
started=$(date +%s)
failed=()

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT_DIR/gpu.txt"
NPROC=$("$PY" - <<'PY'
import sys, torch, torch.distributed as dist
if not torch.cuda.is_available():
    sys.exit("gpu.sh: PyTorch sees no CUDA GPU")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, NCCL "
      f"{'.'.join(map(str, torch.cuda.nccl.version()))} (available: {dist.is_nccl_available()})", file=sys.stderr)
print(torch.cuda.device_count())
PY
) || exit 1
echo "GPUs: $NPROC" | tee -a "$OUT_DIR/gpu.txt"

part() {  # part NAME SECONDS COMMAND...: run with a timeout, log to OUT_DIR/NAME.log, remember a failure
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  echo "gpu.sh: $name: exit $rc in $((SECONDS - t0)) s (log: $OUT_DIR/$name.log)"
  [ "$rc" -eq 0 ] || failed+=("$name")
}

# --- 1. NCCL / DDP: train, checkpoint, resume, evaluate -------------------------------------------------
run=$OUT_DIR/nccl-run
rm -rf "$run"
common=(--data att-train --device cuda --log-every 10 --checkpoint-every 20 --no-progress --out "$run")
part nccl-train 240 "$TORCHRUN" --standalone --nproc-per-node "$NPROC" -m siamkit train "${common[@]}" --steps 40
part nccl-resume 240 "$TORCHRUN" --standalone --nproc-per-node "$NPROC" -m siamkit train "${common[@]}" --steps 80 --resume
part nccl-evaluate 120 "$PY" -m siamkit evaluate "$run" --data att-test --device cuda
grep -h "process\|NCCL\|nccl\|resum\|accuracy" "$OUT_DIR"/nccl-*.log | head -20

# --- 2. throughput ----------------------------------------------------------------------------------------
sizes=(112)
[ -n "${SIZE64:-}" ] && sizes=(112 64)
for size in "${sizes[@]}"; do
  for triplets in 32 max; do
    name=throughput-${size}-${triplets}
    part "$name" 300 "$PY" benchmarks/train_throughput.py --device cuda --rows gpu --sizes "$size" \
      --triplets "$triplets" --e2e-sizes
    cat "$OUT_DIR/$name.log" | sed -n '/^### /,$p'
  done
done

echo "gpu.sh: $(( $(date +%s) - started )) s in all; results in $OUT_DIR"
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu.sh: failed: ${failed[*]}"
  exit 1
fi
