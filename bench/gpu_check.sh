#!/usr/bin/env bash
# The prepared GPU check (issue 13): at most 5 minutes on one GPU.
#   1. the CUDA tests (pytest -m cuda: training on the device, the torch window gather, exact
#      search on the GPU against FAISS, bundles trained there loading on the CPU);
#   2. the throughput figures as JSON (bench/bench_gpu.py): MIND training at 1M items and batch
#      8192 (fp32, bf16, torch.compile), an epoch of the 50M-interaction log, exact Recall@50 of
#      20,000 users over 1M items, one user's exact search, training at 10M items.
#
# Run it from the repository root on the GPU machine:   bench/gpu_check.sh [OUT_DIR]
# (GPU_CHECK_DEVICE=cpu runs the same steps at smoke scale on a CPU: a check of the script itself.)
# Optional: ML100K=DIR ML100K_SEEDS=2026[,2027...] bench/gpu_check.sh  also runs the ML-100K
# experiment on the GPU (about a minute a seed; five seeds do not fit in the 5 minutes).
#
# The GPU machine's python3 holds its own torch with CUDA: this script never installs the
# project (whose pinned torch is the CPU build) or torch. It runs from the source tree
# (PYTHONPATH). The project's other dependencies (numpy, typer, pytest) are in that image
# except faiss-cpu and polars: made here with bench/gpu_wheels.sh into .whl/ (ignored by git)
# and carried, they are installed into /tmp/site before anything runs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-runs/gpu_check}}
PY=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
SCALE=$([[ $DEVICE == cuda ]] && echo full || echo smoke)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DEVICE=$DEVICE "$PY" - <<'PYEOF'
import os, faiss, numpy, polars, torch, typer
if os.environ["DEVICE"] == "cuda":
    assert torch.cuda.is_available(), "no CUDA GPU visible to torch"
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {gpu}; "
      f"faiss {faiss.__version__}, polars {polars.__version__}, numpy {numpy.__version__}, typer {typer.__version__}")
PYEOF

status=0
echo "== CUDA tests"
timeout 120 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_device.py tests/test_torch_search.py \
    --junitxml="$OUT/cuda_tests.xml" 2>&1 | tee "$OUT/cuda_tests.log" || status=1

echo "== throughput (bench/bench_gpu.py)"
timeout 165 "$PY" -m bench.bench_gpu --out "$OUT" --budget 130 --scale "$SCALE" --device "$DEVICE" \
    2> "$OUT/bench_gpu.log" || status=1

if [[ -n "${ML100K:-}" && -n "${ML100K_SEEDS:-}" ]]; then
    echo "== ML-100K experiment on the GPU, seeds $ML100K_SEEDS"
    "$PY" -m cli experiment --interactions "$ML100K/interactions.csv" --items "$ML100K/items.csv" \
        --users "$ML100K/users.csv" --user-features age,gender,occupation --seeds "$ML100K_SEEDS" \
        --device "$DEVICE" --out "$OUT/experiment_ml100k_gpu.json" 2>&1 | tail -8 || status=1
fi
exit $status
