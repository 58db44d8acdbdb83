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


class _Done:
    def wait(self):
        pass


def _fake_world(monkeypatch, rank: int, world: int, gather):
    """Muon as rank `rank` of `world`, in this one process: the all-gather is `gather`."""
    import optim.muon

    monkeypatch.setattr(optim.muon.Muon, "_world", lambda self: (rank, world))

    def all_gather(out, local, async_op=False):
        gather(out, local)
        return _Done()

    monkeypatch.setattr(optim.muon, "_all_gather_flat", all_gather)


def test_every_rank_orthogonalises_the_same_shapes_in_the_same_order(monkeypatch):
    """The speedrun model on 32 workers (trn1.32xlarge): its 24 (2048, 768) and 24 (768, 2048)
    matrices leave ranks 24-31 without one of each; they must still run the same work."""
    import optim.muon
    from model import build_model, get_config
    from optim import default_optim_config

    with torch.device("meta"):  # shapes only
        model = build_model(get_config("speedrun"))
    calls, sequences = [], {}
    monkeypatch.setattr(optim.muon, "zeropower_via_newtonschulz5",
                        lambda g, steps, dtype: calls.append(tuple(g.shape)) or torch.zeros_like(g, dtype=dtype))
    for rank in (0, 23, 24, 31):
        _fake_world(monkeypatch, rank, 32, gather=lambda out, local: None)
        opt = build_optimizer(model, default_optim_config("speedrun"), distributed=True)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        calls.clear()
        opt.step()
        sequences[rank] = list(calls)
    assert sequences[0] == [(768, 768)] * 3 + [(2048, 768), (768, 2048)]
    assert all(calls == sequences[0] for calls in sequences.values()), sequences


def test_every_rank_traces_the_same_muon_graph(monkeypatch):
    """Neuron runs one graph on every data-parallel worker: the HLO of a distributed Muon step
    must not depend on the rank, also for a rank that owns no matrix of a chunk."""
    torch_xla = pytest.importorskip("torch_xla")
    from optim import Muon

    device = torch_xla.device()

    def hlo(rank: int) -> str:
        g = torch.Generator().manual_seed(0)
        params = [nn.Parameter(torch.randn(s, generator=g).to(device)) for s in [(8, 16)] * 3 + [(12, 12)]]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(device)
        _fake_world(monkeypatch, rank, 4, gather=lambda out, local: out.copy_(local.repeat(4)))
        Muon(params, lr=0.02, distributed=True, ns_dtype=torch.float32).step()
        text = torch_xla._XLAC._get_xla_tensors_hlo(params)
        torch_xla.sync()
        return text

    # Rank 3 owns no (8, 16) matrix (three of them over 4 ranks); ranks 0 and 1 own different ones.
    graphs = {rank: hlo(rank) for rank in (0, 1, 3)}
    assert graphs[0] == graphs[1] == graphs[3]
