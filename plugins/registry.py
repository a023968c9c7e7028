"""The registry of the dynamic-kernel ops: one :class:`OpSpec` per op, read by every site that lists them.

An op lives in one folder, ``plugins/<package>/``, with the modules named here by convention:

==================  ======================================================================
module              what it holds
==================  ======================================================================
``op``              the ``torch.library`` custom op ``attn_export::<op>`` (imported with the package)
``onnx_lowering``   ``portable``: the op lowered into standard ONNX ops (target ``ort``)
``plugin_node``     ``plugin``: the op as one TensorRT plugin node (target ``trt``)
``numpy_ref``       the ``onnx.reference`` ``OpRun`` class of the plugin node, named ``<plugin>``
``trt_plugin``      ``register``: the ``tensorrt.plugin`` definition of the plugin
==================  ======================================================================

Adding an op means one new folder and one entry in :data:`OPS`. This module imports nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Warps per program of every attn-export kernel: the CUDA launchers and the TensorRT AOT kernels alike.
NUM_WARPS = 4

#: Attribute kinds of the plugin nodes' own attributes: one int, or a list of ints.
INT = "int"
INTS = "ints"


@dataclass(frozen=True)
class OpSpec:
    """One op: its torch name, its TensorRT plugin name, its plugin node's inputs and attributes."""

    #: The op's name: ``torch.ops.attn_export.<op>``.
    op: str
    #: The TensorRT plugin name (the plugin node's ``op_type``, the ``OpRun`` class name).
    plugin: str
    #: The op's folder, ``attn_export.plugins.<package>``.
    package: str
    #: The plugin node's inputs.
    inputs: tuple[str, ...]
    #: The plugin node's own attributes ``(name, INT | INTS)``, in the registered TensorRT signature's order.
    attributes: tuple[tuple[str, str], ...]

    def module(self, name: str) -> str:
        """The dotted path of this op's module ``name`` (``"op"``, ``"onnx_lowering"``, ...)."""
        return f"attn_export.plugins.{self.package}.{name}"

    @property
    def attribute_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.attributes)

    @property
    def onnx_lowering(self) -> str:
        return self.module("onnx_lowering")

    @property
    def plugin_node(self) -> str:
        return self.module("plugin_node")

    @property
    def numpy_ref(self) -> str:
        return self.module("numpy_ref")

    @property
    def trt_plugin(self) -> str:
        return self.module("trt_plugin")


OPS: tuple[OpSpec, ...] = (
    OpSpec(
        op="involution2d",
        plugin="AttnExportInvolution2d",
        package="involution",
        inputs=("x", "weight"),
        attributes=(("kernel_size", INT), ("stride", INT), ("padding", INT), ("dilation", INT)),
    ),
    OpSpec(
        op="dynamic_conv2d",
        plugin="AttnExportDynamicConv2d",
        package="dynamic_conv",
        inputs=("x", "weight"),
        attributes=(("stride", INTS), ("padding", INTS), ("dilation", INTS), ("groups", INT)),
    ),
    OpSpec(
        op="outlook_aggregate",
        plugin="AttnExportOutlookAggregate",
        package="outlook",
        inputs=("v", "attn"),
        attributes=(("kernel_size", INT), ("padding", INT), ("stride", INT)),
    ),
)

#: op name -> spec
BY_OP = {spec.op: spec for spec in OPS}
#: plugin name -> spec
BY_PLUGIN = {spec.plugin: spec for spec in OPS}
