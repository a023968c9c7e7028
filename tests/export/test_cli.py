"""The ``attn-export`` command line, run in-process through :func:`attn_export.cli.main`.

Every block alone and the MixedNet are written as checkpoints (randomised weights, BatchNorm that is
not the identity), exported with a dynamic batch and verified; the ONNX graph is then run by
onnxruntime at a batch size the verification did not use. Bad inputs must give exit code 2, a message
on stderr that names the problem, and no output file (nor a temporary one); a verification failure
gives exit code 1 and keeps the graph only as ``*.unverified.onnx``. One test runs the installed
console script in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnxscript import opset18 as op
from torch import nn
from weights import randomize_

import attn_export.plugins as plugins
from attn_export import __version__
from attn_export.blocks import GSoPBlock
from attn_export.cli import main
from attn_export.export import load_model, save_checkpoint
from attn_export.export.checkpoint import FORMAT, architectures

# arch -> (constructor kwargs, input shape without the batch); small enough to export in seconds.
CASES: dict[str, tuple[dict, tuple[int, ...]]] = {
    "Involution2d": ({"channels": 16, "kernel_size": 7, "group_channels": 8}, (16, 16, 16)),
    "ODConv2d": ({"in_planes": 16, "out_planes": 32, "kernel_size": 3, "padding": 1, "kernel_num": 4}, (16, 16, 16)),
    "OutlookAttention": ({"dim": 32, "num_heads": 2}, (16, 16, 32)),
    "GSoPBlock": ({"in_channels": 32, "mid_channels": 16}, (32, 16, 16)),
    "SKConv": ({"channels": 32, "groups": 8, "min_dim": 16}, (32, 16, 16)),
    "MixedNet": ({"num_classes": 10, "width": 16}, (3, 32, 32)),
}
MIXED_BLOCKS = ["involution", "odconv", "skconv", "outlook.block", "gsop"]


def write_checkpoint(path: Path, arch: str, seed: int = 0) -> Path:
    kwargs, shape = CASES[arch]
    model = randomize_(architectures()[arch](**kwargs), seed)
    return save_checkpoint(path, model, arch, kwargs, shape)


def leftovers(folder: Path) -> list[str]:
    """Output or temporary files an aborted export must not leave behind."""
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".onnx" or p.name.startswith(".") or ".tmp" in p.name)


def batch_dim(value_info) -> onnx.TensorShapeProto.Dimension:
    return value_info.type.tensor_type.shape.dim[0]


def run_ort(path: Path, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


# --- 1. every block alone, and the MixedNet ------------------------------------------------------------
@pytest.mark.parametrize("arch", list(CASES))
def test_export_block_checkpoint(arch, tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / f"{arch}.pt", arch)
    report_path = tmp_path / "R.json"
    rc = main([str(ckpt), "--batch", "1:3:8", "--report", str(report_path)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    onnx_path = tmp_path / f"{arch}.onnx"
    assert onnx_path.is_file()
    assert "verification PASSED" in out
    assert f"exported {onnx_path}" in out

    report = json.loads(report_path.read_text())
    assert report["path"] == str(onnx_path)
    assert report["input"]["shape"] == ["batch", *CASES[arch][1]]
    ver = report["verification"]
    assert ver["passed"] is True
    assert ver["batches"] == [1, 3, 8]
    assert sorted({c["batch"] for c in ver["outputs"]}) == [1, 3, 8]
    assert all(c["passed"] for c in ver["outputs"])
    if arch == "MixedNet":
        assert report["blocks"] == MIXED_BLOCKS
        assert {c["name"] for c in ver["blocks"]} == set(MIXED_BLOCKS)
        assert len(ver["blocks"]) == 3 * len(MIXED_BLOCKS)
        assert all(c["passed"] for c in ver["blocks"])
        assert ver["first_divergent_block"] is None
        for name in MIXED_BLOCKS:
            assert f"block {name}" in out
    else:
        assert report["blocks"] == [""]  # the block is the model itself

    model = onnx.load(onnx_path)
    onnx.checker.check_model(model, full_check=True)
    (inp,) = model.graph.input
    assert batch_dim(inp).dim_param, "the batch axis must be symbolic"
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == list(CASES[arch][1])
    assert all(batch_dim(o).dim_param for o in model.graph.output)
    ops = {n.op_type for n in model.graph.node} | {n.op_type for f in model.functions for n in f.node}
    assert "Col2Im" not in ops
    assert sum(report["ops"].values()) == report["nodes"] == len(model.graph.node)

    # A batch size the verification did not use, against torch eager on the checkpoint's model.
    x = np.random.default_rng(1).standard_normal((5, *CASES[arch][1])).astype(np.float32)
    (got,) = run_ort(onnx_path, x)
    torch_model = load_model(ckpt).model.eval()
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(x)).numpy()
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


# --- 2. options ----------------------------------------------------------------------------------------
@pytest.fixture
def gsop_ckpt(tmp_path) -> Path:
    return write_checkpoint(tmp_path / "models" / "gsop.pt", "GSoPBlock")


def test_default_output_is_next_to_the_model(gsop_ckpt, capsys):
    assert main([str(gsop_ckpt), "--batch", "1:2:2", "-q"]) == 0
    assert sorted(p.name for p in gsop_ckpt.parent.iterdir()) == ["gsop.onnx", "gsop.pt"]
    assert "exported" in capsys.readouterr().out


def test_output_option_and_no_verify(gsop_ckpt, tmp_path, capsys):
    out_dir = tmp_path / "elsewhere"
    out_dir.mkdir()
    target = out_dir / "named.onnx"
    report = tmp_path / "r.json"
    rc = main([str(gsop_ckpt), "-o", str(target), "--no-verify", "--report", str(report)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert target.is_file()
    assert not gsop_ckpt.with_suffix(".onnx").exists()
    assert "verification" not in out and "check" not in out and "FAIL" not in out
    assert f"exported {target}" in out
    data = json.loads(report.read_text())
    assert data["verification"] is None
    assert data["path"] == str(target)


def test_input_shape_overrides_the_checkpoint(gsop_ckpt, tmp_path, capsys):
    report = tmp_path / "r.json"
    rc = main([str(gsop_ckpt), "--input-shape", "32,8,12", "--batch", "1:2:3", "--report", str(report), "-q"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads(report.read_text())["input"]["shape"] == ["batch", 32, 8, 12]
    (inp,) = onnx.load(gsop_ckpt.with_suffix(".onnx")).graph.input
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == [32, 8, 12]


def test_seed_is_recorded(gsop_ckpt, tmp_path, capsys):
    report = tmp_path / "r.json"
    assert main([str(gsop_ckpt), "--batch", "1:1:2", "--seed", "1234", "--report", str(report)]) == 0
    assert json.loads(report.read_text())["verification"]["seed"] == 1234
    assert "seed 1234" in capsys.readouterr().out


def test_quiet_prints_no_progress(gsop_ckpt, capsys):
    assert main([str(gsop_ckpt), "--batch", "1:1:2", "-q"]) == 0
    out, err = capsys.readouterr()
    assert "[load]" not in err and "[export]" not in err
    assert "exported" in out


# --- 3. bad inputs ---------------------------------------------------------------------------------------
def expect_error(capsys, argv: list[str], folder: Path, *needles: str) -> str:
    """Run the CLI, expect exit 2 with every needle in the stderr message and nothing written."""
    before = set(folder.iterdir())
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert "attn-export: error:" in err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert leftovers(folder) == [], leftovers(folder)
    assert set(folder.iterdir()) == before
    return err


def test_missing_file(tmp_path, capsys):
    expect_error(capsys, [str(tmp_path / "nope.pt")], tmp_path, "nope.pt", "no such file")


def test_directory(tmp_path, capsys):
    (tmp_path / "dir.pt").mkdir()
    expect_error(capsys, [str(tmp_path / "dir.pt")], tmp_path, "is a directory")


def test_text_file(tmp_path, capsys):
    bad = tmp_path / "notes.pt"
    bad.write_text("these are notes, not a checkpoint\n")
    expect_error(capsys, [str(bad), "--input-shape", "3,8,8"], tmp_path, "notes.pt", "not a PyTorch checkpoint")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes(tmp_path, capsys, seed):
    bad = tmp_path / "noise.pt"
    bad.write_bytes(np.random.default_rng(seed).bytes(4096))
    expect_error(capsys, [str(bad), "--input-shape", "3,8,8"], tmp_path, "noise.pt", "not a PyTorch checkpoint")


def test_empty_file(tmp_path, capsys):
    bad = tmp_path / "empty.pt"
    bad.touch()
    expect_error(capsys, [str(bad), "--input-shape", "3,8,8"], tmp_path, "empty.pt", "not a PyTorch checkpoint")


def test_state_dict_only(tmp_path, capsys):
    sd = tmp_path / "weights.pt"
    torch.save(GSoPBlock(16, mid_channels=8).state_dict(), sd)
    expect_error(capsys, [str(sd), "--input-shape", "16,8,8"], tmp_path, "weights.pt", "state dict")


def test_nested_state_dict(tmp_path, capsys):
    sd = tmp_path / "weights.pt"
    torch.save({"state_dict": GSoPBlock(16, mid_channels=8).state_dict(), "epoch": 3}, sd)
    expect_error(capsys, [str(sd), "--input-shape", "16,8,8"], tmp_path, "state dict", "save_checkpoint")


def test_unknown_architecture(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "m.pt", "GSoPBlock")
    payload = torch.load(ckpt, weights_only=True)
    payload["arch"] = "ResNet50"
    torch.save(payload, ckpt)
    expect_error(capsys, [str(ckpt)], tmp_path, "unknown architecture", "ResNet50")


def test_checkpoint_without_input_shape(tmp_path, capsys):
    kwargs, _ = CASES["GSoPBlock"]
    model = randomize_(GSoPBlock(**kwargs))
    ckpt = tmp_path / "noshape.pt"
    torch.save(
        {
            "format": FORMAT,
            "arch": "GSoPBlock",
            "kwargs": kwargs,
            "input_shape": None,
            "state_dict": model.state_dict(),
            "meta": {},
        },
        ckpt,
    )
    expect_error(capsys, [str(ckpt)], tmp_path, "no input shape", "--input-shape")
    # ... and with the shape given, it exports.
    assert main([str(ckpt), "--input-shape", "32,8,8", "--batch", "1:1:2", "-q"]) == 0
    assert ckpt.with_suffix(".onnx").is_file()


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--input-shape", "a,b"], ["--input-shape", "'a,b'"]),
        (["--input-shape", "32,0,8"], ["--input-shape", "positive"]),
        (["--batch", "8:1:2"], ["--batch", "8:1:2"]),
        (["--batch", "0:1:2"], ["--batch"]),
        (["--batch", "one"], ["--batch", "one"]),
        (["--opset", "17"], ["--opset", "18", "17"]),
        (["--fp16"], ["--fp16", "--trt"]),
        (["--bf16"], ["--bf16", "--trt"]),
        (["--trt", "--fp16", "--bf16"], ["--fp16", "--bf16", "choose one"]),
        (["--workspace", "2"], ["--workspace", "--trt"]),
    ],
)
def test_bad_options(tmp_path, capsys, args, needles):
    ckpt = write_checkpoint(tmp_path / "m.pt", "GSoPBlock")
    expect_error(capsys, [str(ckpt), *args], tmp_path, *needles)


def test_output_folder_missing(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "m.pt", "GSoPBlock")
    expect_error(capsys, [str(ckpt), "-o", str(tmp_path / "no" / "such" / "out.onnx")], tmp_path, "does not exist")


def test_output_is_a_directory(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "m.pt", "GSoPBlock")
    (tmp_path / "out.onnx").mkdir()
    before = set(tmp_path.iterdir())
    assert main([str(ckpt), "-o", str(tmp_path / "out.onnx")]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert set(tmp_path.iterdir()) == before


def test_argparse_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "m.pt"), "--opset", "eighteen"])
    assert exc.value.code == 2
    assert "--opset" in capsys.readouterr().err


# Pickled models. The classes live at module level so that pickle can find them again.
class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), GSoPBlock(16, mid_channels=8))

    def forward(self, x):
        return self.body(x)


class FrozenBatch(nn.Module):
    """Reshapes to a constant batch of 4: runs at batch 4 only."""

    def forward(self, x):
        return x.view(4, x[0].numel())


class ValueBranch(nn.Module):
    """Python control flow on tensor values: torch.export cannot trace it."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


class Wrapper(nn.Module):
    def __init__(self, bad: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), bad)

    def forward(self, x):
        return self.body(x)


def test_pickled_module_needs_trust(tmp_path, capsys):
    path = tmp_path / "pickled.pt"
    torch.save(randomize_(TinyNet()), path)
    err = expect_error(capsys, [str(path), "--input-shape", "16,8,8"], tmp_path, "--trust-checkpoint", "TinyNet")
    assert "runs code" in err


def test_pickled_module_with_trust(tmp_path, capsys):
    path = tmp_path / "pickled.pt"
    model = randomize_(TinyNet()).eval()
    torch.save(model, path)
    report = tmp_path / "r.json"
    argv = [str(path), "--trust-checkpoint", "--input-shape", "16,8,8", "--batch", "1:2:3", "--report", str(report)]
    rc = main(argv)
    assert rc == 0, capsys.readouterr().err
    data = json.loads(report.read_text())
    assert data["verification"]["passed"] is True
    assert data["blocks"] == ["body.2"]
    x = np.random.default_rng(2).standard_normal((5, 16, 8, 8)).astype(np.float32)
    (got,) = run_ort(tmp_path / "pickled.onnx", x)
    with torch.no_grad():
        np.testing.assert_allclose(got, model(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-4)


def test_ultralytics_style_dict_with_trust(tmp_path, capsys):
    path = tmp_path / "best.pt"
    torch.save({"model": randomize_(TinyNet()), "ema": None, "epoch": 10}, path)
    expect_error(capsys, [str(path), "--input-shape", "16,8,8"], tmp_path, "--trust-checkpoint", "TinyNet")
    rc = main([str(path), "--trust-checkpoint", "--input-shape", "16,8,8", "--batch", "1:1:2", "-q"])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "best.onnx").is_file()


class Note:
    """A plain object: the weights-only loader refuses it, so the file needs --trust-checkpoint."""


def test_pickled_non_module_with_trust(tmp_path, capsys):
    path = tmp_path / "thing.pt"
    torch.save({"model": "a string", "ema": None, "note": Note()}, path)
    expect_error(capsys, [str(path), "--trust-checkpoint", "--input-shape", "3,8,8"], tmp_path, "not an nn.Module")


@pytest.mark.parametrize(
    ("bad", "kind"),
    [(FrozenBatch(), "FrozenBatch"), (ValueBranch(), "ValueBranch")],
    ids=["frozen-batch", "data-dependent-branch"],
)
def test_export_failure_names_the_module(tmp_path, capsys, bad, kind):
    path = tmp_path / "broken.pt"
    torch.save(Wrapper(bad), path)
    argv = [str(path), "--trust-checkpoint", "--input-shape", "4,8,8", "--batch", "1:4:8"]
    expect_error(capsys, argv, tmp_path, "body.2", kind)


class NoSingleImages(nn.Module):
    """Exports (traced at a batch of 2) but refuses a batch of 1 in eager mode."""

    def forward(self, x):
        if not torch.compiler.is_exporting() and x.shape[0] == 1:
            raise ValueError("needs at least two images")
        return x * 2


def test_model_failing_at_a_verification_batch(tmp_path, capsys):
    path = tmp_path / "m.pt"
    torch.save(NoSingleImages(), path)
    argv = [str(path), "--trust-checkpoint", "--input-shape", "3,4,4", "--batch", "1:2:4"]
    expect_error(capsys, argv, tmp_path, "batch of 1", "needs at least two images")


def test_model_that_does_not_run(tmp_path, capsys):
    path = tmp_path / "m.pt"
    torch.save(TinyNet(), path)
    argv = [str(path), "--trust-checkpoint", "--input-shape", "3,8,8"]  # TinyNet wants 16 channels
    # the stage, and the user's batch (OPT of the default 1:1:32), not the batch of 2 the trace uses
    err = expect_error(capsys, argv, tmp_path, "run: the model does not run", "(1, 3, 8, 8)")
    assert "(2, 3, 8, 8)" not in err


# --- 4. a verification failure ------------------------------------------------------------------------
def test_verification_failure_names_the_first_divergent_block(tmp_path, capsys, monkeypatch):
    original = plugins.onnx_translation_table

    def broken_table(target: str = "ort") -> dict:
        table = dict(original(target))
        key = torch.ops.attn_export.dynamic_conv2d.default
        good = table[key]

        def doubled(*args, **kwargs):
            y = good(*args, **kwargs)
            return op.Add(y, y)  # twice the right answer

        table[key] = doubled
        return table

    calls = []

    def patched(target: str = "ort") -> dict:
        calls.append(target)
        return broken_table(target)

    monkeypatch.setattr(plugins, "onnx_translation_table", patched)

    ckpt = write_checkpoint(tmp_path / "mixed.pt", "MixedNet")
    out_path = tmp_path / "OUT.onnx"
    report = tmp_path / "r.json"
    rc = main([str(ckpt), "-o", str(out_path), "--batch", "1:2:3", "--seed", "7", "--report", str(report)])
    out, err = capsys.readouterr()
    assert calls, "export_onnx did not take the lowering table from attn_export.plugins"
    assert rc == 1, (out, err)
    assert not out_path.exists()
    assert (tmp_path / "OUT.unverified.onnx").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert "verification FAILED" in err and "OUT.onnx" in err
    assert "FAIL" in out
    assert "first block to diverge: odconv" in out
    # the blocks before it still agree
    lines = [ln for ln in out.splitlines() if ln.startswith("block involution")]
    assert lines and all(ln.endswith("ok") for ln in lines)
    assert any(ln.startswith("block odconv") and ln.endswith("FAIL") for ln in out.splitlines())

    data = json.loads(report.read_text())
    assert data["path"] is None
    assert data["verification"]["passed"] is False
    assert data["verification"]["first_divergent_block"] == "odconv"


# --- the installed console script ----------------------------------------------------------------------
def test_console_script_help_and_version():
    script = Path(sys.executable).with_name("attn-export")
    assert script.is_file(), f"{script} is not installed; pip install -e ."
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    helped = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: attn-export")
    for option in ("--input-shape", "--batch", "--trust-checkpoint", "--no-verify", "demo", "bench"):
        assert option in helped.stdout
    version = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120, env=env)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"attn-export {__version__}"


def test_trt_without_tensorrt_writes_the_verified_plugin_graph_and_says_what_is_missing(tmp_path, capsys):
    """--trt where TensorRT or a GPU is absent: the plugin graph is written and verified, then exit 3 with
    what is missing and the commands that build the engine elsewhere."""
    from attn_export.export.trt_build import check_trt_environment

    missing = check_trt_environment()
    if missing is None:
        pytest.skip("TensorRT and a GPU are present: the engine path is covered by the trt-marked tests")
    ckpt = write_checkpoint(tmp_path / "m.pt", "Involution2d")
    code = main([str(ckpt), "--trt", "--batch", "1:2:3", "-q"])
    out, err = capsys.readouterr()
    assert code == 3
    assert ckpt.with_suffix(".onnx").is_file() and not ckpt.with_suffix(".engine").exists()
    assert "verification PASSED" in out and "AttnExportInvolution2d 1" in out
    assert "TensorRT" in err and "--trt --batch 1:2:3" in err
    assert "trtexec --loadEngine=" in err and "trtexec --onnx=" in err


def test_trt_bf16_without_tensorrt_says_how_to_build_the_bf16_engine(tmp_path, capsys):
    """--trt --bf16 where TensorRT is absent: exit 3, and the command printed for another machine keeps
    --bf16 (the engine built there is the one asked for here)."""
    from attn_export.export.trt_build import check_trt_environment

    if check_trt_environment() is None:
        pytest.skip("TensorRT and a GPU are present: the engine path is covered by the trt-marked tests")
    ckpt = write_checkpoint(tmp_path / "m.pt", "GSoPBlock")
    code = main([str(ckpt), "--trt", "--bf16", "--target", "ort", "--batch", "1:1:2", "--no-verify", "-q"])
    err = capsys.readouterr().err
    assert code == 3
    assert "--trt --batch 1:1:2 --bf16" in err and "--fp16" not in err


def test_checkpoint_class_names_travel_into_the_onnx_metadata(tmp_path):
    kwargs, shape = CASES["GSoPBlock"]
    model = randomize_(architectures()["GSoPBlock"](**kwargs), 3)
    ckpt = save_checkpoint(tmp_path / "m.pt", model, "GSoPBlock", kwargs, shape, meta={"classes": ["a", "b"]})
    assert main([str(ckpt), "--batch", "1:1:2", "-q", "--no-verify"]) == 0
    props = {p.key: p.value for p in onnx.load(str(ckpt.with_suffix(".onnx"))).metadata_props}
    assert json.loads(props["classes"]) == ["a", "b"]
