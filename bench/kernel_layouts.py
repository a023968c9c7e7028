"""How a compiled Triton kernel touches memory, read from its TTGIR and PTX (no GPU): the distributed
layouts (blocked, slice, linear) that map each element to a warp, lane and register; the global loads and
stores with their layouts and source lines; the PTX's vector loads; and the 32-byte sectors a warp access
costs. Used by :mod:`attn_export.bench.kernels`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SECTOR = 32


@dataclass(frozen=True)
class Layout:
    """A TTGIR distributed layout: per thread (warp, lane) and register, the element coordinates."""

    kind: str  # blocked | slice | linear
    params: tuple  # blocked: (spt, tpw, wpc, order); linear: (register, lane, warp); slice: (dim, parent)

    def mapping(self, shape: tuple[int, ...], num_warps: int, elem_bytes: int):
        """``(coords, group, lane_axis)``: coords (warps, 32, regs, ndim) element coordinates, group (regs,)
        the vector instruction of each register, lane_axis the tensor axis consecutive lanes step along
        (None: they all hold the same elements)."""
        import numpy as np

        if self.kind == "slice":
            dim, parent = self.params
            pshape = list(shape)
            pshape.insert(dim, 1)
            coords, group, lane_axis = parent.mapping(tuple(pshape), num_warps, elem_bytes)
            coords = np.delete(coords, dim, axis=-1)
            if lane_axis is not None:
                lane_axis = None if lane_axis == dim else lane_axis - (lane_axis > dim)
            return coords, group, lane_axis
        if self.kind == "blocked":
            return _blocked_mapping(*self.params, shape, num_warps, elem_bytes)
        return _linear_mapping(*self.params, shape, num_warps, elem_bytes)


def _digits(index, radices, order):
    """Mixed-radix digits of ``index`` with ``order[0]`` fastest."""
    out = [None] * len(radices)
    for d in order:
        out[d] = index % radices[d]
        index = index // radices[d]
    return out


def _blocked_mapping(spt, tpw, wpc, order, shape, num_warps, elem_bytes):
    import numpy as np

    nd = len(shape)
    tile = [spt[d] * tpw[d] * wpc[d] for d in range(nd)]
    reps = [max(1, -(-shape[d] // tile[d])) for d in range(nd)]
    nregs = [spt[d] * reps[d] for d in range(nd)]
    warps = np.arange(num_warps)[:, None, None]
    lanes = np.arange(32)[None, :, None]
    regs = np.arange(int(np.prod(nregs)))[None, None, :]
    wd = _digits(warps, wpc, order)
    ld = _digits(lanes, tpw, order)
    rd = _digits(regs, nregs, order)
    coords = np.zeros((num_warps, 32, regs.shape[-1], nd), dtype=np.int64)
    for d in range(nd):
        x = (rd[d] // spt[d]) * tile[d] + wd[d] * spt[d] * tpw[d] + ld[d] * spt[d] + rd[d] % spt[d]
        coords[..., d] = np.broadcast_to(x % shape[d], coords.shape[:3])
    o0 = order[0]
    vec = max(1, min(spt[o0], 16 // elem_bytes))
    key = [rd[d][0, 0] if d != o0 else rd[d][0, 0] // vec for d in range(nd)]
    group = np.zeros(regs.shape[-1], dtype=np.int64)
    for d in range(nd):
        group = group * (nregs[d] + 1) + key[d]
    lane_axis = next((d for d in order if tpw[d] > 1 and shape[d] > spt[d]), None)
    return coords, group, lane_axis


def _linear_mapping(register, lane, warp, shape, num_warps, elem_bytes):
    import numpy as np

    nd = len(shape)

    def span(bases, n):
        idx = np.arange(n)
        out = np.zeros((n, nd), dtype=np.int64)
        for bit, basis in enumerate(bases):
            on = ((idx >> bit) & 1).astype(bool)
            out[on] ^= np.asarray(basis, dtype=np.int64)
        return out

    nreg = 1 << len(register)
    r, ln, w = span(register, nreg), span(lane, 32), span(warp, num_warps)
    coords = w[:, None, None, :] ^ ln[None, :, None, :] ^ r[None, None, :, :]
    coords %= np.asarray(shape, dtype=np.int64)
    vec = 1
    for basis in register:  # leading unit steps along one axis form the vector
        expect = [0] * nd
        axis = next((d for d in range(nd) if basis[d]), None)
        if axis is None:
            break
        expect[axis] = vec
        if list(basis) != expect or (vec * 2) * elem_bytes > 16:
            break
        vec *= 2
    group = np.arange(nreg) // vec
    first = next((b for b in lane if any(b)), None)
    lane_axis = None if first is None else next(d for d in range(nd) if first[d])
    return coords, group, lane_axis


_ENC_DEF = re.compile(r"^(#\w+) = (#ttg\.\w+<\{.*\}>)\s*$", re.M)
_MEM = re.compile(r"\b(tt\.load|tt\.store|ttg\.async_copy_global_to_local)\b")
_PTR_T = re.compile(r"tensor<((?:\d+x)+)!tt\.ptr<(\w+)>,\s*(#ttg\.slice<\{[^}]*\}>|#[\w.]+)>")
_LOCREF = re.compile(r"loc\((#loc\d*)\)\s*$")
_LOCDEF = re.compile(r"^(#loc\d*) = loc\((.*)\)\s*$", re.M)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in re.findall(r"-?\d+", text))


def parse_encoding(text: str, defs: dict[str, str]) -> Layout | None:
    """A :class:`Layout` from a TTGIR encoding (``#blocked1``, ``#ttg.slice<{...}>``, ...); None if not
    a distributed layout this report reads."""
    text = text.strip()
    if text in defs:
        text = defs[text]
    m = re.match(r"#ttg\.blocked<\{(.*)\}>", text)
    if m:
        body = m.group(1)

        def field_(name):
            return _ints(re.search(rf"{name} = \[([^\]]*)\]", body).group(1))

        return Layout(
            "blocked", (field_("sizePerThread"), field_("threadsPerWarp"), field_("warpsPerCTA"), field_("order"))
        )
    m = re.match(r"#ttg\.slice<\{dim = (\d+), parent = (#[\w.]+)\}>", text)
    if m:
        parent = parse_encoding(m.group(2), defs)
        return None if parent is None else Layout("slice", (int(m.group(1)), parent))
    m = re.match(r"#ttg\.linear<\{(.*)\}>", text)
    if m:
        body = m.group(1)

        def bases(name):
            inner = re.search(rf"{name} = \[(.*?)\]\](?:,|$)|{name} = \[\]", body)
            if inner is None or inner.group(1) is None:
                return ()
            return tuple(_ints(b) for b in re.findall(r"\[([^\[\]]*)\]", inner.group(1) + "]"))

        return Layout("linear", (bases("register"), bases("lane"), bases("warp")))
    return None


def _resolve_loc(name: str, locs: dict[str, str], depth: int = 0) -> tuple[str, int] | None:
    text = locs.get(name)
    if text is None or depth > 20:
        return None
    m = re.match(r'"([^"]+)":(\d+):\d+', text)
    if m:
        return Path(m.group(1)).name + ":" + m.group(1), int(m.group(2))
    m = re.match(r"callsite\((#loc\d*) at", text)
    if m:
        return _resolve_loc(m.group(1), locs, depth + 1)
    m = re.match(r'"[^"]*"\((#loc\d*)\)', text)
    if m:
        return _resolve_loc(m.group(1), locs, depth + 1)
    m = re.match(r"fused\[(#loc\d*)", text)
    if m:
        return _resolve_loc(m.group(1), locs, depth + 1)
    return None


def memory_ops(ttgir: str) -> list[dict]:
    """Every global load/store of a tensor of pointers in a TTGIR module: ``{op, file, line, shape, dtype,
    encoding}`` (``file`` the source path, ``encoding`` the layout's text)."""
    defs = dict(_ENC_DEF.findall(ttgir))
    locs = dict(_LOCDEF.findall(ttgir))
    found = []
    for line in ttgir.splitlines():
        op = _MEM.search(line)
        if not op:
            continue
        t = _PTR_T.search(line)
        ref = _LOCREF.search(line)
        if not t or not ref:
            continue
        where = _resolve_loc(ref.group(1), locs)
        if where is None:
            continue
        enc = t.group(3)
        found.append(
            {
                "op": op.group(1),
                "file": where[0].split(":", 1)[1],
                "line": where[1],
                "shape": _ints(t.group(1)),
                "dtype": t.group(2),
                "encoding": defs.get(enc, enc),
                "encoding_defs": {k: v for k, v in defs.items() if k in enc or k in defs.get(enc, "")},
            }
        )
    return found


def ptx_load_counts(ptx: str) -> dict[str, int]:
    """Global memory instructions of a PTX module by width."""
    counts = {
        "ld_scalar": 0,
        "ld_v2": 0,
        "ld_v4": 0,
        "cp_async_4": 0,
        "cp_async_8": 0,
        "cp_async_16": 0,
        "st_scalar": 0,
        "st_vec": 0,
    }
    for m in re.finditer(r"\bld\.global[\w.]*", ptx):
        ins = m.group(0)
        counts["ld_v4" if ".v4" in ins else "ld_v2" if ".v2" in ins else "ld_scalar"] += 1
    for m in re.finditer(r"\bcp\.async\.(?:ca|cg)\.shared(?:::cta)?\.global[^;]*?\],\s*(0x[0-9a-fA-F]+|\d+)", ptx):
        key = f"cp_async_{int(m.group(1), 0)}"
        counts[key] = counts.get(key, 0) + 1
    for m in re.finditer(r"\bst\.global[\w.]*", ptx):
        counts["st_vec" if (".v2" in m.group(0) or ".v4" in m.group(0)) else "st_scalar"] += 1
    return counts


# ------------------------------------------------------------------------------------------ sectors
def access_cost(offsets, mask, layout: Layout, num_warps: int, elem_bytes: int) -> dict:
    """One access (every warp of one program, one load/store) under ``layout``: ``sectors`` (32-byte
    sectors summed over its warp instructions), ``lane_axis`` and ``contiguous_axis`` (the tile axis
    along which neighbouring elements are ``elem_bytes`` apart, None for a gather)."""
    import numpy as np

    shape = tuple(offsets.shape)
    coords, group, lane_axis = layout.mapping(shape, num_warps, elem_bytes)
    flat = np.ravel_multi_index(tuple(np.moveaxis(coords, -1, 0)), shape)
    off = offsets.reshape(-1)[flat]
    on = mask.reshape(-1)[flat]
    warp = np.broadcast_to(np.arange(num_warps)[:, None, None], flat.shape)
    grp = np.broadcast_to(group[None, None, :], flat.shape)
    key = (warp[on].astype(np.int64) * (int(group.max()) + 1) + grp[on]) * (1 << 40) + off[on] // SECTOR
    sectors = int(np.unique(key).size)
    return {"sectors": sectors, "lane_axis": lane_axis, "contiguous_axis": contiguous_axis(offsets, mask, elem_bytes)}


def contiguous_axis(offsets, mask, elem_bytes: int):
    """The tile axis along which most neighbouring (both unmasked) elements are one element apart."""
    import numpy as np

    best, best_frac = None, 0.0
    for axis in range(offsets.ndim):
        if offsets.shape[axis] < 2:
            continue
        d = np.diff(offsets, axis=axis)
        both = np.logical_and(
            np.take(mask, range(1, offsets.shape[axis]), axis=axis),
            np.take(mask, range(0, offsets.shape[axis] - 1), axis=axis),
        )
        if not both.any():
            continue
        frac = float((d[both] == elem_bytes).mean())
        if frac > best_frac:
            best, best_frac = axis, frac
    return best if best_frac >= 0.5 else None
