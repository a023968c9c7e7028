"""Make a model export-ready: swap foreign block implementations for ours, rewrite functions.

Module adapters are small registered functions keyed by what they recognise (class name and
parameter layout, as the official repositories define them). Each swap is checked to be exact in
eager mode, in float64, on the input the module really receives in the model, before it is kept.
:func:`adapt` reports every candidate module (one an adapter picked by its class name or an attribute
the official code uses): adapted, or left, and why. The model itself may be the foreign block (an
official ``ODConv2d`` saved bare); :func:`adapt` then returns its replacement.

Wrappers are listed too (kept as they are): a layer of an Ultralytics model (``i``/``f``/``type``/``np``,
which its ``DetectionModel`` routes by, and which a swapped layer keeps) or a ``Conv``-style
``conv``/``bn``/``act`` module, when it holds a candidate.

GSoP's official channel attention is not a module but the ``chan_att`` method of the GSoP ResNet
``Bottleneck``: that Bottleneck is kept, its attention layers move into an attn-export
``GSoPAttention`` child, and its ``chan_att`` calls that child.

Never chain on what ``train()``/``eval()`` return: mmcv/mmdet-style models override ``train()``
without returning ``self``.

Function-level rewrites (``F.fold`` and ``F.unfold`` as strided slices, the batch-folded grouped
``F.conv2d`` as a per-sample convolution) apply inside
:func:`function_rewrites`, a context manager that restores the originals on exit (mmdeploy's
rewriter idea, scoped instead of global).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attn_export.plugins._taps import fold_taps, out_size, unfold_taps

log = logging.getLogger("attn_export")


@dataclass
class Adapter:
    """Recognises a foreign module and builds our equivalent with the same weights.

    ``considers(m)`` picks the candidates (a class name or attribute the official code uses): every
    candidate appears in the adaptation report. ``fits(m)`` says why a candidate does not have the
    official layout (``""`` when it has). ``convert(m)`` builds the replacement, or a list of
    replacements to try in order (the first one that is exact in float64 is kept).
    """

    name: str
    considers: Callable[[nn.Module], bool]
    fits: Callable[[nn.Module], str]
    convert: Callable[[nn.Module], nn.Module | list[nn.Module]]


@dataclass
class AdaptRecord:
    """What happened to one candidate module, and why."""

    path: str
    foreign: str
    action: str  # "adapted" or "left"
    reason: str = ""
    max_abs_error: float | None = None
    adapter: str = ""


ADAPTERS: list[Adapter] = []


def register_adapter(name: str, considers: Callable[[nn.Module], bool], fits: Callable[[nn.Module], str]):
    """Decorator: register ``convert`` for the candidates that ``considers`` picks and ``fits``."""

    def wrap(convert: Callable[[nn.Module], nn.Module]) -> Callable[[nn.Module], nn.Module]:
        ADAPTERS.append(Adapter(name, considers, fits, convert))
        return convert

    return wrap


def _missing(m: nn.Module, *names: str) -> list[str]:
    return [n for n in names if not hasattr(m, n)]


def block_types() -> tuple[type[nn.Module], ...]:
    """The attn-export block classes (imported on first use, not with this module)."""
    from attn_export.blocks import GSoPBlock, Involution2d, ODConv2d, OutlookAttention, SKConv

    return (Involution2d, ODConv2d, OutlookAttention, GSoPBlock, SKConv)


def _ours(m: nn.Module) -> bool:
    return isinstance(m, block_types())


def _named(*names: str, lower: bool = False) -> Callable[[nn.Module], bool]:
    def considers(m: nn.Module) -> bool:
        name = type(m).__name__
        return not _ours(m) and (name.lower() if lower else name) in names

    return considers


# --- ODConv (OSVAI/ODConv, modules/odconv.py) ------------------------------------------------------
def _odconv_fits(m: nn.Module) -> str:
    w = getattr(m, "weight", None)
    if not (isinstance(w, torch.Tensor) and w.dim() == 5):
        return "no 5-D weight (kernel_num, out, in/groups, k, k): not the OSVAI layout"
    att = getattr(m, "attention", None)
    if not isinstance(att, nn.Module):
        return "no 'attention' submodule: not the OSVAI layout"
    missing = _missing(att, "fc", "bn", "channel_fc")
    return f"its attention lacks {', '.join(missing)}: not the OSVAI layout" if missing else ""


@register_adapter("ODConv2d (OSVAI)", _named("ODConv2d"), _odconv_fits)
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
def _involution_fits(m: nn.Module) -> str:
    missing = _missing(m, "conv1", "conv2", "kernel_size", "stride", "group_channels")
    return f"lacks {', '.join(missing)}: not the d-li14 involution_naive layout" if missing else ""


@register_adapter("involution (d-li14)", _named("involution", lower=True), _involution_fits)
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
def _outlook_fits(m: nn.Module) -> str:
    not_linear = [n for n in ("v", "attn", "proj") if not isinstance(getattr(m, n, None), nn.Linear)]
    if not_linear:
        return f"{', '.join(not_linear)} not nn.Linear: not the VOLO layout"
    missing = _missing(m, "num_heads", "kernel_size", "padding", "stride")
    return f"lacks {', '.join(missing)}: not the VOLO layout" if missing else ""


@register_adapter("OutlookAttention (VOLO)", _named("OutlookAttention"), _outlook_fits)
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


# --- GSoP (ZilinGao/Global-Second-order-Pooling-Convnet, torchvision/models/resnet.py) --------------
# The official channel attention is the ``chan_att`` METHOD of the GSoP ResNet ``Bottleneck``
# (``attention='1'``), whose parts sit beside conv1..conv3; ports also hold it in a module of its own.
_GSOP_PARTS = ("conv_for_DR", "bn_for_DR", "row_bn", "row_conv_group", "fc_adapt_channels")
#: The child that holds our block in an adapted module whose ``chan_att`` method is routed through it.
GSOP_CHILD = "gsop_att"


def _gsop_considers(m: nn.Module) -> bool:
    return not _ours(m) and (any(hasattr(m, n) for n in _GSOP_PARTS) or callable(getattr(m, "chan_att", None)))


def _gsop_extra_children(m: nn.Module) -> list[str]:
    return [n for n, c in m.named_children() if n not in _GSOP_PARTS and any(True for _ in c.parameters())]


def _gsop_fits(m: nn.Module) -> str:
    missing = _missing(m, *_GSOP_PARTS)
    if missing:
        if callable(getattr(m, "chan_att", None)) and len(missing) == len(_GSOP_PARTS):
            what = f" (attention={m.attention!r})" if isinstance(getattr(m, "attention", None), str) else ""
            return f"has a chan_att method but no channel-attention layers{what}: nothing to adapt"
        return f"lacks {', '.join(missing)}: not the GSoP channel-attention layout"
    dr = m.conv_for_DR
    if not isinstance(dr, nn.Conv2d) or dr.kernel_size != (1, 1) or dr.padding != (0, 0) or dr.groups != 1:
        return "conv_for_DR is not a 1x1 convolution without padding: not the official layout"
    if dr.stride[0] != dr.stride[1]:
        return f"conv_for_DR has a non-square stride {dr.stride}"
    if _gsop_extra_children(m) and not callable(getattr(m, "chan_att", None)):
        return (
            "holds the GSoP layers beside other layers but has no chan_att method, so where the attention "
            "is applied is unknown"
        )
    return ""


def _gsop_variants(m: nn.Module, kind) -> list[nn.Module]:
    """Our block with ``m``'s weights: the official function first (no ReLU after the row conv), then with one."""
    dr = m.conv_for_DR
    pre = [hasattr(m, "relu_normal"), not hasattr(m, "relu_normal")]
    out = []
    for pre_act in pre:
        for row_relu in (False, True):
            new = kind(dr.in_channels, dr.out_channels, pre_act=pre_act, dr_stride=dr.stride[0], row_relu=row_relu)
            new.load_state_dict({k: v for k, v in m.state_dict().items() if k.split(".")[0] in _GSOP_PARTS})
            out.append(new)
    return out


def _routed_chan_att(self: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """``chan_att`` of an adapted module: the channel weights from its attn-export block."""
    return getattr(self, GSOP_CHILD)(out)


@register_adapter("GSoP channel attention (ZilinGao)", _gsop_considers, _gsop_fits)
def _convert_gsop(m: nn.Module) -> list[nn.Module]:
    from attn_export.blocks.gsop import GSoPAttention, GSoPBlock

    if not _gsop_extra_children(m):  # the attention alone, in a module of its own
        return _gsop_variants(m, GSoPBlock)
    # The official Bottleneck: keep it, route its chan_att method through our block.
    routed = []
    for block in _gsop_variants(m, GSoPAttention):
        new = copy.deepcopy(m)
        for name in _GSOP_PARTS:
            delattr(new, name)
        setattr(new, GSOP_CHILD, block)
        new.chan_att = types.MethodType(_routed_chan_att, new)
        routed.append(new)
    return routed


# --- SKConv (SKNet-style, e.g. the widely used PyTorch port with convs/fc/fcs) --------------------
def _sk_fits(m: nn.Module) -> str:
    if isinstance(getattr(m, "fcs", None), nn.ModuleList) and isinstance(getattr(m, "fc", None), nn.Linear):
        return ""
    return "no Linear 'fc' and ModuleList 'fcs': not the common SKNet port"


@register_adapter("SKConv (SKNet-style, Linear fc)", _named("SKConv", "SKAttention"), _sk_fits)
def _convert_sk_linear(m: nn.Module) -> nn.Module:
    raise NotImplementedError(
        "its branches (growing kernels with bias instead of dilated 3x3, a Linear fuse layer without BN) "
        "compute a different function from attn_export's SKConv; it exports with standard ops as it is"
    )


# --- SelectiveKernel (timm, layers/selective_kernel.py: skresnet*, skresnext*) ----------------------------
def _sk_path_parts(path: nn.Module) -> tuple[nn.Module | None, nn.Module | None, nn.Module | None]:
    """The conv, norm and activation of a timm ``ConvNormAct`` path (the activation lives in the norm
    layer, timm's ``BatchNormAct2d``, or beside it)."""
    conv, bn = getattr(path, "conv", None), getattr(path, "bn", None)
    act = getattr(path, "act", None)
    if act is None or isinstance(act, nn.Identity):
        act = getattr(bn, "act", None)
    return conv, bn, act


def _timm_sk_considers(m: nn.Module) -> bool:
    return _named("SelectiveKernel")(m) or (
        not _ours(m) and isinstance(getattr(m, "paths", None), nn.ModuleList) and hasattr(m, "attn")
    )


def _timm_sk_fits(m: nn.Module) -> str:
    paths, attn = getattr(m, "paths", None), getattr(m, "attn", None)
    if not isinstance(paths, nn.ModuleList) or not isinstance(attn, nn.Module):
        return "no ModuleList 'paths' and 'attn' submodule: not timm's SelectiveKernel layout"
    missing = _missing(attn, "fc_reduce", "bn", "fc_select")
    if missing:
        return f"its attn lacks {', '.join(missing)}: not timm's SelectiveKernelAttn layout"
    if getattr(m, "split_input", False):
        return (
            "split_input=True: each path convolves its own slice of the input channels (timm's skresnet18/34), "
            "while attn-export's SKConv gives every branch the whole input; kept as it is, it exports with "
            "standard ops and a dynamic batch"
        )
    convs = [_sk_path_parts(p)[0] for p in paths]
    if not all(isinstance(c, nn.Conv2d) for c in convs):
        return "a path without a Conv2d 'conv': not timm's ConvNormAct layout"
    c0 = convs[0]
    if c0.in_channels != c0.out_channels:
        return f"{c0.in_channels} channels in, {c0.out_channels} out: attn-export's SKConv keeps the channel count"
    for i, c in enumerate(convs):
        if c.kernel_size != (3, 3) or c.dilation != (i + 1, i + 1) or c.padding != (i + 1, i + 1):
            return (
                f"path {i} is a {c.kernel_size} conv with dilation {c.dilation} and padding {c.padding}; attn-export's "
                f"SKConv has 3x3 paths with dilation and padding {i + 1} (timm's keep_3x3=True); kept as it is, it "
                "exports with standard ops"
            )
        if c.bias is not None or c.groups != c0.groups or c.stride != c0.stride or c.stride[0] != c.stride[1]:
            return f"path {i}'s conv differs from path 0 in bias, groups or stride: not timm's layout"
    return ""


def _copy_bn(dst: nn.Module, src: nn.Module) -> None:
    dst.load_state_dict({k: v for k, v in src.state_dict().items() if k.split(".")[0] in dict(dst.state_dict())})
    dst.eps = src.eps


@register_adapter("SelectiveKernel (timm)", _timm_sk_considers, _timm_sk_fits)
def _convert_timm_sk(m: nn.Module) -> nn.Module:
    from attn_export.blocks.skconv import SKConv

    parts = [_sk_path_parts(p) for p in m.paths]
    conv0, _, act = parts[0]
    attn = m.attn
    acts = {type(a) for _, _, a in parts} | {type(getattr(attn, "act", None))}
    if len(acts) != 1 or act is None:
        raise ValueError(f"its activations differ ({sorted(t.__name__ for t in acts)}); SKConv has one")
    channels, d = conv0.out_channels, attn.fc_reduce.out_channels
    new = SKConv(
        channels, len(parts), conv0.groups, reduction=channels, min_dim=d, stride=conv0.stride[0], act_layer=type(act)
    )
    with torch.no_grad():
        for (conv, bn, _), branch in zip(parts, new.convs, strict=True):
            branch.conv.weight.copy_(conv.weight)
            _copy_bn(branch.bn, bn)
        new.fc.conv.weight.copy_(attn.fc_reduce.weight)
        _copy_bn(new.fc.bn, attn.bn)
        new.fcs.weight.copy_(attn.fc_select.weight)
        sel_bias = attn.fc_select.bias
        new.fcs.bias.copy_(sel_bias if sel_bias is not None else torch.zeros_like(new.fcs.bias))
    return new


# --- applying adapters -------------------------------------------------------------------------------
def _clone_args(args: tuple) -> tuple:
    return tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args)


def capture_inputs(model: nn.Module, paths: list[str], sample: torch.Tensor) -> dict[str, tuple]:
    """A copy of the arguments each module at ``paths`` receives (its first call) when ``model`` runs ``sample``."""
    mods = dict(model.named_modules())
    seen: dict[str, tuple] = {}
    handles = []
    for p in paths:

        def hook(mod, args, p=p):
            if p not in seen:  # a copy: the model may change the tensor in place later
                seen[p] = _clone_args(args)

        handles.append(mods[p].register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(sample)
    finally:
        for h in handles:
            h.remove()
    return seen


def _eval_copy64(m: nn.Module) -> nn.Module:
    m64 = copy.deepcopy(m)
    m64.double()
    m64.eval()  # never chain on train()/eval(): some models override train() without returning self
    return m64


def _max_error(a: nn.Module, b: nn.Module, args: tuple) -> tuple[float, float]:
    """The max abs difference of ``a`` and ``b`` in float64 on ``args``, and the max abs of ``a``'s output."""
    a64, b64 = _eval_copy64(a), _eval_copy64(b)

    def run(m: nn.Module) -> list[torch.Tensor]:
        args64 = tuple(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in args)
        with torch.no_grad():
            return torch.utils._pytree.tree_leaves(m(*_clone_args(args64)))

    ra, rb = run(a64), run(b64)
    if len(ra) != len(rb) or any(x.shape != y.shape for x, y in zip(ra, rb, strict=True)):
        return float("inf"), 0.0
    err = max((float((x - y).abs().max()) for x, y in zip(ra, rb, strict=True) if x.numel()), default=0.0)
    return err, max((float(x.abs().max()) for x in ra if x.numel()), default=0.0)


#: What Ultralytics' ``parse_model`` sets on each layer of ``model.model``: its index, where its input comes
#: from, its class path and its parameter count. ``DetectionModel._forward_once`` routes by ``f`` and ``i``.
ULTRALYTICS_ATTRS = ("i", "f", "type", "np")
#: The ``adapter`` of the records of wrappers (recognised, kept, listed for what they hold).
WRAPPER = "Ultralytics-style wrapper"


def _ultralytics_layer(m: nn.Module) -> bool:
    return "i" in vars(m) and "f" in vars(m)


def _carry_routing(old: nn.Module, new: nn.Module) -> list[str]:
    """Copy the Ultralytics layer attributes of ``old`` onto its replacement (a swapped layer of
    ``model.model`` without ``f``/``i`` breaks the model's forward); returns the names copied."""
    if not _ultralytics_layer(old):
        return []
    names = [n for n in ULTRALYTICS_ATTRS if n in vars(old)]
    for n in names:
        setattr(new, n, vars(old)[n])  # an instance attribute, as parse_model sets them ('type' too)
    return names


def _conv_wrapper(m: nn.Module) -> bool:
    """Ultralytics' ``Conv`` habit: children ``conv`` -> ``bn`` -> ``act`` (YOLO ports wrap ODConv2d so)."""
    return all(isinstance(getattr(m, n, None), nn.Module) for n in ("conv", "bn", "act"))


def _with_wrappers(tree: dict[str, nn.Module], records: list[AdaptRecord]) -> list[AdaptRecord]:
    """``records`` plus one record per Ultralytics-style wrapper that holds a candidate: a layer of an
    Ultralytics model (``i``/``f`` attributes) or a ``Conv``-style ``conv``/``bn``/``act`` module. Wrappers
    are kept as they are; their candidates have records of their own. In module order."""
    order = {p: i for i, p in enumerate(tree)}
    paths = [r.path for r in records]
    out = list(records)
    for path, mod in tree.items():
        if not path or _ours(mod) or path in paths:
            continue
        inside = [p for p in paths if p.startswith(path + ".")]
        if not inside:
            continue
        if _ultralytics_layer(mod):
            what = f"Ultralytics layer {vars(mod)['i']} (input from {vars(mod)['f']})"
        elif _conv_wrapper(mod) and f"{path}.conv" in inside:
            what = "a Conv-style wrapper (conv -> bn -> act, the Ultralytics habit)"
        else:
            continue
        held = ", ".join(f"{tree[p].__class__.__name__} at '{p}'" for p in inside)
        reason = f"{what}: kept as it is, it exports with standard ops; it holds {held}, listed on its own"
        out.append(AdaptRecord(path, type(mod).__name__, "left", reason, adapter=WRAPPER))
    return sorted(out, key=lambda r: order.get(r.path, -1))


def _describe(new: nn.Module) -> str:
    block = getattr(new, GSOP_CHILD, None)
    if block is not None and not _ours(new):
        return f"chan_att method routed through {type(block).__name__}({block.extra_repr()}) at '{GSOP_CHILD}'"
    return f"-> {type(new).__name__}({new.extra_repr()})" if new.extra_repr() else f"-> {type(new).__name__}"


def adapt(model: nn.Module, sample: torch.Tensor, atol: float = 1e-6) -> tuple[nn.Module, list[AdaptRecord]]:
    """Swap recognised foreign modules of ``model`` for ours, keeping only swaps exact in float64.

    A swap is exact when the float64 outputs differ by at most ``atol`` times the larger of 1 and the
    output's magnitude (float64 rounding grows with it, e.g. in the covariance of large activations).
    Returns the adapted model (``model`` itself, changed in place, or the replacement when the model
    itself is a foreign block) and one record per candidate module (what was done and why) and per
    wrapper that holds one, in module order.
    """
    candidates: list[tuple[str, nn.Module, Adapter, str]] = []
    fitting: list[str] = []
    tree = dict(model.named_modules())
    for path, mod in tree.items():
        if any(path == p or path.startswith(p + ".") for p in fitting if p) or (fitting and fitting[0] == ""):
            continue  # inside a module that is being adapted
        for ad in ADAPTERS:
            if ad.considers(mod):
                why = ad.fits(mod)
                candidates.append((path, mod, ad, why))
                if not why:
                    fitting.append(path)
                break
    if not candidates:
        return model, []
    inputs = capture_inputs(model, fitting, sample) if fitting else {}
    records = []
    for path, mod, ad, why in candidates:
        rec = AdaptRecord(path, type(mod).__name__, "left", adapter=ad.name)
        records.append(rec)
        if why:
            rec.reason = why
            continue
        if path not in inputs:
            rec.reason = "not called in the forward pass, so the swap cannot be checked"
            continue
        try:
            made = ad.convert(mod)
        except NotImplementedError as e:
            rec.reason = str(e)
            continue
        except Exception as e:  # a layout we recognised but cannot map: keep the original, say why
            rec.reason = f"cannot map its weights: {type(e).__name__}: {e}"
            continue
        best: tuple[float, float, nn.Module] | None = None
        for new in made if isinstance(made, list) else [made]:
            try:
                err, scale = _max_error(mod, new, inputs[path])
            except Exception as e:
                rec.reason = f"the replacement does not run on the module's input: {type(e).__name__}: {e}"
                continue
            if best is None or err < best[0]:
                best = (err, scale, new)
            if err <= atol * max(1.0, scale):
                break
        if best is None:
            continue
        err, scale, new = best
        rec.max_abs_error = err
        if not err <= atol * max(1.0, scale):
            rec.reason = f"swap not exact in float64 (max error {err:.2e}): its forward differs from the official one"
            continue
        new.train(mod.training)
        carried = _carry_routing(mod, new)
        if path:
            parent_path, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, attr, new)
        else:
            model = new
        rec.action = "adapted"
        rec.reason = f"{_describe(new)}; exact in float64 on its input in the model (max error {err:.1e})"
        if carried:
            rec.reason += f"; Ultralytics layer attributes {', '.join(carried)} carried over (its model routes by them)"
    return model, _with_wrappers(tree, records)


def adapt_model(model: nn.Module, sample: torch.Tensor, atol: float = 1e-6) -> list[AdaptRecord]:
    """:func:`adapt` in place; ``model`` itself must not be a foreign block (wrap it in a module)."""
    new, records = adapt(model, sample, atol)
    if new is not model:
        raise ValueError("the model itself is a foreign block; use adapt(), which returns its replacement")
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
        # the output size as given: a symbolic height/width (SymInt) must not be specialised by int()
        hh, ww = (output_size, output_size) if not isinstance(output_size, (tuple, list)) else output_size[:2]
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
