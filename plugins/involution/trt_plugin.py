"""TensorRT plugin ``attn_export::AttnExportInvolution2d``: ``involution2d`` inside a TensorRT engine.

The ONNX node (target ``trt``) has inputs ``x`` (B, C, H, W) and ``weight`` (B, G, k*k, Ho, Wo) and
the int attributes ``kernel_size``, ``stride``, ``padding``, ``dilation`` (in that order); the output
is (B, C, Ho, Wo) in the input's type. :func:`register` defines, with ``tensorrt.plugin``:

- the output shape, :func:`output_shape` applied to the inputs' shape expressions;
- ``impl`` (JIT): the op run from Python on TensorRT's stream (on CUDA its Triton kernel), its result
  written into TensorRT's output buffer (:func:`launch`);
- ``autotune``: fp32, fp16 or bf16 for all three tensors (and the network's own mixed input types),
  linear layout (:func:`attn_export.plugins.trt.autotune_combinations`);
- ``aot_impl`` (TensorRT >= 10.9): the Triton kernel compiled ahead of time to PTX, through an entry
  (:func:`aot_entry`) whose parameters come in TensorRT's order (inputs, int32 scalars, output), with
  a 1-D grid and the scalars as shape expressions of the batch, so the engine runs without Python.

The AOT launch geometry (grid, scalars, block sizes) is :func:`launch_plan`, equal to what
``cuda_kernel.involution2d_cuda`` uses (a test holds them together).

No ``from __future__ import annotations`` here: ``tensorrt.plugin`` reads the annotations of the
registered functions as objects.
"""

import functools

from attn_export.plugins import trt as _trt
from attn_export.plugins._trt_names import INVOLUTION, plugin_id

PLUGIN_NAME = INVOLUTION
PLUGIN_ID = plugin_id(INVOLUTION)
#: The plugin's attributes, in the order of the registered function's signature (the ONNX node's
#: order must equal it: see :func:`attn_export.plugins._plugin_node.attribute_order`).
ATTRIBUTES = ("kernel_size", "stride", "padding", "dilation")
#: Kernel parameters TensorRT passes to the AOT entry: 2 inputs, 9 int32 scalars, 1 output.
SCALARS = ("C", "H", "W", "Ho", "Wo", "G", "CG", "n_pblk", "n_cblk")
N_SCALARS = len(SCALARS)
N_PARAMS = 2 + N_SCALARS + 1


# ------------------------------------------------------------------------------------------ pure shape logic
def check_attributes(kernel_size: int, stride: int, padding: int, dilation: int) -> None:
    if kernel_size < 1 or stride < 1 or dilation < 1 or padding < 0:
        raise ValueError(
            f"{PLUGIN_NAME}: need kernel_size, stride, dilation >= 1 and padding >= 0, got kernel_size={kernel_size}, "
            f"stride={stride}, padding={padding}, dilation={dilation}"
        )


def output_shape(x, weight, kernel_size: int, stride: int, padding: int, dilation: int) -> tuple:
    """(B, C, Ho, Wo) from the shapes (shape expressions or ints) of ``x`` and ``weight``."""
    check_attributes(kernel_size, stride, padding, dilation)
    ho = _trt.conv_out(x[2], kernel_size, stride, padding, dilation)
    wo = _trt.conv_out(x[3], kernel_size, stride, padding, dilation)
    return (x[0], x[1], ho, wo)


def blocks(cg: int | None, howo: int | None) -> tuple[int, int]:
    """``(BLOCK_C, BLOCK_P)`` as the Triton launcher picks them; None (a dynamic size) takes the largest."""
    block_p = 128 if howo is None else min(max(_trt.next_pow2(howo), 16), 128)
    block_c = min(32 if cg is None else _trt.next_pow2(cg), max(4096 // block_p, 1), 32)
    return block_c, block_p


def launch_plan(x, weight, kernel_size: int, stride: int, padding: int, dilation: int, block_c: int, block_p: int):
    """``(grid, scalars, constexprs)`` of the kernel for shapes of ``x`` and ``weight``.

    With ints this is the JIT launch; with shape expressions the AOT one (grid and scalars symbolic in
    the batch). ``scalars`` are the kernel's int32 arguments between the pointers, in its order.
    """
    b, c, h, w = x[0], x[1], x[2], x[3]
    g, ho, wo = weight[1], weight[3], weight[4]
    cg = c // g
    n_pblk = _trt.cdiv(ho * wo, block_p)
    n_cblk = _trt.cdiv(cg, block_c)
    grid = b * g * n_pblk * n_cblk
    scalars = (c, h, w, ho, wo, g, cg, n_pblk, n_cblk)
    constexprs = {
        "STRIDE": stride,
        "PAD": padding,
        "DIL": dilation,
        "K": kernel_size,
        "BLOCK_C": block_c,
        "BLOCK_P": block_p,
    }
    return grid, scalars, constexprs


# ------------------------------------------------------------------------------------------ kernels
def launch(x, weight, out, kernel_size: int, stride: int, padding: int, dilation: int) -> None:
    """The JIT plugin's body on torch tensors: ``involution2d`` (on CUDA its Triton kernel) into ``out``."""
    import torch

    import attn_export.plugins  # noqa: F401  (registers the ops)

    check_attributes(kernel_size, stride, padding, dilation)
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
    ):
        _body(x_ptr, w_ptr, out_ptr, C, H, W, Ho, Wo, G, CG, n_pblk, n_cblk, STRIDE, PAD, DIL, K, BLOCK_C, BLOCK_P)

    return triton.jit(involution2d_aot)


@functools.lru_cache(maxsize=64)
def aot_kernel(
    dtype: str | tuple[str, str, str],
    kernel_size: int,
    stride: int,
    padding: int,
    dilation: int,
    block_c: int,
    block_p: int,
    target=None,
) -> _trt.AOTKernel:
    """The AOT entry compiled for ``dtype`` (``"fp32"``/``"fp16"``/``"bf16"``, or one per x, weight and
    output) and these constexprs (cached). The kernel reads every load as fp32, so mixed types work."""
    dtypes = (dtype,) * 3 if isinstance(dtype, str) else tuple(dtype)
    signature = _trt.pointer_signature(("x_ptr", "w_ptr"), dtypes, SCALARS, "out_ptr")
    constexprs = {
        "STRIDE": stride,
        "PAD": padding,
        "DIL": dilation,
        "K": kernel_size,
        "BLOCK_C": block_c,
        "BLOCK_P": block_p,
    }
    return _trt.compile_aot(aot_entry(), signature, constexprs, N_PARAMS, target=target)


# ------------------------------------------------------------------------------------------ registration
def register(*, aot: bool = True) -> None:
    """Define the plugin with ``tensorrt.plugin`` (idempotent); with ``aot`` also its AOT implementation.

    Imports TensorRT: call through :func:`attn_export.plugins.trt.register_trt_plugins`.
    """
    _trt.register_plugin(__name__, PLUGIN_NAME, _define_jit, _define_aot, aot)


def _define_jit(trt, trtp) -> None:
    @trtp.register(PLUGIN_ID)
    def involution2d_desc(
        x: trtp.TensorDesc, weight: trtp.TensorDesc, kernel_size: int, stride: int, padding: int, dilation: int
    ) -> trtp.TensorDesc:
        shape = output_shape(x.shape_expr, weight.shape_expr, kernel_size, stride, padding, dilation)
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
        xs, ws = _trt.static_dims(x.shape), _trt.static_dims(weight.shape)
        cg = xs[1] // ws[1] if xs[1] is not None and ws[1] is not None else None
        howo = ws[3] * ws[4] if ws[3] is not None and ws[4] is not None else None
        block_c, block_p = blocks(cg, howo)
        dtypes = _trt.io_dtypes(trt, (x, weight), outputs)
        kernel = aot_kernel(dtypes, kernel_size, stride, padding, dilation, block_c, block_p)
        grid, scalars, _ = launch_plan(
            x.shape_expr, weight.shape_expr, kernel_size, stride, padding, dilation, block_c, block_p
        )
        return _trt.aot_launch(trtp, kernel, grid, scalars)
