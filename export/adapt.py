"""Make a model export-ready: swap foreign block implementations for ours, rewrite functions.

Module adapters are small registered functions keyed by what they recognise (class name and
parameter layout, as the official repositories define them). Each swap is checked to be exact in
eager mode, in float64, on the input the module really receives in the model, before it is kept.

Function-level rewrites (``F.fold`` and ``F.unfold`` as strided slices, the batch-folded grouped
``F.conv2d`` as a per-sample convolution) apply inside
:func:`function_rewrites`, a context manager that restores the originals on exit (mmdeploy's
rewriter idea, scoped instead of global).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attn_export.plugins._taps import fold_taps, out_size, unfold_taps

log = logging.getLogger("attn_export")


@dataclass
class Adapter:
    """Recognises a foreign module and builds our equivalent with the same weights."""

    name: str
    matches: Callable[[nn.Module], bool]
    convert: Callable[[nn.Module], nn.Module]


@dataclass
class AdaptRecord:
    """What happened to one recognised module."""

    path: str
    foreign: str
    action: str  # "adapted" or "left"
    reason: str = ""
    max_abs_error: float | None = None


ADAPTERS: list[Adapter] = []


def register_adapter(name: str, matches: Callable[[nn.Module], bool]):
    """Decorator: register ``convert`` for modules that ``matches``."""

    def wrap(convert: Callable[[nn.Module], nn.Module]) -> Callable[[nn.Module], nn.Module]:
        ADAPTERS.append(Adapter(name, matches, convert))
        return convert

    return wrap


def _has(m: nn.Module, *names: str) -> bool:
    return all(hasattr(m, n) for n in names)


def _ours(m: nn.Module) -> bool:
    from attn_export.export.onnx_export import block_types

    return isinstance(m, block_types())


# --- ODConv (OSVAI/ODConv, modules/odconv.py) ------------------------------------------------------
def _is_odconv(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return (
        not _ours(m)
        and type(m).__name__ == "ODConv2d"
        and isinstance(getattr(m, "attention", None), nn.Module)
        and isinstance(w, torch.Tensor)
        and w.dim() == 5
        and _has(m.attention, "fc", "bn", "channel_fc")
    )


@register_adapter("ODConv2d (OSVAI)", _is_odconv)
def _convert_odconv(m: nn.Module) -> nn.Module:
    from attn_export.blocks.odconv import ODConv2d

    n, cout, cin_g, k, _ = m.weight.shape
    att = m.attention
    ac = att.fc.out_channels
    cin = att.fc.in_channels
    new = ODConv2d(
        cin,
        cout,
        k,
        stride=int(m.stride),
        padding=int(m.padding),
        dilation=int(m.dilation),
        groups=cin // cin_g,
        reduction=ac / cin,
        kernel_num=n,
        min_channel=ac,
    )
    new.load_state_dict(m.state_dict())
    new.update_temperature(float(getattr(att, "temperature", 1.0)))
    return new


# --- Involution (d-li14/involution, involution_naive.py) -----------------------------------------
def _is_involution(m: nn.Module) -> bool:
    return (
        not _ours(m)
        and type(m).__name__.lower() == "involution"
        and _has(m, "conv1", "conv2", "kernel_size", "stride", "group_channels")
    )


@register_adapter("involution (d-li14)", _is_involution)
def _convert_involution(m: nn.Module) -> nn.Module:
    from attn_export.blocks.involution import Involution2d

    sd = m.state_dict()
    reduce_w = sd["conv1.conv.weight"]
    channels = reduce_w.shape[1]
    new = Involution2d(
        channels,
        kernel_size=int(m.kernel_size),
        stride=int(m.stride),
        reduction=channels // reduce_w.shape[0],
        group_channels=int(m.group_channels),
    )
    new.load_state_dict(sd)
    return new


# --- Outlook attention (sail-sg/volo, models/volo.py) ---------------------------------------------
def _is_outlook(m: nn.Module) -> bool:
    return (
        not _ours(m)
        and type(m).__name__ == "OutlookAttention"
        and all(isinstance(getattr(m, n, None), nn.Linear) for n in ("v", "attn", "proj"))
        and _has(m, "num_heads", "kernel_size", "padding", "stride")
    )


@register_adapter("OutlookAttention (VOLO)", _is_outlook)
def _convert_outlook(m: nn.Module) -> nn.Module:
    from attn_export.blocks.outlook import OutlookAttention

    drop = lambda name: float(getattr(getattr(m, name, None), "p", 0.0))  # noqa: E731
    new = OutlookAttention(
        m.v.in_features,
        int(m.num_heads),
        int(m.kernel_size),
        int(m.padding),
        int(m.stride),
        qkv_bias=m.v.bias is not None,
        qk_scale=float(m.scale),
        attn_drop=drop("attn_drop"),
        proj_drop=drop("proj_drop"),
    )
    new.load_state_dict(m.state_dict())
    return new


# --- GSoP (ZilinGao/Global-Second-order-Pooling-Convnet chan_att, as a module) --------------------
_GSOP_PARTS = ("conv_for_DR", "bn_for_DR", "row_bn", "row_conv_group", "fc_adapt_channels")


def _is_gsop(m: nn.Module) -> bool:
    if _ours(m) or not _has(m, *_GSOP_PARTS):
        return False
    # Only a module that is the attention alone: no convolutions besides the GSoP parts.
    extra = [n for n, c in m.named_children() if n not in _GSOP_PARTS and any(True for _ in c.parameters())]
    return not extra


@register_adapter("GSoP channel attention", _is_gsop)
def _convert_gsop(m: nn.Module) -> nn.Module:
    from attn_export.blocks.gsop import GSoPBlock

    new = GSoPBlock(m.conv_for_DR.in_channels, m.conv_for_DR.out_channels, pre_act=hasattr(m, "relu_normal"))
    new.load_state_dict(m.state_dict())
    return new


# --- SKConv (SKNet-style, e.g. the widely used PyTorch port with convs/fc/fcs) --------------------
def _is_sk_linear(m: nn.Module) -> bool:
    return (
        not _ours(m)
        and type(m).__name__ in ("SKConv", "SKAttention")
        and isinstance(getattr(m, "fcs", None), nn.ModuleList)
        and isinstance(getattr(m, "fc", None), nn.Linear)
    )


@register_adapter("SKConv (SKNet-style, Linear fc)", _is_sk_linear)
def _convert_sk_linear(m: nn.Module) -> nn.Module:
    raise NotImplementedError(
        "its branches (growing kernels with bias instead of dilated 3x3, a Linear fuse layer without BN) "
        "compute a different function from attn_export's SKConv; it exports with standard ops as it is"
    )


# --- applying adapters -------------------------------------------------------------------------------
def _capture_inputs(model: nn.Module, paths: list[str], sample: torch.Tensor) -> dict[str, tuple]:
    mods = dict(model.named_modules())
    seen: dict[str, tuple] = {}
    handles = []
    for p in paths:

        def hook(mod, args, p=p):
            seen.setdefault(p, tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))

        handles.append(mods[p].register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(sample)
    finally:
        for h in handles:
            h.remove()
    return seen


def _max_error(a: nn.Module, b: nn.Module, args: tuple) -> float:
    a64, b64 = copy.deepcopy(a).double(), copy.deepcopy(b).double()
    args64 = tuple(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in args)
    with torch.no_grad():
        ra, rb = a64(*args64), b64(*args64)
    return float((ra - rb).abs().max())


def adapt_model(model: nn.Module, sample: torch.Tensor, atol: float = 1e-6) -> list[AdaptRecord]:
    """Swap recognised foreign modules of ``model`` (in place) for ours, keeping only exact swaps."""
    found: list[tuple[str, nn.Module, Adapter]] = []
    for path, mod in model.named_modules():
        if any(path.startswith(p + ".") for p, _, _ in found):
            continue  # inside a module already recognised
        for ad in ADAPTERS:
            if ad.matches(mod):
                found.append((path, mod, ad))
                break
    if not found:
        return []
    inputs = _capture_inputs(model, [p for p, _, _ in found], sample)
    records = []
    for path, mod, ad in found:
        name = type(mod).__name__
        if path not in inputs:
            records.append(AdaptRecord(path, name, "left", "not called in the forward pass"))
            continue
        try:
            new = ad.convert(mod)
        except NotImplementedError as e:
            records.append(AdaptRecord(path, name, "left", str(e)))
            continue
        except Exception as e:  # a layout we recognised but cannot map: keep the original, say why
            records.append(AdaptRecord(path, name, "left", f"cannot map its weights: {type(e).__name__}: {e}"))
            continue
        new.train(mod.training)
        was = model.training
        model.eval()
        err = _max_error(mod.eval(), new.eval(), inputs[path])
        model.train(was)
        mod.train(was)
        new.train(was)
        if err > atol:
            records.append(AdaptRecord(path, name, "left", f"swap not exact (max error {err:.2e})", err))
            continue
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if not path:
            raise ValueError("the model itself is a foreign block; wrap it in a module to adapt it")
        setattr(parent, attr, new)
        records.append(AdaptRecord(path, name, "adapted", f"-> {type(new).__name__}", err))
    return records


# --- function rewrites ------------------------------------------------------------------------------
def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _square(*pairs: tuple[int, int]) -> tuple[int, ...] | None:
    """The side of each square window parameter, or None when any is not square."""
    return None if any(p[0] != p[1] for p in pairs) else tuple(p[0] for p in pairs)


def _make_unfold(original):
    def unfold(input, kernel_size, dilation=1, padding=0, stride=1):
        geo = _square(_pair(kernel_size), _pair(dilation), _pair(padding), _pair(stride))
        if geo is None or input.dim() != 4:
            return original(input, kernel_size, dilation, padding, stride)
        k, d, p, s = geo
        return unfold_taps(input, k, p, s, d).flatten(1, 2).flatten(2)  # B, C*kk, L

    return unfold


def _make_fold(original):
    def fold(input, output_size, kernel_size, dilation=1, padding=0, stride=1):
        geo = _square(_pair(kernel_size), _pair(dilation), _pair(padding), _pair(stride))
        if geo is None or input.dim() != 3:
            return original(input, output_size, kernel_size, dilation, padding, stride)
        k, d, p, s = geo
        hh, ww = _pair(output_size)
        h, w = out_size(hh, k, s, p, d), out_size(ww, k, s, p, d)
        taps = input.reshape(input.shape[0], input.shape[1] // (k * k), k * k, h, w)
        return fold_taps(taps, hh, ww, k, p, s, d)

    return fold


def _make_conv2d(original):
    """``conv2d`` of a batch folded into the channels, ``groups = g * B`` -> per-sample ``dynamic_conv2d``.

    The trick of ODConv/CondConv-style code: ``x.reshape(1, B*Cin, H, W)`` convolved with
    ``(B*Cout, Cin/g, k, k)`` kernels in ``g * B`` groups. While tracing with a dynamic batch, ``groups``
    is then a symbolic ``g * batch``; the exporters cannot lower a Conv whose group count is unknown.
    """

    def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        if not isinstance(groups, torch.SymInt) or input.dim() != 4 or isinstance(padding, str):
            return original(input, weight, bias, stride, padding, dilation, groups)
        coeff, _ = groups.node.expr.as_coeff_Mul()
        if not (coeff.is_Integer and int(coeff) > 0) or input.shape[0] != 1:
            return original(input, weight, bias, stride, padding, dilation, groups)
        g = int(coeff)
        batch = groups // g
        from attn_export.plugins import dynamic_conv2d

        x = input.reshape(batch, -1, *input.shape[2:])
        w = weight.reshape(batch, -1, *weight.shape[1:])
        out = dynamic_conv2d(x, w, list(_pair(stride)), list(_pair(padding)), list(_pair(dilation)), g)
        if bias is not None:
            out = out + bias.reshape(batch, -1, 1, 1)
        return out.reshape(1, -1, *out.shape[2:])

    return conv2d


@contextlib.contextmanager
def function_rewrites() -> Iterator[None]:
    """Within the block: ``F.fold``/``F.unfold`` are strided-slice forms (no Col2Im, no Gather im2col),
    and a batch-folded grouped ``F.conv2d`` is a per-sample ``dynamic_conv2d``.

    Non-square windows, unbatched inputs and ordinary convolutions fall through to the originals.
    """
    saved = (F.fold, F.unfold, F.conv2d)
    F.fold, F.unfold, F.conv2d = _make_fold(saved[0]), _make_unfold(saved[1]), _make_conv2d(saved[2])
    try:
        yield
    finally:
        F.fold, F.unfold, F.conv2d = saved
