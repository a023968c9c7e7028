"""Export on upstream code no one here wrote: small local stand-ins of those layouts, written
here with the same attribute names and habits.

- an mmcls/mmdet-style backbone (RedNet) whose ``train()`` returns nothing;
- an OSVAI ``ODConv2d`` saved bare, as the whole model;
- the GSoP ResNet ``Bottleneck`` (ZilinGao), whose channel attention is its ``chan_att`` METHOD, with a
  stride-2 ``conv_for_DR`` when ``planes <= 64``;
- an SKNet port that squeezes the batch axis away at batch 1 (``torch.squeeze(fea)``);
- Python control flow on a tensor's value (``if x.mean() > 0:``);
- and ``export_onnx`` leaving the caller's model as it was.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json

import onnx
import pytest
import torch
from torch import nn
from weights import randomize_

from attn_export import blocks as ours
from attn_export.bench import upstream as official
from attn_export.cli import main
from attn_export.export import ExportError, export_onnx
from attn_export.export.adapt import GSOP_CHILD, adapt


# --- 1. train() without a return ------------------------------------------------------------------------
class RedNetLike(nn.Module):
    """An mmcls-style backbone (RedNet): ``train()`` keeps BN frozen (``norm_eval``) and returns nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = official.involution(16, 3, 1)  # the d-li14 involution RedNet is built from
        self.head = nn.Conv2d(16, 8, 1)
        self.norm_eval = True

    def train(self, mode: bool = True):  # no `return self`, as mmcls/mmdet backbones
        super().train(mode)
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()

    def forward(self, x):
        return self.head(self.layer1(self.stem(x)))


def test_model_whose_train_returns_nothing_exports(tmp_path):
    model = randomize_(RedNetLike(), seed=1)
    model.train()
    result = export_onnx(model, tmp_path / "rednet.onnx", (3, 12, 12), batch=(1, 2, 3), seed=2)
    assert result.ok and result.report.passed, result.to_dict()
    assert [(r.path, r.action) for r in result.adapted] == [("layer1", "adapted")]
    assert isinstance(model.layer1, official.involution) and model.training  # the caller's model is as it was


def test_model_whose_train_returns_nothing_exports_from_the_cli(tmp_path, capsys):
    path = tmp_path / "rednet.pt"
    torch.save(randomize_(RedNetLike(), seed=3), path)
    rc = main([str(path), "--trust-checkpoint", "--input-shape", "3,12,12", "--batch", "1:2:3", "-q"])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "rednet.onnx").is_file()


class Exploding(nn.Module):
    """A model whose train() fails: something nobody planned for."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def train(self, mode: bool = True):
        raise RuntimeError("train() is not supported by this wrapper")

    def forward(self, x):
        return self.conv(x)


def test_anything_unexpected_is_one_line_naming_the_stage(tmp_path, capsys):
    with pytest.raises(ExportError, match=r"^prepare: unexpected RuntimeError: train\(\) is not supported"):
        export_onnx(Exploding(), tmp_path / "x.onnx", (3, 8, 8))
    path = tmp_path / "x.pt"
    torch.save(Exploding(), path)
    rc = main([str(path), "--trust-checkpoint", "--input-shape", "3,8,8"])
    err = capsys.readouterr().err
    assert rc == 2
    (line,) = [t for t in err.splitlines() if "error" in t]
    assert line.startswith("attn-export: error: prepare: unexpected RuntimeError: train() is not supported")
    assert "Traceback" not in err
    assert not list(tmp_path.glob("*.onnx"))


# --- 2. a bare official block as the whole model ------------------------------------------------------
def test_bare_official_odconv_as_the_model_is_adapted(tmp_path):
    model = randomize_(official.ODConv2d(16, 24, 3, padding=1, kernel_num=4), seed=4).eval()
    result = export_onnx(model, tmp_path / "od.onnx", (16, 10, 10), batch=(1, 3, 5), seed=5)
    assert result.ok and result.report.passed, result.to_dict()
    (rec,) = result.adapted
    assert (rec.path, rec.foreign, rec.action) == ("", "ODConv2d", "adapted"), rec
    assert rec.max_abs_error is not None and rec.max_abs_error <= 1e-6
    assert result.blocks == [""]
    assert type(model) is official.ODConv2d  # the caller's module was not replaced
    graph = onnx.load(str(tmp_path / "od.onnx"))
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_bare_official_block_through_the_cli(tmp_path, capsys):
    path = tmp_path / "odconv.pt"
    torch.save(randomize_(official.ODConv2d(16, 16, 3, padding=1), seed=6), path)
    report = tmp_path / "r.json"
    argv = [str(path), "--trust-checkpoint", "--input-shape", "16,8,8", "--batch", "1:2:3", "--report", str(report)]
    assert main(argv) == 0, capsys.readouterr().err
    data = json.loads(report.read_text())
    assert [(r["path"], r["action"]) for r in data["adapted"]] == [("", "adapted")]


# --- 3. GSoP: the Bottleneck's chan_att method ----------------------------------------------------------
def naive_chan_att(b: official.Bottleneck, out: torch.Tensor) -> torch.Tensor:
    """The official chan_att written out with loops over samples and channel pairs, in float64."""
    with torch.no_grad():
        z = torch.relu(b.bn_for_DR(b.conv_for_DR(torch.relu(out))))  # B, d, h, w
        bsz, d = z.shape[:2]
        f = z.reshape(bsz, d, -1)
        m = f.shape[2]
        cov = torch.empty(bsz, d, d, dtype=z.dtype)
        for s in range(bsz):
            for i in range(d):
                for j in range(d):
                    fi, fj = f[s, i], f[s, j]
                    cov[s, i, j] = (fi * fj).sum() / m - fi.sum() * fj.sum() / (m * m)
        y = b.row_conv_group(b.row_bn(cov.unsqueeze(-1)))  # no activation after the row conv
        return torch.sigmoid(b.fc_adapt_channels(y))


class GSoPNet(nn.Module):
    """Three GSoP ResNet bottlenecks: planes 16 (stride-2 conv_for_DR), one without attention, planes 96."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, padding=1)
        down1 = nn.Sequential(nn.Conv2d(64, 64, 1, bias=False), nn.BatchNorm2d(64))
        down3 = nn.Sequential(nn.Conv2d(64, 384, 1, stride=2, bias=False), nn.BatchNorm2d(384))
        self.layer1 = nn.Sequential(
            official.Bottleneck(64, 16, downsample=down1, attention="1", att_dim=8),
            official.Bottleneck(64, 16, attention="0", att_dim=8),
            official.Bottleneck(64, 96, stride=2, downsample=down3, attention="1", att_dim=8),
        )

    def forward(self, x):
        return self.layer1(torch.relu(self.stem(x)))


def test_our_gsop_follows_the_official_chan_att_with_the_stride_2_reduction():
    b = randomize_(official.Bottleneck(64, 16, attention="1", att_dim=8), seed=7).double().eval()
    assert b.conv_for_DR.stride == (2, 2)  # planes <= 64
    block = ours.GSoPBlock(64, 8, dr_stride=2).double().eval()
    block.load_state_dict({k: v for k, v in b.state_dict().items() if k.split(".")[0] in dict(block.named_children())})
    out = torch.randn(2, 64, 7, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    expected = naive_chan_att(b, out)
    with torch.no_grad():
        torch.testing.assert_close(
            b.chan_att(out), expected, rtol=1e-7, atol=1e-8
        )  # float64; the covariance cancels digits
        torch.testing.assert_close(
            block.attention(out), expected, rtol=1e-7, atol=1e-8
        )  # float64; the covariance cancels digits
        torch.testing.assert_close(
            block(out), out * expected, rtol=1e-7, atol=1e-8
        )  # float64; the covariance cancels digits
        with_relu = ours.GSoPBlock(64, 8, dr_stride=2, row_relu=True).double().eval()
        with_relu.load_state_dict(block.state_dict())
        assert (with_relu.attention(out) - expected).abs().max() > 1e-3  # the ReLU changes the function


def test_gsop_bottleneck_chan_att_is_adapted_where_it_lives(tmp_path):
    model = randomize_(GSoPNet(), seed=9).eval()
    original = copy.deepcopy(model)
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(10))

    adapted, records = adapt(copy.deepcopy(model), x)

    by_path = {r.path: r for r in records}
    assert set(by_path) == {"layer1.0", "layer1.1", "layer1.2"}
    for path, stride in (("layer1.0", 2), ("layer1.2", 1)):
        rec = by_path[path]
        assert (rec.foreign, rec.action) == ("Bottleneck", "adapted"), rec
        assert "chan_att" in rec.reason and rec.max_abs_error is not None and rec.max_abs_error <= 1e-6
        block = getattr(adapted.get_submodule(path), GSOP_CHILD)
        assert isinstance(block, ours.GSoPBlock) and block.dr_stride == stride and not block.row_relu
        assert not hasattr(adapted.get_submodule(path), "conv_for_DR")  # the official parts were moved
    assert by_path["layer1.1"].action == "left" and "attention='0'" in by_path["layer1.1"].reason
    xs = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        torch.testing.assert_close(adapted(xs), original(xs), rtol=1e-5, atol=1e-5)

    result = export_onnx(model, tmp_path / "gsop.onnx", (3, 12, 12), batch=(1, 2, 3), seed=12)
    assert result.ok and result.report.passed, result.to_dict()
    assert result.blocks == [f"layer1.0.{GSOP_CHILD}", f"layer1.2.{GSOP_CHILD}"]
    assert {c.name for c in result.report.blocks} == set(result.blocks)


@pytest.mark.parametrize(
    ("kind", "row_relu"),
    [
        pytest.param(official.GSoP, False, id="official"),
        # the layout this project's GSoP had before: a ReLU after the row conv (a different function)
        pytest.param(functools.partial(official.GSoP, row_relu=True), True, id="row-relu"),
    ],
)
def test_standalone_gsop_gets_the_function_it_computes(kind, row_relu):
    model = nn.Sequential(nn.Conv2d(32, 32, 1), randomize_(kind(32, 8), seed=13)).eval()
    original = copy.deepcopy(model)
    adapted, (rec,) = adapt(model, torch.randn(2, 32, 9, 9))
    assert rec.action == "adapted", rec
    assert isinstance(adapted[1], ours.GSoPBlock) and adapted[1].row_relu is row_relu
    x = torch.randn(3, 32, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), original(x), rtol=1e-5, atol=1e-5)


class ODConv2d(nn.Module):  # the official class name, another layout
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8, 3, 3))

    def forward(self, x):
        return nn.functional.conv2d(x, self.weight, padding=1)


def test_the_report_lists_every_candidate_with_what_and_why():
    model = nn.Sequential(ODConv2d(), official.SKConv(8, G=4), official.ODConv2d(8, 8, 3, padding=1)).eval()
    _, records = adapt(model, torch.randn(2, 8, 8, 8))
    got = [(r.path, r.foreign, r.action) for r in records]
    assert got == [("0", "ODConv2d", "left"), ("1", "SKConv", "left"), ("2", "ODConv2d", "adapted")]
    assert "5-D weight" in records[0].reason and "not the OSVAI layout" in records[0].reason
    assert "different function" in records[1].reason
    assert records[2].reason.startswith("-> ODConv2d(") and "exact in float64" in records[2].reason
    assert all(r.adapter for r in records)


# --- 4. the batch axis squeezed away at batch 1 ---------------------------------------------------------
class SqueezingSK(nn.Module):
    """The pppLang SKNet habit: ``torch.squeeze`` of the pooled features, which drops the batch at batch 1."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        fea = self.gap(torch.relu(self.conv(x)))
        fea = torch.squeeze(fea)
        return self.fc(fea)


def test_squeeze_at_batch_1_is_explained(tmp_path, capsys):
    model = randomize_(SqueezingSK(), seed=14).eval()
    result = export_onnx(model, tmp_path / "sk.onnx", (3, 8, 8), batch=(1, 2, 4), seed=15)
    assert not result.ok and not result.report.passed
    (bad,) = [c for c in result.report.outputs if not c.passed]
    assert bad.batch == 1 and bad.shape == [10] and bad.graph_shape == [1, 10]
    assert bad.max_abs is not None and bad.max_abs < 1e-4  # the values agree; only the shape differs
    (problem,) = result.report.problems
    assert "PyTorch gave shape (10,) while the graph gives (1, 10)" in problem
    assert "drops its batch axis at batch 1" in problem
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))  # no inf, no NaN
    assert data["verification"]["problems"] == [problem]
    assert f"problem: {problem}" in result.report.table()

    path = tmp_path / "sk.pt"
    torch.save(model, path)
    assert main([str(path), "--trust-checkpoint", "--input-shape", "3,8,8", "--batch", "1:2:2"]) == 1
    out = capsys.readouterr()
    assert "drops its batch axis at batch 1" in out.out and "inf" not in out.out


# --- 5. data-dependent control flow ---------------------------------------------------------------------
class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        x = self.conv(x)
        if x.mean() > 0:
            x = x * 2
        return x


def _branch_line() -> int:
    lines, first = inspect.getsourcelines(Branchy.forward)
    return first + next(i for i, t in enumerate(lines) if "if x.mean() > 0:" in t)


def test_data_dependent_control_flow_names_the_users_line(tmp_path, capfd):
    model = nn.Sequential(nn.Identity(), Branchy())
    with pytest.raises(ExportError) as info:
        export_onnx(model, tmp_path / "b.onnx", (3, 8, 8))
    msg = str(info.value)
    assert "\n" not in msg
    assert f"{__file__}:{_branch_line()}" in msg and "`if x.mean() > 0:`" in msg, msg
    assert "module '1' (Branchy)" in msg and "data-dependent control flow" in msg
    printed = capfd.readouterr()
    assert "GraphModule" not in printed.out + printed.err  # torch's FX dumps are not on the terminal
    assert not list(tmp_path.iterdir())


def test_verbose_shows_the_exporters_dumps(tmp_path, capsys):
    path = tmp_path / "b.pt"
    torch.save(Branchy(), path)
    assert main([str(path), "--trust-checkpoint", "--input-shape", "3,8,8"]) == 2
    quiet = capsys.readouterr().err
    assert f":{_branch_line()} in forward" in quiet and "GraphModule" not in quiet
    assert main([str(path), "--trust-checkpoint", "--input-shape", "3,8,8", "-v"]) == 2
    verbose = capsys.readouterr().err
    assert "what torch printed" in verbose and "if x.mean() > 0" in verbose


# --- 7. the caller's model is left as it was ------------------------------------------------------------
def test_export_onnx_does_not_change_the_callers_model(tmp_path):
    model = nn.Sequential(
        nn.Conv2d(16, 16, 1), official.ODConv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), official.GSoP(16, 8)
    )
    randomize_(model, seed=16).double().train()
    before = copy.deepcopy(model.state_dict())
    kinds = [type(m) for m in model.modules()]

    result = export_onnx(model, tmp_path / "m.onnx", (16, 8, 8), batch=(1, 2, 3), seed=17)

    assert result.ok, result.to_dict()
    assert {r.path for r in result.adapted if r.action == "adapted"} == {"1", "3"}
    assert [type(m) for m in model.modules()] == kinds
    assert all(m.training for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]) for k in before)


def test_copy_model_false_exports_in_place(tmp_path):
    model = nn.Sequential(nn.Conv2d(16, 16, 1), randomize_(official.ODConv2d(16, 16, 3, padding=1), seed=18))
    result = export_onnx(model, tmp_path / "m.onnx", (16, 8, 8), batch=(1, 2, 2), seed=19, copy_model=False)
    assert result.ok
    assert isinstance(model[1], ours.ODConv2d) and not model.training  # documented: changed in place
