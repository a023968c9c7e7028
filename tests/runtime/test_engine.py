"""The metadata JSON beside an engine (:mod:`attn_export.runtime.engine`): where it lives, written
atomically, read back."""

from __future__ import annotations

from attn_export.runtime.engine import ENGINE_FORMAT, metadata_path_for, read_engine_metadata, write_engine_metadata

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
