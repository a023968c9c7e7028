"""Model loading for the service: backends, the checkpoint export cache, class names, clear errors; the CLI."""

from __future__ import annotations

import importlib.util
import shutil

import onnx
import pytest
from serve_helpers import CLASSES, cell_square, client_for, make_image, make_settings

from attn_export.detection import loader
from attn_export.detection.loader import ModelError, load, model_kind
from attn_export.serve.cli import main, parser, settings_from_args, settings_to_env
from attn_export.serve.settings import Settings


def test_model_kind(tmp_path, standin_onnx, standin_checkpoint):
    assert model_kind(standin_onnx) == "onnx"
    assert model_kind(standin_checkpoint) == "checkpoint"
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"\0" * 8)
    assert model_kind(engine) == "engine"
    renamed = tmp_path / "weights.bin2"
    shutil.copy(standin_checkpoint, renamed)
    assert model_kind(renamed) == "checkpoint"  # a zip archive: torch.save's format


@pytest.mark.parametrize(
    ("model", "backend", "message"),
    [
        (None, "onnxruntime", "no model to serve"),
        ("missing.onnx", "onnxruntime", "no such file"),
        (".", "onnxruntime", "is a directory"),
    ],
)
def test_load_errors(model, backend, message):
    settings = Settings(backend=backend)
    settings.model = model  # bypass the shipped-model default
    with pytest.raises(ModelError, match=message):
        load(settings)


def test_backend_and_file_mismatches(tmp_path, standin_onnx):
    with pytest.raises(ModelError, match="--backend torch serves a checkpoint"):
        load(make_settings(standin_onnx, backend="torch"))
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"\0" * 8)
    with pytest.raises(ModelError, match="serve it with --backend tensorrt"):
        load(make_settings(engine))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a graph")
    with pytest.raises(ModelError, match="onnxruntime cannot load"):
        load(make_settings(bad))


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_tensorrt_backend_says_what_is_missing(standin_onnx):
    with pytest.raises(ModelError, match="--backend tensorrt is not available here: TensorRT is not installed"):
        load(make_settings(standin_onnx, backend="tensorrt"))
    assert main([str(standin_onnx), "--backend", "tensorrt"]) == 2


def test_torch_backend_serves_a_checkpoint(standin_checkpoint):
    with client_for(make_settings(standin_checkpoint, backend="torch", warmup=False)) as c:
        info = c.get("/readyz").json()
        assert info["backend"] == "torch" and info["provider"].startswith("torch") and info["classes"] == CLASSES
        img = make_image((320, 320), [cell_square(2, 4, 4)])
        (det,) = c.post("/detect", files={"images": ("a.png", img, "image/png")}).json()["images"][0]["detections"]
        assert det["class_name"] == "rectangle" and det["box"] == [128.0, 128.0, 160.0, 160.0]


def test_checkpoint_on_onnxruntime_is_exported_once_to_a_cache(tmp_path, standin_checkpoint, monkeypatch):
    monkeypatch.delenv("ATTN_EXPORT_CACHE_DIR", raising=False)  # set in the Docker images: beside the checkpoint here
    ckpt = tmp_path / "det.pt"
    shutil.copy(standin_checkpoint, ckpt)
    served = load(make_settings(ckpt))
    assert served.backend == "onnxruntime" and served.path.parent == tmp_path
    assert served.path.name.startswith(".det.") and served.path.suffix == ".onnx"
    assert served.class_names == CLASSES and served.name == "det"
    props = {p.key: p.value for p in onnx.load(str(served.path)).metadata_props}
    assert props["source"] == "det.pt"

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr("attn_export.export.export_onnx", no_export)
    again = load(make_settings(ckpt))
    assert again.path == served.path
    # an explicit cache folder
    cache = tmp_path / "cache"
    target, folders = loader.cache_path(ckpt, cache)
    assert folders == [cache] and target.parent == cache


def test_class_names_from_a_checkpoint_beside_the_graph(tmp_path, standin_onnx, standin_checkpoint):
    model = onnx.load(str(standin_onnx))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "det.onnx"))
    assert load(make_settings(tmp_path / "det.onnx")).class_names == ["class0", "class1", "class2", "class3"]
    shutil.copy(standin_checkpoint, tmp_path / "det.pt")
    assert load(make_settings(tmp_path / "det.onnx")).class_names == CLASSES


# ------------------------------------------------------------------------------------------ CLI
def test_cli_options_override_the_environment(monkeypatch, standin_onnx):
    monkeypatch.setenv("ATTN_EXPORT_MAX_BATCH", "3")
    monkeypatch.setenv("ATTN_EXPORT_PORT", "9999")
    monkeypatch.setenv("ATTN_EXPORT_API_KEY", "k")
    args = parser().parse_args([str(standin_onnx), "--port", "1234", "--no-warmup"])
    s = settings_from_args(args)
    assert (s.max_batch, s.port, s.warmup, s.model) == (3, 1234, False, standin_onnx)
    env = settings_to_env(s)
    assert env["ATTN_EXPORT_PORT"] == "1234" and env["ATTN_EXPORT_API_KEY"] == "k"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert Settings() == s


def test_cli_errors(tmp_path, capsys):
    assert main([str(tmp_path / "missing.onnx")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main([str(tmp_path / "m.onnx"), "--max-batch", "0"]) == 2
    assert "max_batch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--backend", "nope"])
