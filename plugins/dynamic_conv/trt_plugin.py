"""TensorRT plugin ``attn_export::AttnExportDynamicConv2d``: ``dynamic_conv2d`` inside a TensorRT engine.

The ONNX node (target ``trt``) has inputs ``x`` (B, Cin, H, W) and ``weight`` (B, Cout, Cin/groups,
kH, kW) and the attributes ``stride``, ``padding``, ``dilation`` (two ints each: rows, columns) and
``groups`` (an int), in that order; the output is (B, Cout, Ho, Wo) in the input's type. The int
pairs arrive as ``numpy.int32`` arrays (``tensorrt.plugin`` has no list attributes).

Defined as :mod:`attn_export.plugins.trt` describes, with the launch plan of
:mod:`attn_export.plugins.dynamic_conv.plan`. The output shape keeps the kernel size symbolic (it is
the weight's shape), but the AOT kernel takes it as a compile-time constant, so the AOT path needs kH
and kW static in the network (they are for ODConv: the weight is built from fixed-size kernels). Its
``tl.dot`` needs x and weight of one type: a mixed-type combination is JIT only.

No ``from __future__ import annotations`` here: ``tensorrt.plugin`` reads the annotations of the
registered functions as objects.
"""

import functools

from attn_export.plugins import _trt_kit as _trt
from attn_export.plugins._shape_expr import conv_out, static_dims
from attn_export.plugins.dynamic_conv import plan

PLUGIN_NAME, PLUGIN_ID, ATTRIBUTES, N_PARAMS = _trt.plugin_constants("dynamic_conv2d", plan.SCALARS)


# ------------------------------------------------------------------------------------------ kernels
def launch(x, weight, out, stride, padding, dilation, groups: int) -> None:
    """The JIT plugin's body on torch tensors: ``dynamic_conv2d`` (on CUDA its fastest kernel) into ``out``."""
    import torch

    import attn_export.plugins.dynamic_conv.op  # noqa: F401  (registers the op)

    stride, padding, dilation = plan.check_attributes(stride, padding, dilation, groups)
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
        BLOCK_K: tl.constexpr,
        BLOCK_P: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        _body(x_ptr, w_ptr, out_ptr, CIN, H, W, COUT, HO, WO, GROUPS, CIN_G, COUT_G, n_pblk, n_coblk,
              SH, SW, PH, PW, DH, DW, KH, KW, BLOCK_CO, BLOCK_K, BLOCK_P, DOT_PRECISION)  # fmt: skip

    return triton.jit(dynamic_conv2d_aot)


@functools.lru_cache(maxsize=64)
def aot_kernel(
    dtype: str | tuple[str, str, str],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    kernel_hw: tuple[int, int],
    block_co: int,
    block_k: int,
    block_p: int,
    target=None,
) -> _trt.AOTKernel:
    """The AOT entry compiled for ``dtype`` (``"fp32"``/``"fp16"``/``"bf16"``, or one per x, weight and
    output; x and weight must match, for ``tl.dot``) and these constexprs (cached)."""
    dtypes = _trt.expand_dtypes(dtype, 3)
    if dtypes[0] != dtypes[1]:
        raise _trt.TensorRTError(
            f"{PLUGIN_NAME}: the AOT kernel multiplies x and weight tiles with tl.dot, which needs one type, got "
            f"x {dtypes[0]} and weight {dtypes[1]}; give both one type in the graph (attn_export.export."
            "precision_graph does) or use the JIT plugins (plugins='jit')"
        )
    precision = plan.dot_precision(dtypes[0])
    entry_constexprs = plan.constexprs(stride, padding, dilation, kernel_hw, block_co, block_k, block_p, precision)
    return _trt.compile_entry(
        aot_entry(), ("x_ptr", "w_ptr", "out_ptr"), dtypes, plan.SCALARS, entry_constexprs, target
    )


# ------------------------------------------------------------------------------------------ registration
def register(*, aot: bool = True) -> None:
    """Define the plugin (with ``aot``, its AOT implementation too): :func:`attn_export.plugins.trt.register_plugin`."""
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
        shape = plan.output_shape(x.shape_expr, weight.shape_expr, stride, padding, dilation, groups)
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
        strides, pads, dils = plan.check_attributes(stride, padding, dilation, groups)
        ws = static_dims(weight.shape)
        if ws[3] is None or ws[4] is None:
            raise _trt.TensorRTError(
                f"{PLUGIN_NAME}: the AOT kernel needs a static kernel size, but the weight's shape is {ws}; "
                "use the JIT plugins (register_trt_plugins(aot=False))"
            )
        kernel_hw = (ws[3], ws[4])
        xs = static_dims(x.shape)
        cout_g = ws[1] // int(groups) if ws[1] is not None else None
        howo = None
        if xs[2] is not None and xs[3] is not None:
            howo = conv_out(xs[2], ws[3], strides[0], pads[0], dils[0]) * conv_out(
                xs[3], ws[4], strides[1], pads[1], dils[1]
            )
        block_co, block_k, block_p = plan.blocks(cout_g, ws[2], howo)
        dtypes = _trt.io_dtypes(trt, (x, weight), outputs)
        kernel = aot_kernel(dtypes, strides, pads, dils, kernel_hw, block_co, block_k, block_p)
        grid, scalars, _ = plan.launch_plan(
            x.shape_expr,
            weight.shape_expr,
            strides,
            pads,
            dils,
            groups,
            kernel_hw,
            block_co,
            block_k,
            block_p,
            plan.dot_precision(dtypes[0]),
        )
        return _trt.aot_launch(trtp, kernel, grid, scalars)
