"""export/surgery.py's onnxruntime rewrites: same numbers (float64 references), and the fusion they are for."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from attn_export.export.surgery import clean_graph

ERF = np.vectorize(math.erf)


def torch_gelu_graph(rng, extra_output: bool = False):
    """``y = gelu(x @ W + b)`` written as ``torch.onnx`` writes the exact GELU:
    ``h * ((erf(h / sqrt2) + 1) * 0.5)``; ``extra_output``: the ``(erf + 1) * 0.5`` tensor is an output too."""
    w = rng.standard_normal((8, 16)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    consts = {"w": w, "b": b, "sqrt2": np.float32(2**0.5), "one": np.float32(1.0), "half": np.float32(0.5)}
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["h"]),
        helper.make_node("Div", ["h", "sqrt2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["e1"]),
        helper.make_node("Mul", ["e1", "half"], ["g"]),
        helper.make_node("Mul", ["h", "g"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5, 16])]
    if extra_output:
        outputs.append(helper.make_tensor_value_info("g", TensorProto.FLOAT, ["batch", 5, 16]))
    graph = helper.make_graph(
        nodes,
        "gelu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5, 8])],
        outputs,
        [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), w, b


def reference(x, w, b):
    h = x.astype(np.float64) @ w.astype(np.float64) + b.astype(np.float64)
    return h * 0.5 * (1.0 + ERF(h / math.sqrt(2.0)))


def optimized_ops(model, tmp_path) -> set[str]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}


def run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def test_torch_gelu_is_reordered_so_that_onnxruntime_fuses_it(tmp_path):
    rng = np.random.default_rng(0)
    model, w, b = torch_gelu_graph(rng)
    # as torch writes it, onnxruntime leaves the five element-wise nodes alone
    assert "Erf" in optimized_ops(model, tmp_path)
    cleaned = clean_graph(model, ["y"], 1, "ort")
    muls = [n for n in cleaned.graph.node if n.op_type == "Mul"]
    assert set(muls[0].input) == {"h", "e1"} and "half" in muls[1].input  # h * (erf + 1), then * 0.5
    ops = optimized_ops(cleaned, tmp_path)
    assert "Erf" not in ops and ops & {"Gelu", "BiasGelu"}, ops
    for batch in (1, 3):
        x = rng.standard_normal((batch, 5, 8)).astype(np.float32) * 2
        (got,) = run(cleaned, x)
        np.testing.assert_allclose(got, reference(x, w, b), rtol=1e-5, atol=1e-5)


def test_gelu_whose_inner_product_is_an_output_is_left_alone():
    rng = np.random.default_rng(1)
    model, w, b = torch_gelu_graph(rng, extra_output=True)
    cleaned = clean_graph(model, ["y", "g"], 2, "ort")
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    y, g = run(cleaned, x)
    h = x.astype(np.float64) @ w + b
    np.testing.assert_allclose(g, 0.5 * (1.0 + ERF(h / math.sqrt(2.0))), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, reference(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", ["trt"])
def test_other_targets_keep_torch_form(target):
    model, _, _ = torch_gelu_graph(np.random.default_rng(2))
    cleaned = clean_graph(model, ["y"], 1, target)
    last = [n for n in cleaned.graph.node if n.op_type == "Mul"][-1]
    assert list(last.input) == ["h", "g"]
