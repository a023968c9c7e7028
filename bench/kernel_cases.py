"""The kernels ``attn-export kernels`` compiles (:mod:`attn_export.bench.kernels`): one :class:`Case` per
kernel, shape and dtype, at the realistic shapes (involution B32 C256 56x56 k7 G16; outlook B32 C384
28x28, 12 heads, k3, stride 1 and 2; dynamic conv B32 C256 28x28 k3), for the ops' CUDA kernels and the
TensorRT AOT entries. Programs are traced at batch 1 and scaled to the batch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

DTYPES = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class Case:
    """One kernel at one shape and dtype: how to compile it and how to trace its accesses."""

    kernel: str  # report name, e.g. "involution2d_fwd"
    op: str  # involution | outlook | dynamic_conv
    role: str  # op | aot
    label: str  # shape label
    dtype: str
    compile_fn: str  # "module:attr" of the JITFunction, or "module:aot_entry()" for an AOT entry
    signature: tuple  # ((name, type), ...) of the non-constexpr parameters, in order
    constexprs: tuple  # ((name, value), ...)
    trace_fn: str  # "module:attr" of the kernel run by the interpreter (the AOT's body)
    trace_args: tuple  # ("tensor", index) or ("int", value) per positional parameter of trace_fn
    trace_constexprs: tuple
    tensors: tuple  # ((name, shape at batch 1, "in"|"out"), ...)
    grid1: int  # programs at batch 1
    num_warps: int = 4
    num_stages: int = 3

    def key(self, arch: str) -> str:
        return f"{self.kernel}/{self.label}/{self.dtype}/{arch}"

    def trace_key(self) -> str:
        return json.dumps([self.trace_fn, self.trace_args, self.trace_constexprs, self.tensors, self.dtype, self.grid1])


def _sig(pointers: Sequence[str], dtype: str, ints: Sequence[str]) -> tuple:
    return tuple((p, f"*{dtype}") for p in pointers) + tuple((n, "i32") for n in ints)


def _aot_sig(pointers: Sequence[str], dtype: str, ints: Sequence[str]) -> tuple:
    """TensorRT's order: inputs, scalars, output."""
    return (
        tuple((p, f"*{dtype}") for p in pointers[:-1])
        + tuple((n, "i32") for n in ints)
        + ((pointers[-1], f"*{dtype}"),)
    )


def _involution_cases(dtype: str) -> list[Case]:
    from attn_export.plugins.involution import cuda_kernel as ck
    from attn_export.plugins.involution import plan

    b, c, h, w, k, g, s, p, d = 1, 256, 56, 56, 7, 16, 1, 3, 1
    x, wt = (b, c, h, w), (b, g, k * k, h, w)
    tensors = (("x", x, "in"), ("weight", wt, "in"), ("out", (b, c, h, w), "out"))
    label = "B32 C256 56x56 k7 G16"
    args = (("tensor", 0), ("tensor", 1), ("tensor", 2))
    ptrs = ("x_ptr", "w_ptr", "out_ptr")
    out = []
    # the op's default kernel and the candidate (whichever the op runs is named by ck.DEFAULT)
    for name, fn, planner in (
        ("involution2d_tiles", "_involution2d_fwd", ck.tiles_plan),
        ("involution2d_rows", "_involution2d_rows", ck.rows_plan),
    ):
        grid, scalars, ce = planner(x, wt, k, s, p, d)
        names = ck.TILES_SCALARS if planner is ck.tiles_plan else ck.ROWS_SCALARS
        role = "op" if name.endswith(ck.DEFAULT) else "op-candidate"
        out.append(
            Case(
                name,
                "involution",
                role,
                label,
                dtype,
                f"{ck.__name__}:{fn}",
                _sig(ptrs, dtype, names),
                tuple(ce.items()),
                f"{ck.__name__}:{fn}",
                args + tuple(("int", v) for v in scalars),
                tuple(ce.items()),
                tensors,
                grid,
                num_warps=ck.rows_warps(ce) if planner is ck.rows_plan else 4,
            )
        )
    # the TensorRT AOT entry: static shapes (the launcher's blocks) and dynamic ones (blocks(None, None))
    for tag, (bc, bp) in (("static", plan.blocks(c // g, h * w)), ("dynamic", plan.blocks(None, None))):
        grid, scalars, ce = plan.launch_plan(x, wt, k, s, p, d, bc, bp)
        out.append(
            Case(
                f"involution2d_aot[{tag}]",
                "involution",
                "aot",
                label,
                dtype,
                "attn_export.plugins.involution.trt_plugin:aot_entry()",
                _aot_sig(ptrs, dtype, plan.SCALARS),
                tuple(ce.items()),
                f"{ck.__name__}:_involution2d_fwd",
                args + tuple(("int", v) for v in scalars),
                tuple(ce.items()),
                tensors,
                grid,
            )
        )
    return out


def _outlook_cases(dtype: str) -> list[Case]:
    """The window-row kernel (the op's and the TensorRT AOT entry's for k <= 3) at k3 s1 and s2, and the
    tile kernel that k > 3 falls back to, at k5 s1 (role ``fallback``: no realistic shape runs it)."""
    from attn_export.plugins.outlook import cuda_kernel as ck
    from attn_export.plugins.outlook import plan

    b, c, h, w, heads = 1, 384, 28, 28, 12
    out = []
    ptrs = ("v_ptr", "attn_ptr", "out_ptr")
    args = (("tensor", 0), ("tensor", 1), ("tensor", 2))
    rows_fn = f"{ck.__name__}:_outlook_rows"
    for k, p, s in ((3, 1, 1), (3, 1, 2)):
        v = (b, c, h, w)
        gh, gw = plan.window_grid(v, k, p, s)
        attn = (b, heads, gh * gw, k * k, k * k)
        tensors = (("v", v, "in"), ("attn", attn, "in"), ("out", v, "out"))
        label = f"B32 C384 28x28 m12 k{k} s{s}"
        variants = (
            ("outlook_aggregate_rows", "op", plan.rows_blocks(c // heads, w, k, s)),
            ("outlook_aggregate_aot[static]", "aot", plan.rows_blocks(c // heads, w, k, s)),
            ("outlook_aggregate_aot[dynamic]", "aot", plan.rows_blocks(None, None, k, s)),
        )
        for name, role, blk in variants:
            grid, scalars, ce = plan.rows_launch_plan(v, attn, k, p, s, *blk)
            aot = role == "aot"
            out.append(
                Case(
                    name,
                    "outlook",
                    role,
                    label,
                    dtype,
                    "attn_export.plugins.outlook.trt_plugin:aot_rows_entry()" if aot else rows_fn,
                    (_aot_sig if aot else _sig)(ptrs, dtype, plan.ROWS_SCALARS),
                    tuple(ce.items()),
                    rows_fn,
                    args + tuple(("int", x) for x in scalars),
                    tuple(ce.items()),
                    tensors,
                    grid,
                    num_warps=plan.ROWS_NUM_WARPS,
                )
            )
    k, p, s = 5, 2, 1
    v = (b, c, h, w)
    gh, gw = plan.window_grid(v, k, p, s)
    attn = (b, heads, gh * gw, k * k, k * k)
    grid, scalars, ce = plan.launch_plan(v, attn, k, p, s, *plan.blocks(c // heads, h * w))
    out.append(
        Case(
            "outlook_aggregate_fwd",
            "outlook",
            "fallback",
            f"B32 C384 28x28 m12 k{k} s{s}",
            dtype,
            f"{ck.__name__}:_outlook_aggregate_fwd",
            _sig(ptrs, dtype, plan.SCALARS),
            tuple(ce.items()),
            f"{ck.__name__}:_outlook_aggregate_fwd",
            args + tuple(("int", x) for x in scalars),
            tuple(ce.items()),
            (("v", v, "in"), ("attn", attn, "in"), ("out", v, "out")),
            grid,
        )
    )
    return out


def _conv_cases(dtype: str) -> list[Case]:
    from attn_export.plugins.dynamic_conv import cuda_kernel as ck
    from attn_export.plugins.dynamic_conv import plan

    b, cin, h, w, cout, k = 1, 256, 28, 28, 256, 3
    x, wt = (b, cin, h, w), (b, cout, cin, k, k)
    tensors = (("x", x, "in"), ("weight", wt, "in"), ("out", (b, cout, h, w), "out"))
    label = "B32 C256 28x28 k3"
    ptrs = ("x_ptr", "w_ptr", "out_ptr")
    args = (("tensor", 0), ("tensor", 1), ("tensor", 2))
    geom = dict(SH=1, SW=1, PH=1, PW=1, DH=1, DW=1, KH=k, KW=k)
    bm, bn, bk, warps, stages = ck.REPORT_CONFIG
    precision = "ieee" if dtype == "fp32" else None  # the op's default (TF32 only where torch allows it)
    ce = dict(geom, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_PRECISION=precision, UPCAST=False)
    ints = (cin, h, w, cout, h, w, 1, cin, cout)
    conv_ints = ("CIN", "H", "W", "COUT", "HO", "WO", "GROUPS", "CIN_G", "COUT_G")
    grid = b * (-(-h * w // bm)) * (-(-cout // bn))
    trace_ce = dict(ce, UPCAST=dtype == "bf16", DOT_PRECISION="ieee" if dtype != "fp16" else None)
    # the launcher's kernel: channels-last (x and weight transposed first: channels innermost) where a
    # group's channels are a multiple of 32, in every dtype
    cl = ck.channels_last(cin)
    fn = "_dynamic_conv2d_igemm_cl" if cl else "_dynamic_conv2d_igemm"
    gemm_tensors = (("x", (b, h, w, cin), "in"), ("weight", (b, cout, k, k, cin), "in"), tensors[2]) if cl else tensors
    out = [
        Case(
            "dynamic_conv2d_igemm_cl" if cl else "dynamic_conv2d_igemm",
            "dynamic_conv",
            "op",
            label,
            dtype,
            f"{ck.__name__}:{fn}",
            _sig(ptrs, dtype, conv_ints),
            tuple(ce.items()),
            f"{ck.__name__}:{fn}",
            args + tuple(("int", v) for v in ints),
            tuple(trace_ce.items()),
            gemm_tensors,
            grid,
            warps,
            stages,
        )
    ]
    for tag, blk in (("static", plan.blocks(cout, cin, h * w)), ("dynamic", plan.blocks(None, None, None))):
        grid, scalars, ce = plan.launch_plan(x, wt, (1, 1), (1, 1), (1, 1), 1, (k, k), *blk, plan.dot_precision(dtype))
        tce = dict(ce, DOT_PRECISION="ieee" if dtype != "fp16" else ce["DOT_PRECISION"])
        out.append(
            Case(
                f"dynamic_conv2d_aot[{tag}]",
                "dynamic_conv",
                "aot",
                label,
                dtype,
                "attn_export.plugins.dynamic_conv.trt_plugin:aot_entry()",
                _aot_sig(ptrs, dtype, plan.SCALARS),
                tuple(ce.items()),
                f"{ck.__name__}:_dynamic_conv2d_fwd",
                args + tuple(("int", v) for v in scalars),
                tuple(tce.items()),
                tensors,
                grid,
            )
        )
    return out


def cases(dtypes: Sequence[str] = DTYPES, ops: Sequence[str] | None = None) -> list[Case]:
    """Every kernel of issue 18's realistic shapes, in each of ``dtypes`` (``ops``: a subset of
    involution, outlook, dynamic_conv)."""
    found = []
    for dtype in dtypes:
        found += _involution_cases(dtype) + _outlook_cases(dtype) + _conv_cases(dtype)
    return [c for c in found if ops is None or c.op in ops]
