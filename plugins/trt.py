"""The TensorRT plugins of the attn-export ops: registration and the helpers they share.

Each op has a ``tensorrt.plugin`` (quickly deployable Python plugin) definition in
``attn_export.plugins.<op>.trt_plugin``: the output shape as shape expressions, a JIT implementation
that launches the op's Triton kernel from Python on TensorRT's stream, an autotune declaration (fp32
and fp16, linear layout) and, on TensorRT >= 10.9, an ahead-of-time (AOT) implementation that hands
TensorRT the kernel's PTX so that an engine runs without Python (e.g. under ``trtexec``).

Nothing here imports TensorRT (or Triton) at import time: :func:`register_trt_plugins` imports them
when called, and importing :mod:`attn_export.plugins` never does.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from attn_export.plugins._trt_names import NAMESPACE, PLUGINS

#: Oldest TensorRT with ``tensorrt.plugin`` (quickly deployable Python plugins).
MIN_VERSION = (10, 6)
#: Oldest TensorRT with ``tensorrt.plugin.aot_impl`` (engines that run without Python).
AOT_MIN_VERSION = (10, 9)
#: The plugin modules, one per op (``attn_export.plugins.<op>.trt_plugin``).
PLUGIN_MODULES = {
    "involution2d": "attn_export.plugins.involution.trt_plugin",
    "dynamic_conv2d": "attn_export.plugins.dynamic_conv.trt_plugin",
    "outlook_aggregate": "attn_export.plugins.outlook.trt_plugin",
}
#: Environment variable: PTX ISA version of the AOT kernels (e.g. ``84`` for PTX 8.4), for drivers
#: older than the PTX that Triton's bundled toolchain writes by default.
PTX_VERSION_ENV = "ATTN_EXPORT_AOT_PTX_VERSION"
#: Warps per program of every attn-export kernel (the Triton launchers use 4).
NUM_WARPS = 4

_INSTALL_HINT = (
    "pip install tensorrt (TensorRT >= 10.6 for the Python plugins, >= 10.9 for AOT plugins that run "
    "without Python) on a Linux machine with an NVIDIA GPU and driver"
)

_lock = threading.Lock()
_mode: str | None = None


class TensorRTError(RuntimeError):
    """TensorRT is missing, too old, or refused a plugin; the message says which and what to do."""


# ------------------------------------------------------------------------------------------ versions
def parse_version(text: str) -> tuple[int, ...]:
    """``"10.9.0.34"`` -> ``(10, 9, 0, 34)`` (non-numeric tails such as ``rc1`` are dropped)."""
    parts = []
    for piece in str(text).split("."):
        digits = re.match(r"\d+", piece)
        if not digits:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


def _import_tensorrt():
    """``tensorrt``, or :class:`TensorRTError` saying it is missing or broken."""
    try:
        import tensorrt
    except ModuleNotFoundError as e:
        if e.name == "tensorrt":
            raise TensorRTError(f"TensorRT is not installed (no module named 'tensorrt'): {_INSTALL_HINT}") from e
        raise TensorRTError(f"TensorRT is installed but cannot be imported ({e}): {_INSTALL_HINT}") from e
    except Exception as e:  # the PyPI stub wheels and missing CUDA libraries fail here
        raise TensorRTError(
            f"TensorRT is installed but cannot be imported ({type(e).__name__}: {e}): {_INSTALL_HINT}"
        ) from e
    return tensorrt


def tensorrt_version() -> tuple[int, ...] | None:
    """The installed TensorRT's version, or None where it cannot be imported. Imports TensorRT."""
    try:
        return parse_version(_import_tensorrt().__version__)
    except TensorRTError:
        return None


def tensorrt_available() -> bool:
    """Whether a TensorRT with the Python plugin API (>= 10.6) can be imported. Imports TensorRT."""
    version = tensorrt_version()
    if version is None or version[:2] < MIN_VERSION:
        return False
    return importlib.util.find_spec("tensorrt.plugin") is not None


def aot_supported(trt=None) -> bool:
    """Whether this TensorRT offers ``tensorrt.plugin.aot_impl`` (>= 10.9). Imports TensorRT."""
    trt = trt or _import_tensorrt()
    return parse_version(trt.__version__)[:2] >= AOT_MIN_VERSION and hasattr(trt, "QuickPluginCreationRequest")


# ------------------------------------------------------------------------------------------ registration
def register_trt_plugins(aot: bool | None = None) -> str:
    """Register the three attn-export plugins with TensorRT's plugin registry; return the plugin mode.

    ``aot=None`` registers the AOT implementations too where TensorRT supports them (>= 10.9), and the
    mode is ``"aot"``; ``aot=False`` registers the JIT (Python) implementations only (``"jit"``);
    ``aot=True`` insists on AOT. Idempotent and thread-safe: later calls return the mode of the first
    (a later ``aot=True`` call after a JIT-only one adds the AOT implementations).

    Raises :class:`TensorRTError` where TensorRT is missing, older than 10.6, or lacks AOT support that
    ``aot=True`` asks for.
    """
    global _mode
    with _lock:
        if _mode is not None and (aot is not True or _mode == "aot"):
            return _mode
        trt = _import_tensorrt()
        version = parse_version(trt.__version__)
        if version[:2] < MIN_VERSION:
            raise TensorRTError(
                f"TensorRT {trt.__version__} is too old: the attn-export plugins use tensorrt.plugin, "
                f"TensorRT >= {MIN_VERSION[0]}.{MIN_VERSION[1]}: {_INSTALL_HINT}"
            )
        can_aot = aot_supported(trt)
        if aot and not can_aot:
            raise TensorRTError(
                f"TensorRT {trt.__version__} has no AOT Python plugins (tensorrt.plugin.aot_impl needs "
                f"TensorRT >= {AOT_MIN_VERSION[0]}.{AOT_MIN_VERSION[1]}); upgrade, or use JIT plugins (aot=False)"
            )
        use_aot = can_aot if aot is None else bool(aot)
        try:
            importlib.import_module("tensorrt.plugin")
        except Exception as e:
            raise TensorRTError(f"TensorRT {trt.__version__}: tensorrt.plugin cannot be imported ({e})") from e
        for module in PLUGIN_MODULES.values():
            importlib.import_module(module).register(aot=use_aot)
        _mode = "aot" if use_aot else "jit"
        return _mode


def plugin_mode() -> str | None:
    """``"aot"`` or ``"jit"`` once :func:`register_trt_plugins` has run in this process, else None."""
    return _mode


def is_defined(trtp, name: str) -> bool:
    """Whether ``tensorrt.plugin`` already holds a definition of ``NAMESPACE::name`` (from any caller)."""
    namespace = getattr(trtp.op, NAMESPACE, None)
    return namespace is not None and hasattr(namespace, name)


def plugin_names() -> list[str]:
    """The plugin names (``op_type`` of the plugin nodes), in op order."""
    return list(PLUGINS.values())


# ------------------------------------------------------------------------------------------ shape expressions
# The plugins' shape logic is written against the operators ``tensorrt.plugin.ShapeExpr`` supports:
# indexing of the input's ``shape_expr``, and ``expr + int``, ``expr - int``, ``expr * int``,
# ``expr // int`` and the same with an expression on the right. There are no reflected operators
# (``2 * expr`` fails) and no truth value, so every helper keeps the expression on the left and never
# branches on it. Plain ints satisfy the same protocol, which is how the JIT path and the tests use it.
def add(expr, constant: int):
    """``expr + constant`` without a negative constant (written as a subtraction instead)."""
    return expr + constant if constant >= 0 else expr - (-constant)


def cdiv(expr, divisor: int):
    """``ceil(expr / divisor)`` for a positive int ``divisor``, using only ``+`` and ``//``."""
    return (expr + (divisor - 1)) // divisor


def conv_out(size, kernel, stride: int, padding: int, dilation: int):
    """``(size + 2*padding - dilation*(kernel - 1) - 1) // stride + 1`` (the ops' ``out_size``).

    ``size`` may be a shape expression; ``kernel`` an int or (for ``dynamic_conv2d``, whose kernel size
    is the weight's shape) a shape expression too.
    """
    if isinstance(kernel, int):
        return add(size, 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    return (add(size, 2 * padding + dilation - 1) - kernel * dilation) // stride + 1


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1), as ``triton.next_power_of_2``."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def static_dims(shape) -> tuple[int | None, ...]:
    """Concrete dims of a TensorRT shape, with None for the dynamic ones (-1)."""
    return tuple(int(d) if int(d) >= 0 else None for d in shape)


# ------------------------------------------------------------------------------------------ torch interop
def dtype_name(trt, dtype) -> str:
    """Triton's name of a TensorRT data type the plugins take: ``"fp32"`` or ``"fp16"``."""
    if dtype == trt.DataType.FLOAT:
        return "fp32"
    if dtype == trt.DataType.HALF:
        return "fp16"
    raise TensorRTError(f"attn-export plugins take fp32 or fp16 tensors, got {dtype}")


def as_torch(tensor):
    """A torch view of a ``tensorrt.plugin.Tensor`` (through its ``__cuda_array_interface__``)."""
    import torch

    return torch.as_tensor(tensor, device="cuda")


# ------------------------------------------------------------------------------------------ AOT kernels
@dataclass(frozen=True)
class AOTKernel:
    """An ahead-of-time compiled kernel as ``tensorrt.plugin.aot_impl`` returns it."""

    name: str
    ptx: bytes
    block_x: int
    shared_mem: int
    params: int


_ENTRY = re.compile(r"(\.entry\s+(?P<name>[\w$]+)\s*\()(?P<params>[^)]*)(\))")


def ptx_params(ptx: str) -> list[str]:
    """The parameter declarations of the (first) kernel entry of a PTX module."""
    m = _ENTRY.search(ptx)
    if not m:
        raise TensorRTError("no .entry found in the compiled PTX")
    return [p.strip() for p in m.group("params").split(",") if p.strip()]


def fit_ptx_params(ptx: str, keep: int, scratch_free: bool = True) -> str:
    """Drop the kernel entry's trailing parameters beyond the first ``keep``, if they are unused.

    TensorRT launches an AOT plugin kernel with exactly its inputs, its extra scalar arguments and its
    outputs. Triton (>= 3.3) appends hidden pointer parameters (global and profile scratch) that its own
    launcher fills; when the kernel needs no scratch memory they are never read, and removing them from
    the entry makes the PTX signature match what TensorRT passes. A parameter that the body does use,
    or a kernel that asks for scratch memory, is an error (TensorRT cannot provide it).
    """
    m = _ENTRY.search(ptx)
    if not m:
        raise TensorRTError("no .entry found in the compiled PTX")
    params = [p.strip() for p in m.group("params").split(",") if p.strip()]
    if len(params) < keep:
        raise TensorRTError(f"the compiled kernel takes {len(params)} parameters, TensorRT passes {keep}")
    if len(params) == keep:
        return ptx
    extra = params[keep:]
    names = [p.split()[-1] for p in extra]
    body = ptx[m.end() :]
    used = [n for n in names if re.search(rf"\b{re.escape(n)}\b", body)]
    if used or not scratch_free:
        raise TensorRTError(
            f"the compiled kernel needs {len(extra)} hidden parameter(s) ({', '.join(names)}) that a TensorRT "
            "AOT plugin cannot pass (Triton scratch memory); use the JIT plugins (aot=False)"
        )
    kept = ",\n\t".join(params[:keep])
    return ptx[: m.start("params")] + "\n\t" + kept + "\n" + ptx[m.end("params") :]


def _ptx_version_option() -> int | None:
    value = os.environ.get(PTX_VERSION_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise TensorRTError(f"{PTX_VERSION_ENV}={value!r}: expected the PTX ISA version as digits, e.g. 84 for 8.4")
    return int(value)


def compile_aot(
    entry,
    signature: Mapping[str, str],
    constexprs: Mapping[str, object],
    n_params: int,
    num_warps: int = NUM_WARPS,
    target=None,
) -> AOTKernel:
    """Compile a Triton kernel ahead of time for a TensorRT AOT plugin.

    ``entry`` is a ``triton.JITFunction`` whose parameters are, in order, the plugin's input pointers,
    its int32 scalars and its output pointers (TensorRT's launch order), then constexprs; ``signature``
    types the non-constexpr parameters (``"*fp32"``, ``"i32"``, ...). ``target`` is a
    ``triton.backends.compiler.GPUTarget`` (None: the current GPU). Returns the kernel's name, its PTX
    with exactly ``n_params`` parameters, and its launch block size and shared memory.
    """
    import triton
    from triton.runtime.jit import JITFunction

    if not isinstance(entry, JITFunction):
        raise TensorRTError(
            "AOT plugins need compiled Triton kernels, but TRITON_INTERPRET=1 made them interpreted; unset "
            "TRITON_INTERPRET in the process that builds the engine"
        )
    sig = dict(signature)
    sig.update({k: "constexpr" for k in constexprs})
    options: dict[str, object] = {"num_warps": num_warps}
    ptx_version = _ptx_version_option()
    if ptx_version is not None:
        options["ptx_version"] = ptx_version
    src = triton.compiler.ASTSource(fn=entry, signature=sig, constexprs=dict(constexprs))
    compiled = triton.compile(src, target=target, options=options)
    meta = compiled.metadata
    if getattr(meta, "launch_cooperative_grid", False) or getattr(meta, "launch_pdl", False) or meta.num_ctas != 1:
        raise TensorRTError(
            f"kernel {meta.name} needs a special launch (cooperative/PDL/clusters) TensorRT does not do"
        )
    scratch_free = not getattr(meta, "global_scratch_size", 0) and not getattr(meta, "profile_scratch_size", 0)
    ptx = fit_ptx_params(compiled.asm["ptx"], n_params, scratch_free)
    return AOTKernel(meta.name, ptx.encode(), int(meta.num_warps) * 32, int(meta.shared), n_params)


def launch_params(trtp, grid, kernel: AOTKernel):
    """``tensorrt.plugin.KernelLaunchParams`` for a 1-D grid of ``grid`` programs (a shape expression)."""
    params = trtp.KernelLaunchParams()
    params.grid_x = grid
    params.block_x = kernel.block_x
    params.shared_mem = kernel.shared_mem
    return params


def sym_args(trtp, values):
    """The kernel's int32 scalar arguments as ``tensorrt.plugin.SymIntExprs`` (each a ``SymInt32``)."""
    return trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in values])
