#!/usr/bin/env bash
# Training rows 1-6 (+ compile with bf16) and evaluation speed on one CUDA GPU, in one go.
#
#   benchmarks/gpu.sh [OUT_DIR]          # default OUT_DIR: benchmarks/results
#
# About 4-5 minutes on an H100/H200, torch.compile warm-up included (the compiled rows of both image
# sizes compile at the same time, in their own processes). Prints the GPU's name, then the two
# Markdown tables, which are also written to OUT_DIR/{train,eval}_throughput_cuda.md.
#
# The end-to-end row needs the ROF-neutral faces: SIAMKIT_DATA=DIR (DIR/rof_neutral), else it
# looks in ../shared/data beside the repository and reports "no data" when they are not there.
# Row 6 needs pytorch-metric-learning (`pip install -e ".[bench]"`); on a machine without a package
# index, put its wheel (pure Python) in .whl/ and it is installed from there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${1:-benchmarks/results}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__)"

if ! "$PY" -c "import pytorch_metric_learning" 2>/dev/null; then
    if compgen -G ".whl/pytorch_metric_learning-*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --target /tmp/siamkit-bench-site .whl/pytorch_metric_learning-*.whl
        export PYTHONPATH="$PYTHONPATH:/tmp/siamkit-bench-site"
    else
        echo "pytorch-metric-learning is not installed: row 6 will say so" >&2
    fi
fi

started=$(date +%s)
timeout 420 "$PY" benchmarks/train_throughput.py --device cuda | tee "$OUT_DIR/train_throughput_cuda.md"
timeout 120 "$PY" benchmarks/eval_throughput.py --device cuda | tee "$OUT_DIR/eval_throughput_cuda.md"
echo "gpu.sh: $(( $(date +%s) - started )) s in all"
