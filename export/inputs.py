"""What the model is given: named tensor inputs, the forward they fill, and the image sizes.

:func:`check_inputs` makes ``{name: shape without the batch}`` of ``input_shape`` or ``inputs``;
:func:`check_forward` refuses, before running it, a forward the inputs cannot fill, or one that takes a
dict or a list, with the wrapper to write (a module whose forward takes tensors and builds it);
:func:`order_inputs` passes inputs by name where they are forward's parameters. For a graph with free
height and width, :func:`plan_sizes` runs the model at the sizes the graph is verified at and says
whether it takes a free size at all, needs multiples of its stride, or only one size.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from attn_export.export.errors import ExportError, first_line
from attn_export.export.profile import check_input_shape, parse_hw, rounded_hw, verify_sizes
from attn_export.export.torch_export import INPUT_NAME


def check_inputs(input_shape: Sequence[int] | None, inputs: Mapping[str, Sequence[int]] | None) -> dict:
    """``{name: shape without the batch}``: ``inputs`` as given, else ``{"input": input_shape}``."""
    if inputs is None:
        if input_shape is None:
            raise ExportError("input shape: give input_shape (C, H, W), or inputs={name: shape}")
        return {INPUT_NAME: check_input_shape(input_shape)}
    if not inputs:
        raise ExportError("--input: give at least one input as NAME:C,H,W")
    specs: dict[str, tuple[int, ...]] = {}
    for name, shape in inputs.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.:-]*", name):
            raise ExportError(f"--input: {name!r} is not a usable input name (letters, digits, _ . : -)")
        try:
            specs[name] = check_input_shape(shape)
        except ExportError as e:
            raise ExportError(f"--input {name}: {e}") from e
    return specs


def describe_inputs(specs: Mapping[str, Sequence[int]], batch: int) -> str:
    if len(specs) == 1:
        return f"an input of shape {(batch, *next(iter(specs.values())))}"
    return "inputs " + ", ".join(f"{n} {(batch, *s)}" for n, s in specs.items())


def _forward_params(model: nn.Module) -> tuple[list[str], bool] | None:
    """The names of ``model.forward``'s positional parameters, and whether it takes ``*args``."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = [p for p in sig.parameters.values() if p.kind in kinds]
    varargs = any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in sig.parameters.values())
    return [p.name for p in params if p.default is inspect.Parameter.empty], varargs


_KEYS = r"""{p}\s*(?:\[\s*|\.get\(\s*)['"]([^'"]+)['"]"""


def _dict_keys(model: nn.Module, param: str) -> list[str] | None:
    """The string keys ``forward`` reads from its parameter ``param`` (``x["image"]``, ``x.get("mask")``),
    or None where it reads none and calls no dict method on it."""
    try:
        src = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return None
    p = re.escape(param)
    keys = list(dict.fromkeys(re.findall(_KEYS.format(p=rf"\b{p}"), src)))
    if keys:
        return keys
    if re.search(rf"\b{p}\.(items|keys|values)\(", src):
        return []
    return None


def _wrapper_hint(keys: Sequence[str], specs: Mapping[str, Sequence[int]], kind: str = "dict") -> str:
    """The wrapper to write around a model whose forward takes a dict (or a list, ``kind="list"``): a
    module whose forward takes tensors and builds it."""
    names = [k for k in keys if k.isidentifier()] or (["image"] if kind == "dict" else ["x0", "x1"])
    shapes = list(specs.values())
    dims = [",".join(map(str, shapes[i])) if i < len(shapes) else "C,H,W" for i in range(len(names))]
    args = ", ".join(names)
    built = "{" + ", ".join(f"{k!r}: {k}" for k in names) + "}" if kind == "dict" else f"[{args}]"
    pairs = list(zip(names, dims, strict=True))
    return (
        f"write a wrapper whose forward takes tensors and builds the {kind}, and export it instead:\n"
        "    class Wrapped(torch.nn.Module):\n"
        "        def __init__(self, model):\n"
        "            super().__init__()\n"
        "            self.model = model\n\n"
        f"        def forward(self, {args}):\n"
        f"            return self.model({built})\n"
        f"then export Wrapped(model) with inputs={{{', '.join(f'{k!r}: ({d})' for k, d in pairs)}}} "
        f"(CLI: save it, then {' '.join(f'--input {k}:{d}' for k, d in pairs)})"
    )


def _container_annotation(model: nn.Module, param: str) -> str:
    """``"dict"`` or ``"list"`` where ``forward`` annotates ``param`` as a mapping or a sequence, else ``""``."""
    try:
        annotation = inspect.signature(model.forward).parameters[param].annotation
    except (TypeError, ValueError, KeyError):
        return ""
    if annotation is inspect.Parameter.empty:
        return ""
    text = annotation if isinstance(annotation, str) else repr(annotation)
    head = re.split(r"[\[|]", text.replace("typing.", "").replace("collections.abc.", ""), maxsplit=1)[0].strip()
    head = head.removeprefix("<class '").removesuffix("'>")
    if head in ("dict", "Dict", "Mapping", "MutableMapping", "OrderedDict"):
        return "dict"
    if head in ("list", "List", "tuple", "Tuple", "Sequence"):
        return "list"
    return ""


def check_forward(model: nn.Module, specs: Mapping[str, Sequence[int]]) -> None:
    """Refuse, before running it, a forward whose positional parameters the inputs cannot fill, or one
    that reads its single argument as a dict."""
    found = _forward_params(model)
    if found is None:
        return
    required, varargs = found
    if len(required) == 1:
        kind = _container_annotation(model, required[0])
        if kind:
            raise ExportError(
                f"run: {type(model).__name__}.forward takes a {kind} as '{required[0]}' (its annotation); the "
                f"export takes tensors only. {_wrapper_hint([], specs, kind)}"
            )
        keys = _dict_keys(model, required[0])
        if keys is not None:
            what = f" (it reads {', '.join(map(repr, keys))})" if keys else ""
            raise ExportError(
                f"run: {type(model).__name__}.forward takes a dict as '{required[0]}'{what}; the export takes "
                f"tensors only. {_wrapper_hint(keys, specs)}"
            )
    if not varargs and len(required) > len(specs):
        raise ExportError(
            f"run: {type(model).__name__}.forward takes {len(required)} inputs ({', '.join(required)}) but "
            f"{len(specs)} {'was' if len(specs) == 1 else 'were'} given; give each with --input NAME:C,H,W "
            "(API: inputs={name: shape})"
        )


def order_inputs(model: nn.Module, specs: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """``specs`` in the order of ``forward``'s parameters when every name is one of them, else as given."""
    found = _forward_params(model)
    if found is None or len(specs) < 2:
        return specs
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return specs
    if all(n in params for n in specs):
        return {n: specs[n] for n in sorted(specs, key=params.index)}
    return specs


def shapes_at(
    specs: Mapping[str, Sequence[int]], dynamic: Sequence[str], hw: tuple[int, int]
) -> dict[str, tuple[int, ...]]:
    return {n: (s[0], *hw) if n in dynamic else tuple(s) for n, s in specs.items()}


def sample_inputs(specs: Mapping[str, Sequence[int]], batch: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn((batch, *s), generator=gen) for s in specs.values())


def size_problem(model: nn.Module, args: tuple) -> str | None:
    """None where ``model`` runs on ``args``, else the reason, naming the innermost module that raised."""
    paths = {id(m): p for p, m in model.named_modules()}
    stack: list[nn.Module] = []

    def enter(mod, args) -> None:
        stack.append(mod)

    def leave(mod, args, out) -> None:  # returns None: a hook's return value would replace the output
        if stack:
            stack.pop()

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(enter))
        handles.append(m.register_forward_hook(leave))
    try:
        with torch.no_grad():
            model(*args)
        return None
    except Exception as e:
        failed = stack[-1] if stack else model
        return f"module '{paths.get(id(failed)) or '<model>'}' ({type(failed).__name__}): {first_line(e)}"
    finally:
        for h in handles:
            h.remove()


#: The multiples of a size tried when a model runs at some image sizes but not at others (strided
#: feature pyramids concatenate maps that agree only at multiples of their largest stride).
SIZE_MULTIPLES = (2, 4, 8, 16, 32, 64, 128)


def plan_sizes(
    model: nn.Module, specs: Mapping[str, Sequence[int]], dynamic: Sequence[str], hw: tuple[int, int, int], batch: int
) -> tuple[list[tuple[int, int]], int, str]:
    """Where to verify a graph with symbolic height and width: ``(sizes, multiple, refused)``.

    The model runs eagerly at :func:`verify_sizes`; where it fails at some sizes, the smallest multiple of
    :data:`SIZE_MULTIPLES` at whose sizes it runs is the model's (``sizes`` then at multiples of it). A model
    that runs at none of them but the size it was given (a fixed position embedding, a flatten into a fixed
    ``Linear``) is refused: ``refused`` says why in one line, naming the module. A model that fails at part
    of the range only gets an :class:`ExportError` naming the size.
    """

    def problems(sizes: Sequence[tuple[int, int]], first: bool = False) -> dict[tuple[int, int], str]:
        found = {}
        for size in sizes:
            why = size_problem(model, sample_inputs(shapes_at(specs, dynamic, size), batch))
            if why:
                found[size] = why
                if first:
                    break  # one failure is enough to reject these sizes
        return found

    sizes = verify_sizes(hw)
    failed = problems(sizes)
    if not failed:
        return sizes, 1, ""
    # A feature pyramid concatenates maps that agree only at multiples of its largest stride. A multiple
    # explains the failures when each failing size has a side inside the rounded range that is not a
    # multiple of it (a model too small for its kernel at MIN is not explained by rounding MIN up).
    for multiple in SIZE_MULTIPLES:
        try:
            lo, _, hi = rounded_hw(hw, multiple)
            candidate = verify_sizes(hw, multiple)
        except ExportError:
            break  # the range holds fewer than two multiples of this (or of any larger) size
        explained = all(lo <= min(h, w) and max(h, w) <= hi and (h % multiple or w % multiple) for h, w in failed)
        if explained and not problems(candidate, first=True):
            return candidate, multiple, ""
    lo, _, hi = parse_hw(hw)
    if all(h != w for h, w in failed):  # every square size runs, the non-square one does not
        return [], 1, f"the model needs square inputs (height == width): {next(iter(failed.values()))}"
    if (lo, lo) in failed and (hi, hi) in failed:  # neither end of the range: a model of one size
        return [], 1, failed[(lo, lo)]
    (h, w), why = next(iter(failed.items()))
    raise ExportError(
        f"--dynamic-hw {':'.join(map(str, hw))}: the model fails at {h}x{w} ({why}); give a range of sizes it runs at"
    )
