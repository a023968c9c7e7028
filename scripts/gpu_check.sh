#!/usr/bin/env bash
# One-shot GPU check, at most ~8 minutes on one H100/H200 with no internet. In order:
#   0. set-up without touching the system Python: the checkout runs from its own folder (PYTHONPATH, no
#      `pip install -e`), carried wheels go to /tmp/site (pip --target); nothing else is installed
#   1. `attn-export kernels` for this GPU's architecture: every Triton kernel compiled ahead of time (in
#      parallel, the compile time printed) with its registers, spills, layouts and estimated HBM fraction
#   2. the CUDA kernel tests, compiled (not interpreted), in parallel shards
#   3. `attn-export bench --device cuda` (ops at the report's shapes, blocks, detector)
#   4. one summary table: the report's estimate next to the measured fraction of copy bandwidth per op
#      kernel and dtype, and each gate's verdict
# Everything is tee'd into $OUT (the device tool brings $OUT back), or out/gpu_check without one.
#
# Prepare here, once, on the development machine (the GPU machine has no network; its image has torch,
# triton, onnx, onnxruntime, onnxscript, pytest but not onnx-graphsurgeon, which the export package imports):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl onnx-graphsurgeon==0.6.1        # pure Python: a py3-none-any wheel
#
# (`.whl/` is git-ignored.) Then, with the device tool, in one call:
#
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# Exit status: 0 only when every correctness gate passes (the kernel tests, and the benchmark's
# correctness gate of every variant); the report's figures and the timings are information, not gates.
set -uo pipefail

OUT="${OUT:-out/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # compiled kernels, not the interpreter
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout itself: nothing installed into any Python
JOBS="$(nproc 2>/dev/null || echo 4)"
T0=$(date +%s)
declare -A GATE

since() { echo $(($(date +%s) - T0)); }

{
  echo "== $(date -u +%FT%TZ) $(uname -m) $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv || true
  "$PY" -c 'import numpy, torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "| triton", triton.__version__, "| numpy", numpy.__version__, "| device", torch.cuda.get_device_name(0))'
  grep -m1 'model name' /proc/cpuinfo || true
  # Triton < 3.7's interpreter breaks on numpy >= 2.4 (pyproject pins numpy<2.4 for the CPU tests); the
  # compiled kernels here do not use it, so this is a note, not a failure
  "$PY" -c 'import numpy, triton; t = tuple(int(v) for v in triton.__version__.split(".")[:2]); n = tuple(int(v) for v in numpy.__version__.split(".")[:2]); print("note: numpy", numpy.__version__, "with triton", triton.__version__, "breaks TRITON_INTERPRET=1 (not used here)") if t < (3, 7) and n >= (2, 4) else None' || true
} 2>&1 | tee "$OUT/env.txt"
CC="$("$PY" -c 'import torch; m, n = torch.cuda.get_device_capability(0); print(f"{m}{n}")' 2>/dev/null || echo 90)"
ARCH="sm_90"
[ "$CC" = "80" ] && ARCH="sm_80"

# 0) Carried wheels (onnx-graphsurgeon) into /tmp/site; a failure is reported, not fatal: the kernel work
#    below does not need them, and the benchmark says what it could not import.
if compgen -G ".whl/*.whl" >/dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl >"$OUT/install.txt" 2>&1; then
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
    echo "installed the carried wheels into /tmp/site" | tee -a "$OUT/env.txt"
  else
    echo "WARNING: the carried wheels did not install (see install.txt); going on without them" | tee -a "$OUT/env.txt"
  fi
fi
"$PY" -c 'import attn_export, attn_export.plugins' 2>>"$OUT/env.txt" || { echo "the checkout does not import" | tee -a "$OUT/env.txt"; exit 1; }

# 1) Ahead-of-time compilation and the kernel report for this GPU's architecture (cached in ~/.cache).
echo "== [$(since) s] kernel report ($ARCH, $JOBS compile processes)" | tee "$OUT/kernels.txt"
s1=$(date +%s)
timeout 150 "$PY" -m attn_export kernels --arch "$ARCH" --jobs "$JOBS" --json >"$OUT/kernels.jsonl" 2>>"$OUT/kernels.txt"
rc=$?
echo "kernel report: exit $rc, $(($(date +%s) - s1)) s wall (compile times per kernel in kernels.jsonl)" | tee -a "$OUT/kernels.txt"
GATE[report]=$([ $rc -eq 0 ] && echo ok || echo "exit $rc (information)")

# 2) Kernel tests, compiled, in three parallel shards (each compiles its own kernels; one Triton cache).
echo "== [$(since) s] kernel tests (compiled)" | tee "$OUT/kernel_tests.txt"
pids=()
for k in involution outlook "not involution and not outlook"; do
  tag="${k// /_}"
  timeout 200 "$PY" -m pytest -q -m gpu -p no:cacheprovider --durations=5 -k "$k" tests/plugins \
    >"$OUT/kernel_tests.$tag.txt" 2>&1 &
  pids+=($!)
done
tests_rc=0
for p in "${pids[@]}"; do wait "$p" || tests_rc=1; done
cat "$OUT"/kernel_tests.*.txt >>"$OUT/kernel_tests.txt"
grep -hE "passed|failed|error|skipped" "$OUT"/kernel_tests.*.txt | tail -n 6
GATE[kernel_tests]=$([ $tests_rc -eq 0 ] && echo ok || echo FAILED)

# 3) The benchmark: a 150 s budget (it skips, and says so, what does not fit; its JSON is rewritten after
#    each step, so a run stopped by the timeout still leaves what it measured).
echo "== [$(since) s] attn-export bench --device cuda" | tee -a "$OUT/env.txt"
timeout 220 "$PY" -m attn_export bench --device cuda --budget-s 150 --json-out "$OUT/bench_cuda.json" \
  2>"$OUT/bench_cuda.log" >"$OUT/bench_cuda.md"
bench_rc=$?
tail -n 5 "$OUT/bench_cuda.log"
GATE[bench]=$([ $bench_rc -eq 0 ] && echo ok || echo "FAILED (exit $bench_rc)")

# 4) One summary: the report's estimate next to the measured fraction, and the gates.
"$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.md"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
report = []
for line in (out / "kernels.jsonl").read_text().splitlines() if (out / "kernels.jsonl").exists() else []:
    try:
        report.append(json.loads(line))
    except ValueError:
        pass
bench = json.loads((out / "bench_cuda.json").read_text()) if (out / "bench_cuda.json").exists() else {"rows": []}
measured = {}
for r in bench.get("rows", []):
    if r.get("section") == "ops" and r.get("variant", "").startswith("ours, Triton"):
        op = r["name"].split()[0]
        stride = "s2" if " s2" in r["name"] else "s1"
        measured[(op, stride, r["variant"], r["dtype"])] = r
print("| op kernel | dtype | regs | spill B | est HBM (report) | measured ms | measured fraction of copy | status |")
print("|---|---|---|---|---|---|---|---|")
names = {"involution": "involution", "outlook": "outlook", "dynamic_conv": "dynamic_conv"}
for k in report:
    if k.get("role") != "op":
        continue
    stride = "s2" if k["label"].endswith("s2") else "s1"
    variant = "ours, Triton"
    m = measured.get((names[k["op"]], stride, variant, k["dtype"]), {})
    frac = m.get("fraction")
    print(f"| {k['kernel']} {k['label']} | {k['dtype']} | {k.get('registers')} | {k.get('spill_bytes')} | "
          f"{k.get('est_hbm_fraction')} | {m.get('ms', '-')} | {'-' if frac is None else f'{frac:.2f}'} | "
          f"{m.get('status', 'not measured')} |")
EOF
{
  echo
  echo "| gate | verdict |"
  echo "|---|---|"
  for g in report kernel_tests bench; do echo "| $g | ${GATE[$g]} |"; done
  echo
  echo "total $(since) s"
} | tee -a "$OUT/summary.md"

status=0
[ "${GATE[kernel_tests]}" = ok ] || status=1
[ "${GATE[bench]}" = ok ] || status=1
echo "gpu_check: exit $status (files in $OUT)" | tee -a "$OUT/env.txt"
exit "$status"
