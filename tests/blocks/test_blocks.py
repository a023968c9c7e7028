"""The five reference blocks against independent re-implementations of the official code.

The references are the official-layout stand-ins of :mod:`attn_export.bench.upstream` (d-li14 involution
with ``nn.Unfold``; OSVAI ODConv with the batch folded into the groups; sail-sg VOLO with ``nn.Unfold``
and ``F.fold``; GSoP ``chan_att`` with the MPNCOV centring-matrix covariance), written from the official
repositories' layouts, and ``RefSKConv`` below (SKNet with per-branch ``fcs`` layers); none calls the ops
of :mod:`attn_export.plugins` or the blocks. The same (randomised) weights are loaded into both, and they
are compared in float64, in eval mode and in train mode (batch statistics).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from weights import randomize_

from attn_export.bench import upstream as official
from attn_export.blocks import GSoPBlock, Involution2d, ODConv2d, OutlookAttention, SKConv

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def randn(*shape: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).to(dtype)


def pair(block: nn.Module, ref: nn.Module, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """Float64 copies of ``block`` (randomised) and ``ref`` (loaded with the same weights)."""
    block = randomize_(block.double(), seed, dtype=F64)
    ref = ref.double()
    ref.load_state_dict(block.state_dict(), strict=True)
    return block, ref


def set_mode(train: bool, *modules: nn.Module) -> None:
    for m in modules:
        m.train(train)


def assert_same_bn_stats(block: nn.Module, ref: nn.Module) -> None:
    """After a train-mode forward both must have updated their running statistics identically."""
    ref_state = ref.state_dict()
    for name, buf in block.named_buffers():
        torch.testing.assert_close(buf, ref_state[name], **TOL, msg=f"buffer {name}")


def assert_grads(block: nn.Module, ref_grads: dict[str, torch.Tensor], zero_ok: frozenset[str] = frozenset()) -> None:
    """Every parameter gets a finite gradient equal to the reference's; ``zero_ok`` names parameters
    whose gradient is zero by construction (checked to be ~0)."""
    for name, p in block.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-8, atol=1e-10, msg=f"grad of {name}")
        if name in zero_ok:
            assert p.grad.abs().max() < 1e-9, name
        else:
            assert p.grad.abs().max() > 0, f"{name} has an all-zero gradient"


def run_pair(block, ref, x, train: bool):
    set_mode(train, block, ref)
    out, expected = block(x), ref(x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, **TOL)
    if train:
        assert_same_bn_stats(block, ref)
    return out


BATCHES = [pytest.param(b, id=f"b{b}") for b in (1, 2, 5)]
MODES = [pytest.param(False, id="eval"), pytest.param(True, id="train")]


# ==================================================================================================
# Involution: d-li14/involution, cls/mmcls/models/utils/involution_naive.py
# ==================================================================================================


INVOLUTION_CASES = [
    # channels, kernel_size, stride, reduction, group_channels, H, W
    pytest.param(16, 7, 1, 4, 16, 9, 9, id="c16-k7-s1-g1-9x9"),
    pytest.param(32, 3, 2, 4, 8, 7, 9, id="c32-k3-s2-g4-7x9"),
    pytest.param(16, 5, 1, 2, 4, 6, 5, id="c16-k5-s1-g4-6x5"),
    pytest.param(32, 7, 2, 4, 16, 8, 8, id="c32-k7-s2-g2-8x8"),
    pytest.param(16, 3, 3, 4, 8, 8, 7, id="c16-k3-s3-g2-8x7"),
]


def involution_pair(c, k, s, r, gc, ceil_mode=True):
    ref = official.involution(c, k, s, reduction_ratio=r, group_channels=gc, ceil_mode=ceil_mode)
    return pair(Involution2d(c, k, s, r, gc), ref, seed=c + k + s)


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize(("c", "k", "s", "r", "gc", "h", "w"), INVOLUTION_CASES)
def test_involution_matches_official(c, k, s, r, gc, h, w, b, train):
    block, ref = involution_pair(c, k, s, r, gc)
    out = run_pair(block, ref, randn(b, c, h, w, seed=b), train)
    assert out.shape == (b, c, math.ceil(h / s), math.ceil(w / s))


def test_involution_even_size_matches_official_floor_pooling():
    """On even sizes ceil-mode pooling is the official floor-mode ``AvgPool2d(stride, stride)``."""
    block, ref = involution_pair(32, 3, 2, 4, 16, ceil_mode=False)
    set_mode(False, block, ref)
    x = randn(3, 32, 8, 6, seed=1)
    torch.testing.assert_close(block(x), ref(x), **TOL)


# ==================================================================================================
# ODConv: OSVAI/ODConv, modules/odconv.py
# ==================================================================================================


ODCONV_CASES = [
    # in, out, k, stride, padding, dilation, groups, reduction, kernel_num, min_channel, H, W
    pytest.param(16, 32, 3, 1, 1, 1, 1, 0.0625, 4, 16, 7, 7, id="16to32-k3-n4-7x7"),
    pytest.param(16, 16, 3, 2, 1, 1, 16, 0.0625, 4, 16, 9, 7, id="depthwise16-k3-s2-n4-9x7"),
    pytest.param(32, 16, 1, 1, 0, 1, 1, 0.0625, 1, 16, 5, 6, id="32to16-k1-n1-pointwise-fast-path"),
    pytest.param(32, 16, 1, 2, 0, 1, 1, 0.25, 4, 4, 7, 5, id="32to16-k1-s2-n4"),
    pytest.param(16, 32, 3, 1, 2, 2, 4, 0.0625, 1, 16, 7, 8, id="16to32-g4-k3-d2-n1"),
    pytest.param(16, 16, 5, 2, 2, 1, 2, 0.25, 2, 4, 7, 7, id="16to16-g2-k5-s2-n2"),
    pytest.param(16, 16, 3, 1, 1, 1, 16, 0.0625, 1, 8, 5, 5, id="depthwise16-k3-n1"),
]


def odconv_pair(cin, cout, k, s, p, d, g, r, n, mc):
    block = ODConv2d(cin, cout, k, s, p, d, g, reduction=r, kernel_num=n, min_channel=mc)
    return pair(block, official.ODConv2d(cin, cout, k, s, p, d, g, r, n, min_channel=mc), seed=cin + cout + k + n)


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize(("cin", "cout", "k", "s", "p", "d", "g", "r", "n", "mc", "h", "w"), ODCONV_CASES)
def test_odconv_matches_official(cin, cout, k, s, p, d, g, r, n, mc, h, w, b, train):
    if train and b == 1:
        pytest.skip("train-mode BatchNorm after the global average pool sees one value per channel at batch 1")
    block, ref = odconv_pair(cin, cout, k, s, p, d, g, r, n, mc)
    assert set(block.state_dict()) == set(ref.state_dict())  # same skipped heads as the official code
    run_pair(block, ref, randn(b, cin, h, w, seed=b), train)


def test_odconv_skipped_heads():
    assert ODConv2d(16, 16, 3, groups=16).attention.filter_fc is None  # depthwise: no filter attention
    assert ODConv2d(16, 16, 1).attention.spatial_fc is None
    assert ODConv2d(16, 16, 3, kernel_num=1).attention.kernel_fc is None
    full = ODConv2d(16, 16, 3, groups=2).attention
    assert None not in (full.filter_fc, full.spatial_fc, full.kernel_fc)


@pytest.mark.parametrize("temperature", [0.5, 7.0, 31.0])
def test_odconv_update_temperature(temperature):
    block, ref = odconv_pair(16, 32, 3, 1, 1, 1, 1, 0.0625, 4, 16)
    set_mode(False, block, ref)
    x = randn(3, 16, 6, 6, seed=3)
    before = block(x)
    block.update_temperature(temperature)
    ref.update_temperature(temperature)
    assert block.attention.temperature == temperature
    out = block(x)
    torch.testing.assert_close(out, ref(x), **TOL)
    assert not torch.allclose(out, before)  # the temperature does reach the attentions


# ==================================================================================================
# Outlook attention: sail-sg/volo, models/volo.py
# ==================================================================================================


OUTLOOK_CASES = [
    # dim, heads, k, padding, stride, qkv_bias, qk_scale, H, W
    pytest.param(16, 2, 3, 1, 1, False, None, 7, 7, id="d16-h2-k3-s1-7x7"),
    pytest.param(32, 4, 3, 1, 2, False, None, 7, 9, id="d32-h4-k3-s2-7x9"),
    pytest.param(16, 1, 5, 2, 2, True, None, 6, 5, id="d16-h1-k5-s2-6x5-qkvbias"),
    pytest.param(24, 3, 1, 0, 1, False, 0.3, 5, 4, id="d24-h3-k1-5x4-qkscale"),
    pytest.param(16, 4, 3, 1, 3, False, None, 8, 7, id="d16-h4-k3-s3-8x7"),
]


def outlook_pair(dim, heads, k, p, s, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
    kw = dict(qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=proj_drop)
    ref = official.OutlookAttention(dim, heads, k, p, s, **kw)
    return pair(OutlookAttention(dim, heads, k, p, s, **kw), ref, seed=dim)


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize(("dim", "heads", "k", "p", "s", "qkv_bias", "qk_scale", "h", "w"), OUTLOOK_CASES)
def test_outlook_matches_official(dim, heads, k, p, s, qkv_bias, qk_scale, h, w, b, train):
    block, ref = outlook_pair(dim, heads, k, p, s, qkv_bias, qk_scale)
    out = run_pair(block, ref, randn(b, h, w, dim, seed=b), train)
    assert out.shape == (b, h, w, dim)


def test_outlook_dropout_matches_official():
    """Train mode with dropout: same RNG state, same masks, same numbers (dropout order as VOLO)."""
    block, ref = outlook_pair(16, 2, 3, 1, 2, attn_drop=0.3, proj_drop=0.2)
    set_mode(True, block, ref)
    x = randn(3, 7, 5, 16, seed=3)
    torch.manual_seed(123)
    out = block(x)
    torch.manual_seed(123)
    torch.testing.assert_close(out, ref(x), **TOL)


# ==================================================================================================
# GSoP: ZilinGao/Global-Second-order-Pooling-Convnet, Bottleneck.chan_att + MPNCOV.CovpoolLayer
# ==================================================================================================


GSOP_CASES = [
    # in_channels, mid_channels, pre_act, H, W, dr_stride, row_relu
    pytest.param(32, 16, True, 7, 7, 1, False, id="c32-m16-7x7"),
    pytest.param(16, 8, True, 5, 3, 1, False, id="c16-m8-5x3"),
    pytest.param(64, 32, True, 4, 4, 1, False, id="c64-m32-4x4"),
    pytest.param(32, 16, False, 6, 5, 1, False, id="c32-m16-6x5-no-preact"),
    pytest.param(32, 16, True, 7, 6, 2, False, id="c32-m16-7x6-dr-stride2"),
    pytest.param(32, 16, True, 5, 5, 1, True, id="c32-m16-5x5-row-relu"),
]


def gsop_pair(c, m, pre_act, dr_stride=1, row_relu=False):
    return pair(
        GSoPBlock(c, m, pre_act, dr_stride=dr_stride, row_relu=row_relu),
        official.GSoP(c, m, pre_act=pre_act, dr_stride=dr_stride, row_relu=row_relu),
        seed=c + m,
    )


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize(("c", "m", "pre_act", "h", "w", "dr_stride", "row_relu"), GSOP_CASES)
def test_gsop_matches_official(c, m, pre_act, h, w, dr_stride, row_relu, b, train):
    block, ref = gsop_pair(c, m, pre_act, dr_stride, row_relu)
    out = run_pair(block, ref, randn(b, c, h, w, seed=b), train)
    assert out.shape == (b, c, h, w)


def test_gsop_row_relu_matters():
    """Off by default (the official chan_att has no ReLU after the row conv); on, it changes the output."""
    plain, _ = gsop_pair(32, 16, True)
    with_relu, _ = gsop_pair(32, 16, True, row_relu=True)
    set_mode(False, plain, with_relu)
    assert isinstance(plain.row_act, nn.Identity) and not plain.row_relu
    x = randn(2, 32, 5, 5, seed=3)
    assert not torch.allclose(plain(x), with_relu(x))


def test_shipped_detector_keeps_the_gsop_it_was_trained_with():
    """models/shapes_detector.pt was trained with a ReLU after the row conv: its GSoP is built with it."""
    from pathlib import Path

    from attn_export.export import load_model

    path = Path(__file__).resolve().parents[2] / "models" / "shapes_detector.pt"
    model = load_model(path).model.eval()
    (gsop,) = [m for m in model.modules() if isinstance(m, GSoPBlock)]
    assert gsop.row_relu and isinstance(gsop.row_act, nn.ReLU)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x)
        gsop.row_act = nn.Identity()  # what the weights would mean without it
        assert (model(x) - y).abs().max() > 1e-4


def test_gsop_pre_act_matters():
    """The official branch starts with ReLU of its (signed) input: pre_act must change the output."""
    with_act, _ = gsop_pair(32, 16, True)
    without, _ = gsop_pair(32, 16, False)
    set_mode(False, with_act, without)
    x = randn(2, 32, 5, 5, seed=2)
    assert not torch.allclose(with_act(x), without(x))


# ==================================================================================================
# SKConv: SKNet with per-branch select layers (the "list form" the block's docstring maps onto)
# ==================================================================================================


class RefSKConv(nn.Module):
    """The SK unit as most ports write it: per-branch conv/BN/ReLU with dilation 1+i, fuse by sum, GAP,
    Linear + BatchNorm1d + ReLU, one Linear per branch, softmax over branches. Not the stand-in
    ``official.SKConv`` (kernels 3, 5, ... with bias, no BatchNorm in the fuse): our SKConv is this function."""

    def __init__(self, channels, branches, groups, reduction, min_dim, stride):
        super().__init__()
        d = max(channels // reduction, min_dim)
        self.branch_convs = nn.ModuleList(
            nn.Conv2d(channels, channels, 3, stride, padding=1 + i, dilation=1 + i, groups=groups, bias=False)
            for i in range(branches)
        )
        self.branch_bns = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(branches))
        self.fc = nn.Linear(channels, d, bias=False)
        self.fc_bn = nn.BatchNorm1d(d)
        self.fcs = nn.ModuleList(nn.Linear(d, channels) for _ in range(branches))

    def forward(self, x):
        feats = [F.relu(bn(conv(x))) for conv, bn in zip(self.branch_convs, self.branch_bns, strict=True)]
        u = sum(feats)
        s = u.mean(dim=(2, 3))  # B, C
        z = F.relu(self.fc_bn(self.fc(s)))  # B, d
        logits = torch.stack([fc(z) for fc in self.fcs], dim=1)  # B, M, C
        attention = logits.softmax(dim=1)
        return sum(attention[:, i, :, None, None] * f for i, f in enumerate(feats))


def sk_to_ref(state: dict[str, torch.Tensor], branches: int, channels: int) -> dict[str, torch.Tensor]:
    """Map an SKConv state dict (or gradients by name) onto RefSKConv's names."""
    out = {}
    for name, t in state.items():
        parts = name.split(".")
        if parts[0] == "convs":
            i, layer, leaf = parts[1], parts[2], parts[3]
            out[f"branch_convs.{i}.{leaf}" if layer == "conv" else f"branch_bns.{i}.{leaf}"] = t
        elif name == "fc.conv.weight":
            out["fc.weight"] = t.flatten(1)
        elif parts[:2] == ["fc", "bn"]:
            out[f"fc_bn.{parts[2]}"] = t
        elif parts[0] == "fcs":
            chunks = t if t.dim() == 1 else t.flatten(1)  # bias (M*C,) / weight (M*C, d, 1, 1)
            for i in range(branches):
                out[f"fcs.{i}.{parts[1]}"] = chunks[i * channels : (i + 1) * channels]
        else:
            raise AssertionError(f"unexpected SKConv entry {name}")
    return out


def ref_to_sk_grads(ref: RefSKConv, block: SKConv) -> dict[str, torch.Tensor]:
    """RefSKConv's gradients under SKConv's parameter names and shapes."""
    g = {n: p.grad for n, p in ref.named_parameters()}
    out = {}
    for name, p in block.named_parameters():
        parts = name.split(".")
        if parts[0] == "convs":
            i, layer, leaf = parts[1:4]
            out[name] = g[f"branch_convs.{i}.{leaf}" if layer == "conv" else f"branch_bns.{i}.{leaf}"]
        elif name == "fc.conv.weight":
            out[name] = g["fc.weight"].view_as(p)
        elif parts[:2] == ["fc", "bn"]:
            out[name] = g[f"fc_bn.{parts[2]}"]
        else:  # fcs.weight / fcs.bias: concatenate the branches
            out[name] = torch.cat([g[f"fcs.{i}.{parts[1]}"] for i in range(block.branches)]).view_as(p)
    return out


SK_CASES = [
    # channels, branches, groups, reduction, min_dim, stride, H, W
    pytest.param(32, 2, 8, 16, 8, 1, 7, 7, id="c32-m2-g8-s1-7x7"),
    pytest.param(64, 3, 32, 16, 32, 2, 9, 7, id="c64-m3-g32-s2-9x7"),
    pytest.param(16, 2, 16, 4, 4, 2, 8, 8, id="c16-m2-depthwise-s2-8x8"),
    pytest.param(32, 4, 4, 8, 4, 1, 5, 6, id="c32-m4-g4-s1-5x6"),
]


def sk_pair(c, m, g, r, d, s):
    block = randomize_(SKConv(c, m, g, r, d, s).double(), seed=c + m, dtype=F64)
    ref = RefSKConv(c, m, g, r, d, s).double()
    ref.load_state_dict(sk_to_ref(block.state_dict(), m, c), strict=True)
    return block, ref


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize(("c", "m", "g", "r", "d", "s", "h", "w"), SK_CASES)
def test_skconv_matches_reference(c, m, g, r, d, s, h, w, b, train):
    if train and b == 1:
        pytest.skip("train-mode BatchNorm of the fused, globally pooled vector sees one value per channel at batch 1")
    block, ref = sk_pair(c, m, g, r, d, s)
    set_mode(train, block, ref)
    x = randn(b, c, h, w, seed=b)
    out = block(x)
    torch.testing.assert_close(out, ref(x), **TOL)
    assert out.shape == (b, c, math.ceil(h / s), math.ceil(w / s))
    if train:
        ref_state = sk_to_ref(dict(block.named_buffers()), m, c)
        for name, buf in ref.named_buffers():
            torch.testing.assert_close(ref_state[name], buf, **TOL, msg=name)


# ==================================================================================================
# float32 blocks agree with the float64 references
# ==================================================================================================


#: Pairs for the float32 and gradient checks: name -> (block and reference, input shape without the batch).
PAIRS = {
    "involution-s2": (lambda: involution_pair(32, 3, 2, 4, 8), (32, 7, 9)),
    "involution-k7": (lambda: involution_pair(16, 7, 1, 4, 16), (16, 6, 6)),
    "odconv": (lambda: odconv_pair(16, 32, 3, 2, 1, 1, 1, 0.0625, 4, 16), (16, 7, 9)),
    "odconv-depthwise": (lambda: odconv_pair(16, 16, 3, 1, 1, 1, 16, 0.0625, 2, 16), (16, 5, 5)),
    "odconv-pointwise": (lambda: odconv_pair(32, 16, 1, 1, 0, 1, 1, 0.0625, 1, 16), (32, 5, 5)),
    "outlook": (lambda: outlook_pair(32, 4, 3, 1, 2), (7, 9, 32)),
    "outlook-qkv-bias": (lambda: outlook_pair(32, 4, 3, 1, 2, qkv_bias=True), (7, 9, 32)),
    "gsop": (lambda: gsop_pair(32, 16, True), (32, 7, 9)),
    "gsop-5x6": (lambda: gsop_pair(32, 16, True), (32, 5, 6)),
    "skconv": (lambda: sk_pair(32, 2, 8, 16, 8, 2), (32, 7, 9)),
}


def make_pair(which: str, batch: int) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    build, shape = PAIRS[which]
    block, ref = build()
    return block, ref, randn(batch, *shape, seed=1)


@pytest.mark.parametrize("which", ["involution-s2", "odconv", "outlook", "gsop", "skconv"])
def test_float32_block_close_to_float64_reference(which):
    block, ref, x = make_pair(which, 2)
    set_mode(False, block, ref)
    out = block.float()(x.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref(x), rtol=1e-4, atol=1e-5)


# ==================================================================================================
# gradients: every parameter, equal to the reference's
# ==================================================================================================


def backward_both(block: nn.Module, ref: nn.Module, x: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Backpropagate the same random cotangent through both; returns their inputs (with ``.grad``)."""
    set_mode(train, block, ref)
    x_block, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = block(x_block)
    cotangent = randn(*out.shape, seed=99)
    (out * cotangent).sum().backward()
    (ref(x_ref) * cotangent).sum().backward()
    return x_block, x_ref


#: (pair, batch) of the gradient checks.
GRAD_CASES = [
    pytest.param(which, batch, id=which)
    for which, batch in (
        ("involution-s2", 3),
        ("involution-k7", 4),
        ("odconv", 4),
        ("odconv-depthwise", 3),
        ("odconv-pointwise", 3),
        ("outlook-qkv-bias", 3),
        ("gsop-5x6", 4),
    )
]


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize(("which", "batch"), GRAD_CASES)
def test_gradients_reach_every_parameter(which, batch, train):
    block, ref, x = make_pair(which, batch)
    # GSoP: conv_for_DR's bias is followed by bn_for_DR: with batch statistics a per-channel constant
    # shift is subtracted out again, so its gradient is zero (up to rounding) in train mode.
    zero_ok = frozenset({"conv_for_DR.bias"}) if train and which.startswith("gsop") else frozenset()
    x_block, x_ref = backward_both(block, ref, x, train)
    torch.testing.assert_close(x_block.grad, x_ref.grad, rtol=1e-8, atol=1e-10)
    assert_grads(block, {n: p.grad for n, p in ref.named_parameters()}, zero_ok)


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize(
    ("c", "m", "g", "s"),
    [pytest.param(32, 2, 8, 1, id="c32-m2-s1"), pytest.param(64, 3, 32, 2, id="c64-m3-s2")],
)
def test_skconv_gradients_reach_every_parameter(c, m, g, s, train):
    block, ref = sk_pair(c, m, g, 16, 8, s)
    backward_both(block, ref, randn(3, c, 7, 7, seed=1), train)
    assert_grads(block, ref_to_sk_grads(ref, block))


def test_skconv_single_branch_selects_nothing():
    """With one branch the softmax over branches is constantly 1, so the select path (fc, fcs) gets an
    exactly zero gradient while the branch itself trains; and the output is that branch's ReLU(BN(conv))."""
    block, ref = sk_pair(16, 1, 4, 4, 4, 1)
    set_mode(True, block, ref)
    x = randn(3, 16, 5, 5, seed=1)
    out = block(x)
    torch.testing.assert_close(out, ref(x), **TOL)
    torch.testing.assert_close(out, block.convs[0](x), **TOL)
    out.square().sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name.startswith(("fc.", "fcs.")):
            assert p.grad.abs().max() < 1e-12, name
        else:
            assert p.grad.abs().max() > 0, name


# ==================================================================================================
# argument errors
# ==================================================================================================


CONSTRUCTION_ERRORS = [
    pytest.param(
        lambda: Involution2d(30, group_channels=16),
        r"channels \(30\) must be divisible by group_channels \(16\)",
        id="inv-group-channels",
    ),
    pytest.param(
        lambda: Involution2d(32, kernel_size=4), r"kernel_size must be a positive odd number", id="inv-even-k"
    ),
    pytest.param(lambda: Involution2d(32, kernel_size=0), r"kernel_size must be a positive odd number", id="inv-k0"),
    pytest.param(
        lambda: Involution2d(32, reduction=3),
        r"channels \(32\) must be divisible by reduction \(3\)",
        id="inv-reduction",
    ),
    pytest.param(lambda: Involution2d(32, stride=0), r"stride must be positive", id="inv-stride0"),
    pytest.param(lambda: Involution2d(32, group_channels=0), r"group_channels must be positive", id="inv-gc0"),
    pytest.param(
        lambda: ODConv2d(16, 30, 3, groups=4),
        r"out_planes \(30\) must be divisible by groups \(4\)",
        id="odconv-out-groups",
    ),
    pytest.param(
        lambda: ODConv2d(18, 32, 3, groups=4),
        r"in_planes \(18\) must be divisible by groups \(4\)",
        id="odconv-in-groups",
    ),
    pytest.param(lambda: ODConv2d(16, 32, 3, padding=-1), r"padding must be >= 0", id="odconv-padding"),
    pytest.param(lambda: ODConv2d(16, 32, 3, kernel_num=0), r"kernel_num must be positive", id="odconv-kernel-num"),
    pytest.param(lambda: ODConv2d(16, 32, 0), r"kernel_size must be positive", id="odconv-k0"),
    pytest.param(lambda: ODConv2d(16, 32, 3, reduction=0.0), r"reduction must be positive", id="odconv-reduction"),
    pytest.param(
        lambda: OutlookAttention(30, 4), r"dim \(30\) must be divisible by num_heads \(4\)", id="outlook-heads"
    ),
    pytest.param(lambda: OutlookAttention(32, 0), r"num_heads must be positive", id="outlook-heads0"),
    pytest.param(lambda: OutlookAttention(32, 4, padding=-1), r"padding must be >= 0", id="outlook-padding"),
    pytest.param(lambda: OutlookAttention(32, 4, stride=0), r"stride must be positive", id="outlook-stride"),
    pytest.param(lambda: GSoPBlock(0), r"in_channels must be positive", id="gsop-in0"),
    pytest.param(lambda: GSoPBlock(32, mid_channels=0), r"mid_channels must be positive", id="gsop-mid0"),
    pytest.param(lambda: SKConv(48, groups=32), r"channels \(48\) must be divisible by groups \(32\)", id="sk-groups"),
    pytest.param(lambda: SKConv(32, branches=0), r"branches must be positive", id="sk-branches"),
    pytest.param(lambda: SKConv(32, stride=0), r"stride must be positive", id="sk-stride"),
]


@pytest.mark.parametrize(("make", "match"), CONSTRUCTION_ERRORS)
def test_invalid_construction_raises(make, match):
    with pytest.raises(ValueError, match=match):
        make()


CALL_BLOCKS = {
    "involution": (lambda: Involution2d(16, 3, group_channels=8), "(B, C, H, W)", 1),
    "odconv": (lambda: ODConv2d(16, 32, 3, padding=1), "(B, C, H, W)", 1),
    "outlook": (lambda: OutlookAttention(16, 2), "(B, H, W, C)", 3),
    "gsop": (lambda: GSoPBlock(16, 8), "(B, C, H, W)", 1),
    "skconv": (lambda: SKConv(16, groups=8, min_dim=8), "(B, C, H, W)", 1),
}


@pytest.mark.parametrize("which", list(CALL_BLOCKS))
def test_wrong_input_rank_raises(which):
    make, layout, _ = CALL_BLOCKS[which]
    with pytest.raises(ValueError, match=r"expected a 4-D input " + layout.replace("(", r"\(").replace(")", r"\)")):
        make().eval()(randn(2, 16, 5, seed=0))


@pytest.mark.parametrize("which", list(CALL_BLOCKS))
def test_wrong_channel_count_raises(which):
    make, _, axis = CALL_BLOCKS[which]
    shape = [2, 5, 5, 5]
    shape[axis] = 12
    with pytest.raises(ValueError, match=rf"expected 16 channels on axis {axis} of"):
        make().eval()(randn(*shape, seed=0))


def test_outlook_channels_first_input_is_rejected():
    """A channels-first tensor passed to the channels-last block is caught by the channel check."""
    with pytest.raises(ValueError, match=r"expected 16 channels on axis 3 of \(B, H, W, C\)"):
        OutlookAttention(16, 2)(randn(2, 16, 5, 5, seed=0))


def test_outlook_grid_mismatch_says_what_padding_to_use():
    block = OutlookAttention(16, 2, kernel_size=3, padding=0)
    with pytest.raises(ValueError, match=r"use padding=\(kernel_size - 1\) // 2 with an odd kernel_size"):
        block(randn(1, 7, 7, 16, seed=0))
