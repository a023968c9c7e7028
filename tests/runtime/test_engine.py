"""The metadata JSON beside an engine (:mod:`attn_export.runtime.engine`): where it lives, written
atomically, read back."""

from __future__ import annotations

from attn_export.runtime.engine import (
    ENGINE_FORMAT,
    metadata_path_for,
    profile_ranges,
    read_engine_metadata,
    write_engine_metadata,
)

META = {"format": ENGINE_FORMAT, "engine": "model.engine", "batch": {"min": 1, "opt": 4, "max": 16}, "classes": None}


def test_metadata_is_written_atomically_and_read_back(tmp_path):
    engine = tmp_path / "model.engine"
    path = write_engine_metadata(engine, META)
    assert path == tmp_path / "model.engine.json"
    assert read_engine_metadata(engine) == META
    assert read_engine_metadata(tmp_path / "other.engine") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.engine.json"]  # no temporary file left


def test_metadata_path_beside_the_engine():
    assert metadata_path_for("out/model.engine").as_posix() == "out/model.engine.json"
    assert metadata_path_for("model.plan").as_posix() == "model.plan.json"


def test_profile_ranges_read_back_every_dynamic_axis(tmp_path):
    from attn_export.export.trt_build import engine_metadata

    kwargs = dict(
        engine_path=tmp_path / "m.engine",
        onnx_path=None,
        input_name="images",
        input_shape=(3, 320, 320),
        outputs=[("out", (-1, 84, -1))],
        batch=(1, 4, 16),
        precision="fp32",
        plugin_mode=None,
        tensorrt_version="10.13.2.6",
    )
    meta = engine_metadata(**kwargs, dynamic_hw=(160, 320, 641))
    write_engine_metadata(tmp_path / "m.engine", meta)
    back = read_engine_metadata(tmp_path / "m.engine")
    assert profile_ranges(back) == {"batch": (1, 4, 16), "height": (160, 320, 641), "width": (160, 320, 641)}
    assert profile_ranges(engine_metadata(**kwargs)) == {"batch": (1, 4, 16)}
    assert profile_ranges(META) == {"batch": (1, 4, 16)}  # metadata from before the profile field
