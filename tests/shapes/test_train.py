"""``attn-export train`` end to end on a tiny run: a loadable checkpoint, reproducible from its seed,
and a fine-tune that records the runs before it."""

from __future__ import annotations

import torch

from attn_export.shapes.train import init_history, main

TINY = ["--images", "8", "--batch", "4", "--size", "96", "--scales", "", "--final-epochs", "0"]
TINY += ["--procs", "1", "--workers", "1", "--val-images", "0", "--warmup", "2", "--log-every", "1"]


def _train(tmp_path, name: str, *extra: str) -> dict:
    out = tmp_path / name
    assert main([*TINY, "--out", str(out), *extra]) == 0
    return torch.load(out, weights_only=True)


def test_train_writes_a_checkpoint_that_reproduces_from_its_seed(tmp_path):
    a = _train(tmp_path, "a.pt", "--seed", "3", "--epochs", "2")
    # quick validation and the image cache change nothing in the weights (so neither do they in a recipe)
    b = _train(tmp_path, "b.pt", "--seed", "3", "--epochs", "2", "--val-images", "2", "--val-every", "1")
    b2 = _train(tmp_path, "b2.pt", "--seed", "3", "--epochs", "2", "--cache", str(tmp_path / "cache"))
    assert list((tmp_path / "cache").glob("*.npz"))
    b3 = _train(tmp_path, "b3.pt", "--seed", "3", "--epochs", "2", "--cache", str(tmp_path / "cache"))
    c = _train(tmp_path, "c.pt", "--seed", "4", "--epochs", "2")
    assert a["arch"] == "ShapesDetector" and a["kwargs"]["input_size"] == 96
    assert a["meta"]["seed"] == 3 and a["meta"]["epochs"] == 2 and a["meta"]["history"] == []
    assert a["meta"]["command"].startswith("attn-export train --images 8")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for other in (b, b2, b3):
        for k, v in a["state_dict"].items():
            assert torch.equal(v, other["state_dict"][k]), k
    # a different seed gives other data, order and initial weights
    assert any(not torch.equal(v, c["state_dict"][k]) for k, v in a["state_dict"].items())


def test_fine_tune_starts_from_init_and_records_the_recipe(tmp_path):
    first = _train(tmp_path, "first.pt", "--seed", "3", "--epochs", "1")
    second = _train(tmp_path, "second.pt", "--seed", "5", "--epochs", "1", "--init", str(tmp_path / "first.pt"))
    third = _train(tmp_path, "third.pt", "--seed", "6", "--epochs", "1", "--init", str(tmp_path / "second.pt"))
    fresh = _train(tmp_path, "fresh.pt", "--seed", "5", "--epochs", "1")
    still = _train(
        tmp_path, "still.pt", "--seed", "5", "--epochs", "1", "--init", str(tmp_path / "first.pt"), "--lr", "1e-12"
    )
    # --init is the starting point: with no learning rate the weights stay those of first.pt (the BN
    # running statistics still move), and they are not those of a run from scratch on the same seed
    weights = [k for k in first["state_dict"] if k.endswith(".weight") and first["state_dict"][k].ndim > 1]
    assert len(weights) > 20
    for k in weights:
        torch.testing.assert_close(still["state_dict"][k], first["state_dict"][k], rtol=0, atol=1e-6)
    assert any(not torch.equal(fresh["state_dict"][k], second["state_dict"][k]) for k in weights)
    history = third["meta"]["history"]
    assert [h["command"] for h in history] == [first["meta"]["command"], second["meta"]["command"]]
    assert [h["seed"] for h in history] == [3, 5]
    assert "--init" in history[1]["command"] and third["meta"]["seed"] == 6


def test_init_history_of_a_foreign_checkpoint_says_so():
    assert init_history({}) == [{"command": None, "note": "weights from a checkpoint not written by attn-export train"}]
    made = {"command": "attn-export train --seed 1", "seed": 1, "epochs": 3, "classes": ["x"], "history": [{"seed": 0}]}
    assert init_history(made) == [{"seed": 0}, {"command": "attn-export train --seed 1", "seed": 1, "epochs": 3}]


def test_data_parallel_run_reproduces_from_its_seed(tmp_path):
    """The shipped recipe trains in 2 processes (gloo all-reduce); that must be reproducible too."""
    a = _train(tmp_path, "a.pt", "--seed", "3", "--epochs", "1", "--procs", "2")
    b = _train(tmp_path, "b.pt", "--seed", "3", "--epochs", "1", "--procs", "2")
    one = _train(tmp_path, "one.pt", "--seed", "3", "--epochs", "1")
    assert a["meta"]["procs"] == 2 and one["meta"]["procs"] == 1
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    # each process augments its share with its own generator, so the process count is part of the recipe
    assert any(not torch.equal(v, one["state_dict"][k]) for k, v in a["state_dict"].items())
