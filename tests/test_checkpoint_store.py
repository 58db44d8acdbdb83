"""training/checkpoint.py: atomic step directories, the last K kept, resolution and refusals."""

import dataclasses

import pytest
import torch

from model.config import ModelConfig
from runtime.backend import CPUBackend
from training import checkpoint
from training.checkpoint import CheckpointError


def save(run_dir, step, keep=2):
    return checkpoint.save(run_dir, step, {"model": {"w": torch.full((2,), float(step))}, "state": {"step": step}},
                           {"optimizer": {}, "rank": 0}, CPUBackend(), keep)


def test_keeps_the_last_k_and_leaves_no_temporary(tmp_path):
    for step in (10, 20, 30):
        save(tmp_path, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000020", "step_000030"]
    assert not list(tmp_path.rglob("*.tmp"))
    common, mine = checkpoint.load(tmp_path / "step_000030", 0, 1)
    assert common["state"]["step"] == 30 and torch.equal(common["model"]["w"], torch.full((2,), 30.0))
    assert mine["rank"] == 0


def test_an_interrupted_save_is_never_resumed(tmp_path):
    save(tmp_path, 10)
    half = tmp_path / "step_000020.tmp"  # what a save killed halfway leaves behind
    half.mkdir()
    (half / "rank_0.pt").write_bytes(b"partial")
    assert checkpoint.resolve("auto", tmp_path) == tmp_path / "step_000010"
    assert checkpoint.resolve(str(tmp_path), tmp_path / "elsewhere") == tmp_path / "step_000010"
    assert checkpoint.resolve("auto", tmp_path / "nothing") is None


def test_unreadable_or_foreign_checkpoints_are_refused(tmp_path):
    path = save(tmp_path, 10)
    with pytest.raises(CheckpointError, match="processes but this run has 2"):
        checkpoint.load(path, 0, 2)
    (path / "common.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot be read"):
        checkpoint.load(path, 0, 1)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        checkpoint.resolve(str(tmp_path / "empty"), tmp_path)


def test_another_run_is_named_by_its_difference():
    mine = lambda **kw: dataclasses.asdict(ModelConfig(n_layers=2, d_model=64, n_heads=2, d_ff=128, **kw))
    common = {"model_config": mine(), "identity": {"seed": 0}}
    checkpoint.check_same_run(common, mine(), {"seed": 0}, "ck")
    with pytest.raises(CheckpointError, match="d_model=64 there vs 128 here"):
        checkpoint.check_same_run(common, {**mine(), "d_model": 128}, {"seed": 0}, "ck")
    with pytest.raises(CheckpointError, match="training config differs .seed=0 there vs 1 here"):
        checkpoint.check_same_run(common, mine(), {"seed": 1}, "ck")


def test_a_checkpoint_from_before_a_new_model_field_still_resumes():
    """A field added later (extra_layers, max_length) is missing from older checkpoints: at its
    default it describes the same model, anything else is another model."""
    old = {k: v for k, v in dataclasses.asdict(ModelConfig(n_layers=2, d_model=64, n_heads=2, d_ff=128)).items()
           if k not in ("extra_layers", "max_length")}
    ours = dataclasses.asdict(ModelConfig(n_layers=2, d_model=64, n_heads=2, d_ff=128))
    checkpoint.check_same_run({"model_config": old, "identity": {}}, ours, {}, "ck")
    with pytest.raises(CheckpointError, match="max_length=0 there vs 512 here"):
        checkpoint.check_same_run({"model_config": old, "identity": {}}, {**ours, "max_length": 512}, {}, "ck")
