"""What the export is given and what it is compared with: several named inputs, a forward that takes a
dict, a model left in train mode, torch's warnings, and the headline parity, which compares the graph
with the user's model as given (not the adapted, BatchNorm-folded copy that was exported), so that a
wrong adapter or a wrong fold cannot pass.

The stand-ins are written here with the habits of upstream code: a segmentation-style model of an
image and a mask, a forward that reads a dict (mmdet/detectron2-style ``batch["image"]``), a
classifier with Dropout that was saved in train mode.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from weights import randomize_

import attn_export.export.onnx_export as onnx_export
from attn_export.blocks import Involution2d, SKConv
from attn_export.cli import main
from attn_export.export import ExportError, export_onnx
from attn_export.export.checkpoint import parse_inputs


class ImageAndMask(nn.Module):
    """Two tensor inputs of different channels: the mask gates the image features."""

    def __init__(self) -> None:
        super().__init__()
        self.image_conv = nn.Conv2d(3, 16, 3, padding=1)
        self.mask_conv = nn.Conv2d(1, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.sk = SKConv(16, groups=8, min_dim=8)

    def forward(self, image, mask):
        return self.sk(torch.relu(self.bn(self.image_conv(image))) * torch.sigmoid(self.mask_conv(mask)))


class DictForward(nn.Module):
    """Reads its input as a dict, as detection frameworks do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, batch):
        return self.conv(batch["image"]) * batch["mask"]


class DropoutNet(nn.Module):
    """A classifier with Dropout and BatchNorm, left in train mode (as a checkpoint saved mid-training)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.inv = Involution2d(16, kernel_size=3, group_channels=8)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.drop(self.inv(self.features(x)).mean((2, 3))))


class Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        warnings.warn("noisy-user-warning from the model", UserWarning, stacklevel=1)
        return self.conv(x)


def ort_run(path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


# --- several inputs --------------------------------------------------------------------------------------
def test_two_named_inputs_api(tmp_path):
    model = randomize_(ImageAndMask(), 1).eval()
    path = tmp_path / "two.onnx"
    # given in the other order: the names are forward's parameters, so they are passed by name
    result = export_onnx(model, path, inputs={"mask": (1, 12, 12), "image": (3, 12, 12)}, batch=(1, 2, 3), seed=0)
    assert result.ok, result.report.table()
    assert [i["name"] for i in result.inputs] == ["image", "mask"]
    assert result.to_dict()["inputs"] == [
        {"name": "image", "shape": ["batch", 3, 12, 12]},
        {"name": "mask", "shape": ["batch", 1, 12, 12]},
    ]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image", "mask"]
    rng = np.random.default_rng(5)
    image = rng.standard_normal((4, 3, 12, 12), dtype=np.float32)  # a batch the verification did not use
    mask = rng.standard_normal((4, 1, 12, 12), dtype=np.float32)
    (got,) = sess.run(None, {"image": image, "mask": mask})
    with torch.no_grad():
        want = model.double()(torch.from_numpy(image).double(), torch.from_numpy(mask).double()).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)


def test_two_inputs_cli(tmp_path, capsys):
    path = tmp_path / "two.pt"
    torch.save(randomize_(ImageAndMask(), 2).eval(), path)
    report = tmp_path / "r.json"
    argv = [str(path), "--trust-checkpoint", "--input", "image:3,10,10", "--input", "mask:1,10,10"]
    rc = main([*argv, "--batch", "1:2:2", "--report", str(report)])
    _, err = capsys.readouterr()
    assert rc == 0, err
    data = json.loads(report.read_text())
    assert [i["name"] for i in data["inputs"]] == ["image", "mask"]
    assert data["verification"]["passed"]
    rng = np.random.default_rng(0)
    feeds = {"image": rng.standard_normal((3, 3, 10, 10), dtype=np.float32)}
    feeds["mask"] = rng.standard_normal((3, 1, 10, 10), dtype=np.float32)
    assert ort_run(path.with_suffix(".onnx"), feeds)[0].shape == (3, 16, 10, 10)


def test_too_few_inputs_names_the_parameters(tmp_path):
    with pytest.raises(ExportError, match=r"^run: ImageAndMask.forward takes 2 inputs \(image, mask\) but 1 was"):
        export_onnx(ImageAndMask().eval(), tmp_path / "m.onnx", (3, 8, 8))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "items, message",
    [
        (["image"], "expected NAME:C,H,W"),
        (["image:3,a,8"], "--input image: expected positive integers"),
        (["a:3,8,8", "a:1,8,8"], "'a' given twice"),
        (["a:0,8,8"], "--input a: expected positive integers"),
    ],
)
def test_parse_inputs_errors(items, message):
    with pytest.raises(ExportError, match=message):
        parse_inputs(items)
    assert parse_inputs(["image:3,8,8", "mask:1,8,8"]) == {"image": (3, 8, 8), "mask": (1, 8, 8)}


# --- a forward that takes a dict --------------------------------------------------------------------------
def test_dict_forward_shows_the_wrapper(tmp_path):
    with pytest.raises(ExportError) as info:
        export_onnx(DictForward().eval(), tmp_path / "d.onnx", (3, 8, 8), batch=(1, 1, 4))
    msg = str(info.value)
    assert msg.startswith("run: DictForward.forward takes a dict as 'batch' (it reads 'image', 'mask')")
    assert "def forward(self, image, mask):" in msg
    assert "return self.model({'image': image, 'mask': mask})" in msg
    assert "--input image:3,8,8" in msg
    assert "(2," not in msg  # no batch the user did not ask for
    assert list(tmp_path.iterdir()) == []

    # the wrapper the message shows, written out, exports (the message is advice that works)
    class Wrapped(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, image, mask):
            return self.model({"image": image, "mask": mask})

    result = export_onnx(
        Wrapped(DictForward().eval()), tmp_path / "w.onnx", inputs={"image": (3, 8, 8), "mask": (8, 8, 8)}, seed=0
    )
    assert result.ok


def test_dict_forward_cli_one_stage_no_traceback(tmp_path, capsys):
    path = tmp_path / "d.pt"
    torch.save(DictForward(), path)
    rc = main([str(path), "--trust-checkpoint", "--input-shape", "3,8,8"])
    _, err = capsys.readouterr()
    assert rc == 2
    assert "\nattn-export: error: run: DictForward.forward takes a dict" in err
    assert "class Wrapped(torch.nn.Module):" in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.onnx"))


def test_warnings_only_with_verbose(tmp_path, capsys):
    path = tmp_path / "n.pt"
    torch.save(Noisy().eval(), path)
    assert main([str(path), "--trust-checkpoint", "--input-shape", "3,8,8", "--batch", "1:1:2"]) == 0
    out, err = capsys.readouterr()
    assert "noisy-user-warning" not in out + err
    assert main([str(path), "--trust-checkpoint", "--input-shape", "3,8,8", "--batch", "1:1:2", "-v"]) == 0
    out, err = capsys.readouterr()
    assert "noisy-user-warning" in err


# --- train mode -------------------------------------------------------------------------------------------
def test_train_mode_is_reported_and_exported_in_eval(tmp_path):
    model = randomize_(DropoutNet(), 3)
    model.train()
    said: list[str] = []
    result = export_onnx(model, tmp_path / "t.onnx", (3, 12, 12), batch=(1, 2, 2), progress=lambda s, m: said.append(m))
    assert result.ok, result.report.table()
    warning = [m for m in said if m.startswith("warning: the model was in train mode")]
    assert len(warning) == 1 and "drop" in warning[0] and "features.1" in warning[0]
    mode = result.to_dict()["mode"]
    assert mode["given"] == "train" and mode["exported"] == "eval" and "Dropout off" in mode["note"]
    assert model.training and model.drop.training  # the user's model is left as it was
    # the graph is the eval-mode model: deterministic, equal to a float64 eval copy
    x = np.random.default_rng(1).standard_normal((2, 3, 12, 12), dtype=np.float32)
    (got,) = ort_run(tmp_path / "t.onnx", {"input": x})
    ref = DropoutNet().double()
    ref.load_state_dict(model.state_dict())
    ref.eval()
    with torch.no_grad():
        np.testing.assert_allclose(got, ref(torch.from_numpy(x).double()).numpy(), atol=1e-4, rtol=1e-3)


def test_eval_mode_says_nothing(tmp_path):
    said: list[str] = []
    result = export_onnx(
        randomize_(DropoutNet(), 3).eval(), tmp_path / "e.onnx", (3, 8, 8), progress=lambda s, m: said.append(m)
    )
    assert result.mode == {"given": "eval", "exported": "eval"}
    assert not any("train mode" in m for m in said)


# --- parity with the model as given -----------------------------------------------------------------------
def _nudge(module: nn.Module) -> None:
    """A wrong weight: what a buggy adapter or fold would leave."""
    with torch.no_grad():
        p = next(p for p in module.parameters() if p.dim() > 1)
        p.mul_(1.05)


def test_wrong_fold_is_caught_only_against_the_original(tmp_path, monkeypatch):
    fold = onnx_export.prepare_for_inference

    def wrong_fold(model, *args, **kwargs):
        folded = fold(model, *args, **kwargs)
        _nudge(folded.get_submodule("0"))  # the conv BatchNorm was folded into
        return folded

    monkeypatch.setattr(onnx_export, "prepare_for_inference", wrong_fold)
    model = randomize_(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), SKConv(16, groups=8)))
    model.eval()
    result = export_onnx(model, tmp_path / "f.onnx", (3, 10, 10), batch=(1, 2, 2), seed=0)
    report = result.report
    assert not result.ok and not (tmp_path / "f.onnx").exists()
    assert not any(c.passed for c in report.outputs)  # the graph against the model as given: caught
    assert report.blocks and all(c.passed for c in report.blocks)  # graph vs the exported copy: agrees
    assert not any(c.passed for c in report.adapted)  # and the copy itself is what differs
    assert "your model as given" in report.compared["outputs"]
    assert "your model as given" in report.table()


def test_wrong_adapter_is_caught_only_against_the_original(tmp_path, monkeypatch):
    adapt = onnx_export.adapt

    def wrong_adapt(model, sample):
        model, records = adapt(model, sample)
        _nudge(model.get_submodule("1"))  # the Involution block, as a buggy swap would leave it
        return model, records

    monkeypatch.setattr(onnx_export, "adapt", wrong_adapt)
    model = randomize_(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), Involution2d(16, 3, group_channels=8))).eval()
    result = export_onnx(model, tmp_path / "a.onnx", (3, 10, 10), batch=(1, 1, 2), seed=0)
    assert not result.ok
    assert not any(c.passed for c in result.report.outputs)
    assert all(c.passed for c in result.report.blocks)
    assert result.report.first_divergent_block is None  # the probes alone could not have caught it


def test_input_and_input_shape_together_refused(tmp_path, capsys):
    path = tmp_path / "two.pt"
    torch.save(ImageAndMask().eval(), path)
    rc = main([str(path), "--trust-checkpoint", "--input", "image:3,8,8", "--input-shape", "3,8,8"])
    _, err = capsys.readouterr()
    assert rc == 2 and "attn-export: error: --input and --input-shape: give the shapes one way" in err
    assert not list(tmp_path.glob("*.onnx"))


class ListForward(nn.Module):
    """Takes a list of feature maps, as FPN necks do."""

    def forward(self, feats: list[torch.Tensor]):
        return feats[0] + feats[1]


def test_list_forward_shows_the_wrapper(tmp_path):
    with pytest.raises(ExportError) as info:
        export_onnx(ListForward(), tmp_path / "l.onnx", (3, 8, 8))
    msg = str(info.value)
    assert msg.startswith("run: ListForward.forward takes a list as 'feats' (its annotation)")
    assert "def forward(self, x0, x1):" in msg and "return self.model([x0, x1])" in msg
    assert list(tmp_path.iterdir()) == []
