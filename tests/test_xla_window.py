"""On XLA (torch-xla's CPU runtime, PJRT_DEVICE=CPU): a growing attention window and the switch
from the masked-LM warm-up to masked diffusion run train.py's step without a new graph."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

# Before the runtime starts: fast CPU compiles (the graph count does not depend on them).
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
pytest.importorskip("torch_xla")
pytestmark = pytest.mark.xla


def test_a_changing_window_and_the_diffusion_switch_compile_no_new_graph():
    from data.masking import MaskingConfig, mask_batch
    from model import build_model, get_config
    from optim import build_optimizer, default_optim_config
    from runtime.xla import XLABackend
    from train import train_step

    b = XLABackend(SimpleNamespace(precision="fp32"))
    b.init_distributed()
    torch.manual_seed(0)
    model = b.prepare_model(build_model(get_config("sample", n_layers=2, d_model=32, n_heads=2, d_ff=64,
                                                   attn_impl="sdpa")))
    opt = build_optimizer(model, default_optim_config("sample"))
    tokens = torch.randint(4, 24, (2, 48))
    tokens[:, [0, 30]], tokens[:, [29, 47]] = 0, 2  # two documents per row
    doc_ids = (torch.arange(48) >= 30).long().expand(2, 48).clone()
    masking = MaskingConfig(rule="all_mask", rate=0.2, diffusion="sequence", diffusion_from=2)
    g = torch.Generator().manual_seed(0)

    def step(s: int, window: int) -> float:
        batch = {**mask_batch(tokens, doc_ids, s, masking, g), "doc_ids": doc_ids}
        loss_sum, count, *_ = train_step(model, [batch], opt, b, 1.0, torch.tensor(window))
        return float(b.to_host(loss_sum / count))

    for s, w in ((0, 3), (1, 5)):  # masked-LM warm-up; the first step also creates the optimizer state
        step(s, w)
    compiles = b.compile_count()
    losses = [step(s, w) for s, w in ((2, 8), (3, 13), (4, 47))]  # diffusion, the window growing
    assert b.compile_count() == compiles, "a new window or the diffusion phase compiled a new graph"
    assert all(torch.isfinite(torch.tensor(losses)))
    # the count is not blind: another shape compiles
    half = {**mask_batch(tokens[:1], doc_ids[:1], 5, masking, g), "doc_ids": doc_ids[:1]}
    train_step(model, [half], opt, b, 1.0, torch.tensor(8))
    assert b.compile_count() > compiles
