"""Engine building (:mod:`attn_export.export.trt_build`) and the TensorRT runner.

Without TensorRT (as here) this covers the parts that need none: the ``trtexec`` command lines, the
environment check, the metadata written beside an engine, the paths and the argument checks.
``@pytest.mark.trt`` tests build engines from exported graphs (``--target trt`` with the attn-export
plugins, and ``--target ort``) and compare :class:`TensorRTRunner` with PyTorch; they are skipped
where TensorRT or a GPU is absent.
"""

from __future__ import annotations

import json
import math
import shlex
import sys

import numpy as np
import pytest
import torch
from torch import nn

from attn_export import __version__
from attn_export.export import ExportError
from attn_export.export import trt_build as tb
from attn_export.export.profile import profile_shapes
from attn_export.export.trt_precision import low_graph_path_for
from attn_export.files import write_bytes
from attn_export.plugins import trt as trt_plugins
from attn_export.runtime.engine import ENGINE_FORMAT, metadata_path_for, read_engine_metadata, write_engine_metadata


# ------------------------------------------------------------------------------------------ trtexec
def _argv(cmd: str) -> list[str]:
    return shlex.split(cmd)


def test_trtexec_command_builds_the_same_profile():
    cmd = tb.trtexec_command("m.onnx", "m.engine", "input", (3, 32, 48), (1, 4, 16), tensorrt_major=10)
    argv = _argv(cmd)
    assert argv[0] == "trtexec"
    assert "--onnx=m.onnx" in argv and "--saveEngine=m.engine" in argv
    assert "--minShapes=input:1x3x32x48" in argv
    assert "--optShapes=input:4x3x32x48" in argv
    assert "--maxShapes=input:16x3x32x48" in argv
    assert "--timingCacheFile=m.timing.cache" in argv  # the cache build_engine keeps beside the engine
    assert "--memPoolSize=workspace:4096M" in argv
    assert "--fp16" not in argv and "--noTF32" in argv  # fp32 means IEEE fp32, as build_engine does
    assert not any(a.startswith("--dynamicPlugins") for a in argv)


def test_trtexec_command_options():
    cmd = tb.trtexec_command(
        "in dir/m.onnx",
        "out dir/m.plan",
        "images",
        [3, 8, 8],
        [2, 2, 2],
        fp16=True,
        workspace_gb=0.5,
        timing_cache="caches/shared.cache",
        plugin_libraries=["/opt/libfoo.so"],
        tensorrt_major=10,
    )
    argv = _argv(cmd)  # paths with spaces survive the shell
    assert "--onnx=in dir/m.onnx" in argv and "--saveEngine=out dir/m.plan" in argv
    assert "--minShapes=images:2x3x8x8" in argv and "--maxShapes=images:2x3x8x8" in argv
    assert "--fp16" in argv and "--noTF32" in argv  # fp16 builds keep their fp32 layers IEEE fp32 too
    assert "--memPoolSize=workspace:512M" in argv
    assert "--timingCacheFile=caches/shared.cache" in argv
    assert "--dynamicPlugins=/opt/libfoo.so" in argv
    assert "--memPoolSize" not in " ".join(_argv(tb.trtexec_command("a", "b", "x", (1,), (1, 1, 1), workspace_gb=None)))


def test_trtexec_command_on_tensorrt_11():
    argv = _argv(tb.trtexec_command("m.onnx", "m.engine", "input", (3, 8, 8), tensorrt_major=11))
    assert "--noTF32" in argv and "--fp16" not in argv  # TensorRT 11 keeps TF32 (builder flag and trtexec)
    assert "--noTF32" not in _argv(tb.trtexec_command("m", "e", "input", (3, 8, 8), tensorrt_major=11, tf32=True))
    for flag in ("fp16", "bf16"):
        with pytest.raises(ValueError, match=f"TensorRT 11 removed --{flag}.*precision_graph"):
            tb.trtexec_command("m.onnx", "m.engine", "input", (3, 8, 8), tensorrt_major=11, **{flag: True})


def test_trtexec_command_with_layer_precisions_on_tensorrt_10():
    spec = ["--precisionConstraints=obey", "--layerPrecisions=a:fp32", "--layerOutputTypes=a:fp32"]
    argv = _argv(
        tb.trtexec_command("m.onnx", "e", "input", (3, 8, 8), bf16=True, layer_precisions=spec, tensorrt_major=10)
    )
    assert "--bf16" in argv and all(a in argv for a in spec) and "--noTF32" in argv
    with pytest.raises(ValueError, match="fp16 or bf16 builds"):
        tb.trtexec_command("m.onnx", "e", "input", (3, 8, 8), layer_precisions=spec, tensorrt_major=10)


def test_trtexec_run_command():
    argv = _argv(tb.trtexec_run_command("out/m.engine", "input", (3, 32, 32), 8))
    assert argv == ["trtexec", "--loadEngine=out/m.engine", "--shapes=input:8x3x32x32"]


@pytest.mark.parametrize("batch", [(0, 1, 2), (4, 2, 8), (1, 2), (1, 8, 4)])
def test_bad_batches_are_rejected(batch):
    with pytest.raises(ExportError, match="MIN <= OPT <= MAX"):
        tb.trtexec_command("m.onnx", "m.engine", "input", (3, 8, 8), batch, tensorrt_major=10)


def test_bad_input_shape_is_rejected():
    with pytest.raises(ExportError, match="positive dims"):
        profile_shapes((3, 0, 8), (1, 1, 1))
    assert profile_shapes([3, 4, 5], (1, 2, 3)) == ((1, 3, 4, 5), (2, 3, 4, 5), (3, 3, 4, 5))


def test_one_profile_over_batch_height_and_width():
    """--dynamic-hw: the one profile ranges over the batch and both sides together."""
    shapes = profile_shapes((3, 32, 48), (1, 4, 16), (96, 320, 641))
    assert shapes == ((1, 3, 96, 96), (4, 3, 320, 320), (16, 3, 641, 641))
    assert profile_shapes((3, 32, 48), (2, 2, 2), "160:320:640")[2] == (2, 3, 640, 640)
    with pytest.raises(ExportError, match="MIN:OPT:MAX"):
        profile_shapes((3, 32, 32), (1, 1, 1), (64, 32, 128))
    with pytest.raises(ExportError, match=r"\(C, H, W\)"):
        profile_shapes((8, 32), (1, 1, 1), (16, 32, 64))
    ranges = tb.profile_ranges(shapes, ["batch", 3, "height", "width"])
    assert ranges == {
        "batch": {"min": 1, "opt": 4, "max": 16},
        "height": {"min": 96, "opt": 320, "max": 641},
        "width": {"min": 96, "opt": 320, "max": 641},
    }


def test_trtexec_command_with_dynamic_height_and_width():
    argv = _argv(
        tb.trtexec_command("m.onnx", "m.engine", "images", (3, 320, 320), (1, 8, 32), dynamic_hw=(128, 320, 640))
    )
    assert "--minShapes=images:1x3x128x128" in argv
    assert "--optShapes=images:8x3x320x320" in argv
    assert "--maxShapes=images:32x3x640x640" in argv
    assert sum(a.startswith(("--minShapes", "--optShapes", "--maxShapes")) for a in argv) == 3


# ------------------------------------------------------------------------------------------ environment
def test_environment_check_names_tensorrt_where_it_is_absent(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` fails as if not installed
    message = tb.check_trt_environment()
    assert message is not None
    assert "TensorRT is not installed" in message and "pip install tensorrt" in message


def test_environment_check_names_the_gpu_where_there_is_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = tb.check_trt_environment()
    assert message is not None and "torch.cuda.is_available() is False" in message


def test_environment_check_here():
    message = tb.check_trt_environment()
    if trt_plugins.tensorrt_available() and torch.cuda.is_available():
        assert message is None
    else:
        assert message.startswith("TensorRT engines cannot be built here")
        assert "TensorRT" in message


def test_build_engine_says_what_is_missing(tmp_path):
    if tb.check_trt_environment() is None:
        pytest.skip("TensorRT and a GPU are available here; the trt-marked tests build engines")
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"")
    with pytest.raises(ExportError, match="TensorRT engines cannot be built here"):
        tb.build_engine(onnx_path, tmp_path / "m.engine", "input", (3, 8, 8), (1, 2, 4))
    assert not (tmp_path / "m.engine").exists()


def test_build_engine_checks_its_arguments_first(tmp_path):
    with pytest.raises(ExportError, match="no such ONNX file"):
        tb.build_engine(tmp_path / "missing.onnx", tmp_path / "m.engine", "input", (3, 8, 8))
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"")
    with pytest.raises(ExportError, match="output folder does not exist"):
        tb.build_engine(onnx_path, tmp_path / "nope" / "m.engine", "input", (3, 8, 8))
    with pytest.raises(ExportError, match="is a directory"):
        tb.build_engine(onnx_path, tmp_path, "input", (3, 8, 8))
    with pytest.raises(ExportError, match="plugins"):
        tb.build_engine(onnx_path, tmp_path / "m.engine", "input", (3, 8, 8), plugins="python")
    with pytest.raises(ExportError, match="MIN <= OPT <= MAX"):
        tb.build_engine(onnx_path, tmp_path / "m.engine", "input", (3, 8, 8), batch=(2, 1, 4))


# ------------------------------------------------------------------------------------------ metadata
def _metadata(**overrides):
    kwargs = {
        "engine_path": "out/model.engine",
        "onnx_path": "out/model.onnx",
        "input_name": "input",
        "input_shape": (3, 32, 32),
        "outputs": [("output", (-1, 10))],
        "batch": (1, 4, 16),
        "precision": "fp16",
        "plugin_mode": "aot",
        "plugins": {"AttnExportInvolution2d": 2},
        "tensorrt_version": "10.9.0.34",
        "classes": ["cat", "dog"],
        "timing_cache": "out/model.timing.cache",
        "workspace_gb": 2.0,
        "device": "NVIDIA H100",
        "compute_capability": (9, 0),
        "build_seconds": 12.34567,
        "created": "2025-01-01T00:00:00+0000",
    }
    kwargs.update(overrides)
    return tb.engine_metadata(**kwargs)


def test_engine_metadata_fields():
    meta = _metadata()
    assert meta["format"] == ENGINE_FORMAT
    assert meta["engine"] == "model.engine" and meta["onnx"] == "model.onnx"
    assert meta["inputs"] == [{"name": "input", "shape": ["batch", 3, 32, 32], "dtype": "float32"}]
    assert meta["outputs"] == [{"name": "output", "shape": ["batch", 10], "dtype": "float32"}]
    assert meta["batch"] == {"min": 1, "opt": 4, "max": 16}
    assert meta["precision"] == "fp16"
    assert meta["plugins"] == {"mode": "aot", "nodes": {"AttnExportInvolution2d": 2}}
    assert meta["classes"] == ["cat", "dog"]
    assert meta["timing_cache"] == "model.timing.cache"
    assert meta["versions"] == {"attn_export": __version__, "tensorrt": "10.9.0.34"}
    assert meta["device"] == {"name": "NVIDIA H100", "compute_capability": [9, 0]}
    assert meta["build_seconds"] == 12.346
    assert meta["workspace_gb"] == 2.0
    json.dumps(meta)  # plain JSON


def test_engine_metadata_without_plugins_or_classes():
    meta = _metadata(plugin_mode=None, plugins=None, classes=None, outputs=[("a", (-1, 4, -1)), ("b", (-1,))])
    assert meta["plugins"] == {"mode": None, "nodes": {}}
    assert meta["classes"] is None
    assert [o["shape"] for o in meta["outputs"]] == [["batch", 4, "dynamic"], ["batch"]]
    assert "created" in _metadata(created=None)


def test_engine_metadata_records_the_profile_ranges():
    meta = _metadata(dynamic_hw=(128, 320, 640), outputs=[("output", (-1, 10, -1, -1))])
    assert meta["inputs"] == [{"name": "input", "shape": ["batch", 3, "height", "width"], "dtype": "float32"}]
    assert meta["dynamic_hw"] == {"min": 128, "opt": 320, "max": 640, "multiple_of": 1}
    assert _metadata(dynamic_hw=(128, 320, 640), hw_multiple=32)["dynamic_hw"]["multiple_of"] == 32
    profile = meta["profile"]
    assert profile["batch"] == {"min": 1, "opt": 4, "max": 16}
    assert profile["height"] == profile["width"] == {"min": 128, "opt": 320, "max": 640}
    assert profile["shapes"] == {"input": {"min": [1, 3, 128, 128], "opt": [4, 3, 320, 320], "max": [16, 3, 640, 640]}}
    static = _metadata()
    assert static["dynamic_hw"] is None and "height" not in static["profile"]
    assert static["profile"]["shapes"]["input"]["max"] == [16, 3, 32, 32]
    json.dumps(meta)


def test_built_metadata_round_trips(tmp_path):
    engine = tmp_path / "model.engine"
    write_engine_metadata(engine, _metadata())
    assert read_engine_metadata(engine) == _metadata()  # plain JSON: nothing lost on the way


def test_engine_bytes_are_written_atomically(tmp_path):
    target = tmp_path / "blob.bin"
    assert write_bytes(target, bytearray(b"abc")) == 3
    assert write_bytes(target, memoryview(b"hello")) == 5
    assert target.read_bytes() == b"hello"
    assert [p.name for p in tmp_path.iterdir()] == ["blob.bin"]


def test_paths_beside_the_engine(tmp_path):
    assert tb.timing_cache_path_for("out/model.engine").as_posix() == "out/model.timing.cache"
    assert tb.timing_cache_path_for("model.plan").as_posix() == "model.timing.cache"


def test_plugin_nodes_are_counted(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from attn_export.plugins._trt_names import DOMAIN, INVOLUTION, OUTLOOK

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])
    nodes = [
        helper.make_node(INVOLUTION, ["x", "x"], ["a"], domain=DOMAIN),
        helper.make_node(INVOLUTION, ["a", "x"], ["b"], domain=DOMAIN),
        helper.make_node(OUTLOOK, ["b", "x"], ["c"], domain=DOMAIN),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]))
    onnx.save(model, tmp_path / "m.onnx")
    assert tb.plugin_nodes(tmp_path / "m.onnx") == {INVOLUTION: 2, OUTLOOK: 1}


# ------------------------------------------------------------------------------------------ with TensorRT
def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                continue
            for p in m.parameters(recurse=False):
                if p.dim() == 1:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
                else:
                    fan_in = math.prod(p.shape[2:] if p.dim() == 5 else p.shape[1:])
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    return module.eval()


def _mixed_net() -> nn.Module:
    from attn_export.blocks.mixnet import MixedNet

    return _randomize(MixedNet(num_classes=10, width=16))


INPUT_SHAPE = (3, 32, 32)


def _export(model, path, target):
    """``export_onnx(..., target=...)``; skips where that target is not available."""
    from attn_export.export import export_onnx

    try:
        result = export_onnx(model, path, INPUT_SHAPE, batch=(1, 2, 4), target=target, seed=0)
    except (NotImplementedError, ExportError) as e:
        if "not available" in str(e) or "not implemented" in str(e):
            pytest.skip(f"export target {target!r}: {e}")
        raise
    assert result.ok
    return result


def _torch_outputs(model, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.trt
@pytest.mark.parametrize("plugins", ["auto", "jit"])
def test_build_plugin_engine_and_run_it(tmp_path, plugins):
    """``--target trt`` graph -> engine with the attn-export plugins -> TensorRTRunner vs PyTorch."""
    from attn_export.runtime.trt_runner import TensorRTRunner

    model = _mixed_net()
    onnx_path = tmp_path / "net.onnx"
    export = _export(model, onnx_path, "trt")
    stages = []
    engine = tmp_path / "net.engine"
    result = tb.build_engine(
        onnx_path,
        engine,
        export.input_name,
        INPUT_SHAPE,
        batch=(1, 2, 4),
        workspace_gb=1.0,
        progress=lambda stage, msg: stages.append((stage, msg)),
        classes=[f"c{i}" for i in range(10)],
        plugins=plugins,
    )
    assert result.engine_path == engine and engine.stat().st_size == result.size_bytes > 0
    assert result.metadata_path == metadata_path_for(engine)
    assert result.timing_cache_path == tb.timing_cache_path_for(engine) and result.timing_cache_path.exists()
    meta = json.loads(result.metadata_path.read_text())
    assert meta["inputs"][0]["shape"] == ["batch", *INPUT_SHAPE]
    assert [o["name"] for o in meta["outputs"]] == export.output_names
    assert meta["batch"] == {"min": 1, "opt": 2, "max": 4}
    assert meta["plugins"]["nodes"] == export.plugins and sum(export.plugins.values()) == 3
    expected_mode = "jit" if plugins == "jit" else ("aot" if trt_plugins.aot_supported() else "jit")
    assert meta["plugins"]["mode"] == expected_mode
    assert meta["precision"] == "fp32" and meta["classes"][0] == "c0"
    assert {s for s, _ in stages} >= {"plugins", "parse", "build", "write"}

    runner = TensorRTRunner(engine)
    assert runner.input_names == [export.input_name] and runner.output_names == export.output_names
    rng = np.random.default_rng(0)
    for b in (1, 3, 4):
        x = rng.standard_normal((b, *INPUT_SHAPE), dtype=np.float32)
        got = runner.infer({export.input_name: x})[export.output_names[0]]
        np.testing.assert_allclose(got, _torch_outputs(model, x), atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="outside the engine's profile"):
        runner.infer({export.input_name: np.zeros((5, *INPUT_SHAPE), np.float32)})

    # a rebuild reuses the timing cache kept beside the engine
    stages.clear()
    tb.build_engine(
        onnx_path, engine, export.input_name, INPUT_SHAPE, batch=(1, 2, 4), progress=lambda s, m: stages.append((s, m))
    )
    assert any(s == "cache" and "reusing" in m for s, m in stages)


@pytest.mark.trt
def test_build_portable_engine_and_run_it(tmp_path):
    """``--target ort`` graph (standard ONNX ops only) -> engine without plugins -> parity."""
    from attn_export.runtime.trt_runner import TensorRTRunner

    model = _mixed_net()
    export = _export(model, tmp_path / "net.onnx", "ort")
    result = tb.build_engine(tmp_path / "net.onnx", tmp_path / "net.engine", export.input_name, INPUT_SHAPE, (1, 2, 4))
    assert result.metadata["plugins"] == {"mode": None, "nodes": {}}
    runner = TensorRTRunner(result.engine_path)
    x = np.random.default_rng(1).standard_normal((2, *INPUT_SHAPE), dtype=np.float32)
    got = runner.infer({export.input_name: x})[export.output_names[0]]
    np.testing.assert_allclose(got, _torch_outputs(model, x), atol=1e-3, rtol=1e-3)


@pytest.mark.trt
@pytest.mark.parametrize("low", ["fp16", "bf16"])
@pytest.mark.parametrize("arch", ["Involution2d", "ODConv2d", "OutlookAttention", "GSoPBlock", "SKConv", "MixedNet"])
def test_build_half_engine(tmp_path, low, arch):
    """``--fp16`` (``bf16``) engines on the installed TensorRT (10: layer constraints; 11: the converted
    graph), each block alone and the MixedNet, against PyTorch in fp32 with half-precision tolerances."""
    from test_trt_target import CASES  # tests/export is on sys.path (pytest's rootdir-relative import)

    from attn_export.export import export_onnx
    from attn_export.export.checkpoint import architectures
    from attn_export.runtime.trt_runner import TensorRTRunner

    kwargs, shape = CASES[arch]
    model = _randomize(architectures()[arch](**kwargs))
    export = export_onnx(model, tmp_path / "m.onnx", shape, batch=(1, 2, 4), target="trt", seed=0)
    assert export.ok
    x = np.random.default_rng(2).standard_normal((2, *shape), dtype=np.float32)
    result = tb.build_engine(
        tmp_path / "m.onnx",
        tmp_path / f"m_{low}.engine",
        export.input_name,
        shape,
        (1, 2, 4),
        fp16=low == "fp16",
        bf16=low == "bf16",
        precision_samples=[x],
    )
    assert result.precision == low
    runner = TensorRTRunner(result.engine_path)
    got = runner.infer({export.input_name: x})[export.output_names[0]]
    ref = _torch_outputs(model, x)
    tol = 2e-2 if low == "fp16" else 6e-2
    assert np.abs(got - ref).max() <= tol * max(1.0, np.abs(ref).max()), arch


# ------------------------------------------------------------------------------------------ builds, recorded
# build_engine against a stand-in TensorRT (tests/trt_api.py): the real tensorrt.plugin registers the
# plugins; a recording builder, parser and config take the network. What is checked is what build_engine
# tells TensorRT (flags, layer precisions, the graph parsed) and that its printed trtexec line says the same.
import trt_api  # noqa: E402  (tests/ is on sys.path: tests/conftest.py)


@pytest.fixture(scope="module")
def mixed_graph(tmp_path_factory):
    """A ``--target trt`` MixedNet graph (all five blocks, the three plugin nodes), exported once."""
    path = tmp_path_factory.mktemp("mixed") / "net.onnx"
    _export(_mixed_net(), path, "trt")
    return path


@pytest.fixture(params=["10.13.2.6", "11.4.0.106"])
def stand_in(request, monkeypatch):
    try:
        trt_api.bindings_dir()
    except trt_api.Unavailable as e:
        pytest.skip(f"tensorrt.plugin sources unavailable (PyPI unreachable?): {e}")
    with trt_api.installed(request.param) as (trt, _):
        monkeypatch.setattr(tb, "check_trt_environment", lambda: None)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "stand-in GPU")
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        trt_api.BUILDS.clear()
        yield trt


def _trtexec_of(trt, network, config, engine_path, cache_path) -> set[str]:
    """The trtexec arguments that ask for what the recorded network and config hold."""
    ((name, (lo, opt, hi)),) = config.profiles[0].shapes.items()
    args = {
        f"--onnx={network.parsed}",
        f"--saveEngine={engine_path}",
        f"--minShapes={name}:{'x'.join(map(str, lo))}",
        f"--optShapes={name}:{'x'.join(map(str, opt))}",
        f"--maxShapes={name}:{'x'.join(map(str, hi))}",
        f"--timingCacheFile={cache_path}",
        f"--memPoolSize=workspace:{config.pools[trt.MemoryPoolType.WORKSPACE] >> 20}M",
    }
    F = trt.BuilderFlag
    if not trt.__version__.startswith("11") and network.flags & (
        1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    ):
        args.add("--stronglyTyped")
    if trt.BuilderFlag.TF32 not in config.flags:
        args.add("--noTF32")
    for flag, arg in (("FP16", "--fp16"), ("BF16", "--bf16")):
        if hasattr(F, flag) and getattr(F, flag) in config.flags:
            args.add(arg)
    pinned = sorted(layer.name for layer in network.layers if layer.precision == trt.DataType.FLOAT)
    if pinned:
        assert hasattr(F, "OBEY_PRECISION_CONSTRAINTS") and F.OBEY_PRECISION_CONSTRAINTS in config.flags
        spec = ",".join(f"{n}:fp32" for n in pinned)
        args |= {"--precisionConstraints=obey", f"--layerPrecisions={spec}", f"--layerOutputTypes={spec}"}
    return args


@pytest.mark.parametrize("low", [None, "fp16", "bf16"])
def test_build_tells_tensorrt_what_trtexec_is_told(stand_in, mixed_graph, tmp_path, low):
    trt = stand_in
    engine = tmp_path / "net.engine"
    result = tb.build_engine(
        mixed_graph,
        engine,
        "input",
        INPUT_SHAPE,
        (1, 2, 4),
        fp16=low == "fp16",
        bf16=low == "bf16",
        workspace_gb=1.0,
        progress=lambda stage, msg: None,
    )
    ((network, config),) = trt_api.BUILDS
    strongly_typed = trt.__version__.startswith("11")
    assert set(shlex.split(result.trtexec)[1:]) == _trtexec_of(trt, network, config, engine, result.timing_cache_path)
    assert trt.BuilderFlag.TF32 not in config.flags  # fp32 layers are IEEE fp32 on both versions
    meta = json.loads(result.metadata_path.read_text())
    assert meta["trtexec"] == result.trtexec and meta["plugins"]["mode"] == "aot"
    assert meta["precision"] == (low or "fp32")
    assert engine.read_bytes() == b"serialized engine"
    if low is None:
        assert network.parsed == str(mixed_graph) and meta["precision_detail"] is None
        return
    detail = meta["precision_detail"]
    assert detail["low"] == low and detail["reasons"]["softmax"] >= 2 and detail["reasons"]["covariance"] >= 3
    if strongly_typed:  # TensorRT 11: the converted graph, fp32 in and out, its own types
        import onnx

        from attn_export.export import precision_graph as pg

        assert detail["mode"] == "strongly typed graph"
        assert network.parsed == str(low_graph_path_for(engine, low)) and detail["graph"] == f"net.{low}.onnx"
        graph = onnx.load(network.parsed)
        assert pg.graph_precision(graph) == low
        assert network.inputs[0].dtype == network.outputs[0].dtype == trt.DataType.FLOAT
        assert all(layer.precision is None for layer in network.layers)
        assert "--fp16" not in result.trtexec and "--bf16" not in result.trtexec
    else:  # TensorRT 10: the fp32 graph, the flag, the fp32 layers pinned (precision and output types)
        assert detail["mode"] == "layer precision constraints"
        assert network.parsed == str(mixed_graph)
        pinned = [layer for layer in network.layers if layer.precision == trt.DataType.FLOAT]
        assert sorted(detail["fp32_layers"]) == sorted(layer.name for layer in pinned)
        kinds = {layer.name.split("_")[1] for layer in pinned}
        assert "softmax" in kinds and "matmul" in kinds and not any("Conv" in layer.name for layer in pinned)
        for layer in pinned:
            floats = [k for k in range(layer.num_outputs) if layer.get_output(k).dtype == trt.DataType.FLOAT]
            assert layer.output_types == dict.fromkeys(floats, trt.DataType.FLOAT)


def test_a_graph_already_in_fp16_is_labelled_fp16(stand_in, mixed_graph, tmp_path):
    """A converted graph is built as its types say (10: a strongly typed network), labelled by its types."""
    import onnx

    from attn_export.export import precision_graph as pg

    model = onnx.load(str(mixed_graph))
    low_path = tmp_path / "net16.onnx"
    onnx.save(pg.convert(model, pg.plan_precision(model, "fp16")), low_path)
    engine = tmp_path / "net16.engine"
    result = tb.build_engine(low_path, engine, "input", INPUT_SHAPE, (1, 2, 4), fp16=True)
    assert result.precision == "fp16" and result.metadata["precision_detail"]["mode"] == "graph types"
    ((network, config),) = trt_api.BUILDS
    assert network.parsed == str(low_path) and "--fp16" not in result.trtexec  # not converted again
    assert set(shlex.split(result.trtexec)[1:]) == _trtexec_of(
        stand_in, network, config, engine, result.timing_cache_path
    )
    strongly = network.flags & (1 << int(stand_in.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    assert bool(strongly) == stand_in.__version__.startswith("10")  # 10 follows the types only when told to
    with pytest.raises(ExportError, match="already a fp16 graph"):
        tb.build_engine(low_path, engine, "input", INPUT_SHAPE, (1, 2, 4), bf16=True)


def test_fp16_and_bf16_together_are_refused(tmp_path):
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"")
    with pytest.raises(ExportError, match="fp16 or bf16"):
        tb.build_engine(onnx_path, tmp_path / "m.engine", "input", (3, 8, 8), fp16=True, bf16=True)
    with pytest.raises(ValueError, match="fp16 or bf16"):
        tb.trtexec_command("m.onnx", "m.engine", "input", (3, 8, 8), fp16=True, bf16=True, tensorrt_major=10)


@pytest.mark.parametrize("plugins", ["auto", "jit"])
def test_plugin_mode_and_preference_flag(stand_in, mixed_graph, tmp_path, plugins):
    trt = stand_in
    result = tb.build_engine(mixed_graph, tmp_path / "n.engine", "input", INPUT_SHAPE, (1, 2, 4), plugins=plugins)
    ((network, _),) = trt_api.BUILDS
    creation = trt.NetworkDefinitionCreationFlag
    want = creation.PREFER_JIT_PYTHON_PLUGINS if plugins == "jit" else creation.PREFER_AOT_PYTHON_PLUGINS
    assert network.flags == 1 << int(want)
    assert result.plugin_mode == ("jit" if plugins == "jit" else "aot")


# ------------------------------------------------------------------------------------------ dynamic height/width
@pytest.fixture(scope="module")
def hw_graph(tmp_path_factory):
    """A ``--target trt`` graph (involution at stride 2, then ODConv) with symbolic batch, height, width."""
    import onnx

    from attn_export.blocks.involution import Involution2d
    from attn_export.blocks.odconv import ODConv2d
    from attn_export.export.torch_export import torch_onnx_export
    from attn_export.plugins import onnx_translation_table

    model = _randomize(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            Involution2d(8, kernel_size=3, stride=2, reduction=2, group_channels=4),
            ODConv2d(8, 8, 3, padding=1, kernel_num=2, min_channel=4),
        )
    )
    proto = torch_onnx_export(
        model, (torch.randn(2, *INPUT_SHAPE),), onnx_translation_table("trt"), 18, dynamic_hw=True
    )
    path = tmp_path_factory.mktemp("hw") / "hw.onnx"
    onnx.save(proto, path)
    return path


def test_build_one_profile_over_batch_height_and_width(stand_in, hw_graph, tmp_path):
    """--trt with --dynamic-hw: ONE profile over batch, height and width reaches TensorRT, the printed
    trtexec line says the same, and the metadata records the ranges."""
    engine = tmp_path / "hw.engine"
    result = tb.build_engine(hw_graph, engine, "input", INPUT_SHAPE, (1, 2, 4), dynamic_hw=(17, 32, 65))
    ((network, config),) = trt_api.BUILDS
    assert network.inputs[0].shape == (-1, 3, -1, -1)
    assert len(config.profiles) == 1
    assert config.profiles[0].shapes == {"input": ((1, 3, 17, 17), (2, 3, 32, 32), (4, 3, 65, 65))}
    assert set(shlex.split(result.trtexec)[1:]) == _trtexec_of(
        stand_in, network, config, engine, result.timing_cache_path
    )
    meta = read_engine_metadata(engine)
    assert meta == result.metadata
    assert meta["dynamic_hw"] == {"min": 17, "opt": 32, "max": 65, "multiple_of": 1}
    assert meta["inputs"][0]["shape"] == ["batch", 3, "height", "width"]
    assert meta["profile"]["height"] == meta["profile"]["width"] == {"min": 17, "opt": 32, "max": 65}
    assert result.to_dict()["dynamic_hw"] == meta["dynamic_hw"]


def test_dynamic_hw_needs_a_graph_with_free_height_and_width(stand_in, mixed_graph, tmp_path):
    with pytest.raises(ExportError, match="fixed height and width"):
        tb.build_engine(mixed_graph, tmp_path / "n.engine", "input", INPUT_SHAPE, (1, 2, 4), dynamic_hw=(16, 32, 64))
    assert not trt_api.BUILDS and not (tmp_path / "n.engine").exists()


def test_engine_verification_runs_every_size():
    """verify_engine with dynamic_hw: one row per (batch, height, width) of the verify sizes, in the
    model's multiples where it has one (an onnxruntime runner on the plugin-free graph stands in for the
    engine: the comparison is the same code)."""
    from attn_export.blocks.involution import Involution2d
    from attn_export.export.torch_export import torch_onnx_export
    from attn_export.plugins import onnx_translation_table
    from attn_export.runtime.runners import OnnxRuntimeRunner

    model = _randomize(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Involution2d(8, 3, 2, 2, 4)))
    proto = torch_onnx_export(model, (torch.randn(2, *INPUT_SHAPE),), onnx_translation_table("ort"), 18, True)
    runner = OnnxRuntimeRunner(proto.SerializeToString(), threads=1)
    out = runner.output_names
    report = tb.verify_engine(model, runner, "input", INPUT_SHAPE, [1, 3], out, 1e-4, 1e-3, 0, dynamic_hw=(17, 32, 47))
    assert report.passed
    sizes = {(h, w) for _, h, w in report.sizes}
    assert {(17, 17), (32, 32), (47, 47)} <= sizes and any(h != w for h, w in sizes)
    assert any(h % 2 for h, _ in sizes)  # an odd size
    assert {b for b, _, _ in report.sizes} == {1, 3}
    report = tb.verify_engine(
        model, runner, "input", INPUT_SHAPE, [2], out, 1e-4, 1e-3, 0, dynamic_hw=(17, 32, 47), hw_multiple=8
    )
    assert report.passed and all(h % 8 == 0 and w % 8 == 0 for _, h, w in report.sizes)
