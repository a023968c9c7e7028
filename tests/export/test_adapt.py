"""Adapters and function rewrites against the official-layout modules of ``attn_export.bench.upstream``.

Every official module (randomised weights and BN statistics, inside a small model) must be swapped
for our block with the model's outputs unchanged on a fresh input of another batch size; modules that
only look official are left alone with a reason; ``function_rewrites`` computes ``F.fold``/``F.unfold``
exactly and always restores them; and a model built from all the official modules exports to ONNX
with nothing that depends on the batch (no ``Col2Im``, no ``Conv`` with ``groups * batch``).
"""

from __future__ import annotations

import copy
import math

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from weights import randomize_

import attn_export.export.adapt as adapt
from attn_export import blocks as ours
from attn_export.bench import upstream as official
from attn_export.export import export_onnx
from attn_export.export.adapt import adapt_model, function_rewrites

SAMPLE_BATCH, CHECK_BATCH = 2, 3
TOL = dict(rtol=1e-5, atol=1e-5)


def in_model(block: nn.Module, channels_last: bool, channels: int) -> nn.Module:
    """The block between two ordinary layers, so that its input is not the model's input."""
    if channels_last:
        return nn.Sequential(nn.Linear(channels, channels), block, nn.GELU())
    return nn.Sequential(nn.Conv2d(channels, channels, 1), block, nn.ReLU())


# (id, factory, our type, channels-last, channels)
CASES = [
    ("involution-s1", lambda: official.involution(32, 3, 1), ours.Involution2d, False, 32),
    ("involution-s2", lambda: official.involution(32, 3, 2), ours.Involution2d, False, 32),
    ("involution-k5-64", lambda: official.involution(64, 5, 1), ours.Involution2d, False, 64),
    ("odconv", lambda: official.ODConv2d(32, 32, 3, padding=1), ours.ODConv2d, False, 32),
    ("odconv-depthwise", lambda: official.ODConv2d(32, 32, 3, padding=1, groups=32), ours.ODConv2d, False, 32),
    ("odconv-pw1x", lambda: official.ODConv2d(32, 48, 1, kernel_num=1), ours.ODConv2d, False, 32),
    ("odconv-k1-n4", lambda: official.ODConv2d(32, 48, 1), ours.ODConv2d, False, 32),
    ("odconv-k3-n1", lambda: official.ODConv2d(32, 32, 3, padding=1, kernel_num=1), ours.ODConv2d, False, 32),
    (
        "odconv-s2-groups4",
        lambda: official.ODConv2d(32, 64, 3, stride=2, padding=1, groups=4),
        ours.ODConv2d,
        False,
        32,
    ),
    (
        "odconv-dilation2",
        lambda: official.ODConv2d(32, 32, 3, padding=2, dilation=2, reduction=0.25),
        ours.ODConv2d,
        False,
        32,
    ),
    ("outlook-s1", lambda: official.OutlookAttention(32, 4), ours.OutlookAttention, True, 32),
    ("outlook-s2", lambda: official.OutlookAttention(32, 4, stride=2), ours.OutlookAttention, True, 32),
    (
        "outlook-k5-bias-scale",
        lambda: official.OutlookAttention(32, 2, kernel_size=5, padding=2, qkv_bias=True, qk_scale=0.3),
        ours.OutlookAttention,
        True,
        32,
    ),
    ("gsop", lambda: official.GSoP(32, 16), ours.GSoPBlock, False, 32),
    ("gsop-wide", lambda: official.GSoP(64, 8), ours.GSoPBlock, False, 64),
]


def _input(batch: int, channels: int, channels_last: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 16, 16, channels) if channels_last else (batch, channels, 16, 16)
    return torch.randn(shape, generator=g)


@pytest.mark.parametrize(
    ("factory", "kind", "channels_last", "channels"), [pytest.param(*c[1:], id=c[0]) for c in CASES]
)
def test_official_module_is_swapped_exactly(factory, kind, channels_last, channels):
    torch.manual_seed(0)
    model = randomize_(in_model(factory(), channels_last, channels), seed=1).eval()
    original = copy.deepcopy(model)
    foreign = type(model[1])

    records = adapt_model(model, _input(SAMPLE_BATCH, channels, channels_last, seed=2))

    assert len(records) == 1, records
    rec = records[0]
    assert (rec.path, rec.foreign, rec.action) == ("1", foreign.__name__, "adapted"), rec
    assert rec.max_abs_error is not None and rec.max_abs_error <= 1e-6
    assert type(model[1]) is kind
    assert type(original[1]) is foreign  # the copy is untouched
    x = _input(CHECK_BATCH, channels, channels_last, seed=3)
    with torch.no_grad():
        got, expected = model(x), original(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, **TOL)


def test_odconv_temperature_is_carried_over():
    model = randomize_(in_model(official.ODConv2d(32, 32, 3, padding=1), False, 32), seed=4).eval()
    model[1].update_temperature(4.0)
    original = copy.deepcopy(model)
    (rec,) = adapt_model(model, _input(SAMPLE_BATCH, 32, False, seed=5))
    assert rec.action == "adapted", rec
    x = _input(CHECK_BATCH, 32, False, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), **TOL)


def test_skconv_port_is_left_with_a_reason():
    model = randomize_(in_model(official.SKConv(32), False, 32), seed=7).eval()
    original = copy.deepcopy(model)
    block = model[1]

    records = adapt_model(model, _input(SAMPLE_BATCH, 32, False, seed=8))

    assert len(records) == 1
    rec = records[0]
    assert (rec.path, rec.foreign, rec.action) == ("1", "SKConv", "left")
    assert "different function" in rec.reason
    assert model[1] is block
    x = _input(CHECK_BATCH, 32, False, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=0, atol=0)


class involution(official.involution):  # the name the adapter looks for
    """Official layout, different function: a modified copy of the official code."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 0.5 * x


class OutlookAttention(official.OutlookAttention):
    """Official layout; the attention is not softmaxed (a different function)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 1.01


@pytest.mark.parametrize(
    ("block", "channels_last"),
    [
        pytest.param(lambda: involution(32, 3, 1), False, id="involution"),
        pytest.param(lambda: OutlookAttention(32, 4), True, id="outlook"),
    ],
)
def test_lookalike_with_another_forward_is_left(block, channels_last):
    model = randomize_(in_model(block(), channels_last, 32), seed=10).eval()
    original = copy.deepcopy(model)
    kind = type(model[1])

    (rec,) = adapt_model(model, _input(SAMPLE_BATCH, 32, channels_last, seed=11))

    assert rec.action == "left", rec
    assert "not exact" in rec.reason
    assert rec.max_abs_error is not None and rec.max_abs_error > 1e-6
    assert type(model[1]) is kind
    x = _input(CHECK_BATCH, 32, channels_last, seed=12)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=0, atol=0)


# --- function rewrites ---------------------------------------------------------------------------------

# (kernel_size, dilation, padding, stride), square windows, int or pair forms
SQUARE = [
    (3, 1, 1, 1),
    (3, 1, 0, 2),
    (2, 1, 0, 2),
    (2, 2, 1, 1),
    ((3, 3), (2, 2), (2, 2), (3, 3)),
    (5, 1, 2, 2),
    (1, 1, 0, 1),
    (4, 1, 3, 3),
]
NON_SQUARE = [((2, 3), 1, 0, 1), (3, (1, 2), 1, 1), (3, 1, (1, 0), 1), (3, 1, 1, (2, 1))]


def _blocks(size: tuple[int, int], k, d, p, s) -> int:
    k, d, p, s = (adapt._pair(v) for v in (k, d, p, s))
    return math.prod((size[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2))


class _Spy:
    """Counts calls to the wrapped function."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("geometry", SQUARE, ids=str)
def test_rewritten_unfold_and_fold_match_the_originals(geometry, monkeypatch):
    k, d, p, s = geometry
    kk = math.prod(adapt._pair(k))
    unfold, fold = _Spy(F.unfold), _Spy(F.fold)
    monkeypatch.setattr(F, "unfold", unfold)
    monkeypatch.setattr(F, "fold", fold)
    g = torch.Generator().manual_seed(13)
    x = torch.randn(2, 3, 11, 9, generator=g, dtype=torch.float64)
    cols = torch.randn(2, 3 * kk, _blocks((11, 9), k, d, p, s), generator=g, dtype=torch.float64)
    expected_u = unfold.fn(x, k, d, p, s)
    expected_f = fold.fn(cols, (11, 9), k, d, p, s)

    with function_rewrites():
        assert F.unfold is not unfold and F.fold is not fold
        got_u = F.unfold(x, k, dilation=d, padding=p, stride=s)
        got_f = F.fold(cols, output_size=(11, 9), kernel_size=k, dilation=d, padding=p, stride=s)
        got_mod = nn.Fold((11, 9), k, d, p, s)(cols)  # modules call F.fold: rewritten too

    assert (unfold.calls, fold.calls) == (0, 0)  # the rewrites did not fall back
    torch.testing.assert_close(got_u, expected_u, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_f, expected_f, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_mod, expected_f, rtol=1e-12, atol=1e-12)
    assert F.unfold is unfold and F.fold is fold


@pytest.mark.parametrize("geometry", NON_SQUARE, ids=str)
def test_non_square_windows_fall_back_to_the_originals(geometry, monkeypatch):
    k, d, p, s = geometry
    kk = math.prod(adapt._pair(k))
    unfold, fold = _Spy(F.unfold), _Spy(F.fold)
    monkeypatch.setattr(F, "unfold", unfold)
    monkeypatch.setattr(F, "fold", fold)
    g = torch.Generator().manual_seed(14)
    x = torch.randn(2, 3, 10, 9, generator=g, dtype=torch.float64)
    cols = torch.randn(2, 3 * kk, _blocks((10, 9), k, d, p, s), generator=g, dtype=torch.float64)

    with function_rewrites():
        got_u = F.unfold(x, k, d, p, s)
        got_f = F.fold(cols, (10, 9), k, d, p, s)

    assert (unfold.calls, fold.calls) == (1, 1)
    torch.testing.assert_close(got_u, unfold.fn(x, k, d, p, s), rtol=0, atol=0)
    torch.testing.assert_close(got_f, fold.fn(cols, (10, 9), k, d, p, s), rtol=0, atol=0)


def test_unbatched_inputs_fall_back_to_the_originals():
    x = torch.randn(3, 8, 8, dtype=torch.float64)
    cols = torch.randn(3 * 9, 64, dtype=torch.float64)
    expected_u, expected_f = F.unfold(x, 3, 1, 1, 1), F.fold(cols, (8, 8), 3, 1, 1, 1)
    with function_rewrites():
        torch.testing.assert_close(F.unfold(x, 3, 1, 1, 1), expected_u, rtol=0, atol=0)
        torch.testing.assert_close(F.fold(cols, (8, 8), 3, 1, 1, 1), expected_f, rtol=0, atol=0)


def test_function_rewrites_restore_the_originals():
    fold, unfold, conv2d = F.fold, F.unfold, F.conv2d
    with function_rewrites():
        assert F.fold is not fold and F.unfold is not unfold and F.conv2d is not conv2d
    assert F.fold is fold and F.unfold is unfold and F.conv2d is conv2d

    with pytest.raises(RuntimeError, match="inside"), function_rewrites():
        assert F.fold is not fold
        raise RuntimeError("raised inside the block")
    assert F.fold is fold and F.unfold is unfold and F.conv2d is conv2d

    with function_rewrites(), function_rewrites():  # nested: each restores what it found
        pass
    assert F.fold is fold and F.unfold is unfold and F.conv2d is conv2d


def test_ordinary_conv2d_is_untouched_by_the_rewrite():
    x, w = torch.randn(2, 8, 9, 9, dtype=torch.float64), torch.randn(4, 4, 3, 3, dtype=torch.float64)
    with function_rewrites():
        got = F.conv2d(x, w, None, 1, 1, 1, 2)
    torch.testing.assert_close(got, torch.nn.functional.conv2d(x, w, None, 1, 1, 1, 2), rtol=0, atol=0)


# --- end-to-end export -----------------------------------------------------------------------------------


class OfficialNet(nn.Module):
    """A small network built from every official module (the outlook attention channels-last)."""

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.inv = official.involution(channels, 3, 1)
        self.od = official.ODConv2d(channels, channels, 3, padding=1, groups=2)
        self.outlook = official.OutlookAttention(channels, 4)
        self.gsop = official.GSoP(channels, 16)
        self.sk = official.SKConv(channels, G=8)
        self.down = official.involution(channels, 3, 2)
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = self.od(self.inv(x))
        x = x + self.outlook(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = self.down(self.sk(self.gsop(x)))
        return self.head(x.mean((2, 3)))


def _onnx_groups(model: onnx.ModelProto, op_type: str) -> list[int]:
    out = []
    for node in model.graph.node:
        if node.op_type == op_type:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            out.append(int(attrs.get("group", 1)))
    return out


def test_export_of_a_model_of_official_modules(tmp_path):
    torch.manual_seed(0)
    model = randomize_(OfficialNet(), seed=15).eval()
    eager = copy.deepcopy(model)

    result = export_onnx(model, tmp_path / "m.onnx", (3, 16, 16), batch=(1, 3, 8), seed=16)

    assert result.ok and result.report is not None and result.report.passed, result.to_dict()
    swapped = {(r.path, r.foreign) for r in result.adapted if r.action == "adapted"}
    assert swapped == {
        ("inv", "involution"),
        ("od", "ODConv2d"),
        ("outlook", "OutlookAttention"),
        ("gsop", "GSoP"),
        ("down", "involution"),
    }
    left = [r for r in result.adapted if r.action == "left"]
    assert [(r.path, r.foreign) for r in left] == [("sk", "SKConv")]
    # export_onnx adapted a copy: the caller's model is the official one, unchanged
    assert isinstance(model.od, official.ODConv2d) and isinstance(model.outlook, official.OutlookAttention)
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x), rtol=0, atol=0)
    adapted, _ = adapt.adapt(copy.deepcopy(model), torch.randn(2, 3, 16, 16))
    assert isinstance(adapted.od, ours.ODConv2d) and isinstance(adapted.outlook, ours.OutlookAttention)
    assert isinstance(adapted.sk, official.SKConv)
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), eager(x), **TOL)  # the adapted model computes the same

    graph = onnx.load(str(tmp_path / "m.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    assert "Col2Im" not in ops
    model_groups = {m.groups for m in model.modules() if isinstance(m, nn.Conv2d)}
    conv_groups = _onnx_groups(graph, "Conv")
    assert conv_groups, "expected the model's ordinary convolutions in the graph"
    assert set(conv_groups) <= model_groups, (conv_groups, model_groups)  # no groups * batch
    assert set(_onnx_groups(graph, "ConvTranspose")) <= {32}  # the outlook fold: one kernel per channel


def test_official_outlook_exports_through_the_fold_rewrite_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(adapt, "ADAPTERS", [])
    model = nn.Sequential(randomize_(official.OutlookAttention(32, 4, stride=2), seed=17)).eval()

    result = export_onnx(model, tmp_path / "o.onnx", (16, 16, 32), batch=(1, 2, 4), seed=18)

    assert result.ok and result.report is not None and result.report.passed, result.to_dict()
    assert result.adapted == [] and result.blocks == []
    assert isinstance(model[0], official.OutlookAttention)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "o.onnx")).graph.node}
    assert "Col2Im" not in ops
    assert F.fold.__module__ == "torch.nn.functional"  # restored after the export


@pytest.mark.parametrize("groups", [1, 2])
def test_official_odconv_exports_through_the_conv2d_rewrite_alone(tmp_path, monkeypatch, groups):
    """Without the module adapter, the batch-folded grouped conv2d becomes a per-sample dynamic_conv2d."""
    monkeypatch.setattr(adapt, "ADAPTERS", [])
    original_conv2d = F.conv2d
    model = nn.Sequential(randomize_(official.ODConv2d(16, 16, 3, padding=1, groups=groups), seed=21)).eval()

    result = export_onnx(model, tmp_path / "od.onnx", (16, 11, 11), batch=(1, 3, 8), seed=22)

    assert result.ok and result.report is not None and result.report.passed, result.to_dict()
    assert isinstance(model[0], official.ODConv2d)  # left as it is: only the function was rewritten
    graph = onnx.load(str(tmp_path / "od.onnx"))
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch stayed dynamic
    assert set(_onnx_groups(graph, "Conv")) <= {1}  # no group count that depends on the batch
    assert F.conv2d is original_conv2d  # restored after the export
