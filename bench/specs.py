"""The five blocks as the benchmarks build them: the official-layout module and how to get ours from it.

Shared by ``attn-export bench`` (:mod:`attn_export.bench.blocks`, CPU) and its ``--device cuda`` block
section (:mod:`attn_export.bench.cuda_ops`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

#: The blocks, in table order.
BLOCKS = ("involution", "odconv", "outlook", "gsop", "skconv")


@dataclass
class Spec:
    """One block of the benchmark: how to build the official module and our block."""

    name: str
    config: str  # the constructor call, for the table
    official: Callable[[], object]
    input_shape: tuple[int, ...]  # without the batch
    ours: Callable[[object], object] | None = None  # built from the official module; None: adapt_model
    note: str = ""


def specs(channels: int = 64, size: int = 40) -> dict[str, Spec]:
    """The five blocks at the documented defaults (official defaults where the official code has them)."""
    from attn_export.bench import upstream as O
    from attn_export.blocks import SKConv

    c, s = channels, size
    return {
        "involution": Spec(
            "involution",
            f"involution({c}, kernel_size=7, stride=1)  [group_channels 16, reduction 4: official]",
            lambda: O.involution(c, 7, 1),
            (c, s, s),
        ),
        "odconv": Spec(
            "odconv",
            f"ODConv2d({c}, {c}, 3, padding=1, reduction=0.0625, kernel_num=4)",
            lambda: O.ODConv2d(c, c, 3, padding=1, reduction=0.0625, kernel_num=4),
            (c, s, s),
        ),
        "outlook": Spec(
            "outlook",
            f"OutlookAttention({c}, num_heads={max(1, c // 32)}, kernel_size=3, padding=1, stride=1)  [(B, H, W, C)]",
            lambda: O.OutlookAttention(c, max(1, c // 32), 3, 1, 1),
            (s, s, c),
        ),
        "gsop": Spec(
            "gsop",
            f"GSoP({c}, dim=128)  [att_dim 128: official default]",
            lambda: O.GSoP(c, 128),
            (c, s, s),
        ),
        "skconv": Spec(
            "skconv",
            f"SKConv({c}, M=2, G=32, r=16, L=32)  [ours: SKConv({c}, branches=2, groups=32)]",
            lambda: O.SKConv(c, M=2, G=32, r=16, L=32),
            (c, s, s),
            ours=lambda off: SKConv(c, branches=2, groups=32, reduction=16, min_dim=32),
            note="different function from the port (dilated 3x3 branches, conv+BN fuse); parity vs our eager",
        ),
    }


def randomize_norms(model, seed: int) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so parity checks mean something."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))


class NotAdapted(RuntimeError):
    """The exporter's adapters did not take the official module."""


def official_and_ours(spec: Spec, seed: int, sample):
    """The official module (eval mode, randomised norms) and ours: the official weights through the
    exporter's adapters (``sample``: an input batch for them), or our own block where no mapping exists
    (``spec.ours``). Raises :class:`NotAdapted` when the adapters do not take the official module."""
    import copy

    import torch
    from torch import nn

    from attn_export.export.adapt import adapt_model

    torch.manual_seed(seed)
    official = spec.official()
    official.eval()  # never chained: train()/eval() may return None in upstream code
    randomize_norms(official, seed)
    if spec.ours is None:
        holder = nn.Sequential(copy.deepcopy(official))
        holder.eval()
        records = adapt_model(holder, sample)
        if not records or records[0].action != "adapted":
            why = records[0].reason if records else "no adapter recognised it"
            raise NotAdapted(f"{spec.name}: the official module was not adapted: {why}")
        return official, holder[0]
    ours = spec.ours(official)
    ours.eval()
    randomize_norms(ours, seed + 1)
    return official, ours
