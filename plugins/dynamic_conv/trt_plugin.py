"""TensorRT plugin ``attn_export::AttnExportDynamicConv2d``: ``dynamic_conv2d`` inside a TensorRT engine.

The ONNX node (target ``trt``) has inputs ``x`` (B, Cin, H, W) and ``weight`` (B, Cout, Cin/groups,
kH, kW) and the attributes ``stride``, ``padding``, ``dilation`` (two ints each: rows, columns) and
``groups`` (an int), in that order; the output is (B, Cout, Ho, Wo) in the input's type. The int
pairs arrive as ``numpy.int32`` arrays (``tensorrt.plugin`` has no list attributes). :func:`register`
defines, with ``tensorrt.plugin``:

- the output shape, :func:`output_shape` of the inputs' shape expressions (the kernel size is the
  weight's shape, so it stays symbolic there);
- ``impl`` (JIT): the op run from Python on TensorRT's stream (on CUDA its fastest kernel: the
  batch-folded cuDNN convolution or the Triton kernel), its result written into TensorRT's output
  buffer (:func:`launch`);
- ``autotune``: fp32, fp16 or bf16 for all three tensors (and the network's own mixed input types),
  linear layout (:func:`attn_export.plugins.trt.autotune_combinations`);
- ``aot_impl`` (TensorRT >= 10.9): the Triton kernel compiled ahead of time to PTX, through an entry
  (:func:`aot_entry`) whose parameters come in TensorRT's order (inputs, int32 scalars, output). The
  kernel size is a compile-time constant of the kernel, so the AOT path needs kH and kW static in the
  network (they are for ODConv: the weight is built from fixed-size kernels). Its ``tl.dot`` needs x
  and weight of one type: a mixed-type combination is JIT only.

No ``from __future__ import annotations`` here: ``tensorrt.plugin`` reads the annotations of the
registered functions as objects.
"""

import functools
from collections.abc import Sequence

from attn_export.plugins import trt as _trt
from attn_export.plugins._trt_names import DYNAMIC_CONV, plugin_id

PLUGIN_NAME = DYNAMIC_CONV
PLUGIN_ID = plugin_id(DYNAMIC_CONV)
#: The plugin's attributes, in the order of the registered function's signature (the ONNX node's
#: order must equal it: see :func:`attn_export.plugins._plugin_node.attribute_order`).
ATTRIBUTES = ("stride", "padding", "dilation", "groups")
#: Kernel parameters TensorRT passes to the AOT entry: 2 inputs, 11 int32 scalars, 1 output.
SCALARS = ("CIN", "H", "W", "COUT", "HO", "WO", "GROUPS", "CIN_G", "COUT_G", "n_pblk", "n_coblk")
N_SCALARS = len(SCALARS)
N_PARAMS = 2 + N_SCALARS + 1


# ------------------------------------------------------------------------------------------ pure shape logic
def pair(name: str, value: Sequence[int], low: int) -> tuple[int, int]:
    """Two ints (rows, columns) from a list/array attribute, each >= ``low``."""
    values = tuple(int(v) for v in value)
    if len(values) != 2 or min(values) < low:
        raise ValueError(f"{PLUGIN_NAME}: {name} must be two ints >= {low}, got {list(values)}")
    return values  # type: ignore[return-value]


def check_attributes(stride, padding, dilation, groups: int):
    """``(stride, padding, dilation)`` as int pairs, after checking them and ``groups``."""
    if int(groups) < 1:
        raise ValueError(f"{PLUGIN_NAME}: groups must be >= 1, got {groups}")
    return pair("stride", stride, 1), pair("padding", padding, 0), pair("dilation", dilation, 1)


def output_shape(x, weight, stride, padding, dilation, groups: int) -> tuple:
    """(B, Cout, Ho, Wo) from the shapes (shape expressions or ints) of ``x`` and ``weight``."""
    (sh, sw), (ph, pw), (dh, dw) = check_attributes(stride, padding, dilation, groups)
    ho = _trt.conv_out(x[2], weight[3], sh, ph, dh)
    wo = _trt.conv_out(x[3], weight[4], sw, pw, dw)
    return (x[0], weight[1], ho, wo)


def _block(n: int | None, lo: int, hi: int) -> int:
    return hi if n is None else min(max(_trt.next_pow2(n), lo), hi)


def blocks(cout_g: int | None, cin_g: int | None, howo: int | None) -> tuple[int, int, int]:
    """``(BLOCK_CO, BLOCK_CI, BLOCK_P)`` as the Triton launcher picks them (``tl.dot`` tiles >= 16);
    None (a dynamic size) takes the largest."""
    return _block(cout_g, 16, 64), _block(cin_g, 16, 32), _block(howo, 16, 64)


def launch_plan(
    x,
    weight,
    stride,
    padding,
    dilation,
    groups: int,
    kernel_hw: tuple[int, int],
    block_co: int,
    block_ci: int,
    block_p: int,
    dot_precision: str | None,
):
    """``(grid, scalars, constexprs)`` of the kernel for shapes of ``x`` and ``weight``.

    With ints this is the JIT launch; with shape expressions the AOT one (grid and scalars symbolic in
    the batch). ``kernel_hw`` is the static (kH, kW). ``scalars`` are the kernel's int32 arguments
    between the pointers, in its order.
    """
    (sh, sw), (ph, pw), (dh, dw) = check_attributes(stride, padding, dilation, groups)
    groups = int(groups)
    kh, kw = (int(k) for k in kernel_hw)
    b, cin, h, w = x[0], x[1], x[2], x[3]
    cout, cin_g = weight[1], weight[2]
    ho = _trt.conv_out(h, kh, sh, ph, dh)
    wo = _trt.conv_out(w, kw, sw, pw, dw)
    cout_g = cout // groups
    n_pblk = _trt.cdiv(ho * wo, block_p)
    n_coblk = _trt.cdiv(cout_g, block_co)
    grid = b * groups * n_pblk * n_coblk
    scalars = (cin, h, w, cout, ho, wo, groups, cin_g, cout_g, n_pblk, n_coblk)
    constexprs = {
        "SH": sh,
        "SW": sw,
        "PH": ph,
        "PW": pw,
        "DH": dh,
        "DW": dw,
        "KH": kh,
        "KW": kw,
        "BLOCK_CO": block_co,
        "BLOCK_CI": block_ci,
        "BLOCK_P": block_p,
        "DOT_PRECISION": dot_precision,
    }
    return grid, scalars, constexprs


def dot_precision(dtype: str) -> str | None:
    """``tl.dot`` precision: IEEE fp32 products for fp32 (not TF32), the backend default otherwise."""
    return "ieee" if dtype == "fp32" else None


# ------------------------------------------------------------------------------------------ kernels
def launch(x, weight, out, stride, padding, dilation, groups: int) -> None:
    """The JIT plugin's body on torch tensors: ``dynamic_conv2d`` (on CUDA its fastest kernel) into ``out``."""
    import torch

    import attn_export.plugins  # noqa: F401  (registers the ops)

    stride, padding, dilation = check_attributes(stride, padding, dilation, groups)
    op = torch.ops.attn_export.dynamic_conv2d
    _trt.launch_op(PLUGIN_NAME, op, (x, weight), out, list(stride), list(padding), list(dilation), int(groups))


@functools.cache
def aot_entry():
    """``_dynamic_conv2d_fwd`` with TensorRT's parameter order ``(x, weight, <11 scalars>, out, <constexprs>)`` (see
    :func:`attn_export.plugins.trt.compile_aot` for why it lives in this module's globals)."""
    global tl, _body
    import triton
    import triton.language as tl

    from attn_export.plugins.dynamic_conv.cuda_kernel import _dynamic_conv2d_fwd as _body

    def dynamic_conv2d_aot(
        x_ptr,
        w_ptr,
        CIN,
        H,
        W,
        COUT,
        HO,
        WO,
        GROUPS,
        CIN_G,
        COUT_G,
        n_pblk,
        n_coblk,
        out_ptr,
        SH: tl.constexpr,
        SW: tl.constexpr,
        PH: tl.constexpr,
        PW: tl.constexpr,
        DH: tl.constexpr,
        DW: tl.constexpr,
        KH: tl.constexpr,
        KW: tl.constexpr,
        BLOCK_CO: tl.constexpr,
        BLOCK_CI: tl.constexpr,
        BLOCK_P: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        _body(
            x_ptr,
            w_ptr,
            out_ptr,
            CIN,
            H,
            W,
            COUT,
            HO,
            WO,
            GROUPS,
            CIN_G,
            COUT_G,
            n_pblk,
            n_coblk,
            SH,
            SW,
            PH,
            PW,
            DH,
            DW,
            KH,
            KW,
            BLOCK_CO,
            BLOCK_CI,
            BLOCK_P,
            DOT_PRECISION,
        )

    return triton.jit(dynamic_conv2d_aot)


@functools.lru_cache(maxsize=64)
def aot_kernel(
    dtype: str | tuple[str, str, str],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    kernel_hw: tuple[int, int],
    block_co: int,
    block_ci: int,
    block_p: int,
    target=None,
) -> _trt.AOTKernel:
    """The AOT entry compiled for ``dtype`` (``"fp32"``/``"fp16"``/``"bf16"``, or one per x, weight and
    output; x and weight must match, for ``tl.dot``) and these constexprs (cached)."""
    dtypes = (dtype,) * 3 if isinstance(dtype, str) else tuple(dtype)
    if dtypes[0] != dtypes[1]:
        raise _trt.TensorRTError(
            f"{PLUGIN_NAME}: the AOT kernel multiplies x and weight tiles with tl.dot, which needs one type, got "
            f"x {dtypes[0]} and weight {dtypes[1]}; give both one type in the graph (attn_export.export."
            "precision_graph does) or use the JIT plugins (plugins='jit')"
        )
    signature = _trt.pointer_signature(("x_ptr", "w_ptr"), dtypes, SCALARS, "out_ptr")
    constexprs = {
        "SH": stride[0],
        "SW": stride[1],
        "PH": padding[0],
        "PW": padding[1],
        "DH": dilation[0],
        "DW": dilation[1],
        "KH": kernel_hw[0],
        "KW": kernel_hw[1],
        "BLOCK_CO": block_co,
        "BLOCK_CI": block_ci,
        "BLOCK_P": block_p,
        "DOT_PRECISION": dot_precision(dtypes[0]),
    }
    return _trt.compile_aot(aot_entry(), signature, constexprs, N_PARAMS, target=target)


# ------------------------------------------------------------------------------------------ registration
def register(*, aot: bool = True) -> None:
    """Define the plugin with ``tensorrt.plugin`` (idempotent); with ``aot`` also its AOT implementation.

    Imports TensorRT: call through :func:`attn_export.plugins.trt.register_trt_plugins`.
    """
    _trt.register_plugin(__name__, PLUGIN_NAME, _define_jit, _define_aot, aot)


@functools.cache
def _int_pairs():
    """The annotation of the int-pair attributes (one object: tensorrt.plugin compares annotations)."""
    import numpy as np
    import numpy.typing as npt

    return npt.NDArray[np.int32]


def _define_jit(trt, trtp) -> None:
    Ints = _int_pairs()

    @trtp.register(PLUGIN_ID)
    def dynamic_conv2d_desc(
        x: trtp.TensorDesc, weight: trtp.TensorDesc, stride: Ints, padding: Ints, dilation: Ints, groups: int
    ) -> trtp.TensorDesc:
        shape = output_shape(x.shape_expr, weight.shape_expr, stride, padding, dilation, groups)
        return trtp.from_shape_expr(shape, dtype=x.dtype)

    @trtp.autotune(PLUGIN_ID)
    def dynamic_conv2d_autotune(
        x: trtp.TensorDesc, weight: trtp.TensorDesc, outputs: tuple[trtp.TensorDesc]
    ) -> list[trtp.AutoTuneCombination]:
        return _trt.autotune_combinations(trtp, (x, weight))

    @trtp.impl(PLUGIN_ID)
    def dynamic_conv2d_impl(
        x: trtp.Tensor,
        weight: trtp.Tensor,
        stride: Ints,
        padding: Ints,
        dilation: Ints,
        groups: int,
        outputs: tuple[trtp.Tensor],
        stream: int,
    ) -> None:
        _trt.run_jit(launch, (x, weight), outputs, stream, stride, padding, dilation, groups)


def _define_aot(trt, trtp) -> None:
    Ints = _int_pairs()

    # TensorRT passes every attribute positionally, in the registered signature's order: declare all.
    @trtp.aot_impl(PLUGIN_ID)
    def dynamic_conv2d_aot_impl(
        x: trtp.TensorDesc,
        weight: trtp.TensorDesc,
        stride: Ints,
        padding: Ints,
        dilation: Ints,
        groups: int,
        outputs: tuple[trtp.TensorDesc],
        tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        strides, pads, dils = check_attributes(stride, padding, dilation, groups)
        ws = _trt.static_dims(weight.shape)
        if ws[3] is None or ws[4] is None:
            raise _trt.TensorRTError(
                f"{PLUGIN_NAME}: the AOT kernel needs a static kernel size, but the weight's shape is {ws}; "
                "use the JIT plugins (register_trt_plugins(aot=False))"
            )
        kernel_hw = (ws[3], ws[4])
        xs = _trt.static_dims(x.shape)
        cout_g = ws[1] // int(groups) if ws[1] is not None else None
        howo = None
        if xs[2] is not None and xs[3] is not None:
            howo = _trt.conv_out(xs[2], ws[3], strides[0], pads[0], dils[0]) * _trt.conv_out(
                xs[3], ws[4], strides[1], pads[1], dils[1]
            )
        block_co, block_ci, block_p = blocks(cout_g, ws[2], howo)
        dtypes = _trt.io_dtypes(trt, (x, weight), outputs)
        kernel = aot_kernel(dtypes, strides, pads, dils, kernel_hw, block_co, block_ci, block_p)
        grid, scalars, _ = launch_plan(
            x.shape_expr,
            weight.shape_expr,
            strides,
            pads,
            dils,
            groups,
            kernel_hw,
            block_co,
            block_ci,
            block_p,
            dot_precision(dtypes[0]),
        )
        return _trt.aot_launch(trtp, kernel, grid, scalars)
