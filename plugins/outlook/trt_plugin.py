"""TensorRT plugin ``attn_export::AttnExportOutlookAggregate``: ``outlook_aggregate`` inside a TensorRT engine.

The ONNX node (target ``trt``) has inputs ``v`` (B, C, H, W) and ``attn`` (B, heads, h*w, k*k, k*k) and
the int attributes ``kernel_size``, ``padding``, ``stride`` (in that order); the output has ``v``'s
shape and type. :func:`register` defines, with ``tensorrt.plugin``:

- the output shape (``v``'s shape expressions, :func:`output_shape`);
- ``impl`` (JIT): the op run from Python on TensorRT's stream (on CUDA its Triton kernel), its result
  written into TensorRT's output buffer (:func:`launch`);
- ``autotune``: fp32, fp16 or bf16 for all three tensors (and the network's own mixed input types),
  linear layout (:func:`attn_export.plugins.trt.autotune_combinations`);
- ``aot_impl`` (TensorRT >= 10.9): the Triton kernel compiled ahead of time to PTX, through an entry
  (:func:`aot_entry`) whose parameters come in TensorRT's order (inputs, int32 scalars, output), with
  a 1-D grid and the scalars as shape expressions of the batch, so the engine runs without Python.

No ``from __future__ import annotations`` here: ``tensorrt.plugin`` reads the annotations of the
registered functions as objects.
"""

import functools

from attn_export.plugins import trt as _trt
from attn_export.plugins._trt_names import OUTLOOK, plugin_id

PLUGIN_NAME = OUTLOOK
PLUGIN_ID = plugin_id(OUTLOOK)
#: The plugin's attributes, in the order of the registered function's signature (the ONNX node's
#: order must equal it: see :func:`attn_export.plugins._plugin_node.attribute_order`).
ATTRIBUTES = ("kernel_size", "padding", "stride")
#: Kernel parameters TensorRT passes to the AOT entry: 2 inputs, 9 int32 scalars, 1 output.
SCALARS = ("C", "H", "W", "GH", "GW", "HEADS", "CH", "n_pblk", "n_cblk")
N_SCALARS = len(SCALARS)
N_PARAMS = 2 + N_SCALARS + 1


# ------------------------------------------------------------------------------------------ pure shape logic
def check_attributes(kernel_size: int, padding: int, stride: int) -> None:
    if kernel_size < 1 or stride < 1 or padding < 0:
        raise ValueError(
            f"{PLUGIN_NAME}: need kernel_size, stride >= 1 and padding >= 0, got kernel_size={kernel_size}, "
            f"padding={padding}, stride={stride}"
        )


def output_shape(v, attn, kernel_size: int, padding: int, stride: int) -> tuple:
    """``v``'s shape (B, C, H, W): the windows are folded back onto the input grid."""
    check_attributes(kernel_size, padding, stride)
    return (v[0], v[1], v[2], v[3])


def window_grid(v, kernel_size: int, padding: int, stride: int) -> tuple:
    """``(h, w)``, the grid of window centres (``out_size`` with dilation 1)."""
    return (
        _trt.conv_out(v[2], kernel_size, stride, padding, 1),
        _trt.conv_out(v[3], kernel_size, stride, padding, 1),
    )


def blocks(ch: int | None, hw: int | None) -> tuple[int, int]:
    """``(BLOCK_C, BLOCK_P)`` as the Triton launcher picks them; None (a dynamic size) takes the largest."""
    block_p = 64 if hw is None else min(max(_trt.next_pow2(hw), 16), 64)
    block_c = 32 if ch is None else min(_trt.next_pow2(ch), 32)
    return block_c, block_p


def launch_plan(v, attn, kernel_size: int, padding: int, stride: int, block_c: int, block_p: int):
    """``(grid, scalars, constexprs)`` of the kernel for shapes of ``v`` and ``attn``.

    With ints this is the JIT launch; with shape expressions the AOT one (grid and scalars symbolic in
    the batch). ``scalars`` are the kernel's int32 arguments between the pointers, in its order.
    """
    check_attributes(kernel_size, padding, stride)
    b, c, h, w = v[0], v[1], v[2], v[3]
    heads = attn[1]
    gh, gw = window_grid(v, kernel_size, padding, stride)
    ch = c // heads
    n_pblk = _trt.cdiv(h * w, block_p)
    n_cblk = _trt.cdiv(ch, block_c)
    grid = b * heads * n_pblk * n_cblk
    scalars = (c, h, w, gh, gw, heads, ch, n_pblk, n_cblk)
    constexprs = {"K": kernel_size, "PAD": padding, "STRIDE": stride, "BLOCK_C": block_c, "BLOCK_P": block_p}
    return grid, scalars, constexprs


# ------------------------------------------------------------------------------------------ kernels
def launch(v, attn, out, kernel_size: int, padding: int, stride: int) -> None:
    """The JIT plugin's body on torch tensors: ``outlook_aggregate`` (on CUDA its Triton kernel) into ``out``."""
    import torch

    import attn_export.plugins  # noqa: F401  (registers the ops)

    check_attributes(kernel_size, padding, stride)
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


@functools.lru_cache(maxsize=64)
def aot_kernel(
    dtype: str | tuple[str, str, str],
    kernel_size: int,
    padding: int,
    stride: int,
    block_c: int,
    block_p: int,
    target=None,
) -> _trt.AOTKernel:
    """The AOT entry compiled for ``dtype`` (``"fp32"``/``"fp16"``/``"bf16"``, or one per v, attn and
    output) and these constexprs (cached). The kernel reads every load as fp32, so mixed types work."""
    dtypes = (dtype,) * 3 if isinstance(dtype, str) else tuple(dtype)
    signature = _trt.pointer_signature(("v_ptr", "attn_ptr"), dtypes, SCALARS, "out_ptr")
    constexprs = {"K": kernel_size, "PAD": padding, "STRIDE": stride, "BLOCK_C": block_c, "BLOCK_P": block_p}
    return _trt.compile_aot(aot_entry(), signature, constexprs, N_PARAMS, target=target)


# ------------------------------------------------------------------------------------------ registration
def register(*, aot: bool = True) -> None:
    """Define the plugin with ``tensorrt.plugin`` (idempotent); with ``aot`` also its AOT implementation.

    Imports TensorRT: call through :func:`attn_export.plugins.trt.register_trt_plugins`.
    """
    _trt.register_plugin(__name__, PLUGIN_NAME, _define_jit, _define_aot, aot)


def _define_jit(trt, trtp) -> None:
    @trtp.register(PLUGIN_ID)
    def outlook_aggregate_desc(
        v: trtp.TensorDesc, attn: trtp.TensorDesc, kernel_size: int, padding: int, stride: int
    ) -> trtp.TensorDesc:
        shape = output_shape(v.shape_expr, attn.shape_expr, kernel_size, padding, stride)
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
        vs, a = _trt.static_dims(v.shape), _trt.static_dims(attn.shape)
        ch = vs[1] // a[1] if vs[1] is not None and a[1] is not None else None
        hw = vs[2] * vs[3] if vs[2] is not None and vs[3] is not None else None
        block_c, block_p = blocks(ch, hw)
        kernel = aot_kernel(_trt.io_dtypes(trt, (v, attn), outputs), kernel_size, padding, stride, block_c, block_p)
        grid, scalars, _ = launch_plan(v.shape_expr, attn.shape_expr, kernel_size, padding, stride, block_c, block_p)
        return _trt.aot_launch(trtp, kernel, grid, scalars)
