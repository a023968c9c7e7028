"""The ONNX-side precision step: from an exported fp32 graph, the half-precision graph TensorRT builds.

Two TensorRT versions want the same decision in two forms:

- **TensorRT 11** builds strongly typed networks only: precision is the graph's own types. :func:`convert`
  writes an fp16 (or bf16) graph whose inputs and outputs stay fp32 (``keep_io_types``, as ModelOpt's
  AutoCast does), with ``Cast`` nodes around the regions that stay fp32.
- **TensorRT 10** builds the fp32 graph with ``BuilderFlag.FP16`` (weak typing); the same regions are
  pinned to fp32 with ``OBEY_PRECISION_CONSTRAINTS`` and each layer's ``precision`` and output types
  (:func:`apply_layer_precisions`; trtexec: ``--precisionConstraints=obey --layerPrecisions=...``).

Both come from one :class:`PrecisionPlan` (:func:`plan_precision`), made by this policy; a node stays
fp32 when

1. it is a softmax (``Softmax``, ``LogSoftmax``): sums of exponentials, and the attention weights of
   the outlook and SK blocks;
2. it normalizes with statistics it computes (``LayerNormalization``, ``GroupNormalization``,
   ``InstanceNormalization``): means of squares overflow fp16 long before the activations do;
3. it is part of a **covariance** (second-order pooling, GSoP): a ``MatMul`` of a tensor with its own
   transpose, the mean-centering ``Sub``/``ReduceMean`` before it, and the chain after it through
   scaling and reshaping up to and including the ``BatchNormalization`` that normalizes it. On the
   shipped detector the covariance reaches 3.7e7 before the division by H*W (fp16 stops at 65,504);
4. an initializer it reads is beyond fp16's range (a BatchNorm running variance of 375,075, say);
5. a float tensor it writes was measured beyond ``fp16 max / headroom`` (default 65,504 / 4) when the
   fp32 graph ran on onnxruntime with sample inputs (:func:`measure_ranges`): reductions and large
   matrix products whose sums outgrow fp16;
6. it holds a subgraph (``Scan``, ``Loop``, ``If``), writes a tensor a subgraph reads from outside, or
   has a type attribute this step does not rewrite (a ``value_float`` ``Constant``, say).

Rules 4 and 5 are about fp16's range; bf16 has fp32's, so for bf16 only rules 1-3 and 6 apply. The rest
of the graph (convolutions, the plugin nodes, elementwise ops) runs in the low type; TensorRT still
accumulates fp16 convolutions and matrix products in fp32. Every input of an attn-export plugin node is
cast to one type, so the plugins always find a uniform combination (their AOT ``tl.dot`` needs one).

onnxruntime runs such a graph on the CPU, but its CPU provider has few fp16 kernels: it computes the
other nodes in fp32 and drops the casts between neighbouring ones, so a tensor the graph stores in fp16
is not always rounded there. :func:`simulate` gives the numerics TensorRT's storage implies: the fp32
graph with every tensor a low-precision node writes rounded to fp16 (bf16) and back; the tests judge
half precision on it, and run the converted graph for validity.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

#: Largest finite fp16 value.
FP16_MAX = 65504.0
#: A tensor measured above ``FP16_MAX / RANGE_HEADROOM`` stays fp32 (inputs unlike the samples may be larger).
RANGE_HEADROOM = 4.0
#: The low-precision types and their ONNX element types (filled lazily: onnx is imported when used).
LOW_TYPES = ("fp16", "bf16")

SOFTMAX = {"Softmax", "LogSoftmax"}
STAT_NORMS = {"LayerNormalization", "GroupNormalization", "InstanceNormalization"}
SUBGRAPH_OPS = {"Scan", "Loop", "If"}
#: Ops through which the covariance region continues after the Gram product (scaling, reshaping).
_COV_CHAIN = {"Div", "Mul", "Unsqueeze", "Squeeze", "Reshape", "Transpose", "Flatten", "Add", "Sub"}
#: Ops with a type attribute this step rewrites (anything else with one stays fp32).
_TYPED_OPS = {"Cast", "Constant", "ConstantOfShape", "CastLike"}
#: Ops that read any type (their float inputs are not cast).
_ANY_TYPE_OPS = {"Shape", "Size"}
#: Float inputs that must stay fp32 whatever the node's precision: (op, input index).
_FP32_INPUTS = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}


@dataclass
class PrecisionPlan:
    """Which nodes stay fp32, and why (node name -> reason); everything else runs in ``low``."""

    low: str
    fp32: dict[str, str] = field(default_factory=dict)
    ranges: dict[str, float] = field(default_factory=dict)
    headroom: float = RANGE_HEADROOM

    def reasons(self) -> dict[str, int]:
        """``{reason kind: count}`` (the part of each reason before its first colon)."""
        return dict(collections.Counter(r.split(":")[0] for r in self.fp32.values()))

    def to_dict(self) -> dict:
        return {"low": self.low, "fp32_nodes": dict(self.fp32), "reasons": self.reasons(), "headroom": self.headroom}


def _onnx():
    import onnx

    return onnx


def _low_elem(low: str) -> int:
    TP = _onnx().TensorProto
    if low not in LOW_TYPES:
        raise ValueError(f"low precision: choose one of {', '.join(LOW_TYPES)}, got {low!r}")
    return TP.FLOAT16 if low == "fp16" else TP.BFLOAT16


def _elem_types(model) -> dict[str, int]:
    """Element type of every typed tensor of the main graph (inputs, initializers, value_info, outputs)."""
    g = model.graph
    types = {i.name: i.data_type for i in g.initializer}
    for v in (*g.input, *g.value_info, *g.output):
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    return types


def _with_types(model):
    """``model`` with shape inference run (types for every tensor ONNX can infer); plugin nodes keep the
    exporter's ``value_info``."""
    onnx = _onnx()
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:  # a graph shape inference cannot take: use the types it already has
        return model


def _typed_copy(model):
    """``(a copy of model with shapes inferred, {tensor: element type})``: what the rewrites start from."""
    out = _onnx().ModelProto()
    out.CopyFrom(_with_types(model))
    return out, _elem_types(out)


# ------------------------------------------------------------------------------------------ ranges
def measure_ranges(model, samples: Iterable[np.ndarray], input_name: str | None = None) -> dict[str, float]:
    """Max |value| of every float tensor of the fp32 ``model``, over ``samples`` (onnxruntime, CPU).

    Plugin nodes (domain ``trt.plugins``) run through the numpy references, on ONNX's reference evaluator
    instead (slower; give small batches).
    """
    onnx = _onnx()
    model = _with_types(model)
    types = _elem_types(model)
    FLOAT = onnx.TensorProto.FLOAT
    produced = [o for n in model.graph.node for o in n.output if o and types.get(o) == FLOAT]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for name in produced:
        if name not in known:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, FLOAT, None))
    names = [o.name for o in probe.graph.output]
    input_name = input_name or model.graph.input[0].name
    plugin = any(n.domain not in ("", "ai.onnx") for n in model.graph.node)
    if plugin:
        from onnx.reference import ReferenceEvaluator

        from attn_export.plugins import reference_ops

        ref = ReferenceEvaluator(probe, new_ops=reference_ops())

        def run(x):
            return ref.run(None, {input_name: x})
    else:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])

        def run(x):
            return sess.run(names, {input_name: x})

    ranges: dict[str, float] = {}
    for x in samples:
        for name, value in zip(names, run(np.asarray(x, dtype=np.float32)), strict=True):
            value = np.asarray(value)
            if value.size and value.dtype.kind == "f":
                ranges[name] = max(ranges.get(name, 0.0), float(np.nanmax(np.abs(value))))
    return ranges


# ------------------------------------------------------------------------------------------ the plan
def _outer_refs(graph) -> set[str]:
    """Names the subgraphs of ``graph``'s nodes read from outside themselves (implicit inputs)."""
    refs: set[str] = set()
    for n in graph.node:
        for a in n.attribute:
            subs = [a.g] if a.type == a.GRAPH else list(a.graphs) if a.type == a.GRAPHS else []
            for sg in subs:
                local = {i.name for i in (*sg.input, *sg.initializer)} | {o for m in sg.node for o in m.output}
                refs |= {i for m in sg.node for i in m.input if i and i not in local}
                refs |= _outer_refs(sg) - local
    return refs


def _covariance_nodes(graph) -> dict[str, str]:
    """Nodes of every covariance region (rule 3): Gram MatMul, its centering, and the chain up to its norm."""
    producer = {o: n for n in graph.node for o in n.output}
    consumers = collections.defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    out: dict[str, str] = {}
    for n in graph.node:
        if n.op_type not in ("MatMul", "Gemm") or len(n.input) < 2:
            continue
        a, b = n.input[0], n.input[1]
        pa, pb = producer.get(a), producer.get(b)
        gram = a == b or (pb is not None and pb.op_type == "Transpose" and pb.input[0] == a)
        gram = gram or (pa is not None and pa.op_type == "Transpose" and pa.input[0] == b)
        if not gram:
            continue
        reason = f"covariance: Gram product {n.name}"
        out[n.name] = reason
        for t in (pa, pb):  # the transpose and the centering (x - mean(x)) before it
            if t is not None and t.op_type in ("Transpose", "Sub"):
                out[t.name] = reason
                src = producer.get(t.input[0]) if t.op_type == "Transpose" else t
                if src is not None and src.op_type == "Sub":
                    out[src.name] = reason
                    mean = producer.get(src.input[1]) if len(src.input) > 1 else None
                    if mean is not None and mean.op_type == "ReduceMean":
                        out[mean.name] = reason
        tensor, steps = n.output[0], 0
        while steps < 8:  # scaling/reshaping after the product, up to and including its normalization
            users = consumers.get(tensor, [])
            if len(users) != 1:
                break
            user = users[0]
            if user.op_type == "BatchNormalization":
                out[user.name] = reason
                break
            if user.op_type not in _COV_CHAIN:
                break
            out[user.name] = reason
            tensor, steps = user.output[0], steps + 1
    return out


def plan_precision(
    model,
    low: str = "fp16",
    ranges: Mapping[str, float] | None = None,
    headroom: float = RANGE_HEADROOM,
) -> PrecisionPlan:
    """The nodes of ``model`` (fp32) that stay fp32 under the policy of this module, with reasons.

    ``ranges`` (tensor -> max |value|, :func:`measure_ranges`) enables rule 5; without it only the
    structural rules and the initializer rule apply.
    """
    onnx = _onnx()
    from onnx import numpy_helper

    _low_elem(low)
    if headroom < 1:
        raise ValueError(f"headroom must be >= 1, got {headroom}")
    g = model.graph
    plan = PrecisionPlan(low, ranges=dict(ranges or {}), headroom=headroom)
    fp16 = low == "fp16"
    limit = FP16_MAX / headroom
    big_inits = set()
    if fp16:
        for init in g.initializer:
            if init.data_type == onnx.TensorProto.FLOAT:
                a = numpy_helper.to_array(init)
                if a.size and float(np.abs(a).max()) > FP16_MAX:
                    big_inits.add(init.name)
    cov = _covariance_nodes(g)
    implicit = _outer_refs(g)
    for n in g.node:
        if n.op_type in SOFTMAX:
            plan.fp32[n.name] = f"softmax: {n.op_type}"
        elif n.op_type in STAT_NORMS:
            plan.fp32[n.name] = f"normalization statistics: {n.op_type}"
        elif n.name in cov:
            plan.fp32[n.name] = cov[n.name]
        elif n.op_type in SUBGRAPH_OPS or any(a.type in (a.GRAPH, a.GRAPHS) for a in n.attribute):
            plan.fp32[n.name] = f"subgraph: {n.op_type}"
        elif any(o in implicit for o in n.output):
            plan.fp32[n.name] = f"subgraph: {n.op_type} output read inside a subgraph"
        elif fp16 and any(i in big_inits for i in n.input):
            name = next(i for i in n.input if i in big_inits)
            plan.fp32[n.name] = f"initializer beyond fp16: {name}"
        elif fp16 and any(plan.ranges.get(o, 0.0) > limit for o in n.output):
            o = max(n.output, key=lambda t: plan.ranges.get(t, 0.0))
            plan.fp32[n.name] = f"range: {o} reaches {plan.ranges[o]:.4g} (> {limit:.4g})"
        elif n.op_type not in _TYPED_OPS and any(a.name in ("dtype", "to") for a in n.attribute):
            plan.fp32[n.name] = f"type attribute: {n.op_type}"
        elif n.op_type == "Constant" and not any(a.name == "value" for a in n.attribute):
            plan.fp32[n.name] = "type attribute: Constant"  # value_float(s) are always fp32
    return plan


# ------------------------------------------------------------------------------------------ conversion
def _low_array(a: np.ndarray, low: str) -> np.ndarray:
    if low == "fp16":
        return a.astype(np.float16)
    import ml_dtypes

    return a.astype(ml_dtypes.bfloat16)


def _tensor(a: np.ndarray, name: str, elem: int):
    onnx = _onnx()
    t = onnx.TensorProto()
    t.name = name
    t.data_type = elem
    t.dims.extend(a.shape)
    t.raw_data = np.ascontiguousarray(a).view(np.uint16 if a.itemsize == 2 else a.dtype).tobytes()
    return t


def convert(model, plan: PrecisionPlan, keep_io_types: bool = True):
    """The graph of ``plan``: every node not kept fp32 computes in ``plan.low``; casts where types meet.

    Float initializers read by low-precision nodes are stored in the low type (a copy where fp32 nodes
    read them too); ``Cast``/``Constant``/``ConstantOfShape`` of low-precision nodes produce the low
    type; the inputs of each node get one type (a ``Cast`` where needed, one per tensor and type). With
    ``keep_io_types`` the graph's inputs and outputs stay fp32 (TensorRT 11 then takes fp32 in and out).
    The result passes ``onnx.checker``; plugin nodes keep their ``value_info`` with the new types.
    """
    onnx = _onnx()
    from onnx import helper, numpy_helper

    FLOAT, LOW = onnx.TensorProto.FLOAT, _low_elem(plan.low)
    out, types = _typed_copy(model)
    g = out.graph
    inits = {i.name: i for i in g.initializer}
    dtype: dict[str, int] = {}  # the type each float tensor has in the new graph
    for i in g.input:
        if types.get(i.name) == FLOAT:
            dtype[i.name] = FLOAT if keep_io_types else LOW
    low_inits: dict[str, str] = {}
    casts: dict[tuple[str, int], str] = {}
    new_nodes = []
    new_inits = []
    shapes = {v.name: v for v in (*g.input, *g.value_info, *g.output)}
    new_vi: dict[str, int] = {}

    def low_init(name: str) -> str:
        if name not in low_inits:
            a = numpy_helper.to_array(inits[name])
            if plan.low == "fp16" and a.size and float(np.abs(a).max()) > FP16_MAX:
                readers = [n.name for n in g.node if name in n.input and n.name not in plan.fp32]
                raise ValueError(
                    f"initializer {name} reaches {float(np.abs(a).max()):.4g}, beyond fp16, and {readers} would read "
                    "it in fp16; plan_precision keeps such readers fp32"
                )
            low_name = f"{name}__{plan.low}"
            new_inits.append(_tensor(_low_array(a, plan.low), low_name, LOW))
            low_inits[name] = low_name
        return low_inits[name]

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            cname = f"{name}__to_{'fp32' if to == FLOAT else plan.low}"
            new_nodes.append(helper.make_node("Cast", [name], [cname], name=f"cast_{cname}", to=to))
            casts[key] = cname
            new_vi[cname] = to
            if name in shapes:
                shapes[cname] = shapes[name]
        return casts[key]

    def current(name: str) -> int | None:
        if name in dtype:
            return dtype[name]
        if name in inits and inits[name].data_type == FLOAT:
            return FLOAT
        return None

    for n in list(g.node):
        want = FLOAT if n.name in plan.fp32 else LOW
        if n.op_type == "Cast":
            to = next(a.i for a in n.attribute if a.name == "to")
            if to == FLOAT and want == LOW:
                for a in n.attribute:
                    if a.name == "to":
                        a.i = LOW
            if to in (FLOAT, LOW):
                dtype[n.output[0]] = want
                new_vi[n.output[0]] = want
            new_nodes.append(n)
            continue
        for idx, name in enumerate(n.input):
            if not name or current(name) is None or n.op_type in _ANY_TYPE_OPS:
                continue
            need = FLOAT if (n.op_type, idx) in _FP32_INPUTS else want
            if name in inits and current(name) == FLOAT and name not in dtype:
                if need == LOW:
                    n.input[idx] = low_init(name)
                continue
            if dtype[name] != need:
                n.input[idx] = cast(name, need)
        if want == LOW and n.op_type in ("Constant", "ConstantOfShape"):
            if n.op_type == "ConstantOfShape" and not any(a.name == "value" for a in n.attribute):
                n.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.zeros(1, np.float32))))
            for a in n.attribute:
                if a.name == "value" and a.t.data_type == FLOAT:
                    arr = numpy_helper.to_array(a.t)
                    a.t.CopyFrom(_tensor(_low_array(arr, plan.low), a.t.name, LOW))
        for o in n.output:
            if o and types.get(o) == FLOAT:
                dtype[o] = want
                new_vi[o] = want
        new_nodes.append(n)

    # graph outputs: back to fp32 (keep_io_types) under their own names
    renames = {}
    for o in g.output:
        if types.get(o.name) == FLOAT and keep_io_types and dtype.get(o.name) == LOW:
            renames[o.name] = f"{o.name}__{plan.low}"
    if renames:
        for n in new_nodes:
            for k, name in enumerate(n.output):
                if name in renames:
                    n.output[k] = renames[name]
            for k, name in enumerate(n.input):
                if name in renames:
                    n.input[k] = renames[name]
        for name, low_name in renames.items():
            new_nodes.append(helper.make_node("Cast", [low_name], [name], name=f"cast_{name}__to_fp32", to=FLOAT))
            new_vi[low_name] = LOW
            shapes[low_name] = shapes[name]
            new_vi[name] = FLOAT
    for o in g.output:
        if not keep_io_types and o.name in dtype:
            o.type.tensor_type.elem_type = dtype[o.name]

    del g.node[:]
    g.node.extend(new_nodes)
    used = {i for n in new_nodes for i in n.input} | _outer_refs(g)
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    # value_info: the new types, shapes where known
    outputs = {o.name for o in g.output}
    old = {v.name: v for v in g.value_info}
    del g.value_info[:]
    for name, v in old.items():
        if name in new_vi:
            v.type.tensor_type.elem_type = new_vi[name]
        if name in used or name in {o for n in new_nodes for o in n.output}:
            g.value_info.append(v)
    for name, elem in new_vi.items():
        if name in old or name in outputs:
            continue
        vi = onnx.ValueInfoProto()
        if name in shapes and shapes[name].type.HasField("tensor_type"):
            vi.CopyFrom(shapes[name])
        vi.name = name
        vi.type.tensor_type.elem_type = elem
        g.value_info.append(vi)
    for i in g.input:
        if not keep_io_types and i.name in dtype:
            i.type.tensor_type.elem_type = dtype[i.name]
    return out


def graph_precision(model) -> str:
    """``"fp32"``, ``"fp16"``, ``"bf16"`` or ``"mixed"``: the float types a graph computes in.

    From the element types of initializers and of the tensors nodes write: any fp16 (bf16) tensor makes
    it ``"fp16"`` (``"bf16"``; fp32 islands and fp32 I/O included), both kinds ``"mixed"``.
    """
    TP = _onnx().TensorProto
    types = _elem_types(model)
    produced = {o for n in model.graph.node for o in n.output if o}
    kinds = collections.Counter(
        t for name, t in types.items() if (name in produced or name in {i.name for i in model.graph.initializer})
    )
    f16, b16 = kinds.get(TP.FLOAT16, 0), kinds.get(TP.BFLOAT16, 0)
    if f16 and b16:
        return "mixed"
    if f16 or b16:
        return "fp16" if f16 else "bf16"
    return "fp32"


def simulate(model, plan: PrecisionPlan):
    """An fp32 graph that rounds like ``convert(model, plan)`` stores: every float tensor a low-precision
    node writes goes through ``Cast(low) -> Cast(fp32)``, and low nodes read rounded initializers.

    For checking bf16 (and fp16) numerics where onnxruntime's CPU provider has no low-precision kernels:
    it reproduces the rounding and range of every stored tensor, not the low-precision arithmetic inside
    a node (TensorRT's kernels accumulate in fp32 too).
    """
    onnx = _onnx()
    from onnx import helper, numpy_helper

    TP = onnx.TensorProto
    LOW = _low_elem(plan.low)
    out, types = _typed_copy(model)
    g = out.graph
    inits = {i.name: i for i in g.initializer}
    rounded: dict[str, str] = {}
    nodes = []
    extra_inits = []
    for n in list(g.node):
        low = n.name not in plan.fp32
        if low:
            for idx, name in enumerate(n.input):
                if name in inits and inits[name].data_type == TP.FLOAT and (n.op_type, idx) not in _FP32_INPUTS:
                    if name not in rounded:
                        a = numpy_helper.to_array(inits[name])
                        r = _low_array(a, plan.low).astype(np.float32)
                        rounded[name] = f"{name}__rounded"
                        extra_inits.append(numpy_helper.from_array(r, rounded[name]))
                    n.input[idx] = rounded[name]
        nodes.append(n)
        if not low:
            continue
        for k, o in enumerate(n.output):
            if o and types.get(o) == TP.FLOAT:
                raw = f"{o}__unrounded"
                n.output[k] = raw
                nodes.append(helper.make_node("Cast", [raw], [f"{o}__low"], to=LOW))
                nodes.append(helper.make_node("Cast", [f"{o}__low"], [o], to=TP.FLOAT))
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(extra_inits)
    return out


def layer_precision_args(plan: PrecisionPlan, names: Iterable[str] | None = None) -> list[str]:
    """trtexec's form of the plan for TensorRT 10 (weakly typed fp16/bf16 builds): the fp32 layers by name
    (``names``: the layers :func:`apply_layer_precisions` pinned; default the plan's node names)."""
    names = sorted(set(plan.fp32 if names is None else names))
    if not names:
        return []
    spec = ",".join(f"{name}:fp32" for name in names)
    return ["--precisionConstraints=obey", f"--layerPrecisions={spec}", f"--layerOutputTypes={spec}"]


def apply_layer_precisions(trt, network, plan: PrecisionPlan, fp32_tensors: Sequence[str] = ()) -> list[str]:
    """Pin the plan's fp32 layers of a parsed TensorRT 10 ``network``: ``layer.precision`` and the type of
    every float output set to fp32 (the config needs ``OBEY_PRECISION_CONSTRAINTS``). Returns the names.

    TensorRT's ONNX parser names a node's layer after the node; a node that becomes several layers is
    matched by the name of the tensor its last layer writes (the ONNX output name, ``fp32_tensors``).
    """
    float_types = {trt.DataType.FLOAT, trt.DataType.HALF} | (
        {trt.DataType.BF16} if hasattr(trt.DataType, "BF16") else set()
    )
    tensors = set(fp32_tensors)
    pinned = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outs = [layer.get_output(k) for k in range(layer.num_outputs)]
        if layer.name not in plan.fp32 and not any(o.name in tensors for o in outs):
            continue
        floats = [k for k, o in enumerate(outs) if o.dtype in float_types]
        if not floats:
            continue
        layer.precision = trt.DataType.FLOAT
        for k in floats:
            layer.set_output_type(k, trt.DataType.FLOAT)
        pinned.append(layer.name)
    return pinned


def fp32_tensors(model, plan: PrecisionPlan) -> list[str]:
    """The tensors the plan's fp32 nodes write (how :func:`apply_layer_precisions` finds multi-layer nodes)."""
    return [o for n in model.graph.node if n.name in plan.fp32 for o in n.output if o]
