"""The Python API behind the CLI: ``export_onnx``, ``load_model``/``save_checkpoint``, and the argument
parsers (the comparison with PyTorch is tests/export/test_compare.py)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from weights import randomize_

from attn_export.blocks import Involution2d, SKConv
from attn_export.export import ExportError, ExportResult, export_onnx, load_model, save_checkpoint
from attn_export.export.checkpoint import FORMAT, parse_shape
from attn_export.export.profile import parse_batch


def small_net() -> nn.Module:
    return randomize_(
        nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            Involution2d(16, kernel_size=3, group_channels=8),
            SKConv(16, groups=8, min_dim=8),
        )
    ).eval()


# --- 5. export_onnx ------------------------------------------------------------------------------------
def test_export_onnx_api(tmp_path):
    model = small_net()
    path = tmp_path / "net.onnx"
    stages = []
    result = export_onnx(model, path, (3, 16, 16), batch=(1, 2, 4), seed=3, progress=lambda s, m: stages.append(s))
    assert isinstance(result, ExportResult)
    assert result.ok
    assert result.path == path and path.is_file()
    assert result.size_bytes == path.stat().st_size
    assert result.nodes > 0
    assert isinstance(result.ops, dict) and sum(result.ops.values()) == result.nodes
    assert "Col2Im" not in result.ops
    assert result.input_name == "input" and result.output_names == ["output"]
    assert result.input_shape == (3, 16, 16)
    assert result.batch == (1, 2, 4)
    assert result.opset == 18
    assert result.blocks == ["3", "4"]
    assert {"adapt", "export", "surgery", "verify"} <= set(result.timings)
    assert {"adapt", "export", "surgery", "verify"} <= set(stages)

    report = result.report
    assert report is not None and report.passed
    assert report.seed == 3
    assert report.batches == [1, 2, 4]
    assert [c.batch for c in report.outputs] == [1, 2, 4]
    assert {c.name for c in report.blocks} == {"3", "4"}
    assert report.first_divergent_block is None
    assert "verification PASSED" in report.table()

    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["path"] == str(path)
    assert data["input"] == {"name": "input", "shape": ["batch", 3, 16, 16]}
    assert data["batch"] == {"min": 1, "opt": 2, "max": 4}
    assert data["verification"]["passed"] is True
    assert data["verification"]["seed"] == 3
    assert data["ops"] == result.ops

    # The graph takes any batch, and the model was exported in eval mode with its BN statistics.
    proto = onnx.load(path)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    x = np.random.default_rng(0).standard_normal((7, 3, 16, 16)).astype(np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"input": x})
    with torch.no_grad():
        np.testing.assert_allclose(got, model(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-4)


def test_export_onnx_without_verification(tmp_path):
    result = export_onnx(small_net(), tmp_path / "net.onnx", [3, 8, 8], batch="1:1:2", verify=False)
    assert result.report is None
    assert result.ok
    assert result.to_dict()["verification"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx"]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"opset": 17}, "--opset"),
        ({"target": "tflite"}, "unknown target"),
        ({"batch": "4:2:1"}, "--batch"),
    ],
)
def test_export_onnx_rejects_bad_arguments(tmp_path, kwargs, needle):
    with pytest.raises(ExportError, match=needle):
        export_onnx(small_net(), tmp_path / "net.onnx", (3, 8, 8), **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_export_onnx_rejects_bad_output(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        export_onnx(small_net(), tmp_path / "missing" / "net.onnx", (3, 8, 8))
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(ExportError, match="is a directory"):
        export_onnx(small_net(), tmp_path / "dir.onnx", (3, 8, 8))


def test_export_onnx_model_that_does_not_run(tmp_path):
    with pytest.raises(ExportError, match="does not run on an input of shape"):
        export_onnx(small_net(), tmp_path / "net.onnx", (4, 8, 8))  # 4 channels, the stem wants 3
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1:4:32", (1, 4, 32)), ("8", (1, 8, 8)), ("2:2:2", (2, 2, 2)), ((1, 3, 8), (1, 3, 8))],
)
def test_parse_batch(text, expected):
    assert parse_batch(text) == expected


@pytest.mark.parametrize("text", ["8:1:2", "0:1:2", "1:2", "1:2:3:4", "a:b:c", "", "-1"])
def test_parse_batch_rejects(text):
    with pytest.raises(ExportError, match="--batch"):
        parse_batch(text)


@pytest.mark.parametrize(("text", "expected"), [("3,32,32", (3, 32, 32)), ("3x16x8", (3, 16, 8)), ("64", (64,))])
def test_parse_shape(text, expected):
    assert parse_shape(text) == expected


@pytest.mark.parametrize("text", ["a,b", "3,0,8", "3,-1,8", "", ","])
def test_parse_shape_rejects(text):
    with pytest.raises(ExportError, match="--input-shape"):
        parse_shape(text)


# --- checkpoints -----------------------------------------------------------------------------------------
def test_checkpoint_round_trip(tmp_path):
    model = randomize_(SKConv(16, groups=8, min_dim=8))
    path = save_checkpoint(tmp_path / "sk.pt", model, "SKConv", {"channels": 16, "groups": 8, "min_dim": 8}, (16, 8, 8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sk.pt"]  # no temporary file left
    loaded = load_model(path)
    assert (loaded.source, loaded.arch, loaded.input_shape) == ("checkpoint", "SKConv", (16, 8, 8))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[k], v, rtol=0, atol=0)


def test_checkpoint_in_the_legacy_torch_format_loads(tmp_path):
    model = randomize_(SKConv(16, groups=8, min_dim=8))
    payload = {
        "format": FORMAT,
        "arch": "SKConv",
        "kwargs": {"channels": 16, "groups": 8, "min_dim": 8},
        "input_shape": [16, 8, 8],
        "state_dict": model.state_dict(),
        "meta": {},
    }
    path = tmp_path / "legacy.pt"
    torch.save(payload, path, _use_new_zipfile_serialization=False)
    assert load_model(path).arch == "SKConv"


def test_save_checkpoint_unknown_architecture(tmp_path):
    with pytest.raises(ExportError, match="unknown architecture"):
        save_checkpoint(tmp_path / "x.pt", nn.Linear(2, 2), "Linear", {}, (2,))
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_with_wrong_kwargs(tmp_path):
    path = save_checkpoint(
        tmp_path / "sk.pt", SKConv(16, groups=8, min_dim=8), "SKConv", {"channels": 32, "groups": 8, "min_dim": 8}, [16]
    )
    with pytest.raises(ExportError, match="cannot build SKConv"):
        load_model(path)
