"""The card and the software that ``attn-export bench --device cuda`` measures: whether it can run here,
the device's name and the versions, and the peaks of this very run (a device-to-device copy in GB/s,
bytes read plus written; a large matmul in TFLOP/s in fp32, TF32, fp16 and bf16) that the other
sections are reported against.
"""

from __future__ import annotations

import os

from attn_export.bench.measure import Deadline, Row, measure, torch_dtype


def run_peaks(device: str, timer, deadline: Deadline, copy_mib: int = 1024, n: int = 8192) -> tuple[list[Row], dict]:
    """Copy bandwidth and matmul throughput on this device, now."""
    import torch

    rows: list[Row] = []
    peaks: dict[str, float] = {}
    src = torch.randn(copy_mib * 2**18, device=device)
    dst = torch.empty_like(src)
    nbytes = 2 * src.numel() * 4
    row = measure("peaks", f"copy {copy_mib} MiB", "dst.copy_(src)", "fp32", lambda: dst.copy_(src), src, 0.0, timer)
    if row.ms:
        row.metric, row.value = "GB/s", nbytes / (row.ms * 1e-3) / 1e9
        peaks["copy_gbps"] = row.value
    rows.append(row)
    src = dst = None  # free the copy buffers before the matmuls
    matmul = torch.backends.cuda.matmul
    for label, dt, tf32 in (
        ("fp32", "fp32", False),
        ("tf32", "fp32", True),
        ("fp16", "fp16", False),
        ("bf16", "bf16", False),
    ):
        a = torch.randn(n, n, device=device).to(torch_dtype(dt))
        b = torch.randn(n, n, device=device).to(torch_dtype(dt))
        saved = matmul.allow_tf32
        matmul.allow_tf32 = tf32
        try:
            ref = a[:64].double() @ b.double()
            row = measure(
                "peaks",
                f"matmul {n}^3",
                "torch.mm",
                label,
                lambda a=a, b=b: (a @ b)[:64],
                ref,
                2e-2,
                timer,
                deadline=deadline,
            )
            if row.ms:  # timed on the whole product; the slice above only keeps the check cheap
                row.ms = timer(lambda a=a, b=b: a @ b)
                row.metric, row.value = "TFLOP/s", 2 * n**3 / (row.ms * 1e-3) / 1e12
                peaks[f"matmul_{label}_tflops"] = row.value
        finally:
            matmul.allow_tf32 = saved
        rows.append(row)
    return rows, peaks


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def cuda_problem() -> str | None:
    """Why this machine cannot run the CUDA benchmark, or None."""
    import torch

    if not torch.cuda.is_available():
        return (
            "no CUDA device is visible to torch (torch.cuda.is_available() is False; this torch is "
            f"{torch.__version__}). The CUDA benchmark needs an NVIDIA GPU and a CUDA build of torch; "
            "without one, run `attn-export bench` (the CPU/onnxruntime benchmark)."
        )
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton): the kernels and the timer need it."
    if os.environ.get("TRITON_INTERPRET", "") not in ("", "0"):
        return "TRITON_INTERPRET is set: the CUDA benchmark times compiled kernels; unset it."
    return None


def versions() -> str:
    import torch

    try:
        import triton

        tv = triton.__version__
    except Exception:  # pragma: no cover - cuda_problem() checked it is there
        tv = "-"
    from attn_export import __version__

    return f"attn-export {__version__} | torch {torch.__version__} (CUDA {torch.version.cuda}) | triton {tv}"
