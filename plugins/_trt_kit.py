"""The scaffolding the TensorRT plugins of the ops share: what each ``plugins/<op>/trt_plugin.py`` calls
to define itself (:func:`register_plugin`), to pick its types (:func:`autotune_combinations`), to run its
JIT implementation on TensorRT's stream (:func:`run_jit`, :func:`launch_op`) and to compile and launch its
AOT kernel (:func:`compile_entry`, :func:`aot_launch`).

Registration of all the plugins, the public entry point, is :mod:`attn_export.plugins.trt`; it imports the
plugin modules, which import this one (never the other way round). Nothing here imports TensorRT or Triton
at import time.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from attn_export.plugins._trt_names import NAMESPACE, plugin_id
from attn_export.plugins.registry import BY_OP, NUM_WARPS

#: Environment variable: PTX ISA version of the AOT kernels (e.g. ``84`` for PTX 8.4), for drivers
#: older than the PTX that Triton's bundled toolchain writes by default.
PTX_VERSION_ENV = "ATTN_EXPORT_AOT_PTX_VERSION"
#: Shared memory (bytes) a kernel gets without ``cudaFuncSetAttribute(MaxDynamicSharedMemorySize)``.
STATIC_SHARED_LIMIT = 48 * 1024
#: Environment variable: ``1`` hands TensorRT Triton's PTX with its entry unmodified (hidden parameters
#: kept, as NVIDIA's sample does) instead of removing the unused hidden parameters; for trying on a GPU
#: which of the two TensorRT launches (``test_plugin_engine_matches_reference[aot-...]`` settles it).
KEEP_PTX_PARAMS_ENV = "ATTN_EXPORT_AOT_KEEP_PTX_PARAMS"
#: Environment variable: ``1`` lets AOT kernels that need more than 48 KiB of shared memory through
#: (whether TensorRT raises the limit for an AOT plugin kernel is not yet verified; see docs/tensorrt.md).
LARGE_SHARED_ENV = "ATTN_EXPORT_AOT_LARGE_SHARED"

_INSTALL_HINT = (
    "pip install tensorrt (TensorRT >= 10.6 for the Python plugins, >= 10.9 for AOT plugins that run "
    "without Python) on a Linux machine with an NVIDIA GPU and driver"
)

#: ``tensorrt.plugin`` type strings of the element types every plugin takes (inputs and output alike).
TYPES = ("FP32", "FP16", "BF16")

_lock = threading.RLock()


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


def plugin_definition(trtp, name: str):
    """``tensorrt.plugin``'s definition of ``NAMESPACE::name`` (its ``PluginDef``), or None."""
    namespace = getattr(trtp.op, NAMESPACE, None)
    return getattr(namespace, name, None) if namespace is not None else None


def plugin_constants(op: str, scalars: tuple[str, ...]) -> tuple[str, str, tuple[str, ...], int]:
    """``(name, id, attributes, n_params)`` of op ``op``'s plugin: its name and ``tensorrt.plugin`` id, its
    attributes in the registered signature's order (the ONNX node's too), and the number of parameters
    TensorRT passes to its AOT entry (2 inputs, the kernel's int32 ``scalars``, 1 output)."""
    spec = BY_OP[op]
    return spec.plugin, plugin_id(spec.plugin), spec.attribute_names, len(spec.inputs) + len(scalars) + 1


def register_plugin(module_name: str, name: str, define_jit, define_aot, aot: bool) -> None:
    """The ``register`` of every plugin module: define ``NAMESPACE::name`` (``define_jit(trt, trtp)``) unless
    ``tensorrt.plugin`` holds it already, and with ``aot`` add ``define_aot(trt, trtp)`` once.

    The state is ``tensorrt.plugin``'s own registry, not a flag here, so it cannot disagree with what
    TensorRT will create. A definition made by another module (same name, another ``register`` function)
    is left alone: :func:`register_trt_plugins` reports what it holds.
    """
    with _lock:
        import tensorrt as trt
        import tensorrt.plugin as trtp

        pdef = plugin_definition(trtp, name)
        if pdef is None:
            define_jit(trt, trtp)
            pdef = plugin_definition(trtp, name)
        elif getattr(pdef.register_func, "__module__", None) != module_name:
            return  # defined elsewhere in this process: leave it be
        if aot and pdef.aot_impl_func is None:
            define_aot(trt, trtp)


# ------------------------------------------------------------------------------------------ types, autotune
#: TensorRT ``DataType`` member name -> (Triton's name, ``tensorrt.plugin`` type string, torch dtype name).
_DTYPES = {
    "FLOAT": ("fp32", "FP32", "float32"),
    "HALF": ("fp16", "FP16", "float16"),
    "BF16": ("bf16", "BF16", "bfloat16"),
}


def _dtype_entry(trt, dtype):
    for member, entry in _DTYPES.items():
        if hasattr(trt.DataType, member) and dtype == getattr(trt.DataType, member):
            return entry
    raise TensorRTError(f"attn-export plugins take fp32, fp16 or bf16 tensors, got {dtype}")


def dtype_name(trt, dtype) -> str:
    """Triton's name of a TensorRT data type the plugins take: ``"fp32"``, ``"fp16"`` or ``"bf16"``."""
    return _dtype_entry(trt, dtype)[0]


def autotune_combinations(trtp, inputs) -> list:
    """The type/format combinations of a plugin with ``inputs`` (``TensorDesc``) and one output.

    Every input and the output share one of fp32, fp16 and bf16 (linear layout): what TensorRT 10 picks
    from when it chooses precisions. Where the network declares inputs of different types (TensorRT 11
    takes types from the graph and inserts no casts), that exact combination is offered too, with the
    output in the first input's type (as the registered shape function declares it); the JIT
    implementation casts the other inputs to it, the AOT kernels read each pointer in its own type.
    """
    import tensorrt as trt

    uniform = "|".join(TYPES)
    combos = [trtp.AutoTuneCombination(", ".join([uniform] * (len(inputs) + 1)), "LINEAR")]
    try:
        declared = [_dtype_entry(trt, t.dtype)[1] for t in inputs]
    except TensorRTError:
        return combos  # TensorRT rejects the types; the uniform combinations say what is supported
    if len(set(declared)) > 1:
        combos.append(trtp.AutoTuneCombination(", ".join([*declared, declared[0]]), "LINEAR"))
    return combos


# ------------------------------------------------------------------------------------------ torch interop
def cuda_array_interface(trt, tensor) -> tuple[dict, str]:
    """``(__cuda_array_interface__, torch dtype name)`` of a ``tensorrt.plugin.Tensor``, bf16 included.

    ``Tensor.__cuda_array_interface__`` refuses bf16 (numpy has no bf16 type string), so the plugins build
    the interface themselves: bf16 is described as int16 of the same size and viewed back as bf16 in torch.
    ``stream`` is left out: the JIT implementation already runs on TensorRT's stream.
    """
    torch_name = _dtype_entry(trt, tensor.dtype)[2]
    typestr, itemsize = {"float32": ("<f4", 4), "float16": ("<f2", 2), "bfloat16": ("<i2", 2)}[torch_name]
    shape = tuple(int(d) for d in tensor.shape)
    strides = tuple(int(s) * itemsize for s in tensor.strides)
    desc = {"shape": shape, "typestr": typestr, "data": (int(tensor.data_ptr), False), "strides": strides, "version": 3}
    return desc, torch_name


def as_torch(tensor):
    """A torch view (no copy) of a ``tensorrt.plugin.Tensor`` on the GPU, fp32, fp16 or bf16."""
    import tensorrt as trt
    import torch

    desc, torch_name = cuda_array_interface(trt, tensor)
    view = torch.as_tensor(_Interface(desc), device="cuda")
    dtype = getattr(torch, torch_name)
    return view.view(dtype) if view.dtype != dtype else view


class _Interface:
    """An object exposing a prepared ``__cuda_array_interface__`` (what ``torch.as_tensor`` reads)."""

    def __init__(self, desc: dict) -> None:
        self.__cuda_array_interface__ = desc


def run_jit(launch, inputs, outputs, stream: int, *attrs) -> None:
    """The body of every JIT ``impl``: wrap TensorRT's buffers as torch tensors and run ``launch(*inputs,
    out, *attrs)`` on TensorRT's stream."""
    import torch

    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        launch(*(as_torch(t) for t in inputs), as_torch(outputs[0]), *attrs)


def launch_op(name: str, op, inputs, out, *args) -> None:
    """Run ``op(*inputs, *args)`` (an attn-export torch op: on CUDA its fastest kernel) and write ``out``.

    Inputs of another type than ``out`` (a mixed-type combination) are cast to it first. The result must
    have ``out``'s shape; an empty output is left alone.
    """
    if out.numel() == 0:
        return
    inputs = [t if t.dtype == out.dtype else t.to(out.dtype) for t in inputs]
    result = op(*inputs, *args)
    if tuple(result.shape) != tuple(out.shape):
        raise ValueError(f"{name}: output {tuple(out.shape)} {out.dtype}, expected {tuple(result.shape)}")
    out.copy_(result)


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
    its int32 scalars and its output pointers (TensorRT's launch order), then constexprs: each plugin's
    ``aot_entry()``, a ``@triton.jit`` function calling the op's kernel (inlined when compiled). The
    entries find ``triton.language`` and the kernel among their module's globals (``global tl, _body``):
    Triton's interpreter re-executes an entry's source against those (closures are lost), and the
    compiler resolves names there. Under ``TRITON_INTERPRET=1`` an entry is interpreted, which runs it
    on CPU tensors (the tests do) but cannot compile it. ``signature``
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
    ptx = fit_ptx_params(compiled.asm["ptx"], n_params, scratch_free)  # checks the hidden ones are unused
    if os.environ.get(KEEP_PTX_PARAMS_ENV, "").strip() == "1":
        ptx = compiled.asm["ptx"]
    check_shared_memory(meta.name, int(meta.shared))
    return AOTKernel(meta.name, ptx.encode(), int(meta.num_warps) * 32, int(meta.shared), n_params)


def check_shared_memory(name: str, shared: int) -> None:
    """Refuse an AOT kernel that needs more than 48 KiB of shared memory, unless :data:`LARGE_SHARED_ENV` is 1.

    A CUDA kernel gets more than 48 KiB of dynamic shared memory only after
    ``cudaFuncSetAttribute(..., MaxDynamicSharedMemorySize, n)``; Triton's own launcher does that, and
    whether TensorRT does it for an AOT plugin kernel is not documented and not yet tested (the
    ``trt``-marked test ``test_aot_kernel_with_large_shared_memory`` settles it). Until then such a kernel
    is a clear error at build time rather than a launch failure at run time.
    """
    if shared <= STATIC_SHARED_LIMIT or os.environ.get(LARGE_SHARED_ENV, "").strip() == "1":
        return
    raise TensorRTError(
        f"AOT kernel {name} needs {shared} bytes of shared memory, more than the {STATIC_SHARED_LIMIT} a kernel "
        "gets without raising its limit, and it is not verified that TensorRT raises it for AOT plugins; use "
        f"JIT plugins (plugins='jit'), or set {LARGE_SHARED_ENV}=1 to try"
    )


def expand_dtypes(dtype: str | tuple[str, ...], count: int) -> tuple[str, ...]:
    """One Triton type name per pointer: ``dtype`` for all ``count`` of them, or ``dtype`` as given (one each)."""
    return (dtype,) * count if isinstance(dtype, str) else tuple(dtype)


def compile_entry(
    entry,
    pointers: tuple[str, ...],
    dtypes: tuple[str, ...],
    scalars: tuple[str, ...],
    constexprs: Mapping[str, object],
    target=None,
    num_warps: int = NUM_WARPS,
) -> AOTKernel:
    """Compile an op's AOT entry: ``pointers`` are its inputs then its output (typed by ``dtypes``), with the
    int32 ``scalars`` between them (TensorRT's order); see :func:`compile_aot`."""
    signature = pointer_signature(pointers[:-1], dtypes, scalars, pointers[-1])
    return compile_aot(entry, signature, constexprs, len(pointers) + len(scalars), num_warps=num_warps, target=target)


def aot_compiler(entry, pointers: tuple[str, ...], scalars: tuple[str, ...], constexprs, num_warps: int = NUM_WARPS):
    """An op's cached ``aot_kernel(dtype, *args, target=None)``: its AOT entry (``entry()``) compiled by
    :func:`compile_entry` for ``dtype`` (one Triton type name, or one per pointer), the constexprs
    ``constexprs(*args)`` and ``num_warps``."""

    @functools.lru_cache(maxsize=64)
    def aot_kernel(dtype: str | tuple[str, ...], *args, target=None) -> AOTKernel:
        dtypes = expand_dtypes(dtype, len(pointers))
        return compile_entry(entry(), pointers, dtypes, scalars, constexprs(*args), target, num_warps)

    return aot_kernel


def pointer_signature(
    inputs: tuple[str, ...], dtypes: tuple[str, ...], scalars: tuple[str, ...], output: str
) -> dict[str, str]:
    """Triton signature of an AOT entry in TensorRT's order: input pointers (each in its own type from
    ``dtypes``), int32 scalars, the output pointer (``dtypes[-1]``)."""
    if len(dtypes) != len(inputs) + 1:
        raise ValueError(f"need one dtype per input and one for the output, got {dtypes} for {inputs}")
    signature = {name: f"*{dtype}" for name, dtype in zip(inputs, dtypes, strict=False)}
    signature.update(dict.fromkeys(scalars, "i32"))
    signature[output] = f"*{dtypes[-1]}"
    return signature


def io_dtypes(trt, inputs, outputs) -> tuple[str, ...]:
    """Triton's names of the types of the inputs and the output (``TensorDesc`` objects) an AOT kernel gets."""
    return tuple(dtype_name(trt, t.dtype) for t in (*inputs, outputs[0]))


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


def aot_launch(trtp, kernel: AOTKernel, grid, scalars):
    """What every ``aot_impl`` returns: the kernel's name, its PTX, launch parameters and scalar arguments."""
    return kernel.name, kernel.ptx, launch_params(trtp, grid, kernel), sym_args(trtp, scalars)
