#!/usr/bin/env bash
# The GPU path of distributed training, end to end: `torchrun -m siamkit train` under NCCL, one short
# run per BN policy (plus synced BN with gathered PK embeddings), and a plain `python -m siamkit`
# run beside them; then one table of what each run wrote.
#
#   bash benchmarks/gpu_distributed.sh                 # one GPU: torchrun --nproc-per-node 1
#   NPROC=2 bash benchmarks/gpu_distributed.sh         # two GPUs
#   FULL=1 bash benchmarks/gpu_distributed.sh          # also the anchor and frozen policies and bf16
#   DEVICE=cpu bash benchmarks/gpu_distributed.sh      # the same script on CPU (gloo), as a smoke test
#
# Under torchrun even a single process joins a process group (NCCL on CUDA) and trains through
# DistributedDataParallel, so --nproc-per-node 1 checks the NCCL/DDP code path on one GPU.
# images/s are comparable only between rows of one run of this script (same machine, same moment).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
TORCHRUN=${TORCHRUN:-$(dirname "$(command -v "$PYTHON")")/torchrun}
NPROC=${NPROC:-1}
STEPS=${STEPS:-40}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-$(mktemp -d)}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

"$PYTHON" - "$DEVICE" <<'PY' || exit 1
import sys, torch, torch.distributed as dist
device = sys.argv[1]
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("gpu_distributed.sh: PyTorch sees no CUDA GPU (run with DEVICE=cpu for the CPU smoke test)")
gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
nccl = ".".join(map(str, torch.cuda.nccl.version())) if device == "cuda" else "-"
print(f"torch {torch.__version__}, {gpu}, NCCL {nccl}, NCCL available: {dist.is_nccl_available()}")
PY

common=(--data digits --image-size 32 32 --device "$DEVICE" --steps "$STEPS" --log-every 10 --checkpoint-every 1000
        --val-identities 3 --no-progress --batch-size 32)
pk=(--identities-per-batch 3 --images-per-identity 8 --mining batch-hard)  # P x NPROC <= 7 training identities
names=()
run() {  # run NAME LAUNCHER... -- TRAIN-OPTIONS...
  local name=$1; shift
  local launcher=()
  while [ "$1" != "--" ]; do launcher+=("$1"); shift; done; shift
  names+=("$name")
  local start=$SECONDS
  "${launcher[@]}" -m siamkit train "${common[@]}" --out "$OUT/$name" "$@" >"$OUT/$name.log" 2>&1
  echo "$? $((SECONDS - start))" >"$OUT/$name.rc"
}
tr=("$TORCHRUN" --standalone --nproc-per-node "$NPROC")
run plain-joint "$PYTHON" -- --bn-policy joint
run ddp-joint "${tr[@]}" -- --bn-policy joint
policies=(sequential mean)
[ -n "${FULL:-}" ] && policies=(sequential mean anchor frozen)
for policy in "${policies[@]}"; do
  run "ddp-$policy" "${tr[@]}" -- --bn-policy "$policy" --classification-weight 0.5
done
run ddp-pk-syncbn-gather "${tr[@]}" -- "${pk[@]}" --sync-bn --gather-embeddings
[ -n "${FULL:-}" ] && run ddp-joint-bf16 "${tr[@]}" -- --bn-policy joint --amp bf16

"$PYTHON" - "$OUT" "${names[@]}" <<'PY'
import csv, json, re, sys
from pathlib import Path
out, names = Path(sys.argv[1]), sys.argv[2:]
print(f"\n{'run':<22} {'exit':>4} {'wall_s':>6} {'processes':<24} {'steps':>5} {'last loss':>9} {'images/s':>9} {'ROC AUC':>7}")
failed = []
for name in names:
    rc, wall = (out / f"{name}.rc").read_text().split()
    log = (out / f"{name}.log").read_text()
    where = re.search(r" on ([^\s,]+)( x \d+ process(?:es)? \(\w+\))?", log)
    processes = (where.group(1) + (where.group(2) or " (no process group)")) if where else "?"
    rows = list(csv.DictReader(open(out / name / "metrics.csv"))) if (out / name / "metrics.csv").exists() else []
    report = out / name / "eval" / "report.json"
    auc = json.loads(report.read_text())["roc_auc"] if report.exists() else float("nan")
    last = rows[-1] if rows else {"step": "-", "loss": "nan", "images_per_s": "nan"}
    print(f"{name:<22} {rc:>4} {wall:>6} {processes.strip():<24} {last['step']:>5} {float(last['loss']):>9.4f} "
          f"{float(last['images_per_s']):>9.0f} {auc:>7.3f}")
    if rc != "0":
        failed.append(name)
for name in failed:
    print(f"\n--- {name} failed; the end of its log ({out / name}.log):")
    print("\n".join((out / f"{name}.log").read_text().splitlines()[-25:]))
print(f"\nlogs and run folders: {out}")
sys.exit(1 if failed else 0)
PY
