"""Weights files: round trip, full training checkpoints, wrapper prefixes, shape mismatch."""

import pytest
import torch

from model import build_model, get_config
from model.io import load_state_dict_checked, load_weights, save_weights

SMALL = dict(n_layers=2, d_model=32, n_heads=4, d_ff=64)
LARGER = dict(n_layers=3, d_model=48, n_heads=4, d_ff=96)
IDS = torch.tensor([[0, 5, 6, 32, 7, 2, 1, 1]])
DOCS = torch.tensor([[0, 0, 0, 0, 0, 0, -1, -1]])


@pytest.mark.parametrize("preset, extra", [("esm2_8m", {}), ("sample", {}),
                                           ("sample", dict(ngram_buckets=64, ngram_orders=(2, 5)))])
def test_save_and_load_give_the_same_model(tmp_path, preset, extra):
    cfg = get_config(preset, **SMALL, **extra)
    model = build_model(cfg)
    save_weights(tmp_path / "w.pt", model, cfg)
    cfg2, sd = load_weights(tmp_path / "w.pt")
    assert cfg2 == cfg
    other = build_model(cfg2)
    load_state_dict_checked(other, sd)
    assert torch.equal(model(IDS, DOCS)[0], other(IDS, DOCS)[0])


def test_loads_a_full_training_checkpoint_with_wrapper_prefixes(tmp_path):
    cfg = get_config("sample", **SMALL)
    model = build_model(cfg)
    wrapped = {f"_orig_mod.module.{k}": v for k, v in model.state_dict().items()}
    from dataclasses import asdict

    torch.save({"model_config": asdict(cfg), "model": wrapped, "optimizer": {"state": {}},
                "step": 7}, tmp_path / "ckpt.pt")
    cfg2, sd = load_weights(tmp_path / "ckpt.pt")
    other = build_model(cfg2)
    load_state_dict_checked(other, sd)
    assert torch.equal(other.embed.weight, model.embed.weight)


def test_shape_mismatch_names_both_shapes(tmp_path):
    small = build_model(get_config("esm2_8m", **SMALL))
    larger = build_model(get_config("esm2_8m", **LARGER))
    with pytest.raises(ValueError) as err:
        load_state_dict_checked(larger, small.state_dict())
    msg = str(err.value)
    assert "2 layers x d_model 32" in msg and "3 layers x d_model 48" in msg


def test_other_architecture_is_refused(tmp_path):
    esm = build_model(get_config("esm2_8m", **SMALL))
    fast = build_model(get_config("sample", **SMALL))
    with pytest.raises(ValueError, match="does not fit the model"):
        load_state_dict_checked(fast, esm.state_dict())


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    torch.save({"weights": 1}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not an esm-speedrun weights file"):
        load_weights(tmp_path / "x.pt")
