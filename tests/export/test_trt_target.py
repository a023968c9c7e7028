"""``--target trt``: each dynamic-kernel op call is one TensorRT plugin node, the rest standard ONNX.

Every block alone and the MixedNet go through the CLI (``attn-export CKPT --target trt --batch 1:3:8``)
and are verified against PyTorch on onnxruntime, whose plugin nodes run the numpy references as
onnxruntime-extensions Python ops, cross-checked on ONNX's reference evaluator (the same numpy code,
every other node by ONNX's own reference implementation).
The graphs are then checked node by node against the op calls PyTorch makes: one plugin
node per call, in the plugin domain, with the TensorRT parser's attributes (``plugin_namespace``,
``plugin_version``, the op's own) set to the call's arguments; no ``Col2Im``; a dynamic batch.
A deliberately wrong numpy reference must fail verification and name the first block to diverge.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from weights import randomize_

import attn_export.plugins as plugins
from attn_export.blocks import Involution2d
from attn_export.cli import main
from attn_export.export import export_onnx, load_model, save_checkpoint
from attn_export.export.checkpoint import architectures
from attn_export.export.onnx_export import TRT_VERIFY_MAX_BATCH, VERIFY_BACKENDS, _verify_batches
from attn_export.plugins._trt_names import DOMAIN, NAMESPACE, PLUGINS, VERSION
from attn_export.plugins.reference import ORT_ATTRS, ORT_PYOP_DOMAIN, ort_plugin_graph
from attn_export.runtime.runners import PluginGraphRunner, ReferenceRunner

# arch -> (constructor kwargs, input shape without the batch), as in test_cli.py.
CASES: dict[str, tuple[dict, tuple[int, ...]]] = {
    "Involution2d": ({"channels": 16, "kernel_size": 7, "group_channels": 8}, (16, 16, 16)),
    "ODConv2d": ({"in_planes": 16, "out_planes": 32, "kernel_size": 3, "padding": 1, "kernel_num": 4}, (16, 16, 16)),
    "OutlookAttention": ({"dim": 32, "num_heads": 2}, (16, 16, 32)),
    "GSoPBlock": ({"in_channels": 32, "mid_channels": 16}, (32, 16, 16)),
    "SKConv": ({"channels": 32, "groups": 8, "min_dim": 16}, (32, 16, 16)),
    "MixedNet": ({"num_classes": 10, "width": 16}, (3, 32, 32)),
}
MIXED_BLOCKS = ["involution", "odconv", "skconv", "outlook.block", "gsop"]
BACKEND = VERIFY_BACKENDS["trt"]


def write_checkpoint(path: Path, arch: str) -> Path:
    kwargs, shape = CASES[arch]
    return save_checkpoint(path, randomize_(architectures()[arch](**kwargs)), arch, kwargs, shape)


class OpCalls(TorchDispatchMode):
    """Records every ``attn_export::*`` op call: ``(op name, {argument: value})`` with defaults filled in."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "attn_export":
            bound = {}
            for i, arg in enumerate(func._schema.arguments):
                if i < len(args):
                    bound[arg.name] = args[i]
                elif arg.name in kwargs:
                    bound[arg.name] = kwargs[arg.name]
                else:
                    bound[arg.name] = arg.default_value
            self.calls.append((func._opname, {k: v for k, v in bound.items() if not isinstance(v, torch.Tensor)}))
        return func(*args, **kwargs)


def op_calls(model: nn.Module, input_shape) -> list[tuple[str, dict]]:
    with torch.no_grad(), OpCalls() as rec:
        model(torch.randn(2, *input_shape))
    return rec.calls


def plugin_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain not in ("", "ai.onnx")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """arch -> (checkpoint, onnx path, report dict, stdout); each exported once through the CLI."""
    cache: dict[str, tuple] = {}

    def get(arch: str, capsys) -> tuple:
        if arch not in cache:
            folder = tmp_path_factory.mktemp(arch)
            ckpt = write_checkpoint(folder / f"{arch}.pt", arch)
            report = folder / "report.json"
            argv = [str(ckpt), "--target", "trt", "--batch", "1:3:8", "--report", str(report)]
            rc = main(argv)
            out, err = capsys.readouterr()
            assert rc == 0, err
            cache[arch] = (ckpt, folder / f"{arch}.onnx", json.loads(report.read_text()), out)
        return cache[arch]

    return get


# --- export and verification, every block alone and the MixedNet ----------------------------------------
@pytest.mark.parametrize("arch", list(CASES))
def test_exports_and_verifies_on_the_reference_evaluator(arch, exported, capsys):
    ckpt, path, report, out = exported(arch, capsys)
    assert path.is_file()
    assert report["target"] == "trt"
    ver = report["verification"]
    assert ver["passed"] is True
    assert ver["backend"] == BACKEND
    assert f"verification PASSED on {BACKEND}" in out
    assert ver["batches"] == [1, 3, 8]
    assert sorted({c["batch"] for c in ver["outputs"]}) == [1, 3, 8]
    if arch == "MixedNet":
        assert report["blocks"] == MIXED_BLOCKS
        assert len(ver["blocks"]) == 3 * len(MIXED_BLOCKS)
        assert all(c["passed"] for c in ver["blocks"])
        assert ver["first_divergent_block"] is None
    else:
        assert report["blocks"] == [""]
    expected = collections.Counter(PLUGINS[name] for name, _ in op_calls(load_model(ckpt).model.eval(), CASES[arch][1]))
    assert report["plugins"] == dict(expected)
    listed = ", ".join(f"{k} {v}" for k, v in report["plugins"].items()) or "none"
    assert f"TensorRT plugin nodes: {listed}" in out


@pytest.mark.parametrize("arch", list(CASES))
def test_one_plugin_node_per_op_call(arch, exported, capsys):
    ckpt, path, _, _ = exported(arch, capsys)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    calls = op_calls(load_model(ckpt).model.eval(), CASES[arch][1])
    if arch == "MixedNet":
        assert [name for name, _ in calls] == ["involution2d", "dynamic_conv2d", "outlook_aggregate"]
    nodes = plugin_nodes(model)
    assert len(nodes) == len(calls)
    # Both lists are in execution order (the graph is topologically sorted and this one is a chain).
    for node, (op_name, args) in zip(nodes, calls, strict=True):
        assert node.domain == DOMAIN
        assert node.op_type == PLUGINS[op_name]
        assert len(node.input) == 2 and len(node.output) == 1
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert list(attrs)[:2] == ["plugin_namespace", "plugin_version"]
        assert list(attrs)[2:] == list(args)  # the op's attributes in its signature's order
        assert attrs.pop("plugin_namespace") == NAMESPACE.encode()
        assert attrs.pop("plugin_version", VERSION.encode()) == VERSION.encode()
        assert attrs == {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in args.items()}
    imports = {(o.domain, o.version) for o in model.opset_import}
    assert imports == ({("", 18), (DOMAIN, 1)} if nodes else {("", 18)})


@pytest.mark.parametrize("arch", list(CASES))
def test_standard_onnx_around_the_plugins_with_a_dynamic_batch(arch, exported, capsys):
    _, path, _, _ = exported(arch, capsys)
    model = onnx.load(path)
    ops = {n.op_type for n in model.graph.node} | {n.op_type for f in model.functions for n in f.node}
    assert "Col2Im" not in ops
    assert not model.functions
    assert {n.domain for n in model.graph.node} <= {"", DOMAIN}
    (inp,) = model.graph.input
    assert inp.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert all(o.type.tensor_type.shape.dim[0].dim_param == "batch" for o in model.graph.output)
    # The plugin outputs are typed (from the ops' fake kernels) with the same symbolic batch.
    typed = {v.name: v.type.tensor_type for v in [*model.graph.value_info, *model.graph.output]}
    for node in plugin_nodes(model):
        t = typed[node.output[0]]
        assert t.elem_type == onnx.TensorProto.FLOAT
        dims = t.shape.dim
        assert len(dims) == 4 and dims[0].dim_param == "batch" and all(d.dim_value > 0 for d in dims[1:])


def test_plugin_names_are_not_onnx_ops():
    for name in PLUGINS.values():
        assert name.startswith("AttnExport")
        assert not onnx.defs.has(name), f"{name} is a standard ONNX op: TensorRT's parser would take that"


def test_translation_table_trt():
    table = plugins.onnx_translation_table("trt")
    ops = torch.ops.attn_export
    assert set(table) == {ops.involution2d.default, ops.dynamic_conv2d.default, ops.outlook_aggregate.default}
    assert {fn.__module__.rsplit(".", 1)[-1] for fn in table.values()} == {"plugin_node"}


def test_mixed_graph_runs_at_an_unverified_batch(exported, capsys):
    """The ReferenceRunner on batch 5 (not one of 1, 3, 8) against torch eager on the checkpoint."""
    ckpt, path, _, _ = exported("MixedNet", capsys)
    runner = ReferenceRunner(path)
    assert runner.input_names == ["input"] and runner.output_names == ["output"]
    x = np.random.default_rng(1).standard_normal((5, *CASES["MixedNet"][1])).astype(np.float32)
    got = runner.infer({"input": x})["output"]
    with torch.no_grad():
        ref = load_model(ckpt).model.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_plugin_graph_on_onnxruntime_matches_the_reference_evaluator(exported, capsys):
    """The onnxruntime runner and the reference evaluator on one plugin graph, batch 5 (not verified),
    and both against torch eager."""
    ckpt, path, _, _ = exported("MixedNet", capsys)
    x = np.random.default_rng(2).standard_normal((5, *CASES["MixedNet"][1])).astype(np.float32)
    runner = PluginGraphRunner(path, cross_check=False)
    got = runner.infer({"input": x})["output"]
    ref = ReferenceRunner(path).infer({"input": x})["output"]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        eager = load_model(ckpt).model.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, eager, rtol=1e-4, atol=1e-4)


def test_plugin_nodes_become_python_ops_with_their_attributes(exported, capsys):
    _, path, _, _ = exported("MixedNet", capsys)
    model = onnx.load(str(path))
    moved = ort_plugin_graph(model)
    before = [n for n in model.graph.node if n.domain == DOMAIN]
    after = [n for n in moved.graph.node if n.domain == ORT_PYOP_DOMAIN]
    assert len(before) == len(after) == 3 and not [n for n in moved.graph.node if n.domain == DOMAIN]
    for old, new in zip(before, after, strict=True):
        assert (new.op_type, list(new.input), list(new.output)) == (old.op_type, list(old.input), list(old.output))
        (attr,) = new.attribute
        assert attr.name == ORT_ATTRS
        want = {a.name: helper.get_attribute_value(a) for a in old.attribute}
        want = {
            k: v.decode() if isinstance(v, bytes) else list(v) if not isinstance(v, int) else v for k, v in want.items()
        }
        assert json.loads(attr.s.decode()) == want
    assert [n.op_type for n in moved.graph.node] == [n.op_type for n in model.graph.node]
    assert len(model.graph.node) == len(moved.graph.node)  # the caller's graph is left as it was
    assert [n for n in model.graph.node if n.domain == DOMAIN] == before


def test_cross_check_catches_a_wrong_plugin_translation(exported, capsys, monkeypatch):
    """A plugin node run with other attributes on onnxruntime (here: no padding) is caught by the
    reference evaluator on the first item of the first batch."""
    _, path, _, _ = exported("MixedNet", capsys)
    import attn_export.plugins.reference as reference

    right = reference.ort_plugin_graph

    def wrong(model):
        out = right(model)
        for node in out.graph.node:
            if node.op_type == PLUGINS["dynamic_conv2d"]:
                attrs = json.loads(node.attribute[0].s.decode())
                node.attribute[0].s = json.dumps({**attrs, "padding": [0, 0]}).encode()
        return out

    x = np.random.default_rng(3).standard_normal((2, *CASES["MixedNet"][1])).astype(np.float32)
    monkeypatch.setattr(reference, "ort_plugin_graph", wrong)
    with pytest.raises(RuntimeError, match="cross-check"):
        PluginGraphRunner(path).infer({"input": x})
    monkeypatch.setattr(reference, "ort_plugin_graph", right)
    ok = PluginGraphRunner(path)
    got = ok.infer({"input": x})["output"]
    assert set(ok.cross_checked) == {"output"} and ok.cross_checked["output"] < 1e-4
    assert got.shape[0] == 2


def test_cross_check_catches_values_that_differ(exported, capsys, monkeypatch):
    _, path, _, _ = exported("MixedNet", capsys)
    real = ReferenceRunner.infer
    monkeypatch.setattr(
        ReferenceRunner, "infer", lambda self, feeds: {k: v + 0.01 for k, v in real(self, feeds).items()}
    )
    x = np.random.default_rng(4).standard_normal((1, *CASES["MixedNet"][1])).astype(np.float32)
    with pytest.raises(RuntimeError, match=r"differs by 1\.00e-02"):
        PluginGraphRunner(path).infer({"input": x})
    PluginGraphRunner(path, cross_check=False).infer({"input": x})  # no cross-check: nothing compared


def test_export_onnx_api_target_trt(tmp_path):
    """The Python API: plugin counts in the result, the reference backend, MAX capped for verification."""
    model = randomize_(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Involution2d(8, kernel_size=3, group_channels=4)))
    stages = []
    result = export_onnx(
        model,
        tmp_path / "inv.onnx",
        (3, 9, 7),
        batch=(1, 2, 16),
        target="trt",
        seed=1,
        progress=lambda s, m: stages.append(m),
    )
    assert result.ok and result.target == "trt"
    assert result.plugins == {PLUGINS["involution2d"]: 1}
    assert result.ops[PLUGINS["involution2d"]] == 1 and sum(result.ops.values()) == result.nodes
    assert result.to_dict()["plugins"] == result.plugins
    assert result.report.backend == BACKEND
    assert result.report.batches == [1, 2, TRT_VERIFY_MAX_BATCH]
    assert any("capped" in m for m in stages)
    assert any(m.startswith("TensorRT plugin nodes: AttnExportInvolution2d x1") for m in stages)


def test_verified_batches_are_capped_for_trt():
    assert _verify_batches((1, 4, 32), (3, 32, 32), "trt") == [1, 4, TRT_VERIFY_MAX_BATCH]
    assert _verify_batches((16, 32, 64), (3, 32, 32), "trt") == [TRT_VERIFY_MAX_BATCH]
    assert _verify_batches((1, 4, 32), (3, 32, 32), "ort") == [1, 4, 32]


# --- a wrong numpy reference -------------------------------------------------------------------------
def test_wrong_numpy_reference_names_the_first_divergent_block(tmp_path, capsys, monkeypatch):
    from attn_export.plugins.dynamic_conv import numpy_ref

    right = numpy_ref.dynamic_conv2d
    monkeypatch.setattr(numpy_ref, "dynamic_conv2d", lambda *a, **k: 2 * right(*a, **k))

    ckpt = write_checkpoint(tmp_path / "mixed.pt", "MixedNet")
    out_path = tmp_path / "OUT.onnx"
    report = tmp_path / "r.json"
    argv = [str(ckpt), "--target", "trt", "-o", str(out_path), "--batch", "1:2:3", "--seed", "7"]
    rc = main([*argv, "--report", str(report)])
    out, err = capsys.readouterr()
    assert rc == 1, (out, err)
    assert not out_path.exists()
    assert (tmp_path / "OUT.unverified.onnx").is_file()
    assert "verification FAILED" in err
    assert f"verification FAILED on {BACKEND}" in out
    assert "first block to diverge: odconv" in out
    lines = out.splitlines()
    assert all(ln.endswith("ok") for ln in lines if ln.startswith("block involution"))
    assert any(ln.startswith("block odconv") and ln.endswith("FAIL") for ln in lines)
    data = json.loads(report.read_text())
    assert data["path"] is None
    assert data["verification"]["first_divergent_block"] == "odconv"
