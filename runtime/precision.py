"""One fuse/precision step for inference, shared by export and serving: fold BatchNorm, then cast.

:func:`prepare_for_inference` returns a new module (a deep copy; the caller's model is never changed)
that computes the same function as the eval-mode model and can be cast to fp16 or bf16 without
losing the fp32 answers:

1. **Fold** every BatchNorm that directly follows a convolution into that convolution (weights and
   bias recomputed in float64, then stored in the model's dtype), and replace the BatchNorm by
   ``nn.Identity``. The pairs are the consecutive ``Conv2d -> BatchNorm2d`` children of a plain
   ``nn.Sequential`` (``ConvBNAct``, Involution's ``conv1``, SKConv's branches and ``fc``), and the
   block pairs listed in :data:`FOLD_PAIRS` (GSoP's ``conv_for_DR -> bn_for_DR``, ODConv's
   attention ``fc -> bn``). Exact up to rounding: the tests check it in float64.
2. **Re-parametrise** every BatchNorm that cannot be folded (the one after a block in a residual, a
   BatchNorm after a non-convolution, GSoP's ``row_bn`` over the covariance) into the same affine map
   with identity statistics: ``running_mean = 0``, ``running_var = 1 - eps``, ``weight = gamma /
   sqrt(var + eps)``, ``bias = beta - mean * weight``. The module stays a ``BatchNorm2d`` (same
   path, same ONNX op), but no buffer holds a variance any more.
3. **Cast** to ``dtype`` (when given) and check that every parameter and buffer is finite in it.

Why: a trained network's BatchNorm statistics can exceed fp16's range (65,504). The shipped shapes
detector has three: ``stage4.2.body.0.1`` (running_var up to 820,600), ``stage4.3.bn_for_DR``
(375,075) and ``lat5.1`` (409,900); plain ``.half()`` turns them into ``inf`` and its class scores
move by up to 0.44. The activations themselves fit (their standard deviation is the square root of the
variance); only the statistics do not. After steps 1-2 every stored value fits, and the shipped
detector in fp16 gives the fp32 scores within 0.005 (see docs/precision.md for the figures).

What stays in fp32, decided per block by measurement (``tests/runtime/test_precision.py`` checks
each block at large magnitudes against float64; ``python -m attn_export.shapes.precision_report``
prints the figures, docs/precision.md has them):

- GSoP: the covariance and the ``row_bn`` after it are computed in fp32 inside
  :meth:`attn_export.blocks.GSoPBlock.attention` whatever the input dtype. The covariance sums
  ``H*W`` products: with features of about 20 on a 20x20 map those sums pass 65,504 and fp16 gave
  NaN. Everything else in the block runs in the input dtype.
- The dynamic-kernel ops accumulate in fp32 (their CPU references as well as their CUDA kernels and
  the TensorRT plugins): involution's 49 taps summed in bf16 doubled the block's error.
- The detector decodes boxes and scores in fp32 (bf16 spaces coordinates above 256 px 2 px apart).
- Softmax (ODConv's kernel attention, SKConv's branch attention, Outlook's attention over taps):
  torch's softmax already accumulates reduced-precision inputs in fp32, and its output (weights in
  [0, 1]) loses nothing measurable, so it stays in the input dtype. What can hurt is the logits:
  Outlook's attention logits are a ``Linear`` of its input, so on an input of magnitude 1000 they
  are rounded by several units in bf16 (error 4e-2); VOLO, like the detector, layer-norms that input
  (error 5e-3 in bf16, 8e-4 in fp16).

Which path needs this step (measured on the shipped detector, 24 generated images; tolerance: scores
within 0.05 of fp32, boxes of confident cells within 2 px):

- ``.half()`` works on the model as it is only when every BatchNorm statistic fits in fp16
  (:func:`overflowing_values` names those that do not); the shipped detector's do not (scores off by
  0.44): use ``prepare_for_inference(model, torch.float16)`` (0.004).
- ``.bfloat16()`` works as it is (bf16 has fp32's range): 0.039; prepared 0.039.
- ``torch.autocast`` in fp16 works as it is (parameters and buffers stay fp32): 0.009. In bf16 the
  unfolded convolutions before the large BatchNorms round outputs of about 1000 to steps of 8:
  0.067 as it is, 0.037 on ``prepare_for_inference(model)`` (fold only, no cast).
"""

from __future__ import annotations

import collections
import copy
import itertools
from collections.abc import Iterator

import torch
from torch import nn

HALF_DTYPES = (torch.float16, torch.bfloat16)


def _fold_pairs() -> dict[type[nn.Module], tuple[tuple[str, str], ...]]:
    """Block class -> ``(conv attribute, batchnorm attribute)`` pairs where the forward applies the
    batchnorm directly to the convolution's output (and nothing else reads that output)."""
    from attn_export.blocks.gsop import GSoPBlock
    from attn_export.blocks.odconv import ODConvAttention

    return {GSoPBlock: (("conv_for_DR", "bn_for_DR"),), ODConvAttention: (("fc", "bn"),)}


#: Filled on first use (importing the blocks here would import them with this module).
FOLD_PAIRS: dict[type[nn.Module], tuple[tuple[str, str], ...]] = {}


def _no_hooks(m: nn.Module) -> bool:
    """No forward hooks (weight_norm's recomputes the weight) and no parametrization."""
    return not (m._forward_pre_hooks or m._forward_hooks or nn.utils.parametrize.is_parametrized(m))


def _is_plain_conv(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.Conv2d) and type(m).forward is nn.Conv2d.forward and m.padding_mode == "zeros" and _no_hooks(m)
    )


def _is_plain_bn(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.BatchNorm2d)
        and type(m).forward is nn.modules.batchnorm._BatchNorm.forward
        and m.running_mean is not None
        and m.running_var is not None
        and _no_hooks(m)
    )


def _foldable(conv: nn.Module, bn: nn.Module, uses: collections.Counter) -> bool:
    """A plain conv and a plain BatchNorm of its width, each used once (a shared one stays as it is)."""
    return (
        _is_plain_conv(conv)
        and _is_plain_bn(bn)
        and conv.out_channels == bn.num_features
        and uses[id(conv)] == 1
        and uses[id(bn)] == 1
    )


def fold_pairs(model: nn.Module) -> Iterator[tuple[str, str]]:
    """``(conv path, batchnorm path)`` of every BatchNorm that directly follows a convolution."""
    if not FOLD_PAIRS:
        FOLD_PAIRS.update(_fold_pairs())
    uses = collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    for path, m in model.named_modules():
        prefix = f"{path}." if path else ""
        if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward:
            names = list(m._modules)
            for a, b in itertools.pairwise(names):
                if _foldable(m._modules[a], m._modules[b], uses):
                    yield prefix + a, prefix + b
        for conv_name, bn_name in FOLD_PAIRS.get(type(m), ()):
            conv, bn = getattr(m, conv_name, None), getattr(m, bn_name, None)
            if conv is not None and bn is not None and _foldable(conv, bn, uses):
                yield prefix + conv_name, prefix + bn_name


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode BatchNorm as ``x * scale + shift``, in float64."""
    var = bn.running_var.detach().double()
    mean = bn.running_mean.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold the eval-mode ``bn`` into ``conv`` in place (computed in float64, stored in conv's dtype)."""
    scale, shift = _bn_affine(bn)
    w = conv.weight.detach()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
    new_w = (w.double() * scale.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype)
    new_b = (b * scale + shift).to(w.dtype)
    conv.weight = nn.Parameter(new_w, requires_grad=conv.weight.requires_grad)
    conv.bias = nn.Parameter(new_b, requires_grad=conv.weight.requires_grad)


@torch.no_grad()
def normalize_bn(bn: nn.BatchNorm2d) -> None:
    """Rewrite an eval-mode BatchNorm in place as the same affine map with identity statistics."""
    scale, shift = _bn_affine(bn)
    dtype = bn.running_var.dtype
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0 - bn.eps)
    if bn.weight is None:  # affine=False: give it parameters to hold the map
        bn.affine = True
        bn.weight = nn.Parameter(torch.empty_like(bn.running_var), requires_grad=False)
        bn.bias = nn.Parameter(torch.empty_like(bn.running_var), requires_grad=False)
    bn.weight.copy_(scale.to(dtype))
    bn.bias.copy_(shift.to(dtype))


def overflowing_values(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Names of the parameters and buffers that are not finite once cast to ``dtype``, with their largest
    magnitude (``["stage4.3.bn_for_DR.running_var (375075)", ...]``)."""
    out = []
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, t in tensors:
        if t.is_floating_point() and t.numel():
            finite = torch.isfinite(t)
            if not torch.isfinite(t.to(dtype))[finite].all():
                out.append(f"{name} ({t[finite].abs().max().item():.6g})")
    return out


def prepare_for_inference(
    model: nn.Module, dtype: torch.dtype | None = None, fold: bool = True, inplace: bool = False
) -> nn.Module:
    """An eval-mode copy of ``model`` with BatchNorm folded (or re-parametrised) and cast to ``dtype``.

    ``dtype`` ``None`` keeps the model's dtype (the fold only); ``torch.float16`` or
    ``torch.bfloat16`` casts parameters and buffers (the blocks keep their sensitive parts in fp32
    internally, see the module docstring). ``fold=False`` skips steps 1 and 2 (a plain cast, checked).
    The caller's ``model`` is not modified, unless ``inplace=True`` (for a model that is already a
    private copy, such as the one :func:`attn_export.export.export_onnx` works on). Raises ``ValueError``
    naming the values that do not fit in ``dtype`` even after folding (a weight beyond fp16's range:
    run that model in fp32 or bf16).
    """
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"prepare_for_inference: dtype must be a floating-point torch.dtype, got {dtype!r}")
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()  # never chain on eval(): mmcv-style backbones override train() without returning self
    if fold:
        pairs = list(fold_pairs(model))
        for conv_path, bn_path in pairs:
            fold_conv_bn(model.get_submodule(conv_path), model.get_submodule(bn_path))
            parent, _, name = bn_path.rpartition(".")
            setattr(model.get_submodule(parent), name, nn.Identity())
        for m in model.modules():
            if _is_plain_bn(m):
                normalize_bn(m)
    if dtype is not None:
        bad = overflowing_values(model, dtype)
        if bad:
            raise ValueError(
                f"prepare_for_inference: {len(bad)} value(s) do not fit in {dtype} even after folding "
                f"BatchNorm: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; run this model in "
                "float32 or bfloat16"
            )
        model.to(dtype)
    return model
