"""``attn-export bench MODEL.pt``: the whole-model benchmark's fields, its parity gate, its arguments.

No timing is asserted (speed is measured by the command itself, not by tests)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from attn_export.bench import model_bench, upstream_models
from attn_export.bench import upstream as official
from attn_export.cli import main as cli_main

SHAPE = (16, 12, 12)


def small_model(seed: int = 0) -> nn.Module:
    """A stand-in user model: a conv, the official involution (adapted by the export), a head."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(SHAPE[0], 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        official.involution(16, 3, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )
    return upstream_models.calibrate_norms(model, SHAPE, seed=seed)


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "small.pt"
    torch.save(small_model(), path)
    return path


ARGS = ["--trust-checkpoint", "--input-shape", ",".join(map(str, SHAPE)), "--rounds", "2", "--min-sample", "0"]


def test_the_json_has_a_ratio_per_batch_and_the_heaviest_ops(saved, capsys):
    rc = cli_main(["bench", str(saved), *ARGS, "--batch", "1,3", "--top", "3", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["threads"] == 2 and out["input_shape"] == list(SHAPE) and out["rounds"] == 2
    assert out["export"]["verification_passed"] is True
    assert any("involution" in a for a in out["export"]["adapted"])
    assert [r["batch"] for r in out["batches"]] == [1, 3]
    graph_ops = out["export"]["ops"]
    for r in out["batches"]:
        assert r["status"] == "ok" and r["refused"] is None
        assert r["samples"] == 2
        assert r["parity_max_abs"] <= 1e-4
        assert r["eager_ms"] > 0 and r["ort_ms"] > 0
        assert r["ort_over_eager"] == pytest.approx(r["ort_ms"] / r["eager_ms"])
        assert r["target_met"] == (r["ort_over_eager"] <= model_bench.TARGET_RATIO)
        ops = r["heaviest_ops"]
        assert 1 <= len(ops) <= 3
        shares = [o["share"] for o in ops]
        assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
        for o in ops:  # op types of the exported graph (no more nodes than it has of that type), or ORT's own
            assert o["in_graph"] == (o["op_type"] in graph_ops)
            assert o["nodes"] >= 1 and (not o["in_graph"] or o["nodes"] <= graph_ops[o["op_type"]])
    assert "Intel" in out["env"]["machine"] or "AMD" in out["env"]["machine"] or out["env"]["machine"]


def test_the_text_report_prints_the_ratio_and_the_ops(saved, capsys):
    rc = cli_main(["bench", str(saved), *ARGS, "--batch", "2", "--top", "2"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "ORT/eager" in text and "heaviest ONNX ops at batch 2" in text
    row = next(line for line in text.splitlines() if line.split()[:1] == ["2"])
    assert row.count("x") >= 2 and "target" not in row and ("met" in row)


class Shifted:
    """A runner whose outputs are off by ``delta`` at the batch sizes in ``wrong_at`` (a wrong graph)."""

    def __init__(self, runner, wrong_at, delta=1e-2):
        self.runner, self.wrong_at, self.delta = runner, wrong_at, delta
        self.input_names, self.output_names, self.session = runner.input_names, runner.output_names, runner.session

    def infer(self, feeds):
        out = self.runner.infer(feeds)
        b = next(iter(feeds.values())).shape[0]
        return {k: v + self.delta if b in self.wrong_at else v for k, v in out.items()}


def test_the_parity_gate_refuses_a_wrong_graph(saved, monkeypatch, capsys):
    real = model_bench.make_runner
    monkeypatch.setattr(model_bench, "make_runner", lambda path, threads: Shifted(real(path, threads), {1, 3}))
    rc = cli_main(["bench", str(saved), *ARGS, "--batch", "1,3", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1
    for r in out["batches"]:
        assert r["status"] == "refused" and "wrong output" in r["refused"]
        assert r["parity_max_abs"] == pytest.approx(1e-2, rel=1e-3)
        assert r["eager_ms"] is None and r["ort_ms"] is None and r["ort_over_eager"] is None
        assert r["samples"] == 0 and r["heaviest_ops"] == []


def test_only_the_wrong_batch_is_refused_and_its_line_has_no_timing(saved, monkeypatch, capsys):
    real = model_bench.make_runner
    monkeypatch.setattr(model_bench, "make_runner", lambda path, threads: Shifted(real(path, threads), {3}, 5e-3))
    rc = cli_main(["bench", str(saved), *ARGS, "--batch", "1,3", "--top", "0"])
    text = capsys.readouterr().out
    assert rc == 1
    lines = {line.split()[0]: line for line in text.splitlines() if line.split()[:1] in (["1"], ["3"])}
    assert lines["3"].split()[1:4] == ["refused:", "wrong", "output:"]  # the reason where the times would be
    assert "met" not in lines["3"]
    assert "met" in lines["1"]


def test_parity_against_a_float64_loop():
    rng = np.random.default_rng(5)
    ref = [rng.standard_normal((3, 4)).astype(np.float32)]
    got = [ref[0] + np.float32(3e-5)]
    worst = max(abs(float(g) - float(r)) for g, r in zip(got[0].ravel(), ref[0].ravel(), strict=True))
    err, ok = model_bench.parity(got, ref)
    assert err == pytest.approx(worst) and ok
    bad = [ref[0].copy()]
    bad[0][1, 2] += 1.0
    assert model_bench.parity(bad, ref)[1] is False
    nan = [ref[0].copy()]
    nan[0][0, 0] = np.nan
    assert model_bench.parity(nan, ref) == (np.inf, False)
    assert model_bench.parity([ref[0][:2]], ref) == (np.inf, False)
    assert model_bench.parity(ref + ref, ref)[1] is False


def test_bad_input_is_one_line(tmp_path, saved, capsys):
    assert cli_main(["bench", str(saved), "--input-shape", "16,12,12"]) == 2  # pickled, not trusted
    assert "--trust-checkpoint" in capsys.readouterr().err
    assert cli_main(["bench", str(saved), "--trust-checkpoint"]) == 2  # a pickle carries no input shape
    assert "--input-shape" in capsys.readouterr().err
    assert cli_main(["bench", str(saved), *ARGS, "--session-config", "no-equals-sign"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert cli_main(["bench", str(tmp_path / "missing.pt")]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["bench", str(saved), "--batch", "0,2"])


@pytest.mark.parametrize(
    ("name", "published_millions"),
    [  # parameter counts published by timm and the papers (ImageNet heads)
        ("volo_d1_224", 26.6),
        ("skresnet18", 11.96),
        ("skresnext50_32x4d", 27.5),
        ("od_resnet18", 11.94),
        ("rednet26", 9.23),
    ],
)
def test_the_stand_ins_have_upstream_sizes(name, published_millions):
    model = upstream_models.MODELS[name]()
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert n == pytest.approx(published_millions, rel=5e-3)


def test_calibrated_norms_reproduce_the_batch_statistics():
    """After calibration, eval mode on the calibration batch equals train mode on it (float64 check)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))
    upstream_models.calibrate_norms(model, (3, 9, 9), batch=4, seed=3)
    g = torch.Generator().manual_seed(3)
    x = torch.randn((4, 3, 9, 9), generator=g)  # the calibration batch
    with torch.no_grad():
        got = model.double()(x.double())
        h = model[0](x.double())
        for bn, conv in ((model[1], model[3]), (model[4], None)):
            mean, var = h.mean((0, 2, 3), keepdim=True), h.var((0, 2, 3), unbiased=False, keepdim=True)
            h = (h - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
            if conv is not None:
                h = conv(torch.relu(h))
    # running_var is the unbiased variance: a relative difference of n / (n - 1) inside the sqrt
    assert torch.allclose(got, h, atol=2e-2, rtol=2e-2)
    assert not torch.allclose(got, torch.zeros_like(got))


def test_the_gate_uses_the_tolerance_asked_for(saved, monkeypatch, capsys):
    real = model_bench.make_runner
    monkeypatch.setattr(model_bench, "make_runner", lambda path, threads: Shifted(real(path, threads), {2}, 5e-3))
    rc = cli_main(["bench", str(saved), *ARGS, "--batch", "2", "--top", "0", "--atol", "1e-2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["tolerance"]["atol"] == 1e-2
    (r,) = out["batches"]
    assert r["status"] == "ok" and r["parity_max_abs"] == pytest.approx(5e-3, rel=1e-3) and r["samples"] == 2
