"""``attn-export kernels``: what every Triton kernel of the ops compiles to, read on the CPU (no GPU).

Each kernel (the ops' CUDA kernels in ``plugins/*/cuda_kernel.py`` and the TensorRT AOT entries of
``plugins/*/trt_plugin.py``) is compiled with Triton's own compiler for a named target (``GPUTarget``:
sm_90, sm_80; ``ptxas`` ships in the Triton wheel) at the realistic shapes of issue 18, in fp32, fp16 and
bf16, and the report prints per compiled kernel:

- ``registers``, ``spill_bytes`` (spill stores), ``stack_bytes``, ``shared_bytes``: ``ptxas -v`` and the
  compiled metadata;
- ``warp_along_contiguous``: every global load and store of a large tensor (its TTGIR layout) runs its
  warp's consecutive lanes along the tensor's contiguous axis (found from the real addresses, below);
- ``vectorized_loads``: the PTX has vector global loads (``ld.global.v2/.v4``) or 8/16-byte ``cp.async``;
  ``ptx_loads`` counts them;
- ``est_hbm_fraction``: the minimum bytes (every input read once, every output written once) divided by
  the bytes the compiled kernel moves, counted as 32-byte sectors per warp access.

How the sectors are counted. A second process runs sample programs of the kernel in Triton's interpreter
(``TRITON_INTERPRET=1``, batch 1, the rest of the shape as given) and records the byte offset and the mask
of every element of every ``tl.load``/``tl.store`` it executes (loops and masks included). Each access is
matched by source line to its load/store in the compiled TTGIR, whose layout (blocked, slice or linear
encoding, with ``num_warps``) says which warp, lane and register holds each element; a warp's access is
one instruction per register vector (the layout's ``sizePerThread`` along its fastest axis, up to 16
bytes), and it costs the number of distinct 32-byte sectors its unmasked lanes touch. The sum over the
sample programs, scaled to the whole grid at batch 32, is the moved bytes. No cache is modelled: a
re-read is paid again (an upper bound on HBM traffic, a lower bound on the fraction); see
docs/benchmarks.md ("Kernel report") for how it compares with a measured GPU.

Results are cached per kernel (``~/.cache/attn-export/kernel-report``, keyed on Triton's version, the
target, the case and the source of the kernels), so a second run only reads them back.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from attn_export.bench.kernel_cases import DTYPES, Case, _sig, cases
from attn_export.bench.kernel_layouts import (
    SECTOR,
    Layout,
    access_cost,
    contiguous_axis,
    memory_ops,
    parse_encoding,
    ptx_load_counts,
)

__all__ = [
    "DTYPES",
    "SECTOR",
    "Case",
    "Layout",
    "access_cost",
    "calibration_cases",
    "cases",
    "contiguous_axis",
    "memory_ops",
    "parse_encoding",
    "ptx_load_counts",
    "report",
]

ARCHS = {"sm_90": 90, "sm_80": 80}
BATCH = 32  # the batch of the realistic shapes; programs are traced at batch 1 and scaled
#: A tensor with at least this many elements (at batch 1) is "large": its accesses are judged.
LARGE = 1 << 16
#: Programs of each kernel run in the interpreter (spread over the batch-1 grid, first and last included).
SAMPLE_PROGRAMS = 8
_ROOT = Path(__file__).resolve().parents[1]
#: Files whose text keys the cache (a kernel or its launch plan changed: recompile).
_SOURCES = (
    "plugins/_cuda_common.py",
    "plugins/registry.py",
    "plugins/involution/cuda_kernel.py",
    "plugins/involution/plan.py",
    "plugins/involution/trt_plugin.py",
    "plugins/outlook/cuda_kernel.py",
    "plugins/outlook/plan.py",
    "plugins/outlook/trt_plugin.py",
    "plugins/dynamic_conv/cuda_kernel.py",
    "plugins/dynamic_conv/plan.py",
    "plugins/dynamic_conv/trt_plugin.py",
    "plugins/_trt_kit.py",
)
#: Bumped when what the workers record changes (the cache keys on it, not on this file's text).
CACHE_VERSION = 3


# ------------------------------------------------------------------------------------------ calibration
def _calibration_kernels():
    """Two kernels whose figures are known: a coalesced copy (every warp access reads whole sectors: an
    estimate near 1) and a column-order copy of a row-major matrix (each program walks a column with a 1-D
    tile, so every lane of a load touches its own sector: about 1/8 of x's sectors used in fp32)."""
    import triton
    import triton.language as tl

    @triton.jit
    def copy_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < N), mask=offs < N)

    @triton.jit
    def column_copy_kernel(x_ptr, out_ptr, M, N, BLOCK: tl.constexpr):
        col = tl.program_id(0)
        rows = tl.arange(0, BLOCK)
        v = tl.load(x_ptr + rows * N + col, mask=rows < M)
        tl.store(out_ptr + col * M + rows, v, mask=rows < M)

    return copy_kernel, column_copy_kernel


copy_kernel, column_copy_kernel = _calibration_kernels()


def calibration_cases(dtype: str = "fp32") -> list[Case]:
    """The two calibration kernels (:func:`_calibration_kernels`) on a 1024 x 256 matrix."""
    m, n = 1024, 256
    t = (("x", (m, n), "in"), ("out", (m, n), "out"))
    args = (("tensor", 0), ("tensor", 1))
    return [
        Case(
            "copy",
            "calibration",
            "calibration",
            "1024x256",
            dtype,
            "attn_export.bench.kernels:copy_kernel",
            _sig(("x_ptr", "out_ptr"), dtype, ("N",)),
            (("BLOCK", 1024),),
            "attn_export.bench.kernels:copy_kernel",
            (*args, ("int", m * n)),
            (("BLOCK", 1024),),
            t,
            m * n // 1024,
        ),
        Case(
            "column_copy",
            "calibration",
            "calibration",
            "1024x256",
            dtype,
            "attn_export.bench.kernels:column_copy_kernel",
            _sig(("x_ptr", "out_ptr"), dtype, ("M", "N")),
            (("BLOCK", 1024),),
            "attn_export.bench.kernels:column_copy_kernel",
            (*args, ("int", m), ("int", n)),
            (("BLOCK", 1024),),
            t,
            n,
        ),
    ]


# ------------------------------------------------------------------------------------------ workers
def _kernel_modules() -> dict:
    """The modules whose kernels the report compiles, by name (imported here, statically: the
    architecture checks follow them)."""
    from attn_export.plugins.dynamic_conv import cuda_kernel as conv_ck
    from attn_export.plugins.dynamic_conv import trt_plugin as conv_trt
    from attn_export.plugins.involution import cuda_kernel as inv_ck
    from attn_export.plugins.involution import trt_plugin as inv_trt
    from attn_export.plugins.outlook import cuda_kernel as out_ck
    from attn_export.plugins.outlook import trt_plugin as out_trt

    modules = (conv_ck, conv_trt, inv_ck, inv_trt, out_ck, out_trt, sys.modules[__name__])
    found = {m.__name__: m for m in modules}
    found["attn_export.bench.kernels"] = sys.modules[__name__]
    return found


def _resolve(spec: str):
    """``"module:attr"`` (``"module:attr()"``: its result) among :func:`_kernel_modules`."""
    module, attr = spec.split(":")
    if attr.endswith("()"):
        return getattr(_kernel_modules()[module], attr[:-2])()
    return getattr(_kernel_modules()[module], attr)


def _ptxas_report(ptx: str, arch: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run(
            [ptxas, "-v", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}", str(src), "-o", str(Path(tmp) / "k.o")],
            capture_output=True,
            text=True,
            timeout=300,
        )
    log = proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {log.strip()[:300]}")

    def num(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return {
        "registers": num(r"Used (\d+) registers"),
        "spill_bytes": num(r"(\d+) bytes spill stores"),
        "spill_load_bytes": num(r"(\d+) bytes spill loads"),
        "stack_bytes": num(r"(\d+) bytes stack frame"),
    }


def _jit_attrs(case: Case, fn) -> dict:
    """What a JIT launch specialises (an op kernel's launcher, not the TensorRT AOT entries, which
    :func:`attn_export.plugins._trt_kit.compile_aot` compiles without): pointers 16-byte aligned (torch
    allocations are) and int arguments divisible by 16 when the realistic shape's value is."""
    if case.role == "aot":
        return {}
    names = list(fn.arg_names)
    values = dict(zip((n for n, _ in case.signature), (None,) * len(case.signature), strict=True))
    ints = [v for kind, v in case.trace_args if kind == "int"]
    int_names = [n for n, t in case.signature if t == "i32"]
    values.update(dict(zip(int_names, ints, strict=False)))
    attrs = {}
    for name, typ in case.signature:
        if typ.startswith("*") or (typ == "i32" and values.get(name) and values[name] % 16 == 0):
            attrs[(names.index(name),)] = [["tt.divisibility", 16]]
    return attrs


def compile_one(case: Case, arch: str) -> dict:
    """Compile ``case`` for ``arch`` (no GPU): ptxas figures, shared memory, TTGIR memory ops, PTX loads."""
    import triton
    from triton.backends.compiler import GPUTarget

    fn = _resolve(case.compile_fn)
    ce = dict(case.constexprs)
    sig = dict(case.signature)
    sig.update(dict.fromkeys(ce, "constexpr"))
    t0 = time.perf_counter()
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=ce, attrs=_jit_attrs(case, fn))
    options = {"num_warps": case.num_warps, "num_stages": case.num_stages}
    compiled = triton.compile(src, target=GPUTarget("cuda", ARCHS[arch], 32), options=options)
    compile_s = time.perf_counter() - t0
    ptx = compiled.asm["ptx"]
    result = {"compile_s": round(compile_s, 2), "shared_bytes": int(compiled.metadata.shared)}
    result.update(_ptxas_report(ptx, ARCHS[arch]))
    result["memory_ops"] = memory_ops(compiled.asm["ttgir"])
    result["ptx_loads"] = ptx_load_counts(ptx)
    result["triton"] = triton.__version__
    return result


def trace_one(case: Case, programs: int = SAMPLE_PROGRAMS) -> list[dict]:
    """Run sample programs of ``case`` in the interpreter (needs ``TRITON_INTERPRET=1``): per program, the
    accesses in execution order, ``{file, line, kind, tensor, offsets, mask, elem_bytes}``."""
    import numpy as np
    import torch
    import triton.runtime.interpreter as interp

    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[case.dtype]
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(shape, generator=gen).to(dt) for _, shape, _ in case.tensors]
    bases = [(t.data_ptr(), t.numel() * t.element_size(), i) for i, t in enumerate(tensors)]
    args = [tensors[v] if kind == "tensor" else v for kind, v in case.trace_args]
    n = case.grid1
    pids = sorted({round(i * (n - 1) / max(programs - 1, 1)) for i in range(min(programs, n))})
    fn = _resolve(case.trace_fn)
    kernel_files = {str(_ROOT / "plugins"), inspect.getsourcefile(getattr(fn, "fn", fn)) or str(_ROOT / "plugins")}
    per_program: list[list[dict]] = [[] for _ in pids]
    state = {"i": 0}

    def record(kind, ptrs, mask, elem_bytes):
        addr = ptrs.data.astype(np.int64)
        frame = sys._getframe(2)
        while frame is not None and not any(frame.f_code.co_filename.startswith(k) for k in kernel_files):
            frame = frame.f_back
        if frame is None or addr.ndim == 0 or addr.size < 2:
            return
        first = int(addr.reshape(-1)[0])
        tensor = next((i for base, size, i in bases if base <= first < base + size), None)
        if tensor is None:  # masked lanes may point anywhere: use any in-range lane
            inside = [(i, base) for base, size, i in bases if ((addr >= base) & (addr < base + size)).any()]
            if not inside:
                return
            tensor = inside[0][0]
        base = bases[tensor][0]
        per_program[state["i"]].append(
            {
                "file": frame.f_code.co_filename,
                "line": frame.f_lineno,
                "kind": kind,
                "tensor": tensor,
                "offsets": addr - base,
                "mask": np.broadcast_to(mask.data, addr.shape).astype(bool).copy(),
                "elem_bytes": elem_bytes,
            }
        )

    builder = interp.InterpreterBuilder
    orig_load, orig_store, orig_idx = builder.create_masked_load, builder.create_masked_store, builder.set_grid_idx
    orig_dim = builder.set_grid_dim

    def load(self, ptrs, mask, other, *a):
        record("load", ptrs, mask, 0)
        return orig_load(self, ptrs, mask, other, *a)

    def store(self, ptrs, value, mask, *a):
        record("store", ptrs, mask, 0)
        return orig_store(self, ptrs, value, mask, *a)

    def set_idx(self, x, y, z):
        state["i"] = x
        return orig_idx(self, pids[x], y, z)

    def set_dim(self, x, y, z):  # the programs run are a sample of the whole grid
        return orig_dim(self, n, y, z)

    builder.create_masked_load, builder.create_masked_store = load, store
    builder.set_grid_idx, builder.set_grid_dim = set_idx, set_dim
    try:
        fn[(len(pids),)](*args, **dict(case.trace_constexprs))
    finally:
        builder.create_masked_load, builder.create_masked_store = orig_load, orig_store
        builder.set_grid_idx, builder.set_grid_dim = orig_idx, orig_dim
    for accesses in per_program:
        for a in accesses:
            a["elem_bytes"] = tensors[a["tensor"]].element_size()
    return [{"pid": pid, "accesses": acc} for pid, acc in zip(pids, per_program, strict=True)]


def _worker(argv: list[str]) -> int:
    """``python -m attn_export.bench.kernels --worker compile|trace JOBS.json OUT``."""
    import pickle

    mode, jobs_path, out_path = argv
    jobs = json.loads(Path(jobs_path).read_text())
    results = {}
    for job in jobs:
        case = Case(**{k: _tuplify(v) for k, v in job["case"].items()})
        try:
            results[job["id"]] = compile_one(case, job["arch"]) if mode == "compile" else trace_one(case)
        except Exception as e:  # one kernel that fails is a row, not the end of the report
            text = str(e).strip().splitlines()
            results[job["id"]] = {"error": f"{type(e).__name__}: {text[0][:300] if text else ''}"}
        Path(out_path).write_bytes(pickle.dumps(results))
    return 0


def _tuplify(v):
    if isinstance(v, list):
        return tuple(_tuplify(x) for x in v)
    return v


# ------------------------------------------------------------------------------------------ report
@dataclass
class KernelRow:
    kernel: str
    op: str
    role: str
    label: str
    dtype: str
    arch: str
    registers: int | None = None
    spill_bytes: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    warp_along_contiguous: bool | None = None
    vectorized_loads: bool | None = None
    est_hbm_fraction: float | None = None
    min_bytes: int | None = None
    moved_bytes: int | None = None
    compile_s: float | None = None
    ptx_loads: dict = field(default_factory=dict)
    accesses: list = field(default_factory=list)  # per source line: layout, sectors, contiguity
    triton: str = ""
    error: str = ""
    cached: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def cache_dir() -> Path:
    """``$ATTN_EXPORT_KERNEL_CACHE_DIR``, else ``~/.cache/attn-export/kernel-report`` (``$XDG_CACHE_HOME``
    honoured). Not ``ATTN_EXPORT_CACHE_DIR``: that is the service's export cache (its settings)."""
    own = os.environ.get("ATTN_EXPORT_KERNEL_CACHE_DIR")
    if own:
        return Path(own)
    root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "attn-export")
    return Path(root) / "kernel-report"


def _source_hash() -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    for rel in _SOURCES:
        path = _ROOT / rel
        h.update(rel.encode())
        h.update(path.read_bytes() if path.exists() else b"")
    return h.hexdigest()[:16]


def _case_id(case: Case, arch: str, version: str, sources: str) -> str:
    text = json.dumps([dataclasses.astuple(case), arch, version, sources], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def analyse(case: Case, arch: str, compiled: dict, traced: list[dict]) -> KernelRow:
    """A :class:`KernelRow` from one compiled kernel and its traced programs."""
    row = KernelRow(case.kernel, case.op, case.role, case.label, case.dtype, arch)
    if "error" in compiled or (isinstance(traced, dict) and "error" in traced):
        row.error = compiled.get("error") or traced.get("error")  # type: ignore[union-attr]
        return row
    for k in ("registers", "spill_bytes", "stack_bytes", "shared_bytes", "compile_s", "ptx_loads", "triton"):
        setattr(row, k, compiled[k])
    loads = compiled["ptx_loads"]
    vec = loads.get("ld_v2", 0) + loads.get("ld_v4", 0) + loads.get("cp_async_8", 0) + loads.get("cp_async_16", 0)
    row.vectorized_loads = vec > 0
    by_line: dict[tuple[str, int], list[dict]] = {}
    for op in compiled["memory_ops"]:  # by file (its folder and name: a cached compile may name another checkout)
        by_line.setdefault((_short(op["file"]), op["line"]), []).append(op)
    numel = [_prod(shape) for _, shape, _ in case.tensors]
    sectors = 0
    sites: dict[tuple, dict] = {}
    along = True
    unmatched: set[str] = set()
    for program in traced:
        for acc in program["accesses"]:
            ops = by_line.get((_short(acc["file"]), acc["line"]), [])
            ops = [o for o in ops if tuple(o["shape"]) == acc["offsets"].shape]
            site = (Path(acc["file"]).name, acc["line"], acc["kind"])
            if not ops:  # not found in the compiled kernel: the row says so (an error, not a guess)
                unmatched.add(f"{Path(acc['file']).name}:{acc['line']}")
                sites.setdefault(
                    site,
                    {
                        "site": f"{site[0]}:{site[1]}",
                        "kind": acc["kind"],
                        "layout": "unmatched",
                        "sectors": 0,
                        "ideal": 0,
                    },
                )
                continue
            layout = parse_encoding(ops[0]["encoding"], ops[0]["encoding_defs"])
            if layout is None:
                unmatched.add(f"{Path(acc['file']).name}:{acc['line']} (layout {ops[0]['encoding'][:40]})")
                continue
            cost = access_cost(acc["offsets"], acc["mask"], layout, case.num_warps, acc["elem_bytes"])
            sectors += cost["sectors"]
            info = sites.setdefault(
                site,
                {
                    "site": f"{site[0]}:{site[1]}",
                    "kind": acc["kind"],
                    "tensor": case.tensors[acc["tensor"]][0],
                    "layout": ops[0]["encoding"],
                    "sectors": 0,
                    "ideal": 0,
                    "along_contiguous": True,
                },
            )
            info["sectors"] += cost["sectors"]
            info["ideal"] += _ideal_sectors(acc)
            if numel[acc["tensor"]] >= LARGE and acc["mask"].sum() > 1:
                ok = cost["contiguous_axis"] is not None and cost["lane_axis"] == cost["contiguous_axis"]
                info["along_contiguous"] = info["along_contiguous"] and ok
                along = along and ok
    per_program = sectors / max(len(traced), 1)
    row.moved_bytes = int(per_program * case.grid1 * BATCH * SECTOR)
    bytes_each = {"fp32": 4, "fp16": 2, "bf16": 2}[case.dtype]
    row.min_bytes = sum(numel) * BATCH * bytes_each
    row.est_hbm_fraction = round(row.min_bytes / row.moved_bytes, 4) if row.moved_bytes else None
    row.warp_along_contiguous = along
    row.accesses = sorted(sites.values(), key=lambda s: s["site"])
    if unmatched:
        row.error = f"accesses not found among the compiled loads/stores: {', '.join(sorted(unmatched))}"
    return row


def _short(path: str) -> str:
    p = Path(path)
    return f"{p.parent.name}/{p.name}"


def _ideal_sectors(acc) -> int:
    import numpy as np

    return int(np.unique(acc["offsets"][acc["mask"]] // SECTOR).size)


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _run_workers(mode: str, jobs: list[dict], n_procs: int, env: dict, timeout_s: float) -> dict:
    import pickle

    if not jobs:
        return {}
    chunks = [jobs[i::n_procs] for i in range(n_procs) if jobs[i::n_procs]]
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, chunk in enumerate(chunks):
            jp, op = Path(tmp) / f"{mode}{i}.json", Path(tmp) / f"{mode}{i}.pkl"
            jp.write_text(json.dumps(chunk))
            cmd = [sys.executable, "-m", "attn_export.bench.kernels", "--worker", mode, str(jp), str(op)]
            procs.append((subprocess.Popen(cmd, env=env, cwd=str(_ROOT), stderr=subprocess.PIPE, text=True), op))
        results: dict = {}
        deadline = time.monotonic() + timeout_s
        for proc, out in procs:
            try:
                _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if out.exists():
                results.update(pickle.loads(out.read_bytes()))
            if proc.returncode not in (0, None) and not out.exists():
                tail = (err or "").strip().splitlines()[-1:] or [""]
                raise RuntimeError(f"the {mode} worker failed: {tail[0][:300]}")
    return results


def _load_cached(path: Path):
    import pickle

    try:
        return pickle.loads(path.read_bytes())
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError):
        return None


def _store_cached(path: Path, value) -> None:
    import pickle

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(pickle.dumps(value))
    os.replace(tmp, path)


def report(
    archs: Sequence[str] = ("sm_90", "sm_80"),
    dtypes: Sequence[str] = DTYPES,
    ops: Sequence[str] | None = None,
    jobs: int | None = None,
    use_cache: bool = True,
    timeout_s: float = 1800.0,
    only: Sequence[Case] | None = None,
) -> list[KernelRow]:
    """The kernel report's rows: every case of :func:`cases` (or ``only`` these) compiled for each of
    ``archs``. Compiled results and traces are cached separately (:func:`cache_dir`); a failure is a row
    with ``error``."""
    import threading

    import triton

    version = triton.__version__
    sources = _source_hash()
    all_cases = list(only) if only is not None else cases(dtypes, ops)
    cdir = cache_dir()

    def cpath(case, arch):
        return cdir / f"c-{_case_id(case, arch, version, sources)}.pkl"

    def tpath(case):
        return cdir / f"t-{hashlib.sha256((case.trace_key() + version + sources).encode()).hexdigest()[:24]}.pkl"

    compiled: dict = {}
    traced: dict = {}
    compile_todo, trace_todo = [], {}
    for case in all_cases:
        for arch in archs:
            hit = _load_cached(cpath(case, arch)) if use_cache else None
            if hit is None:
                compile_todo.append((case, arch))
            else:
                compiled[(case, arch)] = hit
        hit = _load_cached(tpath(case)) if use_cache else None
        if hit is None:
            trace_todo[case.trace_key()] = case
        else:
            traced[case.trace_key()] = hit
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = str(_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    n = jobs or max(1, min(os.cpu_count() or 1, 8))
    c_jobs = [{"id": str(i), "case": dataclasses.asdict(c), "arch": a} for i, (c, a) in enumerate(compile_todo)]
    t_cases = list(trace_todo.values())
    t_jobs = [{"id": str(i), "case": dataclasses.asdict(c), "arch": ""} for i, c in enumerate(t_cases)]
    box: dict = {}

    # The interpreter traces run beside the compiles: one process on a small machine, and on a large one
    # (a lent GPU's 16 cores) half as many as compile, so that tracing is not the one slow lane.
    n_trace = max(1, n // 2)

    def run_trace():
        try:
            box["t"] = _run_workers("trace", t_jobs, n_trace, dict(env, TRITON_INTERPRET="1"), timeout_s)
        except Exception as e:  # reported per row below
            box["t_error"] = f"{type(e).__name__}: {e}"

    thread = threading.Thread(target=run_trace)
    thread.start()
    try:
        c_out = _run_workers("compile", c_jobs, n, env, timeout_s)
    finally:
        thread.join()
    for i, (case, arch) in enumerate(compile_todo):
        result = c_out.get(str(i), {"error": "not compiled (worker stopped)"})
        compiled[(case, arch)] = result
        if "error" not in result:
            _store_cached(cpath(case, arch), result)
    for i, case in enumerate(t_cases):
        result = box.get("t", {}).get(str(i), {"error": box.get("t_error", "not traced (worker stopped)")})
        traced[case.trace_key()] = result
        if not (isinstance(result, dict) and "error" in result):
            _store_cached(tpath(case), result)
    rows = []
    fresh = set(compile_todo)
    for case in all_cases:
        for arch in archs:
            row = analyse(case, arch, compiled[(case, arch)], traced[case.trace_key()])
            row.cached = (case, arch) not in fresh
            rows.append(row)
    return rows


JSON_FIELDS = (
    "kernel",
    "op",
    "role",
    "label",
    "dtype",
    "arch",
    "registers",
    "spill_bytes",
    "stack_bytes",
    "shared_bytes",
    "warp_along_contiguous",
    "vectorized_loads",
    "est_hbm_fraction",
    "min_bytes",
    "moved_bytes",
    "compile_s",
    "ptx_loads",
    "triton",
    "error",
)


def format_table(rows: Sequence[KernelRow]) -> str:
    head = (
        "kernel",
        "role",
        "shape",
        "dtype",
        "arch",
        "regs",
        "spill B",
        "smem B",
        "warp||contig",
        "vec ld",
        "est HBM",
    )
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        if r.error:
            lines.append(" | ".join((r.kernel, r.role, r.label, r.dtype, r.arch, "error: " + r.error[:80])))
            continue
        lines.append(
            " | ".join(
                (
                    r.kernel,
                    r.role,
                    r.label,
                    r.dtype,
                    r.arch,
                    str(r.registers),
                    str(r.spill_bytes),
                    str(r.shared_bytes),
                    "yes" if r.warp_along_contiguous else "NO",
                    "yes" if r.vectorized_loads else "no",
                    f"{r.est_hbm_fraction:.2f}" if r.est_hbm_fraction is not None else "-",
                )
            )
        )
    return "\n".join("| " + line + " |" for line in lines)


def format_accesses(rows: Sequence[KernelRow]) -> str:
    """Per kernel and access site: the layout, sectors moved against the ideal, contiguity."""
    out = []
    for r in rows:
        if r.error or r.arch != "sm_90":
            continue
        out.append(f"{r.kernel} {r.label} {r.dtype} {r.arch}")
        for a in r.accesses:
            eff = a["ideal"] / a["sectors"] if a.get("sectors") else 0.0
            flag = "" if a.get("along_contiguous", True) else "  <- warp not along the contiguous axis"
            out.append(
                f"  {a['site']:<22} {a['kind']:<5} {a.get('tensor', ''):<7} sector efficiency {eff:5.2f}  "
                f"{a['layout']}{flag}"
            )
    return "\n".join(out)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="attn-export kernels",
        description="Compile every Triton kernel of the ops (and the TensorRT AOT entries) for sm_90/sm_80 on the "
        "CPU at realistic shapes and report registers, spills, shared memory, layouts, vector loads and an "
        "estimated fraction of HBM bandwidth (see docs/benchmarks.md, 'Kernel report').",
    )
    p.add_argument("--arch", action="append", choices=sorted(ARCHS), help="target (repeatable; default both)")
    p.add_argument("--dtype", action="append", choices=DTYPES, help="dtype (repeatable; default all three)")
    p.add_argument("--op", action="append", choices=("involution", "outlook", "dynamic_conv"), help="only these ops")
    p.add_argument("--json", action="store_true", help="one JSON object per compiled kernel")
    p.add_argument("--accesses", action="store_true", help="also list every access site's layout and efficiency")
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: the CPU count, at most 8)")
    p.add_argument("--no-cache", action="store_true", help="recompile everything (the cache is rewritten)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return _worker(argv[1:])
    args = parser().parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError:
        print("attn-export kernels: error: Triton is not installed (pip install triton)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rows = report(args.arch or ("sm_90", "sm_80"), args.dtype or DTYPES, args.op, args.jobs, not args.no_cache)
    elapsed = time.perf_counter() - t0
    if args.json:
        for r in rows:
            print(json.dumps({k: getattr(r, k) for k in JSON_FIELDS}))
    else:
        print(format_table(rows))
        if args.accesses:
            print()
            print(format_accesses(rows))
    fresh = [r for r in rows if not r.cached]
    compile_total = sum(r.compile_s or 0.0 for r in fresh)
    print(
        f"attn-export kernels: {len(rows)} kernels in {elapsed:.1f} s (triton {rows[0].triton if rows else '?'}; "
        f"cache {cache_dir()}; {len(fresh)} compiled now, {compile_total:.0f} s of compilation)",
        file=sys.stderr,
    )
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
