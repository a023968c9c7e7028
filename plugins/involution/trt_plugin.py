"""TensorRT plugin ``attn_export::AttnExportInvolution2d``: ``involution2d`` inside a TensorRT engine.

The ONNX node (target ``trt``) has inputs ``x`` (B, C, H, W) and ``weight`` (B, G, k*k, Ho, Wo) and
the int attributes ``kernel_size``, ``stride``, ``padding``, ``dilation`` (in that order); the output
is (B, C, Ho, Wo) in the input's type. Defined as :mod:`attn_export.plugins.trt` describes, with the
launch plan of :mod:`attn_export.plugins.involution.plan`.

No ``from __future__ import annotations`` here: ``tensorrt.plugin`` reads the annotations of the
registered functions as objects.
"""

import functools

from attn_export.plugins import _trt_kit as _trt
from attn_export.plugins._shape_expr import static_dims
from attn_export.plugins.involution import plan

PLUGIN_NAME, PLUGIN_ID, ATTRIBUTES, N_PARAMS = _trt.plugin_constants("involution2d", plan.SCALARS)


# ------------------------------------------------------------------------------------------ kernels
def launch(x, weight, out, kernel_size: int, stride: int, padding: int, dilation: int) -> None:
    """The JIT plugin's body on torch tensors: ``involution2d`` (on CUDA its Triton kernel) into ``out``."""
    import torch

    import attn_export.plugins.involution.op  # noqa: F401  (registers the op)

    plan.check_attributes(kernel_size, stride, padding, dilation)
    op = torch.ops.attn_export.involution2d
    _trt.launch_op(PLUGIN_NAME, op, (x, weight), out, kernel_size, stride, padding, dilation)


@functools.cache
def aot_entry():
    """``_involution2d_fwd`` with TensorRT's parameter order ``(x, weight, <9 scalars>, out, <constexprs>)`` (see
    :func:`attn_export.plugins.trt.compile_aot` for why it lives in this module's globals)."""
    global tl, _body
    import triton
    import triton.language as tl

    from attn_export.plugins.involution.cuda_kernel import _involution2d_fwd as _body

    def involution2d_aot(
        x_ptr,
        w_ptr,
        C,
        H,
        W,
        Ho,
        Wo,
        G,
        CG,
        n_pblk,
        n_cblk,
        out_ptr,
        STRIDE: tl.constexpr,
        PAD: tl.constexpr,
        DIL: tl.constexpr,
        K: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
        SAME: tl.constexpr,
    ):
        _body(
            x_ptr, w_ptr, out_ptr, C, H, W, Ho, Wo, G, CG, n_pblk, n_cblk, STRIDE, PAD, DIL, K, BLOCK_C, BLOCK_P, SAME
        )

    return triton.jit(involution2d_aot)


#: ``aot_kernel(dtype, *args, target=None)``: the AOT entry compiled (cached) for ``dtype`` (``"fp32"``,
#: ``"fp16"``, ``"bf16"``, or one per x, weight and output) and ``plan.constexprs(*args)``. The kernel
#: reads every load as fp32, so mixed types work.
aot_kernel = _trt.aot_compiler(aot_entry, ("x_ptr", "w_ptr", "out_ptr"), plan.SCALARS, plan.constexprs)


# ------------------------------------------------------------------------------------------ registration
def register(*, aot: bool = True) -> None:
    """Define the plugin (with ``aot``, its AOT implementation too): :func:`attn_export.plugins.trt.register_plugin`."""
    _trt.register_plugin(__name__, PLUGIN_NAME, _define_jit, _define_aot, aot)


def _define_jit(trt, trtp) -> None:
    @trtp.register(PLUGIN_ID)
    def involution2d_desc(
        x: trtp.TensorDesc, weight: trtp.TensorDesc, kernel_size: int, stride: int, padding: int, dilation: int
    ) -> trtp.TensorDesc:
        shape = plan.output_shape(x.shape_expr, weight.shape_expr, kernel_size, stride, padding, dilation)
        return trtp.from_shape_expr(shape, dtype=x.dtype)

    @trtp.autotune(PLUGIN_ID)
    def involution2d_autotune(
        x: trtp.TensorDesc, weight: trtp.TensorDesc, outputs: tuple[trtp.TensorDesc]
    ) -> list[trtp.AutoTuneCombination]:
        return _trt.autotune_combinations(trtp, (x, weight))

    @trtp.impl(PLUGIN_ID)
    def involution2d_impl(
        x: trtp.Tensor,
        weight: trtp.Tensor,
        kernel_size: int,
        stride: int,
        padding: int,
        dilation: int,
        outputs: tuple[trtp.Tensor],
        stream: int,
    ) -> None:
        _trt.run_jit(launch, (x, weight), outputs, stream, kernel_size, stride, padding, dilation)


def _define_aot(trt, trtp) -> None:
    # TensorRT passes every attribute positionally, in the registered signature's order: declare all.
    @trtp.aot_impl(PLUGIN_ID)
    def involution2d_aot_impl(
        x: trtp.TensorDesc,
        weight: trtp.TensorDesc,
        kernel_size: int,
        stride: int,
        padding: int,
        dilation: int,
        outputs: tuple[trtp.TensorDesc],
        tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        xs, ws = static_dims(x.shape), static_dims(weight.shape)
        cg = xs[1] // ws[1] if xs[1] is not None and ws[1] is not None else None
        howo = ws[3] * ws[4] if ws[3] is not None and ws[4] is not None else None
        block_c, block_p = plan.blocks(cg, howo)
        dtypes = _trt.io_dtypes(trt, (x, weight), outputs)
        kernel = aot_kernel(dtypes, kernel_size, stride, padding, dilation, block_c, block_p)
        grid, scalars, _ = plan.launch_plan(
            x.shape_expr, weight.shape_expr, kernel_size, stride, padding, dilation, block_c, block_p
        )
        return _trt.aot_launch(trtp, kernel, grid, scalars)
