"""The human pages of ``--report R.json``: ``R.md`` and ``R.html`` beside the JSON.

Checked against the JSON they come from: every adapted module, every output and block at every
verified size, every op count and stage timing appears; bars are measured against an independent
computation of the log scale; the HTML is self-contained (no script, nothing fetched) and escapes what
the model names; odd or missing fields render; a failure while rendering writes no file at all.
"""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser

import pytest
import torch
from torch import nn
from weights import randomize_

from attn_export.bench import upstream as official
from attn_export.cli import main
from attn_export.export import report_page
from attn_export.export.report_page import page_paths, render_html, render_markdown, unicode_bar, write_report


class InvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.inv = official.involution(16, 3, 1)  # an official-layout module: adapted
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(self.inv(self.stem(x)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    model = randomize_(InvNet(), seed=3).eval()
    ckpt = folder / "inv.pt"
    torch.save(model, ckpt)
    report = folder / "R.json"
    argv = [str(ckpt), "--trust-checkpoint", "--input-shape", "3,12,12", "--batch", "1:2:3", "--report", str(report)]
    rc = main(argv)
    assert rc == 0
    data = json.loads(report.read_text())
    md, page = page_paths(report)
    return data, md.read_text(), page.read_text()


class _Tags(HTMLParser):
    VOID = frozenset({"meta", "br", "rect", "line"})

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.seen: list[tuple[str, dict]] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.seen.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.seen.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def test_pages_sit_beside_the_json():
    assert [p.name for p in page_paths("out/R.json")] == ["R.md", "R.html"]
    assert [p.name for p in page_paths("out/R.txt")] == ["R.txt.md", "R.txt.html"]  # never the report itself
    assert [p.name for p in page_paths("out/R.md")] == ["R.md.md", "R.md.html"]


def test_pages_hold_what_the_json_holds(exported):
    data, md, page = exported
    adapted = data["adapted"]
    assert [(r["path"], r["action"]) for r in adapted] == [("inv", "adapted")]
    ver = data["verification"]
    assert ver["passed"] and data["ops"] and data["timings_s"]
    for text in (md, page):
        assert "PASSED" in text
        assert "inv" in text and "involution" in text and "adapted" in text
        for stage in data["timings_s"]:
            assert stage in text
    # one Markdown row per check: outputs and blocks, each at every verified batch
    checks = [*ver["outputs"], *ver["blocks"]]
    assert sorted({c["batch"] for c in checks}) == [1, 2, 3]
    for c in checks:
        row = [
            line
            for line in md.splitlines()
            if line.startswith("| ") and f"| {c['name']} | {c['batch']} |" in line and f"{c['max_abs']:.2e}" in line
        ]
        assert len(row) >= 1, (c["name"], c["batch"])
    for op, n in data["ops"].items():
        assert re.search(rf"^\| {re.escape(op)} \| {n} \|", md, re.M), op
        assert re.search(rf"<td>{re.escape(op)}</td><td class=\"n\">{n}</td>", page), op


def test_html_is_self_contained_and_well_formed(exported):
    _, _, page = exported
    parser = _Tags()
    parser.feed(page)
    assert parser.errors == [] and parser.stack == []
    tags = {t for t, _ in parser.seen}
    assert "script" not in tags and "link" not in tags and "img" not in tags and "iframe" not in tags
    assert not any(k in ("src", "href") for _, attrs in parser.seen for k in attrs)
    assert "url(" not in page and "@import" not in page
    assert page.count("<svg") >= 3  # bars: errors, ops, timings


def _naive_bar(err: float, width: int) -> float:
    """Filled width, in characters, of an error bar on the log scale 1e-10 .. 1e1."""
    if err <= 0:
        return 0.0
    return width * min(1.0, max(0.0, (math.log10(err) + 10) / 11))


@pytest.mark.parametrize("err", [3.7e-9, 2.2e-7, 1e-4, 0.031, 7.5, 123.0])
def test_error_bars_follow_the_log_scale(err):
    bar = unicode_bar(report_page._frac(err), 24)
    eighths = {c: i for i, c in enumerate(" ▏▎▍▌▋▊▉█")}
    filled = sum(eighths[c] for c in bar) / 8
    assert len(bar) == 24
    assert abs(filled - _naive_bar(err, 24)) <= 1 / 16 + 1e-9


def test_atol_is_marked_where_it_falls_on_the_scale():
    bar = unicode_bar(report_page._frac(1e-6), 22, mark=report_page._frac(1e-4))
    assert bar.index("┃") == int(22 * 6 / 11)
    assert bar.index("┃") > len(bar.rstrip(" ┃").rstrip())  # the error stops before the tolerance


def test_a_failing_check_is_red_and_says_fail():
    check = dict(name="output", batch=2, shape=[2, 4], max_abs=0.5, max_rel=0.2, mean_abs=0.1, p99_abs=0.4)
    check.update(atol=1e-4, rtol=1e-3, passed=False, problem="")
    data = {"path": None, "verification": {"passed": False, "outputs": [check], "blocks": []}}
    page, md = render_html(data), render_markdown(data)
    assert "FAILED" in page and "FAILED" in md
    assert 'fill="#c62828"' in page and "| FAIL |" in md


def test_one_row_per_verified_size():
    rows = []
    for b, h in ((1, 32), (1, 48), (3, 64)):
        c = dict(name="output", batch=b, height=h, width=h, max_abs=1e-6 * h, max_rel=1e-5, atol=1e-4, rtol=1e-3)
        rows.append({**c, "passed": True})
    data = {"verification": {"passed": True, "outputs": rows, "sizes": [[1, 32, 32], [1, 48, 48], [3, 64, 64]]}}
    md = render_markdown(data)
    for b, h in ((1, 32), (1, 48), (3, 64)):
        assert f"| output | {b} | {h}x{h} | {1e-6 * h:.2e} |" in md
    assert "batch 1 at 48x48" in md


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"verification": None, "adapted": None, "ops": None, "timings_s": None},
        {"verification": {"outputs": [None, 3, {"name": "x"}]}, "adapted": ["?", {}], "ops": {"Conv": "many"}},
        {"input": "image", "batch": [1, 2], "mode": {"given": "train", "exported": "eval", "note": "Dropout off"}},
        {"timings_s": {"export": float("nan")}, "size_bytes": "big", "dynamic_hw": {"min": 32, "max": 64}},
    ],
)
def test_odd_or_missing_fields_render(data):
    md, page = render_markdown(data), render_html(data)
    assert md.startswith("# attn-export report") and page.startswith("<!DOCTYPE html>")
    if data.get("mode"):
        assert "given in train mode, exported in eval mode: Dropout off" in md


def test_names_from_the_model_are_escaped():
    rec = {"path": "m.<script>alert(1)</script>", "foreign": "A|B", "action": "left", "reason": "x | y & <z>"}
    data = {"adapted": [rec]}
    page, md = render_html(data), render_markdown(data)
    assert "<script>" not in page and "&lt;script&gt;" in page and "&amp; &lt;z&gt;" in page
    assert "A\\|B" in md and "x \\| y" in md


def test_a_rendering_failure_writes_no_file(tmp_path, monkeypatch):
    def broken(_):
        raise RuntimeError("boom")

    monkeypatch.setattr(report_page, "render_html", broken)
    with pytest.raises(RuntimeError):
        write_report(tmp_path / "R.json", {"path": "x.onnx"})
    assert list(tmp_path.iterdir()) == []


def test_write_report_replaces_old_pages_whole(tmp_path):
    (tmp_path / "R.md").write_text("old " * 10000)
    written = write_report(tmp_path / "R.json", {"path": "x.onnx", "ops": {"Conv": 2}})
    assert [p.name for p in written] == ["R.json", "R.md", "R.html"]
    assert "old" not in (tmp_path / "R.md").read_text()
    assert json.loads((tmp_path / "R.json").read_text())["ops"] == {"Conv": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["R.html", "R.json", "R.md"]  # no temporary left
