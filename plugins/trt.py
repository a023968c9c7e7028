"""The TensorRT plugins of the attn-export ops: their registration, the public entry point.

Each op has a ``tensorrt.plugin`` (quickly deployable Python plugin) definition in
``attn_export.plugins.<op>.trt_plugin``, whose ``register`` defines:

- the output shape, from the inputs' shape expressions (``plan.output_shape``);
- ``impl`` (JIT): the op run from Python on TensorRT's stream (on CUDA its fastest kernel: Triton, or
  cuDNN where that is faster), its result written into TensorRT's output buffer (:func:`run_jit`,
  :func:`launch_op`);
- ``autotune``: fp32, fp16 or bf16 for all three tensors (and the network's own mixed input types),
  linear layout (:func:`autotune_combinations`);
- ``aot_impl`` (TensorRT >= 10.9): the op's Triton kernel compiled ahead of time to PTX, through an
  entry (``aot_entry``) whose parameters come in TensorRT's order (inputs, int32 scalars, output),
  with the 1-D grid and the scalars of the op's launch plan (``plugins/<op>/plan.py``, the plan the
  op's CUDA launcher uses too) as shape expressions of the batch, so that an engine runs without
  Python (e.g. under ``trtexec``).

The scaffolding the plugins share is :mod:`attn_export.plugins._trt_kit` (re-exported here where it is
public); each plugin module keeps only the signatures ``tensorrt.plugin`` reads. The plugins are those
of :mod:`attn_export.plugins.registry`, imported by :func:`register_trt_plugins` from the registry's
module paths.

Nothing here imports TensorRT (or Triton) at import time: :func:`register_trt_plugins` imports them
when called, and importing :mod:`attn_export.plugins` never does.
"""

from __future__ import annotations

import importlib
import importlib.util

from attn_export.plugins._trt_kit import (
    _INSTALL_HINT,
    LARGE_SHARED_ENV,
    NUM_WARPS,
    PTX_VERSION_ENV,
    STATIC_SHARED_LIMIT,
    TensorRTError,
    _import_tensorrt,
    _lock,
    check_shared_memory,
    compile_aot,
    cuda_array_interface,
    fit_ptx_params,
    parse_version,
    plugin_definition,
    ptx_params,
)
from attn_export.plugins.registry import OPS

__all__ = [
    "AOT_MIN_VERSION",
    "LARGE_SHARED_ENV",
    "MIN_VERSION",
    "NUM_WARPS",
    "PTX_VERSION_ENV",
    "STATIC_SHARED_LIMIT",
    "TensorRTError",
    "aot_supported",
    "check_shared_memory",
    "compile_aot",
    "cuda_array_interface",
    "fit_ptx_params",
    "parse_version",
    "plugin_definition",
    "plugin_mode",
    "ptx_params",
    "register_trt_plugins",
    "registered_implementations",
    "registered_mode",
    "tensorrt_available",
    "tensorrt_version",
]


#: Oldest TensorRT with ``tensorrt.plugin`` (quickly deployable Python plugins).
MIN_VERSION = (10, 6)
#: Oldest TensorRT with ``tensorrt.plugin.aot_impl`` (engines that run without Python).
AOT_MIN_VERSION = (10, 9)


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
    """Register the attn-export plugins with TensorRT's plugin registry; return the plugin mode.

    ``aot=None`` adds the AOT implementations where TensorRT supports them (>= 10.9); ``aot=False``
    registers the JIT (Python) implementations only; ``aot=True`` insists on AOT. Idempotent and
    thread-safe (a later ``aot=True`` call after a JIT-only one adds the AOT implementations).

    The mode returned is what is really registered (:func:`registered_mode`): ``"aot"`` only when every
    plugin has an AOT implementation in ``tensorrt.plugin``. A plugin that something else in this process
    already defined is left as it is and reported as it is: without an AOT implementation the mode is
    ``"jit"`` (TensorRT would silently create the JIT plugin), and ``aot=True`` raises.

    Raises :class:`TensorRTError` where TensorRT is missing, older than 10.6, or lacks AOT support that
    ``aot=True`` asks for.
    """
    with _lock:
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
            trtp = importlib.import_module("tensorrt.plugin")
        except Exception as e:
            raise TensorRTError(f"TensorRT {trt.__version__}: tensorrt.plugin cannot be imported ({e})") from e
        for spec in OPS:
            importlib.import_module(spec.trt_plugin).register(aot=use_aot)
        impls = registered_implementations(trtp)
        if aot and not all(i["aot"] for i in impls.values()):
            missing = sorted(n for n, i in impls.items() if not i["aot"])
            raise TensorRTError(
                f"AOT plugins were asked for, but {', '.join(missing)} was defined elsewhere in this process "
                "without an AOT implementation; TensorRT would run its JIT implementation"
            )
        return registered_mode(trtp)


def registered_implementations(trtp) -> dict[str, dict[str, bool]]:
    """``{plugin name: {"jit": bool, "aot": bool}}``: which implementations ``tensorrt.plugin`` holds."""
    out = {}
    for spec in OPS:
        pdef = plugin_definition(trtp, spec.plugin)
        out[spec.plugin] = {
            "jit": getattr(pdef, "impl_func", None) is not None,
            "aot": getattr(pdef, "aot_impl_func", None) is not None,
        }
    return out


def registered_mode(trtp=None) -> str | None:
    """``"aot"`` if every attn-export plugin has an AOT implementation registered, ``"jit"`` if every one
    has at least a JIT one, else None (not registered). Imports ``tensorrt.plugin`` when not given."""
    if trtp is None:
        try:
            trtp = importlib.import_module("tensorrt.plugin")
        except Exception:
            return None
    impls = registered_implementations(trtp).values()
    if all(i["aot"] for i in impls):
        return "aot"
    if all(i["jit"] or i["aot"] for i in impls):
        return "jit"
    return None


def plugin_mode() -> str | None:
    """The mode of the plugins registered in this process (:func:`registered_mode`), or None.

    Never imports TensorRT: None where ``tensorrt.plugin`` has not been imported yet.
    """
    import sys

    trtp = sys.modules.get("tensorrt.plugin")
    return registered_mode(trtp) if trtp is not None else None
