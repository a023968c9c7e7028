"""The measured sections of ``attn-export bench --device cuda``: rows for the ops, the blocks and the
shipped detector, each variant gated for correctness before it is timed (:func:`~attn_export.bench.measure.measure`).

``ops``
    The three dynamic kernels at the shapes of :func:`op_cases`, each in fp32, fp16 and bf16:
    the official code's formulation in eager PyTorch, ``torch.compile`` of it, our plain-torch
    reference and our Triton kernel. GB/s (the minimal bytes: inputs read once, output written once)
    for the memory-bound two, TFLOP/s for the convolution, with the fraction of the peak.
``blocks``
    The five blocks: the official-layout module (:mod:`attn_export.bench.upstream`) in eager and
    compiled, and ours with the official weights (as ``attn-export`` adapts them), with its Triton
    kernels and with the plain-torch reference kernels.
``detector``
    A detector checkpoint's images/s: eager, ``torch.compile(mode="reduce-overhead")`` (CUDA graphs), and
    onnxruntime's CUDA provider where it is installed.
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from attn_export.bench.measure import (
    BLOCK_REL_TOL,
    DTYPES,
    REL_TOL,
    Deadline,
    Row,
    gbps,
    join_notes,
    measure,
    reference_kernels,
    short_error,
    tensors,
    tflops,
    torch_dtype,
)
from attn_export.bench.specs import NotAdapted, official_and_ours, specs

DETECTOR_BATCHES = (1, 32, 128)
#: What "ours, CUDA op kernels" runs for each block's dynamic kernel.
BLOCK_KERNELS = {
    "involution": "involution2d: Triton",
    "outlook": "outlook_aggregate: Triton",
    "odconv": "dynamic_conv2d: cuDNN (the op's CUDA kernel)",
    "gsop": "no dynamic kernel",
    "skconv": "no dynamic kernel",
}


# ------------------------------------------------------------------------------------------ ops
@dataclass(frozen=True)
class OpCase:
    """One op at one shape."""

    op: str  # involution | dynamic_conv | outlook
    label: str
    b: int
    c: int
    h: int
    w: int
    k: int
    stride: int = 1
    groups: int = 1  # involution groups, conv groups, outlook heads
    cout: int = 0  # dynamic_conv only


def op_cases() -> list[OpCase]:
    """The op shapes the command times, those of ``attn-export kernels`` (issue 18's realistic shapes):
    involution B32 C256 56x56 k7 G16; dynamic conv B32 C256 28x28 k3; outlook B32 C384 12 heads 28x28 k3,
    at stride 1 and at VOLO's stride 2."""
    return [
        OpCase("involution", "involution B32 C256 56x56 k7 G16", 32, 256, 56, 56, 7, 1, 16),
        OpCase("dynamic_conv", "dynamic_conv B32 C256 28x28 k3", 32, 256, 28, 28, 3, 1, 1, 256),
        OpCase("outlook", "outlook B32 C384 m12 28x28 k3 s1", 32, 384, 28, 28, 3, 1, 12),
        OpCase("outlook", "outlook B32 C384 m12 28x28 k3 s2 (VOLO)", 32, 384, 28, 28, 3, 2, 12),
    ]


def op_inputs(case: OpCase, device: str, dtype, seed: int = 0):
    """Fresh random inputs (as the blocks produce them: softmaxed outlook attention)."""
    import torch

    from attn_export.plugins._taps import out_size

    g = torch.Generator(device=device).manual_seed(seed)
    k, s, p = case.k, case.stride, case.k // 2
    ho, wo = out_size(case.h, k, s, p, 1), out_size(case.w, k, s, p, 1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    x = rnd(case.b, case.c, case.h, case.w)
    if case.op == "involution":
        return x, rnd(case.b, case.groups, k * k, ho, wo)
    if case.op == "dynamic_conv":
        return x, rnd(case.b, case.cout, case.c // case.groups, k, k) / math.sqrt(case.c // case.groups * k * k)
    attn = torch.randn(case.b, case.groups, ho * wo, k * k, k * k, generator=g, device=device).softmax(-1)
    return x, attn.to(dtype)


def op_cost(case: OpCase, itemsize: int) -> tuple[int, float]:
    """``(minimal bytes, flops)``: inputs read once and the output written once; multiply-adds x 2."""
    from attn_export.plugins._taps import out_size

    k, s, p = case.k, case.stride, case.k // 2
    ho, wo = out_size(case.h, k, s, p, 1), out_size(case.w, k, s, p, 1)
    x = case.b * case.c * case.h * case.w
    if case.op == "involution":
        out, other = case.b * case.c * ho * wo, case.b * case.groups * k * k * ho * wo
        flops = 2.0 * out * k * k
    elif case.op == "dynamic_conv":
        out, other = case.b * case.cout * ho * wo, case.b * case.cout * (case.c // case.groups) * k * k
        flops = 2.0 * out * (case.c // case.groups) * k * k
    else:
        out, other = x, case.b * case.groups * ho * wo * k**4
        flops = 2.0 * case.b * case.c * ho * wo * k**4
    return (x + other + out) * itemsize, flops


def official_op(case: OpCase) -> Callable:
    """The op as the official code writes it (unfold/multiply/sum; batch-folded conv; unfold/matmul/fold)."""
    import torch.nn.functional as F

    k, s, p = case.k, case.stride, case.k // 2

    if case.op == "involution":  # d-li14/involution, involution_naive.py

        def involution(x, weight):
            b, c = x.shape[:2]
            g, ho, wo = weight.shape[1], weight.shape[3], weight.shape[4]
            cols = F.unfold(x, k, 1, p, s).view(b, g, c // g, k * k, ho, wo)
            return (weight.unsqueeze(2) * cols).sum(dim=3).view(b, c, ho, wo)

        return involution
    if case.op == "dynamic_conv":  # OSVAI/ODConv: the batch folded into the groups

        def dynamic_conv(x, weight):
            b, _, h, w = x.shape
            out = F.conv2d(
                x.reshape(1, -1, h, w), weight.reshape(-1, *weight.shape[2:]), None, s, p, 1, case.groups * b
            )
            return out.view(b, weight.shape[1], out.shape[-2], out.shape[-1])

        return dynamic_conv

    def outlook(v, attn):  # sail-sg/volo: unfold, attn @ v, fold
        b, c, h, w = v.shape
        heads, n = attn.shape[1], attn.shape[2]
        cols = F.unfold(v, k, 1, p, s).reshape(b, heads, c // heads, k * k, n).permute(0, 1, 4, 3, 2)
        y = (attn @ cols).permute(0, 1, 4, 3, 2).reshape(b, c * k * k, n)
        return F.fold(y, (h, w), k, 1, p, s)

    return outlook


def ours_op(case: OpCase, triton: bool | str, tf32: bool) -> Callable:
    """Our plain-torch reference, or our Triton kernel (dynamic conv: the autotuned implicit GEMM;
    involution: the op's default, and with ``triton="tiles"`` the tile kernel the TensorRT plugin runs)."""
    k, s, p = case.k, case.stride, case.k // 2
    if case.op == "involution":
        from attn_export.plugins.involution import op as inv

        if triton == "tiles":
            from attn_export.plugins.involution.cuda_kernel import involution2d_cuda_tiles

            return lambda x, wt: involution2d_cuda_tiles(x, wt, k, s, p, 1)

        if triton:
            from attn_export.plugins.involution.cuda_kernel import involution2d_cuda

            return lambda x, wt: involution2d_cuda(x, wt, k, s, p, 1)
        return lambda x, wt: inv.reference(x, wt, k, s, p, 1)
    if case.op == "dynamic_conv":
        from attn_export.plugins.dynamic_conv import op as dconv

        if triton:
            from attn_export.plugins.dynamic_conv.cuda_kernel import dynamic_conv2d_cuda

            return lambda x, wt: dynamic_conv2d_cuda(x, wt, (s, s), (p, p), (1, 1), case.groups, allow_tf32=tf32)
        return lambda x, wt: dconv.reference(x, wt, (s, s), (p, p), (1, 1), case.groups)
    from attn_export.plugins.outlook import op as outl

    if triton:
        from attn_export.plugins.outlook.cuda_kernel import outlook_aggregate_cuda

        return lambda v, a: outlook_aggregate_cuda(v, a, k, p, s)
    return lambda v, a: outl.reference(v, a, k, p, s)


def run_ops(
    cases: Sequence[OpCase],
    dtypes: Sequence[str],
    device: str,
    timer,
    deadline: Deadline,
    peaks: dict,
    compile_dtypes: Sequence[str] = DTYPES,
    triton: bool = True,
    only_compiled: bool = False,
    say: Callable[[str], None] = lambda m: None,
) -> list[Row]:
    """Each case in each dtype: official eager, compiled (``compile_dtypes``), our reference and Triton
    kernel. ``only_compiled``: the compiled variants alone (the second pass of a budgeted run)."""
    import torch

    rows: list[Row] = []
    for case in cases:
        ref_fn = ours_op(case, triton=False, tf32=False)
        for dt in dtypes:
            torch_dt = torch_dtype(dt)
            inputs = op_inputs(case, device, torch_dt)
            with torch.no_grad():
                ref = ref_fn(*(t.double() for t in inputs))
            nbytes, flops = op_cost(case, torch_dt.itemsize)
            # cuDNN (the official and reference convolutions) takes TF32 for fp32 unless torch forbids it;
            # our Triton convolution follows the same switch so the row compares like with like.
            tf32 = case.op == "dynamic_conv" and dt == "fp32" and bool(torch.backends.cudnn.allow_tf32)
            prec = "tf32" if tf32 else dt
            if case.op == "dynamic_conv":
                key = "matmul_tf32_tflops" if tf32 else f"matmul_{dt}_tflops"
                rate = tflops(flops, peaks.get(key))
            else:
                rate = gbps(nbytes, peaks.get("copy_gbps"))
            tol = REL_TOL[prec]
            label = f"{dt} (TF32)" if tf32 else dt
            official = official_op(case)
            variants: list[tuple[str, Callable]] = [] if only_compiled else [("official eager", official)]
            if dt in compile_dtypes:
                variants.append(("torch.compile(official)", torch.compile(official, dynamic=False)))
            if not only_compiled:
                variants.append(("ours, torch reference", ours_op(case, triton=False, tf32=tf32)))
                if triton:
                    variants.append(("ours, Triton", ours_op(case, triton=True, tf32=tf32)))
                if triton and case.op == "involution":  # the TensorRT plugin's kernel, beside the op's default
                    variants.append(("ours, Triton tiles (TensorRT plugin)", ours_op(case, triton="tiles", tf32=tf32)))
            if not variants:
                continue
            for variant, fn in variants:
                say(f"ops: {case.label} {label} {variant}")

                def call(fn=fn, inputs=inputs):
                    with torch.no_grad():
                        return fn(*inputs)

                rows.append(measure("ops", case.label, variant, label, call, ref, tol, timer, rate, deadline))
            del inputs, ref
    return rows


# ------------------------------------------------------------------------------------------ blocks
def run_blocks(
    names: Sequence[str],
    dtypes: Sequence[str],
    device: str,
    timer,
    deadline: Deadline,
    batch: int = 16,
    channels: int = 128,
    size: int = 56,
    compile_dtypes: Sequence[str] = ("fp32",),
    only_compiled: bool = False,
    say: Callable[[str], None] = lambda m: None,
) -> list[Row]:
    """Official module vs ours with its weights, eager and compiled (``compile_dtypes``), in each dtype;
    ``only_compiled``: the compiled variants alone."""
    import torch

    spec_map = specs(channels, size)
    rows: list[Row] = []
    for i, name in enumerate(names):
        spec = spec_map[name]
        # the official weights, through the exporter's adapters (checked exact there)
        sample = torch.randn(2, *spec.input_shape, generator=torch.Generator().manual_seed(i))
        try:
            official, ours = official_and_ours(spec, i, sample)
        except NotAdapted:
            rows.append(Row("blocks", name, "ours", "-", "error", note="the official module was not adapted"))
            continue
        note = (
            "" if spec.ours is None else "ours is a different function (SKConv): checked against its own float64 output"
        )
        x32 = torch.randn(batch, *spec.input_shape, generator=torch.Generator().manual_seed(100 + i)).to(device)
        with torch.no_grad():
            ref_official = copy.deepcopy(official).double().to(device)(x32.double())
            ref_ours = ref_official if spec.ours is None else copy.deepcopy(ours).double().to(device)(x32.double())
        for dt in dtypes:
            torch_dt = torch_dtype(dt)
            x = x32.to(torch_dt)
            off = copy.deepcopy(official).to(device=device, dtype=torch_dt)
            our = copy.deepcopy(ours).to(device=device, dtype=torch_dt)
            tol = BLOCK_REL_TOL[dt]

            def eager(m, x=x):
                def run():
                    with torch.no_grad():
                        return m(x)

                return run

            def with_reference_kernels(m, x=x):
                def run():
                    with torch.no_grad(), reference_kernels():
                        return m(x)

                return run

            if only_compiled and dt not in compile_dtypes:
                continue
            variants = [] if only_compiled else [("official eager", eager(off), ref_official, "")]
            if dt in compile_dtypes:
                variants.append(("torch.compile(official)", eager(torch.compile(off, dynamic=False)), ref_official, ""))
            kernels = BLOCK_KERNELS.get(name, "")
            if not only_compiled:
                variants += [
                    ("ours, CUDA op kernels", eager(our), ref_ours, join_notes(note, kernels)),
                    ("ours, torch reference kernels", with_reference_kernels(our), ref_ours, note),
                ]
            for variant, fn, ref, nt in variants:
                say(f"blocks: {name} {dt} {variant}")
                rows.append(measure("blocks", name, variant, dt, fn, ref, tol, timer, deadline=deadline, note=nt))
    return rows


# ------------------------------------------------------------------------------------------ detector
def run_detector(
    path: Path,
    device: str,
    timer,
    deadline: Deadline,
    batches: Sequence[int] = DETECTOR_BATCHES,
    modes: Sequence[str] = ("eager", "compiled", "ort"),
    say: Callable[[str], None] = lambda m: None,
) -> list[Row]:
    """Images/s of a checkpoint: eager, compiled with CUDA graphs, onnxruntime's CUDA provider (``modes``)."""
    import torch

    from attn_export.export import load_model

    rows: list[Row] = []
    try:
        loaded = load_model(path)
    except Exception as e:
        return [Row("detector", str(path), "load", "fp32", "error", note=short_error(e))]
    model = loaded.model
    model.eval()  # never chain on eval() (mmcv-style train() returns None)
    model = model.to(device)
    shape = tuple(loaded.input_shape or ())
    compiled_model = torch.compile(model, mode="reduce-overhead", dynamic=False) if "compiled" in modes else None
    ort_runner, ort_note = _ort_cuda(loaded, shape, max(batches)) if "ort" in modes else (None, "")
    for bs in batches:
        x = torch.rand(bs, *shape, generator=torch.Generator().manual_seed(bs)).to(device)
        with torch.no_grad():
            ref = model(x)

        def rate(ms, bs=bs):
            return "images/s", bs / (ms * 1e-3), None

        def eager(x=x):
            with torch.no_grad():
                return model(x)

        name = f"{path.name} batch {bs}"
        say(f"detector: batch {bs}")
        if "eager" in modes:
            rows.append(measure("detector", name, "torch eager", "fp32", eager, ref, 1e-4, timer, rate, deadline))
        if compiled_model is not None:

            def comp(x=x):
                with torch.no_grad():
                    out = compiled_model(x)
                return [t.clone() for t in tensors(out)]  # CUDA-graph outputs are overwritten by the next call

            rows.append(
                measure(
                    "detector", name, "torch.compile reduce-overhead", "fp32", comp, ref, 1e-3, timer, rate, deadline
                )
            )
        if "ort" in modes and ort_runner is None:
            rows.append(Row("detector", name, "onnxruntime CUDA", "fp32", "unavailable", note=ort_note))
        elif "ort" in modes:
            feeds = {ort_runner.input_names[0]: x.cpu().numpy()}

            def ort(feeds=feeds):
                return [torch.from_numpy(v) for v in ort_runner.infer(feeds).values()]

            ref_list = [t.cpu() for t in tensors(ref)]
            rows.append(
                measure("detector", name, "onnxruntime CUDA", "fp32", ort, ref_list, 1e-3, timer, rate, deadline)
            )
    return rows


def _ort_cuda(loaded, shape, max_batch: int):
    """An onnxruntime CUDA runner for the model (exported to a temporary file), or (None, why not)."""
    try:
        import onnxruntime as ort
    except Exception as e:
        return None, f"onnxruntime cannot be imported ({short_error(e)})"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None, "onnxruntime has no CUDA provider here (install onnxruntime-gpu)"
    try:
        from attn_export.export import export_onnx
        from attn_export.runtime.runners import OnnxRuntimeRunner

        with tempfile.TemporaryDirectory(prefix="attn-export-bench-cuda-") as tmp:
            res = export_onnx(
                copy.deepcopy(loaded.model).cpu(), Path(tmp) / "model.onnx", shape, (1, 1, max_batch), verify=False
            )
            runner = OnnxRuntimeRunner(res.path, providers=["CUDAExecutionProvider"])
        return runner, ""
    except Exception as e:
        return None, f"export or onnxruntime session failed ({short_error(e)})"
