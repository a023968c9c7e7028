"""Loading models: the project's own checkpoint format, and pickled modules (trusted only).

The project's format is a plain dict that ``torch.load(weights_only=True)`` reads without running
code from the file::

    {"format": "attn-export/1", "arch": "MixedNet", "kwargs": {...},
     "input_shape": [3, 64, 64], "state_dict": {...}, "meta": {...}}

``arch`` names a constructor in :data:`ARCHITECTURES`. A pickled ``nn.Module`` (or a dict holding one
under ``ema`` or ``model``, the Ultralytics layout) runs code from the file when loaded, so it is
loaded only when the caller trusts it.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attn_export.export.errors import ExportError, first_line
from attn_export.files import atomic_path

FORMAT = "attn-export/1"


def _architectures() -> dict[str, Callable[..., nn.Module]]:
    from attn_export.blocks import GSoPBlock, Involution2d, ODConv2d, OutlookAttention, SKConv
    from attn_export.blocks.detector import ShapesDetector
    from attn_export.blocks.mixnet import MixedNet

    return {
        "Involution2d": Involution2d,
        "ODConv2d": ODConv2d,
        "OutlookAttention": OutlookAttention,
        "GSoPBlock": GSoPBlock,
        "SKConv": SKConv,
        "MixedNet": MixedNet,
        "ShapesDetector": ShapesDetector,
    }


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}


def architectures() -> dict[str, Callable[..., nn.Module]]:
    """Name -> constructor of every architecture the checkpoint format can name."""
    if not ARCHITECTURES:
        ARCHITECTURES.update(_architectures())
    return ARCHITECTURES


@dataclass
class LoadedModel:
    """A model ready for export, with where it came from."""

    model: nn.Module
    input_shape: tuple[int, ...] | None
    source: str  # "checkpoint" or "pickle"
    arch: str
    meta: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    arch: str,
    kwargs: dict[str, Any],
    input_shape: Sequence[int],
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` in the project's format (atomically: a temporary file, then a rename)."""
    if arch not in architectures():
        raise ExportError(f"unknown architecture {arch!r}; known: {', '.join(sorted(architectures()))}")
    path = Path(path)
    payload = {
        "format": FORMAT,
        "arch": arch,
        "kwargs": dict(kwargs),
        "input_shape": [int(d) for d in input_shape],
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # not every file lets itself be scanned; the error below still says what to do
        return []


def _from_checkpoint(obj: dict, path: Path) -> LoadedModel:
    arch = obj.get("arch")
    archs = architectures()
    if arch not in archs:
        raise ExportError(f"{path}: unknown architecture {arch!r}; this version knows {', '.join(sorted(archs))}")
    try:
        model = archs[arch](**obj.get("kwargs", {}))
        model.load_state_dict(obj["state_dict"])
        model.eval()  # the format holds weights for inference; a fresh module starts in train mode
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise ExportError(f"{path}: cannot build {arch} from the checkpoint: {e}") from e
    shape = obj.get("input_shape")
    return LoadedModel(model, tuple(shape) if shape else None, "checkpoint", arch, dict(obj.get("meta", {})))


def _from_pickle(obj: Any, path: Path) -> LoadedModel:
    if isinstance(obj, dict):
        for key in ("ema", "model"):
            if isinstance(obj.get(key), nn.Module):
                obj = obj[key]
                break
    if not isinstance(obj, nn.Module):
        raise ExportError(
            f"{path}: the file holds a {type(obj).__name__}, not an nn.Module (nor a dict with one under "
            "'ema' or 'model'); save the model itself, or use the attn-export checkpoint format"
        )
    obj.float()  # not chained: a model may override it (or train()/eval()) without returning self
    return LoadedModel(obj, None, "pickle", type(obj).__name__)


def _looks_like_torch_file(path: Path) -> bool:
    """A zip archive (``torch.save``'s format) or a pickle stream (its legacy format, protocol 2+)."""
    with open(path, "rb") as f:
        head = f.read(2)
    return zipfile.is_zipfile(path) or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def load_model(path: str | os.PathLike, trust_checkpoint: bool = False) -> LoadedModel:
    """Load a model for export. Raises :class:`ExportError` with a clear message on any bad input."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: no such file")
    if path.is_dir():
        raise ExportError(f"{path}: is a directory, expected a .pt checkpoint file")
    if not _looks_like_torch_file(path):
        size = path.stat().st_size
        what = "an empty file" if size == 0 else "neither a zip archive nor a pickle"
        raise ExportError(f"{path}: not a PyTorch checkpoint ({what})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        names = _unsafe_globals(path)
        if not trust_checkpoint:
            wants = f" It wants to import: {', '.join(names)}." if names else ""
            raise ExportError(
                f"{path}: this file is a pickled model, and loading it runs code from the file.{wants} "
                "Load it only if you trust its source, with --trust-checkpoint "
                "(or convert it to the attn-export checkpoint format)."
            ) from e
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise ExportError(f"{path}: cannot unpickle the model: {type(e2).__name__}: {e2}") from e2
        return _from_pickle(obj, path)
    except Exception as e:  # a corrupt file makes the weights-only unpickler raise nearly anything
        raise ExportError(f"{path}: not a PyTorch checkpoint, or a corrupt one ({first_line(e)})") from e
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return _from_checkpoint(obj, path)
    if _is_state_dict(obj) or (
        isinstance(obj, dict) and any(isinstance(obj.get(k), dict) for k in ("state_dict", "model", "ema"))
    ):
        raise ExportError(
            f"{path}: the file holds only weights (a state dict) and no architecture; save it in the attn-export "
            "checkpoint format (attn_export.export.save_checkpoint) or as a pickled nn.Module"
        )
    raise ExportError(f"{path}: not an attn-export checkpoint nor a pickled nn.Module (got {type(obj).__name__})")


def parse_shape(text: str) -> tuple[int, ...]:
    """``"3,320,320"`` -> ``(3, 320, 320)``, with a clear error."""
    try:
        dims = tuple(int(t) for t in text.replace("x", ",").split(",") if t.strip())
    except ValueError:
        dims = ()
    if not dims or min(dims) < 1:
        raise ExportError(f"--input-shape: expected positive integers like 3,320,320 (no batch), got {text!r}")
    return dims


def parse_inputs(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """``["image:3,64,64", "mask:1,64,64"]`` (``--input``, repeatable) -> ``{"image": (3, 64, 64), ...}``."""
    out: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, sep, dims = item.rpartition(":")
        if not sep or not name:
            raise ExportError(f"--input: expected NAME:C,H,W (e.g. image:3,320,320), got {item!r}")
        if name in out:
            raise ExportError(f"--input: {name!r} given twice")
        try:
            out[name] = parse_shape(dims)
        except ExportError:
            raise ExportError(
                f"--input {name}: expected positive integers like 3,320,320 (no batch), got {dims!r}"
            ) from None
    return out
