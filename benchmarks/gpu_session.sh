#!/usr/bin/env bash
# Everything plait measures and checks on one GPU, in one call of at most nine minutes, results
# under $OUT (default /tmp/plait-gpu): the device, the CUDA-only test paths, the trainer against a
# compiled reference (gpu_train.py), the serving engine against Hugging Face on the GPU.
#
#     OUT=/tmp/gpu bash benchmarks/gpu_session.sh
#
# plait runs from the checkout (PYTHONPATH=src) on the machine's own torch, so nothing is
# installed. Each step has its own time limit and the session goes on past a failed one; the
# summary at the end lists each step's exit status.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/plait-gpu}
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_session.sh: no CUDA device here; on the CPU run 'python benchmarks/gpu_train.py --device cpu --quick'" >&2
    exit 2
fi
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=()

step() {  # step NAME SECONDS COMMAND...: run with a limit, output to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    status+=("$name rc=$rc $((SECONDS - t0))s")
    tail -n 25 "$OUT/$name.log"
}

step device 20 bash -c "nvidia-smi; $PY -c 'import torch; print(torch.__version__, torch.version.cuda, \
torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))'"
step cuda_tests 100 "$PY" -m pytest -q -p no:cacheprovider -rs tests/train/test_on_device.py \
    tests/parallel/pipeline/test_clock.py
step gpu_train 370 "$PY" benchmarks/gpu_train.py --budget-s 330 --json "$OUT/gpu_train.json"
step serve_vs_hf_cuda 60 "$PY" benchmarks/serve_vs_hf.py --device cuda --quick --json "$OUT/serve_vs_hf_cuda.json"

printf '%s\n' "${status[@]}" | tee "$OUT/summary.txt"
