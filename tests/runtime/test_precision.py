"""The fuse/precision step and half precision: folding is exact (float64), the caller's model is left
alone, and every block and the shipped detector give the fp32 answers in fp16 and bf16 (CPU).

torch 2.13's CPU kernels run fp16 convolutions, matmuls and BatchNorm (slowly) as well as bf16, so
both dtypes are tested here; the CUDA kernels are checked on a GPU by tests/plugins.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from attn_export.blocks import GSoPBlock, Involution2d, ODConv2d, OutlookAttention, SKConv
from attn_export.blocks.detector import ShapesDetector
from attn_export.blocks.mixnet import MixedNet
from attn_export.plugins import involution2d, outlook_aggregate
from attn_export.runtime.precision import fold_pairs, overflowing_values, prepare_for_inference
from attn_export.shapes.precision_report import calibrate

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "shapes_detector.pt"
F64 = torch.float64
HALF = (torch.float16, torch.bfloat16)
# relative to the largest output magnitude; measured (docs/precision.md): fp16 <= 1.8e-3, bf16 <= 1.4e-2
REL_TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2}


def randomize_bn_(model: nn.Module, seed: int) -> nn.Module:
    """BatchNorm statistics and affine parameters far from the identity, with variances up to 1e6."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(0.3 * torch.randn(n, generator=g))
                m.running_mean.copy_(torch.randn(n, generator=g) * 10)
                m.running_var.copy_(10 ** (torch.rand(n, generator=g) * 6))
    return model


def max_rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


# ------------------------------------------------------------------------------------------ folding
@pytest.mark.parametrize("arch", ["detector", "mixnet"])
def test_fold_is_exact_in_float64(arch):
    torch.manual_seed(0)
    model = ShapesDetector() if arch == "detector" else MixedNet()
    model = randomize_bn_(model, 1).double().eval()
    x = torch.rand(2, 3, 32, 32, dtype=F64)
    folded = prepare_for_inference(model)
    pairs = list(fold_pairs(model))
    assert folded is not model
    # every conv->BN pair became conv->Identity; the BatchNorms left are the unfoldable ones
    bn_paths = {p for p, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert {bn for _, bn in pairs} < bn_paths
    for _, bn in pairs:
        assert isinstance(folded.get_submodule(bn), nn.Identity)
    if arch == "detector":
        folded_bns = {bn for _, bn in pairs}
        assert "stage4.3.bn_for_DR" in folded_bns  # GSoP's reduction
        assert "stage2.2.block.attention.bn" in folded_bns  # ODConv's attention
        assert "stage2.1.block.conv1.bn" in folded_bns  # Involution's kernel branch
        assert "stage3.1.block.convs.0.bn" in folded_bns  # SKConv's branch
        assert "stage4.3.row_bn" not in folded_bns  # after the covariance: re-parametrised, not folded
    for m in folded.modules():  # no statistics left anywhere
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.running_mean == 0) and torch.allclose(m.running_var + m.eps, torch.ones((), dtype=F64))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-10)


def test_fold_handles_conv_with_bias_and_bn_without_affine():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8, affine=False), nn.ReLU())
    model = model.double()
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 5.0)
    model.eval()
    x = torch.randn(2, 3, 9, 9, dtype=F64)
    folded = prepare_for_inference(model)
    assert isinstance(folded[1], nn.Identity)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)


def test_bn_after_a_non_conv_is_not_folded_but_reparametrised():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8)).double()
    randomize_bn_(model, 3).eval()
    folded = prepare_for_inference(model)
    assert list(fold_pairs(model)) == []
    assert isinstance(folded[2], nn.BatchNorm2d)
    x = torch.randn(2, 3, 9, 9, dtype=F64)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)


def test_a_shared_conv_is_not_folded():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 3, padding=1)
    model = nn.Sequential(nn.Sequential(conv, nn.BatchNorm2d(3)), nn.Sequential(conv, nn.BatchNorm2d(3))).double()
    randomize_bn_(model, 4).eval()
    assert list(fold_pairs(model)) == []
    folded = prepare_for_inference(model)
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)


def test_a_weight_normed_conv_is_not_folded():
    torch.manual_seed(0)
    conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3, padding=1))
    model = randomize_bn_(nn.Sequential(conv, nn.BatchNorm2d(4)).double(), 5).eval()
    assert list(fold_pairs(model)) == []
    folded = prepare_for_inference(model)
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)


def test_callers_model_is_unchanged():
    torch.manual_seed(0)
    model = randomize_bn_(ShapesDetector(), 2).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [(n, type(m)) for n, m in model.named_modules()]
    prepared = prepare_for_inference(model, torch.bfloat16)
    assert model.training and not prepared.training
    assert [(n, type(m)) for n, m in model.named_modules()] == kinds
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    assert next(prepared.parameters()).dtype == torch.bfloat16


def test_bad_dtype_and_unfittable_weights_are_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 1))
    with pytest.raises(ValueError, match="floating-point"):
        prepare_for_inference(model, torch.int8)
    with torch.no_grad():
        model[0].weight[0, 0] = 1e6
    with pytest.raises(ValueError, match=r"0\.weight \(1e\+06\)"):
        prepare_for_inference(model, torch.float16)
    assert model[0].weight[0, 0] == 1e6  # still the caller's
    prepare_for_inference(model, torch.bfloat16)  # bf16 has fp32's range


# ------------------------------------------------------------------------------------------ blocks
# input scale: 1000 makes the reduction BatchNorms' running_var 1e5 to 1e6 (beyond fp16); the outlook
# block's input is layer-normed in VOLO (and in the detector), so it is tested at the scale of a
# LayerNorm output with its gain
BLOCKS = {
    "involution": (lambda: Involution2d(32, 7, group_channels=16), (4, 32, 12, 12), 1000.0),
    "odconv": (lambda: ODConv2d(32, 32, 3, padding=1), (4, 32, 12, 12), 1000.0),
    "skconv": (lambda: SKConv(32, groups=4, min_dim=16), (4, 32, 12, 12), 1000.0),
    "gsop": (lambda: GSoPBlock(32, 16), (4, 32, 10, 10), 1000.0),
    "outlook": (lambda: OutlookAttention(32, 2), (4, 12, 12, 32), 3.0),
}


@pytest.fixture(scope="module", params=list(BLOCKS))
def calibrated(request):
    ctor, shape, scale = BLOCKS[request.param]
    torch.manual_seed(0)
    block = calibrate(ctor(), shape, scale, seed=1)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)) * scale  # fresh input
    with torch.no_grad():
        ref = copy.deepcopy(block).double()(x.double())
    return request.param, block, x, ref


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_block_prepared_in_half_matches_float64(calibrated, dtype):
    name, block, x, ref = calibrated
    with torch.no_grad():
        fp32 = block(x)
        out = prepare_for_inference(block, dtype)(x.to(dtype))
    assert out.dtype == dtype
    assert max_rel(fp32, ref) < 1e-5
    assert max_rel(out, ref) < REL_TOL[dtype], name


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_block_plain_cast_and_autocast(calibrated, dtype):
    """``.to(dtype)`` without the step works where the statistics fit (bf16 always); autocast always."""
    name, block, x, ref = calibrated
    with torch.no_grad():
        with torch.autocast("cpu", dtype=dtype):
            auto = block(x)
        assert max_rel(auto, ref) < REL_TOL[dtype], name
        overflow = overflowing_values(block, dtype)
        plain = copy.deepcopy(block).to(dtype)(x.to(dtype))
    if overflow:  # e.g. a reduction BN's running_var of 1e5: .half() needs prepare_for_inference
        assert dtype == torch.float16 and name in ("involution", "skconv", "gsop", "odconv")
        assert all("running_var" in v for v in overflow)
    else:
        assert max_rel(plain, ref) < REL_TOL[dtype], name


def test_gsop_covariance_in_fp32_survives_large_features():
    """Features of about 20 on a 20x20 map: the covariance's sums pass fp16's range; the block computes
    it in fp32, so fp16 stays finite and close (computed in fp16 it was NaN)."""
    torch.manual_seed(0)
    block = GSoPBlock(32, 16)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        block.bn_for_DR.weight.fill_(20.0)
        block.train()
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        for _ in range(2):
            block(torch.randn(4, 32, 20, 20, generator=g) * 30)
        block.eval()
        x = torch.randn(4, 32, 20, 20, generator=g) * 30
        ref = copy.deepcopy(block).double()(x.double())
        z = block.act(block.bn_for_DR(block.conv_for_DR(block.pre_act(x))))
        assert (z.flatten(2) ** 2).sum(2).max() > 65504  # the products' sums overflow fp16
        assert ref.abs().max() > 10  # the attention is not saturated to zero
        for dtype in HALF:
            out = prepare_for_inference(block, dtype)(x.to(dtype))
            assert torch.isfinite(out).all()
            assert max_rel(out, ref) < REL_TOL[dtype]


def _ulp_check(out: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype) -> None:
    """fp32 accumulation: the half result is the float64 result rounded once (within one ulp)."""
    eps = torch.finfo(dtype).eps
    err = (out.double() - ref64).abs()
    assert (err <= eps * ref64.abs() + 1e-6).all(), f"max error {err.max().item()} in {dtype}"


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_op_references_accumulate_in_fp32(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 9, 9, generator=g).to(dtype)
    w = torch.randn(2, 2, 49, 9, 9, generator=g).to(dtype)
    out = involution2d(x, w, 7, 1, 3, 1)
    assert out.dtype == dtype
    _ulp_check(out, involution2d(x.double(), w.double(), 7, 1, 3, 1), dtype)
    v = torch.randn(2, 8, 7, 7, generator=g).to(dtype)
    a = torch.softmax(torch.randn(2, 2, 49, 9, 9, generator=g), -1).to(dtype)
    out = outlook_aggregate(v, a, 3, 1, 1)
    assert out.dtype == dtype
    _ulp_check(out, outlook_aggregate(v.double(), a.double(), 3, 1, 1), dtype)


# ------------------------------------------------------------------------------------------ the shipped detector
@pytest.fixture(scope="module")
def shipped():
    pytest.importorskip("skimage")
    from attn_export.detection.postprocess import letterbox
    from attn_export.export import load_model
    from attn_export.shapes.data import generate

    loaded = load_model(SHIPPED)
    model = loaded.model
    model.eval()
    size = loaded.input_shape[-1]
    x = torch.from_numpy(np.stack([letterbox(generate(20261130, i)[0], size)[0] for i in range(4)]))
    with torch.no_grad():
        ref = model(x)
    return model, x, ref


def _check_detections(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == torch.float32  # decoded in fp32 whatever the model's dtype
    scores, ref_scores = out[..., 4:], ref[..., 4:]
    assert (scores - ref_scores).abs().max().item() <= 0.05
    confident = ref_scores.max(-1).values > 0.5
    assert confident.sum() >= 4  # real images with objects, not noise
    assert (out[..., :4] - ref[..., :4])[confident].abs().max().item() <= 2.0


def test_shipped_detector_overflows_plain_fp16(shipped):
    model, _, _ = shipped
    names = overflowing_values(model, torch.float16)
    assert any(n.startswith("stage4.3.bn_for_DR.running_var") for n in names), names
    assert overflowing_values(prepare_for_inference(model), torch.float16) == []


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_shipped_detector_prepared_in_half(shipped, dtype):
    model, x, ref = shipped
    half = prepare_for_inference(model, dtype)
    with torch.no_grad():
        _check_detections(half(x.to(dtype)), ref)


def test_shipped_detector_plain_bf16_and_autocast(shipped):
    """bf16 has fp32's range, so a plain ``.bfloat16()`` works; autocast keeps the statistics in fp32. In
    bf16 autocast the unfolded convolutions before the large BatchNorms round outputs of about 1000
    to 8 (scores off by up to 0.054 on these images), so bf16 autocast runs on the folded model."""
    model, x, ref = shipped
    with torch.no_grad():
        _check_detections(copy.deepcopy(model).bfloat16()(x.bfloat16()), ref)
        with torch.autocast("cpu", dtype=torch.float16):
            _check_detections(model(x), ref)
        folded = prepare_for_inference(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _check_detections(folded(x), ref)


def test_precision_report_prints_the_block_table(capsys):
    from attn_export.shapes.precision_report import main

    assert main(["--no-detector"]) == 0
    out = capsys.readouterr().out
    assert "| block | input scale |" in out
    for name in ("Involution2d", "ODConv2d", "SKConv", "GSoPBlock", "OutlookAttention"):
        assert f"| {name} |" in out
    assert "overflow" in out  # plain fp16 of the blocks whose statistics pass 65,504
