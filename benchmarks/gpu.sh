#!/usr/bin/env bash
# The GPU check, in one go of at most 7 minutes (420 s, start-up and packing included): NCCL/DDP end to end,
# then the throughput table at 112x112 and the largest batch that fits.
#
#   bash benchmarks/gpu.sh [--out DIR] [--archive FILE]   # default DIR: benchmarks/results/gpu-YYYY-MM-DD
#   bash benchmarks/gpu.sh --rerun-failed [--out DIR]     # only the parts that failed (DIR/status.tsv), and
#                                                          # the parts that need them; the rest is kept
#   bash benchmarks/gpu.sh --cpu --out /tmp/gpu-check     # the script itself on CPU (gloo, 4 + 4 steps at 32x32,
#                                                          # no dlib baseline, a 2-row table; a few minutes)
#
# Parts, each with its own timeout (seconds; GPU_SH_<NAME>=S overrides one, e.g. GPU_SH_THROUGHPUT=300), all
# within GPU_SH_TOTAL (420) from the start: a part never runs past it, and one that hangs cannot eat the rest.
# 1. nccl-train (75), nccl-resume (75), nccl-evaluate (40): `torchrun --nproc-per-node <GPUs present>` trains
#    40 steps on the built-in AT&T faces (checkpoints every 20), resumes the run to 80 steps, and
#    `siamkit evaluate` scores the unseen people s31-s40. NCCL refuses two processes on one GPU, so the world
#    is one process per GPU; with one GPU this checks NCCL's code path, not communication between GPUs.
# 2. throughput (220): benchmarks/train_throughput.py --rows gpu at 112x112 and the largest power-of-two batch
#    at which the six-pass fp32 loop peaks within 80% of the card (--triplets max): six-pass and three-pass
#    loops (fp32), siamkit eager fp32, the six-pass loop in bf16, siamkit bf16 + compile, and bf16 + compile +
#    CUDA graphs; 2 rounds of 8 steps after 3 warm-up steps. MFU = direct-convolution FLOPs of the step / step
#    time / the dense matmul rate measured in the same run (fp32 with TF32 for fp32 rows, bf16 for bf16 rows).
# Everything goes to DIR: each part's log, DIR/status.tsv (part, exit status, seconds, limit; 124 = its
# timeout), DIR/gpu.txt (the card), DIR/summary.txt; at the end DIR is packed into one archive (default
# DIR.tar.gz; checkpoints left out), also after a rerun. Exit status: 1 if any part failed.
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }
OUT_DIR=benchmarks/results/gpu-$(date +%Y-%m-%d)
ARCHIVE= RERUN= CPU=
while [ $# -gt 0 ]; do
  case $1 in
    --out) OUT_DIR=$2; shift 2 ;;
    --archive) ARCHIVE=$2; shift 2 ;;
    --rerun-failed) RERUN=1; shift ;;
    --cpu) CPU=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu.sh: unknown argument $1 (see bash benchmarks/gpu.sh --help)" >&2; exit 2 ;;
  esac
done
ARCHIVE=${ARCHIVE:-${OUT_DIR%/}.tar.gz}
PY=${PYTHON:-python3}
TORCHRUN=${TORCHRUN:-$(dirname "$(command -v "$PY")")/torchrun}
TOTAL=${GPU_SH_TOTAL:-420}
PARTS=(nccl-train nccl-resume nccl-evaluate throughput)
declare -A LIMIT=([nccl-train]=${GPU_SH_NCCL_TRAIN:-75} [nccl-resume]=${GPU_SH_NCCL_RESUME:-75}
                  [nccl-evaluate]=${GPU_SH_NCCL_EVALUATE:-40} [throughput]=${GPU_SH_THROUGHPUT:-220})
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
started=$SECONDS
STATUS=$OUT_DIR/status.tsv

if [ -n "$RERUN" ] && [ ! -f "$STATUS" ] && [ -f "$ARCHIVE" ]; then  # a fresh machine: start from the archive
  mkdir -p "$(dirname "$OUT_DIR")" && tar -xzf "$ARCHIVE" -C "$(dirname "$OUT_DIR")"
fi
if [ -n "$RERUN" ] && [ ! -f "$STATUS" ]; then
  echo "gpu.sh: --rerun-failed: no $STATUS (nor $ARCHIVE) from an earlier run; run without it" >&2
  exit 2
fi
[ -z "$RERUN" ] && rm -rf "$OUT_DIR"
mkdir -p "$OUT_DIR"

previous_rc() { awk -F'\t' -v p="$1" '$1 == p { rc = $2 } END { print (rc == "" ? "none" : rc) }' "$STATUS" 2>/dev/null; }

# Which parts run: all; with --rerun-failed the failed ones, and the NCCL parts that depend on a rerun one
# (evaluate reads the run that resume continues from train) or on a checkpoint the archive left out.
declare -A TODO=()
run=$OUT_DIR/nccl-run
for p in "${PARTS[@]}"; do
  [ -z "$RERUN" ] || [ "$(previous_rc "$p")" != 0 ] && TODO[$p]=1
done
if [ -n "$RERUN" ]; then
  { [ -n "${TODO[nccl-resume]:-}" ] || [ -n "${TODO[nccl-evaluate]:-}" ]; } && [ ! -f "$run/checkpoints/last.pt" ] \
    && TODO[nccl-train]=1
  [ -n "${TODO[nccl-train]:-}" ] && TODO[nccl-resume]=1
  [ -n "${TODO[nccl-resume]:-}" ] && TODO[nccl-evaluate]=1
  echo "gpu.sh: rerunning: ${!TODO[*]}"
fi

failed=()
part() {  # part NAME COMMAND...: run it within its limit and the total's, log to OUT_DIR/NAME.log, record it
  local name=$1; shift
  [ -n "${TODO[$name]:-}" ] || { [ "$(previous_rc "$name")" = 0 ] || failed+=("$name"); return; }
  local left=$((TOTAL - (SECONDS - started) - 5)) limit=${LIMIT[$name]} t0=$SECONDS rc
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    rc=124; echo "gpu.sh: $name: not started, the ${TOTAL} s are spent" >"$OUT_DIR/$name.log"
  else
    timeout --kill-after 5 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    rc=$?
  fi
  { awk -F'\t' -v p="$name" '$1 != p' "$STATUS" 2>/dev/null; printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$limit"; } \
    >"$STATUS.new" && mv "$STATUS.new" "$STATUS"
  echo "gpu.sh: $name: exit $rc in $((SECONDS - t0)) s of $limit (log: $OUT_DIR/$name.log)"
  [ "$rc" -eq 0 ] || failed+=("$name")
}

if [ -n "$CPU" ]; then  # the script's own check: gloo instead of NCCL, a tiny model and table
  DEVICE=cpu NPROC=1 STEPS=(4 8 2)
  size=(--image-size 32 32 --batch-size 4) evaluate=(--no-baseline-dlib)
  bench=(--device cpu --rows naive6 siamkit --sizes 32 --triplets 4 --rounds 1 --steps 1 --warmup 1 --e2e-sizes)
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT_DIR/gpu.txt"
  NPROC=$("$PY" - <<'PY'
import sys, torch, torch.distributed as dist
if not torch.cuda.is_available():
    sys.exit("gpu.sh: PyTorch sees no CUDA GPU (bash benchmarks/gpu.sh --cpu checks the script on CPU)")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, NCCL "
      f"{'.'.join(map(str, torch.cuda.nccl.version()))} (available: {dist.is_nccl_available()})", file=sys.stderr)
print(torch.cuda.device_count())
PY
  ) || exit 1
  DEVICE=cuda STEPS=(40 80 20) size=() evaluate=()
  bench=(--device cuda --rows gpu --sizes 112 --triplets max --rounds 2 --steps 8 --warmup 3 --e2e-sizes)
fi
echo "GPUs: $NPROC; commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" | tee -a "$OUT_DIR/gpu.txt"

# --- 1. NCCL / DDP: train, checkpoint, resume, evaluate -------------------------------------------------
[ -n "${TODO[nccl-train]:-}" ] && rm -rf "$run"
common=(--data att-train --device "$DEVICE" --log-every 10 --checkpoint-every "${STEPS[2]}" --no-progress --out "$run"
        "${size[@]}")
part nccl-train "$TORCHRUN" --standalone --nproc-per-node "$NPROC" -m siamkit train "${common[@]}" --steps "${STEPS[0]}"
part nccl-resume "$TORCHRUN" --standalone --nproc-per-node "$NPROC" -m siamkit train "${common[@]}" --steps "${STEPS[1]}" \
  --resume
part nccl-evaluate "$PY" -m siamkit evaluate "$run" --data att-test --device "$DEVICE" "${evaluate[@]}"

# --- 2. throughput at the largest batch that fits -------------------------------------------------------
part throughput "$PY" benchmarks/train_throughput.py "${bench[@]}"

{
  echo "gpu.sh: $((SECONDS - started)) s in this run (limit $TOTAL); commit $(git rev-parse --short HEAD 2>/dev/null)"
  printf 'part\texit\tseconds\tlimit\n'; cat "$STATUS"
  grep -h "process\|NCCL\|nccl\|resum\|accuracy" "$OUT_DIR"/nccl-*.log 2>/dev/null | head -20
  sed -n '/^### /,$p' "$OUT_DIR/throughput.log" 2>/dev/null
} | tee "$OUT_DIR/summary.txt"
tar -czf "$ARCHIVE" -C "$(dirname "$OUT_DIR")" --exclude='*.pt' "$(basename "$OUT_DIR")" \
  && echo "gpu.sh: results in $OUT_DIR, packed into $ARCHIVE ($(du -h "$ARCHIVE" | cut -f1))"
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu.sh: failed: ${failed[*]} (bash benchmarks/gpu.sh --rerun-failed --out $OUT_DIR reruns them)"
  exit 1
fi
