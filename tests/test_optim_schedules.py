"""LR schedules at their key steps, the Muon momentum warm-up, and apply_schedule."""

import pytest
import torch.nn as nn

from optim import (
    OptimConfig,
    apply_schedule,
    build_optimizer,
    default_optim_config,
    lr_factor,
    muon_momentum,
)


def cfg(**kw):
    return OptimConfig(**({"warmup_steps": 100} | kw))


def test_warmup_is_linear_and_ends_at_the_peak():
    c = cfg(schedule="constant")
    assert lr_factor(0, 1000, c) == pytest.approx(0.01)
    assert lr_factor(49, 1000, c) == pytest.approx(0.5)
    assert lr_factor(99, 1000, c) == 1.0 and lr_factor(500, 1000, c) == 1.0


def test_cosine_midpoint_and_floor():
    c = cfg(schedule="cosine", min_lr_frac=0.1)
    assert lr_factor(100, 1100, c) == 1.0
    assert lr_factor(600, 1100, c) == pytest.approx(0.55)  # halfway: (1 + 0.1) / 2
    assert lr_factor(1100, 1100, c) == pytest.approx(0.1)


def test_wsd_is_flat_until_the_cooldown_then_linear_to_the_floor():
    c = cfg(schedule="wsd", cooldown_frac=0.25, min_lr_frac=0.0)
    assert lr_factor(100, 1000, c) == 1.0
    assert lr_factor(750, 1000, c) == 1.0  # cooldown start: the last 25% = steps 750..1000
    assert lr_factor(875, 1000, c) == pytest.approx(0.5)
    assert lr_factor(1000, 1000, c) == 0.0


def test_esm2_decays_to_a_tenth_at_ninety_percent_then_holds():
    c = default_optim_config("esm2_650m")
    assert (c.schedule, c.warmup_steps) == ("esm2", 2000)
    n = 500_000
    assert lr_factor(1999, n, c) == 1.0
    assert lr_factor(2000 + (450_000 - 2000) // 2, n, c) == pytest.approx(0.55)
    assert lr_factor(450_000, n, c) == pytest.approx(0.1)
    assert lr_factor(499_999, n, c) == pytest.approx(0.1)


def test_warmup_longer_than_the_run_is_refused():
    with pytest.raises(
        ValueError, match=r"warmup_steps=2000 does not fit before 90% of num_steps \(1800\)"
    ):
        lr_factor(0, 2000, default_optim_config("esm2_8m"))


def test_muon_momentum_warms_up_from_085_to_095_over_300_steps():
    c = OptimConfig()
    assert muon_momentum(0, c) == pytest.approx(0.85)
    assert muon_momentum(150, c) == pytest.approx(0.90)
    assert muon_momentum(300, c) == pytest.approx(0.95) == muon_momentum(10_000, c)


def test_apply_schedule_sets_every_group_and_spares_muon_the_warmup():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))  # "0.weight" has no "embed": hidden
    c = cfg(schedule="wsd", cooldown_frac=0.5)
    opt = build_optimizer(model, c)
    factor = apply_schedule(opt, 9, c, num_steps=1000)
    assert factor == pytest.approx(0.1)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["scalar"]["lr"] == pytest.approx(0.04 * 0.1)
    assert groups["hidden"]["lr"] == 0.05 and groups["hidden"]["momentum"] == pytest.approx(0.853)
    apply_schedule(opt, 750, c, num_steps=1000)
    assert groups["scalar"]["lr"] == pytest.approx(0.04 * 0.5)
    assert opt.param_groups[-1]["lr"] == pytest.approx(0.05 * 0.5)  # Muon follows the decay
    assert type(groups["scalar"]["lr"]) is float  # a Python float: no device tensor per step
