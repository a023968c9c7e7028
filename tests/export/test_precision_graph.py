"""The ONNX-side precision step (:mod:`attn_export.export.precision_graph`).

The converted fp16 graphs run on onnxruntime's CPU provider, and the plugin graphs on ONNX's reference
evaluator with the numpy plugins (numpy computes in fp16). onnxruntime's CPU provider has few fp16 (and
fewer bf16) kernels: it runs the others in fp32 and drops the casts between neighbouring ones, so a
tensor the graph stores in fp16 may never be rounded there (a Gram product of 3.8e5 came out finite).
The numerics are therefore judged on :func:`simulate` graphs as well: fp32 graphs that round every
tensor a low-precision node writes to fp16 (bf16) and back, as TensorRT stores it between layers.
Each block alone at realistic magnitudes, and the shipped detector on real images from the generator,
against the fp32 graph with half-precision tolerances.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from attn_export.export import precision_graph as pg

ROOT = Path(__file__).resolve().parents[2]
FLOAT, HALF, BF16 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16


def _ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    """onnxruntime (CPU) without graph optimizations: no fusion hides a tensor stored in fp16 (a MatMul
    fused with the Div after it would never write its fp16 output)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _close(got: np.ndarray, ref: np.ndarray, tol: float) -> float:
    """The largest error relative to ``tol * (|ref| + max|ref|)``: <= 1 passes (NaN/inf never do)."""
    scale = tol * (np.abs(ref) + max(1.0, float(np.abs(ref).max())))
    err = np.abs(got.astype(np.float64) - ref.astype(np.float64)) / scale
    return float(np.nanmax(np.where(np.isfinite(got), err, np.inf)))


# ------------------------------------------------------------------------------------------ a small graph
def _toy_graph(big_init: bool = False) -> onnx.ModelProto:
    """x (B, 4, 6) -> softmax, layer norm, a covariance chain with its BatchNorm, a Resize, output (fp32)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((6, 6)).astype(np.float32), "w"),
        numpy_helper.from_array(np.ones(6, np.float32), "ln_s"),
        numpy_helper.from_array(np.zeros(6, np.float32), "ln_b"),
        numpy_helper.from_array(np.array([2], np.int64), "axes"),
        numpy_helper.from_array(np.float32(6.0), "n"),
        numpy_helper.from_array(np.ones(4, np.float32), "bn_s"),
        numpy_helper.from_array(np.zeros(4, np.float32), "bn_b"),
        numpy_helper.from_array(np.zeros(4, np.float32), "bn_m"),
        numpy_helper.from_array(np.full(4, 4e5 if big_init else 2.0, np.float32), "bn_v"),
        numpy_helper.from_array(np.array([1, 1, 1, 1], np.float32), "scales"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
        helper.make_node("Softmax", ["h"], ["sm"], name="attn", axis=-1),
        helper.make_node("LayerNormalization", ["sm", "ln_s", "ln_b"], ["ln"], name="norm", axis=-1),
        helper.make_node("ReduceMean", ["h", "axes"], ["mu"], name="mean", keepdims=1),
        helper.make_node("Sub", ["h", "mu"], ["c"], name="center"),
        helper.make_node("Transpose", ["c"], ["ct"], name="ct", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["c", "ct"], ["cov"], name="gram"),
        helper.make_node("Div", ["cov", "n"], ["covn"], name="scale"),
        helper.make_node("Unsqueeze", ["covn", "one"], ["cov4"], name="unsq"),
        helper.make_node("Transpose", ["cov4"], ["cov4t"], name="to_nchw", perm=[0, 2, 1, 3]),
        helper.make_node("BatchNormalization", ["cov4t", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"], name="bn"),
        helper.make_node("Resize", ["bn", "", "scales"], ["rs"], name="resize", mode="nearest"),
        helper.make_node("ReduceSum", ["rs", "axes"], ["s"], name="sum", keepdims=0),
        helper.make_node("Shape", ["ln"], ["shp"], name="shape"),
        helper.make_node("Cast", ["shp"], ["shpf"], name="shape_f", to=FLOAT),
        helper.make_node("ReduceSum", ["shpf"], ["nel"], name="nel", keepdims=1),
        helper.make_node("Mul", ["ln", "nel"], ["y"], name="out"),
    ]
    graph = helper.make_graph(
        nodes,
        "toy",
        [helper.make_tensor_value_info("x", FLOAT, ["B", 4, 6])],
        [helper.make_tensor_value_info("y", FLOAT, None), helper.make_tensor_value_info("s", FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def test_plan_follows_the_policy():
    model = _toy_graph(big_init=True)
    plan = pg.plan_precision(model, "fp16")
    assert plan.fp32["attn"].startswith("softmax")
    assert plan.fp32["norm"].startswith("normalization statistics")
    for name in ("mean", "center", "ct", "gram", "scale", "unsq", "to_nchw", "bn"):
        assert plan.fp32[name].startswith("covariance"), name
    assert "proj" not in plan.fp32 and "resize" not in plan.fp32 and "sum" not in plan.fp32
    # rule 5: a tensor measured beyond fp16 max / headroom keeps its producer fp32
    plan = pg.plan_precision(model, "fp16", ranges={"s": 20000.0, "h": 100.0})
    assert plan.fp32["sum"].startswith("range: s reaches 2e+04")
    assert "proj" not in plan.fp32
    # bf16 has fp32's range: the range and initializer rules do not apply
    plan = pg.plan_precision(model, "bf16", ranges={"s": 1e9})
    assert "sum" not in plan.fp32 and plan.fp32["bn"].startswith("covariance")
    with pytest.raises(ValueError, match="fp16, bf16"):
        pg.plan_precision(model, "fp8")


def test_an_initializer_beyond_fp16_keeps_its_reader_fp32():
    model = _toy_graph(big_init=True)
    # out of the covariance chain: a BatchNorm reading a running variance of 4e5 directly
    model.graph.node.append(
        helper.make_node("BatchNormalization", ["rs", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn2"], name="bn2")
    )
    plan = pg.plan_precision(model, "fp16")
    assert plan.fp32["bn2"] == "initializer beyond fp16: bn_v"


@pytest.mark.parametrize("keep_io_types", [True, False])
def test_convert_types_and_casts(keep_io_types):
    model = _toy_graph()
    plan = pg.plan_precision(model, "fp16")
    low = pg.convert(model, plan, keep_io_types=keep_io_types)
    onnx.checker.check_model(low, full_check=True)
    io = FLOAT if keep_io_types else HALF
    assert [i.type.tensor_type.elem_type for i in low.graph.input] == [io]
    assert [o.type.tensor_type.elem_type for o in low.graph.output] == [io, io]
    types = pg._elem_types(onnx.shape_inference.infer_shapes(low, strict_mode=True))
    by_name = {n.name: n for n in low.graph.node}
    assert types[by_name["proj"].output[0]] == HALF and types[by_name["attn"].output[0]] == FLOAT
    assert types[by_name["gram"].output[0]] == FLOAT and types[by_name["bn"].output[0]] == FLOAT
    assert types[by_name["resize"].output[0]] == HALF
    assert types[by_name["resize"].input[2]] == FLOAT  # Resize's scales stay fp32
    assert by_name["shape_f"].attribute[0].i == HALF  # a Cast to float in the low region casts to fp16
    assert pg.graph_precision(low) == "fp16" and pg.graph_precision(model) == "fp32"
    # every node's float inputs agree (ONNX's type constraints; strongly typed TensorRT needs it too)
    x = np.random.default_rng(1).standard_normal((3, 4, 6)).astype(np.float32)
    ref = _ort(model, {"x": x})
    got = _ort(low, {"x": x if keep_io_types else x.astype(np.float16)})
    for g, r in zip(got, ref, strict=True):
        assert _close(g, r, 1e-2) <= 1


def test_convert_bf16_graph_is_valid_and_simulation_rounds_like_it():
    model = _toy_graph()
    plan = pg.plan_precision(model, "bf16")
    low = pg.convert(model, plan)
    onnx.checker.check_model(low, full_check=True)
    assert pg.graph_precision(low) == "bf16"
    inits = {i.name: i for i in low.graph.initializer}
    assert inits["w__bf16"].data_type == BF16
    w = numpy_helper.to_array(inits["w__bf16"]).astype(np.float32)
    w32 = numpy_helper.to_array({i.name: i for i in model.graph.initializer}["w"])
    assert 0 < np.abs(w - w32).max() <= 2**-8 * np.abs(w32).max()  # rounded to bf16's 8 bits
    x = np.random.default_rng(2).standard_normal((2, 4, 6)).astype(np.float32)
    ref = _ort(model, {"x": x})
    sim = _ort(pg.simulate(model, plan), {"x": x})
    for g, r in zip(sim, ref, strict=True):
        assert _close(g, r, 5e-2) <= 1
    assert any(not np.array_equal(g, r) for g, r in zip(sim, ref, strict=True))  # it does round


def test_subgraphs_constants_and_their_types():
    """An If whose branches read an outer tensor and an initializer; a value_float Constant; a
    ConstantOfShape without a value: the converted graph is valid and gives the fp32 answer."""
    x = helper.make_tensor_value_info("x", FLOAT, [2, 3])
    branch_out = helper.make_tensor_value_info("b", FLOAT, [2, 3])
    then_g = helper.make_graph([helper.make_node("Add", ["h", "bias"], ["b"])], "then", [], [branch_out])
    else_g = helper.make_graph([helper.make_node("Sub", ["h", "bias"], ["b"])], "else", [], [branch_out])
    nodes = [
        helper.make_node("Relu", ["x"], ["h"], name="relu"),
        helper.make_node("Constant", [], ["k"], name="k", value_float=2.0),
        helper.make_node("Mul", ["h", "k"], ["hk"], name="scale"),
        helper.make_node("Shape", ["x"], ["shp"], name="shape"),
        helper.make_node("ConstantOfShape", ["shp"], ["zeros"], name="zeros"),
        helper.make_node("Add", ["hk", "zeros"], ["hz"], name="add"),
        helper.make_node("ReduceSum", ["hz"], ["tot"], name="tot", keepdims=0),
        helper.make_node("Greater", ["tot", "zero"], ["cond"], name="cond"),
        helper.make_node("If", ["cond"], ["br"], name="branch", then_branch=then_g, else_branch=else_g),
        helper.make_node("Mul", ["br", "hz"], ["y"], name="out"),
    ]
    inits = [
        numpy_helper.from_array(np.full((2, 3), 0.5, np.float32), "bias"),
        numpy_helper.from_array(np.float32(0), "zero"),
    ]
    y = helper.make_tensor_value_info("y", FLOAT, [2, 3])
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 18)]
    )
    model.ir_version = 10
    plan = pg.plan_precision(model, "fp16")
    assert plan.fp32["branch"].startswith("subgraph") and plan.fp32["k"].startswith("type attribute")
    assert plan.fp32["relu"] == "subgraph: Relu output read inside a subgraph"
    low = pg.convert(model, plan)
    onnx.checker.check_model(low, full_check=True)
    assert "bias" in {i.name for i in low.graph.initializer}  # read only inside the branches: kept
    feeds = {"x": np.random.default_rng(3).standard_normal((2, 3)).astype(np.float32)}
    assert _close(_ort(low, feeds)[0], _ort(model, feeds)[0], 1e-2) <= 1


def test_layer_precisions_for_tensorrt_10():
    model = _toy_graph()
    plan = pg.plan_precision(model, "fp16")
    args = pg.layer_precision_args(plan)
    assert args[0] == "--precisionConstraints=obey"
    assert args[1].startswith("--layerPrecisions=") and "attn:fp32" in args[1] and "gram:fp32" in args[1]
    assert args[2] == args[1].replace("--layerPrecisions=", "--layerOutputTypes=")
    assert pg.layer_precision_args(pg.PrecisionPlan("fp16")) == []


# ------------------------------------------------------------------------------------------ blocks
def _scaled(module: nn.Module, seed: int, magnitude: float) -> nn.Module:
    """Random weights (as the other export tests make them); BatchNorm statistics for activations of
    ``magnitude`` (running variances times ``magnitude**2``)."""
    from weights import randomize_

    randomize_(module, seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_var.mul_(magnitude**2)
    return module.eval()


def _blocks():
    from attn_export.blocks import GSoPBlock, Involution2d, ODConv2d, OutlookAttention, SKConv

    return {
        "Involution2d": (lambda: Involution2d(16, kernel_size=7, group_channels=8), (16, 12, 12)),
        "ODConv2d": (lambda: ODConv2d(16, 32, kernel_size=3, padding=1, kernel_num=4), (16, 12, 12)),
        "OutlookAttention": (lambda: OutlookAttention(32, num_heads=2), (12, 12, 32)),
        "GSoPBlock": (lambda: GSoPBlock(32, mid_channels=16), (32, 10, 10)),
        "SKConv": (lambda: SKConv(32, groups=8, min_dim=16), (32, 12, 12)),
    }


def _export(model, path, shape, target="ort") -> onnx.ModelProto:
    from attn_export.export import export_onnx

    export_onnx(model, path, shape, batch=(1, 2, 4), target=target, verify=False, seed=0)
    return onnx.load(str(path))


# (name, input magnitude): activations in the hundreds, as the shipped detector's reach (max ~1100)
@pytest.mark.parametrize("name", list(_blocks()))
def test_each_block_in_half_precision_at_realistic_magnitudes(tmp_path, name):
    factory, shape = _blocks()[name]
    model = _scaled(factory(), seed=3, magnitude=30.0)
    graph = _export(model, tmp_path / "block.onnx", shape)
    rng = np.random.default_rng(4)
    x = (30.0 * rng.standard_normal((3, *shape))).astype(np.float32)
    samples = [(30.0 * rng.standard_normal((2, *shape))).astype(np.float32)]
    ref = _ort(graph, {"input": x})[0]
    plan16 = pg.plan_precision(graph, "fp16", pg.measure_ranges(graph, samples))
    fp16 = _ort(pg.convert(graph, plan16), {"input": x})[0]
    assert _close(fp16, ref, 1e-2) <= 1, name
    fp16 = _ort(pg.simulate(graph, plan16), {"input": x})[0]
    assert _close(fp16, ref, 1e-2) <= 1, name
    bf16 = _ort(pg.simulate(graph, pg.plan_precision(graph, "bf16")), {"input": x})[0]
    assert _close(bf16, ref, 6e-2) <= 1, name


def test_gsop_covariance_needs_its_fp32_island(tmp_path):
    """Features of ~70 entering the covariance (the BatchNorm before it does not shrink them): the Gram
    product sums ~5e5 before its division by H*W, beyond fp16. All-fp16 overflows; with the policy's
    island the fp16 graph gives the fp32 answer."""
    from attn_export.blocks import GSoPBlock

    model = _scaled(GSoPBlock(32, mid_channels=16), seed=5, magnitude=1.0)
    with torch.no_grad():
        model.conv_for_DR.weight.mul_(70.0)
        model.row_bn.running_var.fill_(6e4)  # the covariance's statistics, just within fp16
        model.row_bn.weight.fill_(0.05)
    graph = _export(model, tmp_path / "gsop.onnx", (32, 10, 10))
    x = np.random.default_rng(6).standard_normal((2, 32, 10, 10)).astype(np.float32)
    ref = _ort(graph, {"input": x})[0]
    plan = pg.plan_precision(graph, "fp16")
    assert plan.reasons().get("covariance", 0) >= 3
    assert _close(_ort(pg.convert(graph, plan), {"input": x})[0], ref, 1e-2) <= 1
    assert _close(_ort(pg.simulate(graph, plan), {"input": x})[0], ref, 1e-2) <= 1
    bare = pg.PrecisionPlan("fp16")  # everything in fp16
    assert not _close(_ort(pg.simulate(graph, bare), {"input": x})[0], ref, 1e-2) <= 1
    with torch.no_grad():
        # beyond fp16 (the export's fuse step re-parametrises row_bn, so a big running_var no longer
        # reaches the graph; a big shift does): converting it for an fp16 reader is refused
        model.row_bn.bias.fill_(7e4)
    graph = _export(model, tmp_path / "gsop_big.onnx", (32, 10, 10))
    with pytest.raises(ValueError, match="beyond fp16"):
        pg.convert(graph, bare)
    low = pg.convert(graph, pg.plan_precision(graph, "fp16"))
    assert _close(_ort(low, {"input": x})[0], _ort(graph, {"input": x})[0], 1e-2) <= 1


@pytest.mark.parametrize("name", ["Involution2d", "ODConv2d", "OutlookAttention"])
def test_plugin_graphs_in_fp16_on_the_reference_evaluator(tmp_path, name):
    """``--target trt`` graphs: the plugin nodes get inputs of one type and run in fp16 (numpy plugins)."""
    from onnx.reference import ReferenceEvaluator

    from attn_export.plugins import reference_ops
    from attn_export.plugins._trt_names import DOMAIN

    factory, shape = _blocks()[name]
    model = _scaled(factory(), seed=7, magnitude=10.0)
    graph = _export(model, tmp_path / "block.onnx", shape, target="trt")
    low = pg.convert(graph, pg.plan_precision(graph, "fp16"))
    typed = pg._elem_types(low)
    plugins = [n for n in low.graph.node if n.domain == DOMAIN]
    assert plugins
    for n in plugins:
        assert {typed[i] for i in n.input} == {HALF}, n.op_type
        assert typed[n.output[0]] == HALF
    x = (10.0 * np.random.default_rng(8).standard_normal((2, *shape))).astype(np.float32)
    ref = ReferenceEvaluator(graph, new_ops=reference_ops()).run(None, {"input": x})[0]
    with np.errstate(over="ignore", invalid="ignore"):  # numpy's fp16 sigmoid overflows exp harmlessly
        got = ReferenceEvaluator(low, new_ops=reference_ops()).run(None, {"input": x})[0]
    assert got.dtype == np.float32
    assert _close(got, ref, 2e-2) <= 1


# ------------------------------------------------------------------------------------------ the shipped detector
@pytest.fixture(scope="module")
def detector_graph(tmp_path_factory):
    from attn_export.export import load_model

    loaded = load_model(ROOT / "models" / "shapes_detector.pt")
    path = tmp_path_factory.mktemp("det") / "det.onnx"
    return _export(loaded.model, path, loaded.input_shape)


@pytest.mark.slow
@pytest.mark.parametrize("low", ["fp16", "bf16"])
def test_shipped_detector_in_half_precision_on_real_images(detector_graph, low):
    """Class scores within 0.05 of fp32 and boxes of confident cells within 2 px (letterboxed input)."""
    from attn_export.detection.postprocess import letterbox
    from attn_export.shapes.data import generate

    images = np.stack([letterbox(generate(777, i)[0])[0] for i in range(6)])
    ref = _ort(detector_graph, {"input": images})[0]
    ranges = pg.measure_ranges(detector_graph, [images[:2]])
    plan = pg.plan_precision(detector_graph, low, ranges)
    assert plan.reasons().get("softmax") == 3 and plan.reasons().get("covariance", 0) >= 3
    graphs = [pg.simulate(detector_graph, plan)] + ([pg.convert(detector_graph, plan)] if low == "fp16" else [])
    for graph in graphs:
        got = _ort(graph, {"input": images})[0]
        assert np.isfinite(got).all()
        scores, ref_scores = got[..., 4:], ref[..., 4:]
        assert np.abs(scores - ref_scores).max() <= 0.05
        confident = ref_scores.max(-1) > 0.3
        assert confident.sum() >= 6  # the images do hold objects
        assert np.abs(got[..., :4] - ref[..., :4])[confident].max() <= 2.0


def test_importing_the_precision_step_imports_no_onnx_backend():
    import subprocess
    import sys

    mods = "('onnx', 'onnxruntime', 'ml_dtypes')"
    code = f"import sys, attn_export.export.precision_graph; print(sorted(m for m in {mods} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
