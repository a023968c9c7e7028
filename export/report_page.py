"""The export report for a person: a Markdown and an HTML page from ``ExportResult.to_dict()``.

``--report R.json`` writes the JSON (for machines) and, beside it, ``R.md`` and ``R.html`` (for people):
the verdict and what was compared with what; what was adapted, left or wrapped, and why; parity per
output and per block at each verified size, as bars of the max abs error on a log scale with the
tolerance marked; op counts; timings per stage. Both pages are self-contained (inline CSS and SVG, no
script, nothing fetched). The dict is read defensively: a field that is missing, null or of another
shape is shown as "-" or left out, never an error, so older and newer reports render alike.

Every file is written atomically (:func:`attn_export.files.write_text`).
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

from attn_export.files import write_text

#: The log10 range of the error bars: errors at or below 10**LOG_MIN draw as an empty bar.
LOG_MIN, LOG_MAX = -10.0, 1.0
#: Width of a Unicode bar in characters.
BAR_CHARS = 24
_EIGHTHS = " ▏▎▍▌▋▊▉█"


def _get(d, *keys, default=None):
    """``d[k0][k1]...`` or ``default`` where anything on the way is missing or not a dict."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return default if d is None else d


def _list(v) -> list:
    return v if isinstance(v, list) else []


def _dict(v) -> dict:
    return v if isinstance(v, dict) else {}


def _num(v, fmt: str = ".2e") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else "-"


def _frac(err) -> float:
    """Where ``err`` sits on the bars' log scale, 0..1."""
    if not isinstance(err, (int, float)) or isinstance(err, bool) or math.isnan(err):
        return 0.0
    if err <= 0:
        return 0.0
    if math.isinf(err):
        return 1.0
    return min(1.0, max(0.0, (math.log10(err) - LOG_MIN) / (LOG_MAX - LOG_MIN)))


def unicode_bar(frac: float, width: int = BAR_CHARS, mark: float | None = None) -> str:
    """A bar of ``frac`` (0..1) of ``width`` characters in eighths; ``mark`` (0..1) puts a ``┃`` there."""
    eighths = round(max(0.0, min(1.0, frac)) * width * 8)
    cells = list("█" * (eighths // 8) + (_EIGHTHS[eighths % 8] if eighths % 8 else ""))
    cells += [" "] * (width - len(cells))
    if mark is not None:
        i = min(width - 1, int(max(0.0, min(1.0, mark)) * width))
        cells[i] = "┃"
    return "".join(cells)


def _size(c: dict) -> str:
    h, w = c.get("height"), c.get("width")
    return f"{h}x{w}" if h is not None and w is not None else "-"


def _checks(ver: dict) -> list[tuple[str, dict]]:
    """``(kind, check)`` for every check of the verification: outputs, blocks, the adapted copy."""
    out = []
    for kind in ("outputs", "blocks", "adapted"):
        out += [
            (kind[:-1] if kind != "adapted" else "adapted copy", c) for c in _list(ver.get(kind)) if isinstance(c, dict)
        ]
    return out


def _verdict(d: dict) -> str:
    ver = _dict(d.get("verification"))
    if not ver:
        return "not verified"
    return "PASSED" if ver.get("passed") else "FAILED"


def _facts(d: dict) -> list[tuple[str, str]]:
    """The model's facts, one ``(label, text)`` each, those present only."""
    facts = []
    inputs = [i for i in _list(d.get("inputs")) if isinstance(i, dict)] or (
        [d["input"]] if isinstance(d.get("input"), dict) else []
    )
    for i in inputs:
        shape = ", ".join(str(s) for s in _list(i.get("shape")))
        facts.append(("input", f"{i.get('name', '?')} ({shape})"))
    if _list(d.get("outputs")):
        facts.append(("outputs", ", ".join(map(str, d["outputs"]))))
    b = _dict(d.get("batch"))
    if b:
        facts.append(("batch", f"{b.get('min', '-')} : {b.get('opt', '-')} : {b.get('max', '-')} (min : opt : max)"))
    hw = _dict(d.get("dynamic_hw"))
    if hw:
        facts.append(("height, width", f"{hw.get('min', '-')} : {hw.get('opt', '-')} : {hw.get('max', '-')} (dynamic)"))
    if d.get("dynamic_hw_refused"):
        facts.append(("height, width", f"static: {d['dynamic_hw_refused']}"))
    mode = _dict(d.get("mode"))
    if mode:
        text = f"given in {mode.get('given', '?')} mode, exported in {mode.get('exported', '?')} mode"
        facts.append(("mode", text + (f": {mode['note']}" if mode.get("note") else "")))
    for key, label in (("target", "target"), ("opset", "opset"), ("nodes", "nodes")):
        if d.get(key) is not None:
            facts.append((label, str(d[key])))
    if isinstance(d.get("size_bytes"), (int, float)) and d["size_bytes"]:
        facts.append(("size", f"{d['size_bytes'] / 1e6:.2f} MB"))
    if d.get("path"):
        facts.append(("graph", str(d["path"])))
    ver = _dict(d.get("verification"))
    if ver.get("backend"):
        facts.append(("verified on", f"{ver['backend']} (seed {ver.get('seed', '-')})"))
    for what, text in _dict(ver.get("compared")).items():
        facts.append((f"compared ({what})", str(text)))
    for p in _list(ver.get("problems")):
        facts.append(("problem", str(p)))
    if ver.get("first_divergent_block"):
        facts.append(("first block to diverge", str(ver["first_divergent_block"])))
    return facts


def _tol(c: dict) -> str:
    return f"{_num(c.get('atol'), 'g')} + {_num(c.get('rtol'), 'g')}·|ref|"


def _atol_mark(c: dict) -> float | None:
    a = c.get("atol")
    return _frac(a) if isinstance(a, (int, float)) and a > 0 else None


def _ok(c: dict) -> str:
    return "ok" if c.get("passed") else "FAIL"


def _rows_ops(d: dict) -> list[tuple[str, int]]:
    ops = [(str(k), v) for k, v in _dict(d.get("ops")).items() if isinstance(v, int)]
    return sorted(ops, key=lambda kv: -kv[1])


def _rows_timings(d: dict) -> list[tuple[str, float]]:
    return [(str(k), float(v)) for k, v in _dict(d.get("timings_s")).items() if isinstance(v, (int, float))]


# --- Markdown -------------------------------------------------------------------------------------------------
def _md(text) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(head: Iterable[str], rows: Iterable[Iterable]) -> list[str]:
    head = list(head)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return lines


def render_markdown(d: dict) -> str:
    """The report as Markdown (tables, Unicode bars)."""
    d = _dict(d)
    lines = [f"# attn-export report: {_md(d.get('path') or 'no graph written')}", ""]
    lines += [f"**Verification {_verdict(d)}**", ""]
    lines += [*_md_table(("", ""), _facts(d)), ""]

    adapted = [r for r in _list(d.get("adapted")) if isinstance(r, dict)]
    lines += ["## Adapted modules", ""]
    if adapted:
        rows = [
            (
                r.get("path") or "<model>",
                r.get("foreign", "?"),
                r.get("action", "?"),
                r.get("adapter", ""),
                _num(r.get("max_abs_error")),
                r.get("reason", ""),
            )
            for r in adapted
        ]
        lines += _md_table(("module", "class", "action", "recognised as", "float64 error", "why"), rows)
    else:
        lines.append("No foreign module was recognised; the model was exported as it is.")
    lines.append("")

    ver = _dict(d.get("verification"))
    checks = _checks(ver)
    lines += ["## Parity", ""]
    if checks:
        lines.append(
            f"Max abs error per check on a log scale from 1e{LOG_MIN:.0f} to 1e{LOG_MAX:.0f}; `┃` marks atol. "
            "A check passes when every element is within atol + rtol·|ref|."
        )
        lines.append("")
        rows = [
            (
                kind,
                c.get("name", "?"),
                c.get("batch", "-"),
                _size(c),
                _num(c.get("max_abs")),
                _num(c.get("max_rel")),
                _tol(c),
                "`" + unicode_bar(_frac(c.get("max_abs")), mark=_atol_mark(c)) + "`",
                _ok(c),
            )
            for kind, c in checks
        ]
        lines += _md_table(
            ("kind", "check", "batch", "size", "max abs", "max rel", "tolerance", "error", "result"), rows
        )
        sizes = [s for s in _list(ver.get("sizes")) if isinstance(s, list) and len(s) == 3 and s[1] is not None]
        if sizes:
            lines += ["", "Verified sizes: " + "; ".join(f"batch {b} at {h}x{w}" for b, h, w in sizes)]
    else:
        lines.append("Not verified.")
    lines.append("")

    ops = _rows_ops(d)
    lines += ["## Ops", ""]
    if ops:
        top = max(n for _, n in ops) or 1
        lines += _md_table(("op", "count", ""), [(k, n, "`" + unicode_bar(n / top, 16) + "`") for k, n in ops])
    plugins = _dict(d.get("plugins"))
    if plugins:
        lines += ["", "TensorRT plugin nodes: " + ", ".join(f"{k} x{v}" for k, v in plugins.items())]
    lines.append("")

    timings = _rows_timings(d)
    lines += ["## Timings", ""]
    if timings:
        top = max(s for _, s in timings) or 1.0
        rows = [(k, f"{s:.2f}", "`" + unicode_bar(s / top, 16) + "`") for k, s in timings]
        lines += _md_table(("stage", "seconds", ""), rows)
    lines.append("")
    return "\n".join(lines)


# --- HTML -------------------------------------------------------------------------------------------------------
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#17692c;font-weight:600}.fail{color:#b00020;font-weight:600}.verdict{font-size:1.3em}
svg{display:block}code{font-size:12px}
"""


def _e(v) -> str:
    return html.escape(str(v), quote=True)


def _svg_bar(frac: float, mark: float | None, passed: bool, width: int = 220, height: int = 14) -> str:
    fill = "#3b9a57" if passed else "#c62828"
    parts = [
        f'<svg width="{width}" height="{height}" role="img" aria-label="error bar">',
        f'<rect x="0" y="2" width="{width}" height="{height - 4}" fill="#eee"/>',
        f'<rect x="0" y="2" width="{frac * width:.1f}" height="{height - 4}" fill="{fill}"/>',
    ]
    if mark is not None:
        x = mark * width
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="0" y2="{height}" stroke="#222" stroke-width="2"/>')
    parts.append("</svg>")
    return "".join(parts)


def _html_table(head: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    """``rows`` hold HTML already (escape text with :func:`_e`); a cell starting with ``\\x00n`` is numeric."""
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        cells = [f'<td class="n">{c[2:]}</td>' if c.startswith("\x00n") else f"<td>{c}</td>" for c in row]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _n(text: str) -> str:
    return "\x00n" + text


def render_html(d: dict) -> str:
    """The report as one self-contained HTML page (inline CSS and SVG bars; no script, no link out)."""
    d = _dict(d)
    verdict = _verdict(d)
    cls = "ok" if verdict == "PASSED" else "fail"
    body = [f"<h1>attn-export report: {_e(d.get('path') or 'no graph written')}</h1>"]
    body.append(f'<p class="verdict">Verification <span class="{cls}">{_e(verdict)}</span></p>')
    body.append(_html_table(("", ""), [(_e(k), _e(v)) for k, v in _facts(d)]))

    body.append("<h2>Adapted modules</h2>")
    adapted = [r for r in _list(d.get("adapted")) if isinstance(r, dict)]
    if adapted:
        rows = [
            (
                f"<code>{_e(r.get('path') or '<model>')}</code>",
                _e(r.get("foreign", "?")),
                f'<span class="{"ok" if r.get("action") == "adapted" else ""}">{_e(r.get("action", "?"))}</span>',
                _e(r.get("adapter", "")),
                _n(_e(_num(r.get("max_abs_error")))),
                _e(r.get("reason", "")),
            )
            for r in adapted
        ]
        body.append(_html_table(("module", "class", "action", "recognised as", "float64 error", "why"), rows))
    else:
        body.append("<p>No foreign module was recognised; the model was exported as it is.</p>")

    body.append("<h2>Parity</h2>")
    ver = _dict(d.get("verification"))
    checks = _checks(ver)
    if checks:
        body.append(
            f"<p>Max abs error per check on a log scale from 1e{LOG_MIN:.0f} to 1e{LOG_MAX:.0f}; the black line marks "
            "atol. A check passes when every element is within atol + rtol·|ref|.</p>"
        )
        rows = [
            (
                _e(kind),
                f"<code>{_e(c.get('name', '?'))}</code>",
                _n(_e(c.get("batch", "-"))),
                _e(_size(c)),
                _n(_e(_num(c.get("max_abs")))),
                _n(_e(_num(c.get("max_rel")))),
                _e(_tol(c)),
                _svg_bar(_frac(c.get("max_abs")), _atol_mark(c), bool(c.get("passed"))),
                f'<span class="{"ok" if c.get("passed") else "fail"}">{_ok(c)}</span>'
                + (f"<br>{_e(c['problem'])}" if c.get("problem") else ""),
            )
            for kind, c in checks
        ]
        body.append(
            _html_table(("kind", "check", "batch", "size", "max abs", "max rel", "tolerance", "error", "result"), rows)
        )
    else:
        body.append("<p>Not verified.</p>")

    body.append("<h2>Ops</h2>")
    ops = _rows_ops(d)
    if ops:
        top = max(n for _, n in ops) or 1
        rows = [(_e(k), _n(str(n)), _svg_bar(n / top, None, True, width=160)) for k, n in ops]
        body.append(_html_table(("op", "count", ""), rows))
    plugins = _dict(d.get("plugins"))
    if plugins:
        body.append("<p>TensorRT plugin nodes: " + _e(", ".join(f"{k} x{v}" for k, v in plugins.items())) + "</p>")

    body.append("<h2>Timings</h2>")
    timings = _rows_timings(d)
    if timings:
        top = max(s for _, s in timings) or 1.0
        rows = [(_e(k), _n(f"{s:.2f}"), _svg_bar(s / top, None, True, width=160)) for k, s in timings]
        body.append(_html_table(("stage", "seconds", ""), rows))
    title = _e(f"attn-export report: {Path(str(d.get('path') or 'model')).name}")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def page_paths(report: str | os.PathLike) -> tuple[Path, Path]:
    """The Markdown and HTML pages beside the JSON report: ``R.json`` -> ``R.md``, ``R.html``; a report
    named otherwise keeps its whole name (``R.txt`` -> ``R.txt.md``), so a page never overwrites it."""
    report = Path(report)
    base = report.with_suffix("") if report.suffix.lower() == ".json" else report
    return base.with_name(base.name + ".md"), base.with_name(base.name + ".html")


def write_report(report: str | os.PathLike, data: dict) -> list[Path]:
    """Write ``data`` (``ExportResult.to_dict()``) as the JSON report at ``report`` and, beside it, the
    Markdown and HTML pages (:func:`page_paths`), each atomically; returns the paths written."""
    report = Path(report)
    md, page = page_paths(report)
    texts = [json.dumps(data, indent=2), render_markdown(data), render_html(data)]  # all made before any is written
    for path, text in zip((report, md, page), texts, strict=True):
        write_text(path, text)
    return [report, md, page]
