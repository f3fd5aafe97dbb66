#!/usr/bin/env bash
# The CUDA path, checked in one call (`make gpu-check`): the tests that take a device on cuda, the demo
# with a bf16 model on cuda, and `bench overhead --device cuda`; everything is written under $OUT.
# On a machine without a CUDA device it prints "no CUDA device: skipped" and exits 0. Every step runs
# even when an earlier one fails (GPU time is rare: get all the results of the call), and the script exits
# non-zero if any step failed, naming it.
#
#   PY      python of the environment (default .venv/bin/python)
#   OUT     result folder (default benchmarks/results/gpu)
#   LENGTHS bench overhead prompt lengths (default "512 1024 2048 4096")
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/results/gpu}
LENGTHS=${LENGTHS:-512 1024 2048 4096}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu-check: no CUDA device: skipped"
    exit 0
fi

mkdir -p "$OUT"
"$PY" - > "$OUT/device.txt" <<'PYEOF'
import torch
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))
PYEOF
(command -v nvidia-smi > /dev/null && nvidia-smi > "$OUT/nvidia-smi.txt") || true

failed=()
step() {  # step NAME LOG COMMAND...: run COMMAND, its output to the screen and $OUT/LOG; note a failure
    local name=$1 log=$2
    shift 2
    echo "gpu-check: $name ..."
    "$@" 2>&1 | tee "$OUT/$log" || failed+=("$name")
}

step "tests on cuda" tests.txt "$PY" -m pytest -q -p no:cacheprovider --device cuda tests/test_device.py
step "bf16 demo on cuda" demo.txt \
    "$PY" -m namm_transfer.pipelines.cli demo --device cuda --dtype bfloat16 --output-dir "$OUT/demo"
# shellcheck disable=SC2086  # LENGTHS is a list of numbers
step "bench overhead on cuda" bench.txt \
    "$PY" -m namm_transfer.pipelines.cli bench overhead --device cuda --lengths $LENGTHS --output "$OUT/overhead.md"

if (( ${#failed[@]} )); then
    printf -v list '%s; ' "${failed[@]}"
    echo "gpu-check: FAILED: ${list%; } (logs in $OUT)"
    exit 1
fi
echo "gpu-check: done, results in $OUT"
