"""TensorRT plugin ``attn_export::AttnExportOutlookAggregate``: ``outlook_aggregate`` inside a TensorRT engine.

The ONNX node (target ``trt``) has inputs ``v`` (B, C, H, W) and ``attn`` (B, heads, h*w, k*k, k*k) and
the int attributes ``kernel_size``, ``padding``, ``stride`` (in that order); the output has ``v``'s
shape and type. Defined as :mod:`attn_export.plugins.trt` describes, with the
launch plan of :mod:`attn_export.plugins.outlook.plan`.

No ``from __future__ import annotations`` here: ``tensorrt.plugin`` reads the annotations of the
registered functions as objects.
"""

import functools

from attn_export.plugins import _trt_kit as _trt
from attn_export.plugins._shape_expr import static_dims
from attn_export.plugins.outlook import plan

PLUGIN_NAME, PLUGIN_ID, ATTRIBUTES, N_PARAMS = _trt.plugin_constants("outlook_aggregate", plan.SCALARS)


# ------------------------------------------------------------------------------------------ kernels
def launch(v, attn, out, kernel_size: int, padding: int, stride: int) -> None:
    """The JIT plugin's body on torch tensors: ``outlook_aggregate`` (on CUDA its Triton kernel) into ``out``."""
    import torch

    import attn_export.plugins.outlook.op  # noqa: F401  (registers the op)

    plan.check_attributes(kernel_size, padding, stride)
    op = torch.ops.attn_export.outlook_aggregate
    _trt.launch_op(PLUGIN_NAME, op, (v, attn), out, kernel_size, padding, stride)


@functools.cache
def aot_entry():
    """``_outlook_aggregate_fwd`` with TensorRT's parameter order ``(v, attn, <9 scalars>, out, <constexprs>)`` (see
    :func:`attn_export.plugins.trt.compile_aot` for why it lives in this module's globals)."""
    global tl, _body
    import triton
    import triton.language as tl

    from attn_export.plugins.outlook.cuda_kernel import _outlook_aggregate_fwd as _body

    def outlook_aggregate_aot(
        v_ptr,
        attn_ptr,
        C,
        H,
        W,
        GH,
        GW,
        HEADS,
        CH,
        n_pblk,
        n_cblk,
        out_ptr,
        K: tl.constexpr,
        PAD: tl.constexpr,
        STRIDE: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        _body(v_ptr, attn_ptr, out_ptr, C, H, W, GH, GW, HEADS, CH, n_pblk, n_cblk, K, PAD, STRIDE, BLOCK_C, BLOCK_P)

    return triton.jit(outlook_aggregate_aot)


@functools.cache
def aot_rows_entry():
    """``_outlook_rows`` (the window-row kernel, ``kernel_size <= plan.ROWS_MAX_K``) with TensorRT's parameter
    order ``(v, attn, <10 scalars>, out, <constexprs>)``."""
    global tl, _rows_body
    import triton
    import triton.language as tl

    from attn_export.plugins.outlook.cuda_kernel import _outlook_rows as _rows_body

    def outlook_rows_aot(
        v_ptr,
        attn_ptr,
        C,
        H,
        W,
        GH,
        GW,
        HEADS,
        CH,
        n_tile,
        n_xblk,
        n_cblk,
        out_ptr,
        K: tl.constexpr,
        PAD: tl.constexpr,
        STRIDE: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_J: tl.constexpr,
        ROWS: tl.constexpr,
        KK2P: tl.constexpr,
    ):
        _rows_body(
            v_ptr, attn_ptr, out_ptr, C, H, W, GH, GW, HEADS, CH, n_tile, n_xblk, n_cblk,
            K, PAD, STRIDE, BLOCK_C, BLOCK_V, BLOCK_J, ROWS, KK2P,
        )  # fmt: skip

    return triton.jit(outlook_rows_aot)


#: ``aot_kernel(dtype, *args, target=None)``: the AOT entry compiled (cached) for ``dtype`` (``"fp32"``,
#: ``"fp16"``, ``"bf16"``, or one per v, attn and output) and ``plan.constexprs(*args)``. The kernel
#: reads every load as fp32, so mixed types work.
aot_kernel = _trt.aot_compiler(aot_entry, ("v_ptr", "attn_ptr", "out_ptr"), plan.SCALARS, plan.constexprs)
#: The same for the window-row kernel and ``plan.rows_constexprs(*args)`` (``kernel_size <= 3``).
aot_rows_kernel = _trt.aot_compiler(
    aot_rows_entry, ("v_ptr", "attn_ptr", "out_ptr"), plan.ROWS_SCALARS, plan.rows_constexprs, plan.ROWS_NUM_WARPS
)


# ------------------------------------------------------------------------------------------ registration
def register(*, aot: bool = True) -> None:
    """Define the plugin (with ``aot``, its AOT implementation too): :func:`attn_export.plugins.trt.register_plugin`."""
    _trt.register_plugin(__name__, PLUGIN_NAME, _define_jit, _define_aot, aot)


def _define_jit(trt, trtp) -> None:
    @trtp.register(PLUGIN_ID)
    def outlook_aggregate_desc(
        v: trtp.TensorDesc, attn: trtp.TensorDesc, kernel_size: int, padding: int, stride: int
    ) -> trtp.TensorDesc:
        shape = plan.output_shape(v.shape_expr, attn.shape_expr, kernel_size, padding, stride)
        return trtp.from_shape_expr(shape, dtype=v.dtype)

    @trtp.autotune(PLUGIN_ID)
    def outlook_aggregate_autotune(
        v: trtp.TensorDesc, attn: trtp.TensorDesc, outputs: tuple[trtp.TensorDesc]
    ) -> list[trtp.AutoTuneCombination]:
        return _trt.autotune_combinations(trtp, (v, attn))

    @trtp.impl(PLUGIN_ID)
    def outlook_aggregate_impl(
        v: trtp.Tensor,
        attn: trtp.Tensor,
        kernel_size: int,
        padding: int,
        stride: int,
        outputs: tuple[trtp.Tensor],
        stream: int,
    ) -> None:
        _trt.run_jit(launch, (v, attn), outputs, stream, kernel_size, padding, stride)


def _define_aot(trt, trtp) -> None:
    # TensorRT passes every attribute positionally, in the registered signature's order: declare all.
    @trtp.aot_impl(PLUGIN_ID)
    def outlook_aggregate_aot_impl(
        v: trtp.TensorDesc,
        attn: trtp.TensorDesc,
        kernel_size: int,
        padding: int,
        stride: int,
        outputs: tuple[trtp.TensorDesc],
        tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        vs, a = static_dims(v.shape), static_dims(attn.shape)
        ch = vs[1] // a[1] if vs[1] is not None and a[1] is not None else None
        dtypes = _trt.io_dtypes(trt, (v, attn), outputs)
        if plan.uses_rows(kernel_size):
            blk = plan.rows_blocks(ch, vs[3], kernel_size, stride)
            compile_kernel, planner = aot_rows_kernel, plan.rows_launch_plan
        else:
            hw = vs[2] * vs[3] if vs[2] is not None and vs[3] is not None else None
            blk = plan.blocks(ch, hw)
            compile_kernel, planner = aot_kernel, plan.launch_plan
        kernel = compile_kernel(dtypes, kernel_size, padding, stride, *blk)
        grid, scalars, _ = planner(v.shape_expr, attn.shape_expr, kernel_size, padding, stride, *blk)
        return _trt.aot_launch(trtp, kernel, grid, scalars)
