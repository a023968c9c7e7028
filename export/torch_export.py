"""PyTorch to ONNX: the dynamo export with a dynamic batch, the block probe, and why an export failed.

:func:`torch_onnx_export` runs ``torch.onnx.export`` quietly (what torch prints goes to the debug log)
and refuses a graph whose batch was fixed while tracing. :class:`Probe` returns the outputs of the
attn-export blocks after the model's, for the block-by-block verification. When the export fails,
:func:`export_failure` says where in the user's code and which submodule, in one line.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from attn_export.export.adapt import block_types, capture_inputs
from attn_export.export.errors import ExportError, SizeRefused, first_line, strip_ansi

log = logging.getLogger("attn_export")

INPUT_NAME = "input"


def find_blocks(model: nn.Module) -> list[str]:
    """Paths of the outermost attn-export blocks in ``model`` (the model itself is ``""``)."""
    kinds = block_types()
    found: list[str] = []
    for path, mod in model.named_modules():
        if isinstance(mod, kinds) and not any(path.startswith(p + ".") or p == "" for p in found):
            found.append(path)
    return found


class Probe(nn.Module):
    """Returns the model's outputs followed by the outputs of the probed blocks, in call order."""

    def __init__(self, model: nn.Module, paths: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self._store: list[torch.Tensor] = []
        mods = dict(model.named_modules())
        self._handles = [mods[p].register_forward_hook(self._hook) for p in paths]

    def _hook(self, module, args, output):
        if isinstance(output, torch.Tensor):
            self._store.append(output)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def forward(self, *args):
        self._store.clear()
        out = self.model(*args)
        probes = tuple(self._store)
        self._store.clear()
        return (*torch.utils._pytree.tree_leaves(out), *probes)


#: The names of the symbolic image axes of a graph exported with ``dynamic_hw`` (the batch is "batch").
HW_NAMES = ("height", "width")


class Splat(nn.Module):
    """``Splat(model)(args)`` runs ``model(*args)``: a model of several inputs seen as one of one argument,
    for the helpers that run ``model(sample)`` (adapt, capture_inputs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, args):
        return self.model(*args)


def _dynamic_shapes(args: Sequence, batch: int, dynamic_hw: bool = False):
    """``dynamic_shapes`` for ``torch.export``: the batch axis of every tensor whose first axis is
    ``batch``; with ``dynamic_hw`` also axes 2 and 3 of every rank-4 tensor shaped like the first one
    (one height and one width for all image inputs of that size; other sizes stay static).

    Height and width are ``Dim.DYNAMIC``: torch then infers their ranges and turns the guards a model's
    sizes imply (a stride, a minimum) into runtime checks, instead of refusing an explicit range that
    some intermediate size would leave at 1. What a model cannot follow at all (a fixed position
    embedding) is found by :func:`check_hw_input` on the graph and by running the model at other sizes.
    """
    dim = torch.export.Dim("batch", min=1)
    images = [a for a in args if isinstance(a, torch.Tensor) and a.dim() == 4]
    hw = tuple(images[0].shape[2:]) if dynamic_hw and images else None
    specs = []
    for a in args:
        if not (isinstance(a, torch.Tensor) and a.dim()):
            specs.append(None)
            continue
        spec = {0: dim} if a.shape[0] == batch else {}
        if hw is not None and a.dim() == 4 and tuple(a.shape[2:]) == hw:
            spec.update({2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC})
        specs.append(spec or None)
    return tuple(specs)


def _rename_dims(proto, names: dict[str, str]) -> None:
    """Rename symbolic dims (``s53`` -> ``height``) everywhere in the graph, inside expressions too."""
    if not names:
        return
    pattern = re.compile(r"\b(" + "|".join(re.escape(k) for k in names) + r")\b")
    values = [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]
    for v in values:
        for d in v.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                d.dim_param = pattern.sub(lambda m: names[m.group(1)], d.dim_param)


def check_hw_input(proto, dynamic) -> None:
    """Name the symbolic image axes ``height``/``width`` (and the batch ``batch``), or raise
    :class:`SizeRefused` where the export fixed them or tied them together."""
    renames: dict[str, str] = {}
    for spec, value in zip(dynamic, proto.graph.input, strict=False):
        dims = value.type.tensor_type.shape.dim
        if not spec or not dims:
            continue
        if 0 in spec and dims[0].HasField("dim_param"):
            renames.setdefault(dims[0].dim_param, "batch")
        if 2 not in spec:
            continue
        h, w = dims[2], dims[3]
        if h.HasField("dim_value") or w.HasField("dim_value"):
            fixed = " x ".join(
                str(d.dim_value) if d.HasField("dim_value") else n for d, n in zip((h, w), HW_NAMES, strict=True)
            )
            raise SizeRefused(f"the export fixed the image size to {fixed}: the model computes with a constant size")
        if h.dim_param == w.dim_param:
            raise SizeRefused("the model needs height == width (square inputs only)")
        renames.setdefault(h.dim_param, HW_NAMES[0])
        renames.setdefault(w.dim_param, HW_NAMES[1])
    _rename_dims(proto, renames)


@contextlib.contextmanager
def capture_output() -> Iterator[list[str]]:
    """Take what is printed meanwhile, by Python or by C++ (file descriptors 1 and 2 as well as
    ``sys.stdout``/``sys.stderr``), off the terminal into a temporary file; on exit the yielded list
    holds it as one string. Shared by the export (torch's FX dumps) and the benchmark (the exporters'
    noise)."""
    import sys
    import tempfile

    sys.stdout.flush()
    sys.stderr.flush()
    captured: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = [os.dup(1), os.dup(2)]
        text = io.StringIO()
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
                yield captured
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            captured.append(sink.read().decode(errors="replace") + text.getvalue())


@contextlib.contextmanager
def _captured_output(what: str):
    """Send what torch prints while exporting (FX graph dumps on failures: dozens of lines, often twice)
    to the debug log (the CLI shows it with -v) instead of the terminal."""
    captured: list[str] = []
    try:
        with capture_output() as captured:
            yield
    finally:
        dumped = "".join(captured)
        if dumped.strip() and log.isEnabledFor(logging.DEBUG):
            log.debug("%s: what torch printed:\n%s", what, dumped.rstrip())


def _takes_varargs(module: nn.Module) -> bool:
    """Whether ``forward`` takes ``*args`` only (as :class:`Probe` does): torch.export then wants the
    dynamic shapes of all positional inputs as one tuple."""
    import inspect

    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(params) == 1 and params[0].kind == inspect.Parameter.VAR_POSITIONAL


def torch_onnx_export(
    module: nn.Module,
    args: tuple,
    table: dict,
    opset: int,
    dynamic_hw: bool = False,
    input_names: Sequence[str] | None = None,
):
    """``torch.onnx.export`` (dynamo) of ``module`` with a dynamic batch; its ``ModelProto``, unprocessed
    but for the names of its symbolic axes.

    ``dynamic_hw``: the rank-4 image input(s) get symbolic ``height`` and ``width`` besides ``batch``;
    where the model fixes them (or needs them equal) :class:`SizeRefused` says so.
    ``input_names``: the graph's input names (default ``input`` for one input).
    """
    quiet = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "torchvision is not installed" notes: we do not use torchvision
    batch = args[0].shape[0]
    dynamic = _dynamic_shapes(args, batch, dynamic_hw)
    if input_names is None and len(args) == 1:
        input_names = [INPUT_NAME]
    try:
        with warnings.catch_warnings(), _captured_output(f"torch.onnx.export of {type(module).__name__}"):
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=list(input_names) if input_names else None,
                opset_version=opset,
                dynamic_shapes=(dynamic,) if _takes_varargs(module) else dynamic,
                custom_translation_table=table,
                optimize=True,
                verbose=False,
                report=False,
            )
    finally:
        quiet.setLevel(level)
    proto = prog.model_proto
    # torch.export may specialise the batch silently (e.g. x.view(4, ...)); the graph's input then has a
    # fixed batch, which renaming the axis "batch" later would hide.
    for spec, value in zip(dynamic, proto.graph.input, strict=False):
        dims = value.type.tensor_type.shape.dim
        if spec and 0 in spec and dims and dims[0].HasField("dim_value"):
            raise ExportError(
                f"the batch dimension was fixed to {dims[0].dim_value} while tracing: the model computes with a "
                "constant batch size (e.g. x.view(4, ...)); use x.shape[0] or -1 for the batch instead"
            )
    check_hw_input(proto, dynamic)
    return proto


_DATA_DEPENDENT = ("GuardOnDataDependentSymNode", "data-dependent", "data dependent")
_RAISED_AT = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.+)')


def _library_file(filename: str) -> bool:
    """Frames that are not the user's: torch, onnx, onnxscript, the standard library, this package's
    export machinery, generated code."""
    if filename.startswith("<"):
        return True
    import onnx
    import onnxscript

    dirs = [os.path.dirname(os.path.abspath(m.__file__)) for m in (torch, onnx, onnxscript)]
    dirs.append(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.abspath(filename)
    stdlib = os.path.dirname(os.path.abspath(contextlib.__file__))
    in_stdlib = path.startswith(stdlib + os.sep) and not any(p in path for p in ("site-packages", "dist-packages"))
    return in_stdlib or any(path.startswith(d + os.sep) for d in dirs)


def user_frame(e: BaseException) -> tuple[str, int, str, str, object] | None:
    """The innermost frame of the user's code in ``e``'s chain: ``(file, line, function, source, self)``,
    where ``self`` is the frame's ``self`` (the module whose method it is) or None."""
    import linecache
    import traceback

    found = None
    seen: set[int] = set()
    chain = [e]
    while chain and len(seen) < 20:
        c = chain.pop()
        if id(c) in seen:
            continue
        seen.add(id(c))
        for frame, lineno in traceback.walk_tb(c.__traceback__):
            code = frame.f_code
            if not _library_file(code.co_filename):
                found = (code.co_filename, lineno, code.co_name, "", frame.f_locals.get("self"))
        if found is None:  # torch.export names the call in its message
            m = _RAISED_AT.search(strip_ansi(str(c)))
            if m:
                found = (m.group(1), int(m.group(2)), m.group(3), m.group(4).strip(), None)
        chain += [x for x in (c.__cause__, c.__context__) if x is not None]
    if found and not found[3]:
        found = (*found[:3], linecache.getline(found[0], found[1]).strip(), found[4])
    return found


def _is_data_dependent(e: BaseException) -> bool:
    c: BaseException | None = e
    for _ in range(20):
        if c is None:
            return False
        if any(k in type(c).__name__ or k in str(c)[:2000] for k in _DATA_DEPENDENT):
            return True
        c = c.__cause__ or c.__context__
    return False


def explain_export_failure(e: BaseException, model: nn.Module | None = None) -> str | None:
    """A one-line explanation of a failure whose cause is in the user's code, or None: the file, line
    and source of the user's frame, and the module it belongs to when it is one of ``model``'s."""
    where = user_frame(e)
    if not where:
        return None
    file, line, func, code, owner = where
    at = f"{file}:{line} in {func}: `{code}`" if code else f"{file}:{line} in {func}"
    paths = {id(m): p for p, m in model.named_modules()} if model is not None else {}
    if id(owner) in paths:
        path = paths[id(owner)]
        at = f"module '{path or '<model>'}' ({type(owner).__name__}) at {at}"
    if _is_data_dependent(e):
        return (
            f"export failed in {at}: the model branches on a tensor's value (data-dependent control flow), "
            "which a graph cannot hold; compute both sides and select with torch.where, use torch.cond, "
            "or move the decision out of the model"
        )
    return f"export failed in {at}: {first_line(e)}"


def locate_failure(model: nn.Module, sample: torch.Tensor | tuple, table: dict, opset: int) -> tuple[str, str] | None:
    """Find the smallest submodule that fails to export on its own: ``(path, reason)``. ``sample``: the
    model's input, or a tuple of its inputs."""
    if isinstance(sample, tuple):
        seen = capture_inputs(Splat(model), [f"model.{p}" for p, _ in model.named_modules() if p], sample)
        seen = {k.removeprefix("model."): v for k, v in seen.items()}
    else:
        seen = capture_inputs(model, [p for p, _ in model.named_modules() if p], sample)
    mods = dict(model.named_modules())

    def fails(path: str) -> str | None:
        args = seen.get(path)
        if not args or not all(isinstance(a, torch.Tensor) for a in args):
            return None
        try:
            torch_onnx_export(mods[path], tuple(args), table, opset)
        except Exception as e:
            return first_line(e)
        return None

    culprit: tuple[str, str] | None = None
    parent = ""
    while True:
        children = [f"{parent}.{n}" if parent else n for n, _ in mods[parent].named_children()]
        for child in children:
            reason = fails(child)
            if reason:
                culprit = (child, reason)
                parent = child
                break
        else:
            return culprit


def export_failure(e: BaseException, model: nn.Module, sample: torch.Tensor | tuple, table: dict, opset: int) -> str:
    """The one-line message for an export of ``model`` that raised ``e``: the user's frame, and the smallest
    submodule that fails to export on its own where one does."""
    if _is_data_dependent(e):
        explained = explain_export_failure(e, model)
        if explained:
            return explained
    try:
        where = locate_failure(model, sample, table, opset)
    except Exception:  # the search is a courtesy; the first failure is what matters
        where = None
    at = user_frame(e)
    loc = (f" at {at[0]}:{at[1]}" + (f" (`{at[3]}`)" if at[3] else "")) if at else ""
    if where:
        path, reason = where
        kind = type(model.get_submodule(path)).__name__
        return f"export failed in module '{path}' ({kind}){loc}: {reason}"
    return f"export failed{loc}: {first_line(e)}"
