#!/usr/bin/env bash
# What a CUDA machine adds to the CPU runs: the GPU tests (compiled Triton kernels, training
# on the GPU against one CPU process), the kernels' bandwidth, estimate against
# max_memory_allocated, fidelity on the GPU, routed experts (the fused grouped GEMM
# against transformers' loop and its own grouped_mm), and the throughput study (its
# modeled points, and its measured ones on one GPU). Each step logs to OUTDIR/STEP.log
# and the suites write their tables there; a failing step does not stop the others.
#   usage: benchmarks/gpu.sh OUTDIR        (about 5 minutes on one H100)
set -u
out=${1:?usage: benchmarks/gpu.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
failed=0
step() {
  local name=$1 t0=$SECONDS
  shift
  echo "== $name: $*"
  if timeout "${STEP_TIMEOUT:-600}" "$@" >"$out/$name.log" 2>&1; then
    echo "   ok in $((SECONDS - t0)) s"
  else
    echo "   FAILED (exit $?) in $((SECONDS - t0)) s; the end of $name.log:"
    tail -n 25 "$out/$name.log"
    failed=1
  fi
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
step tests python3 -m pytest -q -rs tests/test_kernels.py tests/test_cuda.py
step kernels python3 -m benchmarks kernels --out "$out"
step estimate python3 -m benchmarks estimate --out "$out"
step fidelity python3 -m benchmarks fidelity --out "$out"
step experts python3 -m benchmarks experts --out "$out"
step study-throughput python3 -m benchmarks study-throughput --out "$out"
exit $failed
