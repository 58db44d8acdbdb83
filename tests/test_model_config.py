"""Model configs: validation, presets, parameter counts, FLOPs per token, T_eff."""

import pytest
import torch

from model import (
    PRESETS,
    ModelConfig,
    build_model,
    flops_per_token,
    get_config,
    param_counts,
    t_eff,
)
from model.config import matmul_params

# fair-esm module counts (reference sheet §1); they include the contact head, Linear(L*H, 1),
# which this codebase leaves out because masked-LM training never uses it.
FAIR_ESM_COUNTS = {
    "esm2_8m": 7_512_474,
    "esm2_35m": 33_501_394,
    "esm2_150m": 148_140_154,
    "esm2_650m": 651_043_254,
    "esm2_3b": 2_839_005_634,
    "esm2_15b": 15_129_100_194,
}


def meta_model(name):
    cfg = get_config(name)
    with torch.device("meta"):  # no memory for the 15B weights
        return cfg, build_model(cfg)


@pytest.mark.parametrize("name", sorted(FAIR_ESM_COUNTS))
def test_esm2_param_counts_match_fair_esm(name):
    cfg, model = meta_model(name)
    contact_head = cfg.n_layers * cfg.n_heads + 1
    assert param_counts(model)["total"] + contact_head == FAIR_ESM_COUNTS[name]


def test_speedrun_preset_has_splm_param_count():
    _, model = meta_model("speedrun")
    assert param_counts(model)["total"] == 133_065_357  # SpeedrunningPLMs default (reference §6)


def test_sample_preset_is_small():
    _, model = meta_model("sample")
    assert 2e6 <= param_counts(model)["total"] <= 6e6


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_measured_matmul_params_match_formula(name):
    cfg, model = meta_model(name)
    counts = param_counts(model)
    assert counts["matmul"] == matmul_params(cfg)
    assert counts["non_embedding"] < counts["total"]


def test_flops_per_token_matches_reference_table():
    # reference §4 at T = 1024: 8M 0.069 GF/token, 650M 4.422 GF/token
    assert flops_per_token(get_config("esm2_8m"), 1024) / 1e9 == pytest.approx(0.069, rel=0.01)
    assert flops_per_token(get_config("esm2_650m"), 1024) / 1e9 == pytest.approx(4.422, rel=0.001)


def test_t_eff_from_document_lengths():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, -1, -1], [0] * 10])
    assert t_eff(doc_ids) == pytest.approx((3**2 + 5**2 + 10**2) / 18)
    assert t_eff(torch.full((2, 4), -1)) == 0.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(d_model=100, n_heads=3), "not divisible by n_heads"),
        (dict(activation="swish"), "activation 'swish' is unknown"),
        (dict(attn_impl="flash"), "attn_impl 'flash' is unknown"),
        (dict(attn_fp32_max_head_dim=-1), "attn_fp32_max_head_dim -1 must be >= 0"),
        (dict(norm="batch"), "norm 'batch' is unknown"),
        (dict(n_layers=0), "n_layers=0 must be a positive integer"),
        (dict(logit_softcap=-1.0), "logit_softcap"),
        (dict(d_model=60, n_heads=20), "must be even for rotary"),
    ],
)
def test_config_validation_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        get_config("sample", **overrides)


def test_esm2_refuses_speedrun_switches():
    with pytest.raises(ValueError, match="arch 'esm2' is fixed by ESM2.*unet"):
        get_config("esm2_8m", unet=True)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="preset 'esm2_9m' is unknown"):
        get_config("esm2_9m")
    with pytest.raises(ValueError, match=r"unknown fields \['hidden'\]"):
        ModelConfig.from_dict({"hidden": 3})
