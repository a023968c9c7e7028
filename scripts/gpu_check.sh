#!/usr/bin/env bash
# One-shot GPU check: the CUDA kernel tests COMPILED (not interpreted), then
# `attn-export bench --device cuda` (ops, blocks, detector against the copy/matmul peaks of the same run).
# Everything is tee'd into $OUT (the device tool brings $OUT back), or out/gpu_check without one.
#
# Prepare here, once, on the development machine (the GPU machine has no network; its image has
# torch, triton, onnx, onnxruntime, onnxscript, pytest but not onnx-graphsurgeon, which the export
# package imports):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl onnx-graphsurgeon==0.6.1        # pure Python: a py3-none-any wheel
#
# (`.whl/` is git-ignored.) Then, with the device tool, in one call (at most ~9 minutes of a 15-minute budget):
#
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=590)
#
# Exit status: 0 when the kernel tests pass and the benchmark gates every variant as correct.
set -uo pipefail

OUT="${OUT:-out/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # compiled kernels, not the interpreter
status=0

{
  echo "== $(date -u +%FT%TZ) $(uname -m) $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv || true
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "| triton", triton.__version__, "| device", torch.cuda.get_device_name(0))'
} 2>&1 | tee "$OUT/env.txt"

# The carried wheels (onnx-graphsurgeon), then this checkout without its dependencies (the image has them).
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tee "$OUT/install.txt" || status=1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tee -a "$OUT/install.txt" || status=1

# 1) Kernel tests, compiled: every test of tests/plugins/test_cuda_kernels.py carries the gpu marker
#    where CUDA is visible; other gpu-marked plugin tests come along. ~1-2 min (each variant compiles once).
timeout 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider --durations=10 tests/plugins 2>&1 \
  | tee "$OUT/kernel_tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# 2) The benchmark: a 150 s budget (it skips, and says so, what does not fit; its JSON is rewritten after
#    each step, so a run stopped by the timeout still leaves what it measured).
timeout 270 "$PY" -m attn_export bench --device cuda --budget-s 150 --json-out "$OUT/bench_cuda.json" 2>"$OUT/bench_cuda.log" \
  | tee "$OUT/bench_cuda.md"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
tail -n 5 "$OUT/bench_cuda.log"

echo "gpu_check: exit $status (files in $OUT)" | tee -a "$OUT/env.txt"
exit "$status"
