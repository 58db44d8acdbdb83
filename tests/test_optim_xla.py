"""The optimizer step on an XLA device (torch-xla CPU runtime): a fixed graph, no host syncs."""

import pytest
import torch
import torch.nn as nn

from optim import OptimConfig, apply_schedule, build_optimizer

pytestmark = pytest.mark.xla


def test_muon_and_adamw_steps_compile_once_and_never_sync():
    torch_xla = pytest.importorskip("torch_xla")
    import torch_xla.debug.metrics as met

    device = torch_xla.device()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).to(device)
    cfg = OptimConfig(warmup_steps=2, schedule="cosine")
    opt = build_optimizer(model, cfg)  # hidden matrices to Muon, biases to AdamW
    assert {g["optimizer"] for g in opt.param_groups} == {"muon", "adamw"}
    x = torch.randn(5, 8).to(device)
    compiles = []
    for step in range(6):
        apply_schedule(opt, step, cfg, num_steps=6)  # a new lr every step: must not recompile
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()
        torch_xla.sync()
        compiles.append(met.counter_value("UncachedCompile") or 0)
    assert compiles[-1] == compiles[2], compiles  # warm-up creates optimizer state, then stable
    assert not met.counter_value("aten::nonzero")
    assert not met.counter_value("aten::_local_scalar_dense")
