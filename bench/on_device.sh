#!/usr/bin/env bash
# Everything a lent GPU machine runs for this repository, in one call (see bench/README.md).
#
#   bash bench/on_device.sh tests    # the whole test suite on CUDA (GPU tests included)
#   bash bench/on_device.sh bench    # bench/mechanism.py, then bench/compare.py (full run)
#   bash bench/on_device.sh all      # both; TESTS_S caps the tests, BUDGET_S the benchmark (--budget-s)
#   bash bench/on_device.sh multi    # several devices (docs/multi-gpu.md): its tests, then bench/multi_gpu.py
#   METHODS='bf16,fp8ctx*' bash bench/on_device.sh bench   # a subset (compare.py --methods)
#   TESTS="tests/test_kernels.py" bash bench/on_device.sh tests  # a subset of the tests
#
# The machine has torch, triton, transformers, accelerate, hypothesis and pytest but no diffusers,
# torchao or fp8ctx and no network: the wheels come from the git-ignored .whl/ (carried), the
# repository goes on PYTHONPATH. Results are written under $OUT (default: ./device-out).
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-all}
out=${OUT:-device-out}
mkdir -p "$out"

# the wheels sit in the repository root's .whl/ (in a worktree under .wt/NAME, two levels up)
wheels=.whl; [[ -d $wheels ]] || wheels=../../.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl \
  >/tmp/pip.txt 2>&1 || { echo "wheel install failed"; tail -5 /tmp/pip.txt; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$out/device.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)' \
  | tee -a "$out/device.txt"

if [[ $mode == tests || $mode == all ]]; then
  start=$(date +%s)
  # -n 12: twelve workers share the GPU; tests that measure device memory measure from their own baseline
  timeout "${TESTS_S:-300}" python3 -m pytest -p no:cacheprovider -n 12 -v -rs ${TESTS:-tests fp8ctx} >"$out/tests.txt" 2>&1
  echo "tests rc=$? in $(( $(date +%s) - start )) s"
  grep -E "passed|failed|error" "$out/tests.txt" | tail -3
  grep -E "^(FAILED|ERROR)" "$out/tests.txt" | head -20
fi

if [[ $mode == bench || $mode == all ]]; then
  python3 bench/mechanism.py --device cuda --json "$out/mechanism.json" --profile "$out/host_profile.txt" \
    >"$out/mechanism.txt" 2>&1
  tail -18 "$out/mechanism.txt"
  python3 bench/compare.py --budget-s "${BUDGET_S:-500}" ${METHODS:+--methods "$METHODS"} --out "$out/results.json" --markdown "$out/benchmarks.md" \
    >"$out/compare.txt" 2>&1
  echo "compare rc=$?"
  tail -60 "$out/compare.txt"
fi

if [[ $mode == multi ]]; then
  start=$(date +%s)
  timeout "${TESTS_S:-240}" python3 -m pytest -p no:cacheprovider -v -rs tests/test_integrations.py tests/test_swap.py \
    tests/test_distributed.py tests/test_tensor.py -k "accelerate or offload or distributed or fsdp or strided or device_map" \
    >"$out/multi_tests.txt" 2>&1
  echo "multi-device tests rc=$? in $(( $(date +%s) - start )) s"
  grep -E "passed|failed|error" "$out/multi_tests.txt" | tail -3
  grep -E "^(FAILED|ERROR|SKIPPED)" "$out/multi_tests.txt" | head -20
  timeout "${BUDGET_S:-300}" python3 bench/multi_gpu.py --out "$out" >"$out/multi_gpu.txt" 2>&1
  echo "multi_gpu rc=$?"
  tail -80 "$out/multi_gpu.txt"
fi
