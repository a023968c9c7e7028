"""Argument checks shared by the blocks: each error says what to change."""

from __future__ import annotations

import torch


def check_positive(block: str, **values: float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{block}: {name} must be positive, got {value}")


def check_divisible(block: str, name: str, value: int, by_name: str, by: int) -> None:
    if by <= 0 or value % by:
        raise ValueError(f"{block}: {name} ({value}) must be divisible by {by_name} ({by})")


def check_odd(block: str, name: str, value: int) -> None:
    if value < 1 or value % 2 == 0:
        raise ValueError(f"{block}: {name} must be a positive odd number so the window has a centre, got {value}")


def check_input(block: str, x: torch.Tensor, layout: str, channels: int, channel_axis: int) -> None:
    """Check rank and channel count of a block's input (``layout`` is e.g. ``'(B, C, H, W)'``)."""
    if x.dim() != 4:
        raise ValueError(f"{block}: expected a 4-D input {layout}, got shape {tuple(x.shape)}")
    if x.shape[channel_axis] != channels:
        raise ValueError(
            f"{block}: expected {channels} channels on axis {channel_axis} of {layout}, got shape {tuple(x.shape)}"
        )
