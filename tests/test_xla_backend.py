"""XLABackend pieces in one process on torch-xla's CPU runtime (PJRT_DEVICE=CPU)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

# Before the runtime starts: fast CPU compiles (the graph count does not depend on them).
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
pytest.importorskip("torch_xla")
pytestmark = pytest.mark.xla


def backend(precision="fp32"):
    from runtime.xla import XLABackend

    b = XLABackend(SimpleNamespace(precision=precision))
    b.init_distributed()
    return b


def tiny_model():
    """The speedrun architecture; 2 layers so that it has a value embedding and a U-Net skip."""
    from model import build_model, get_config

    torch.manual_seed(0)
    return build_model(get_config("sample", n_layers=2, d_model=32, n_heads=2, d_ff=64, attn_impl="sdpa"))


def tiny_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 24, (2, 32), generator=g)
    labels = torch.where(torch.rand(2, 32, generator=g) < 0.3, ids, -100)
    return {"input_ids": torch.where(labels != -100, 32, ids), "labels": labels,
            "doc_ids": (torch.arange(32) // 16).expand(2, 32).clone()}


def test_runtime_env_states_the_compiler_cast_and_keeps_user_flags():
    from runtime.xla import runtime_env

    env = runtime_env("bf16", "--cache_dir=/c --auto-cast=matmult")
    assert env["NEURON_CC_FLAGS"] == "--cache_dir=/c --auto-cast=matmult --model-type=transformer"
    assert "NEURON_RT_STOCHASTIC_ROUNDING_EN" not in env
    env = runtime_env("bf16_sr", "")
    assert env["NEURON_CC_FLAGS"] == "--model-type=transformer --auto-cast=none"
    assert env["NEURON_RT_STOCHASTIC_ROUNDING_EN"] == "1"


def test_unknown_precision_is_refused_with_the_choices():
    from runtime.errors import ConfigError
    from runtime.xla import XLABackend

    with pytest.raises(ConfigError, match="bf16_sr"):
        XLABackend(SimpleNamespace(precision="fp8"))


def test_prepare_model_keeps_tied_weights_tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(5, 4)
            self.head = nn.Linear(4, 5, bias=False)
            self.head.weight = self.embed.weight

    m = backend().prepare_model(Tied())
    assert m.head.weight is m.embed.weight
    assert m.embed.weight.device.type == "xla"
    assert len(list(m.parameters())) == 1


def test_bf16_sr_makes_parameters_bf16_and_keeps_buffers_fp32():
    b = backend("bf16_sr")
    m = b.prepare_model(tiny_model())
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert {t.dtype for t in m.buffers() if t.is_floating_point()} == {torch.float32}
    batch = b.to_device(tiny_batch())
    _, loss = m(batch["input_ids"], batch["doc_ids"], batch["labels"])
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(b.to_host(loss))


def test_bf16_autocasts_matmuls():
    b = backend("bf16")
    lin = b.prepare_model(nn.Linear(4, 4))
    with b.autocast():
        y = lin(torch.ones(2, 4, device=b.device))
    assert y.dtype == torch.bfloat16 and lin.weight.dtype == torch.float32


def test_a_non_finite_step_is_undone_on_the_device_without_a_new_graph():
    from optim import build_optimizer, default_optim_config

    b = backend()
    model = b.prepare_model(tiny_model())
    opt = build_optimizer(model, default_optim_config("sample"))  # Muon + AdamW

    def step(scale: float):
        batch = b.to_device(tiny_batch())
        s = torch.tensor(scale, device=b.device)  # as train.py: the gradient scale is a device tensor
        _, loss = model(batch["input_ids"], batch["doc_ids"], batch["labels"])
        loss.backward()
        norm, stepped = b.optimizer_step(model, opt, 1.0, scale=s)
        assert bool(b.to_host(stepped)) == bool(torch.isfinite(b.to_host(norm)))
        return norm

    def snapshot():
        params = [b.to_host(p).clone() for p in model.parameters()]
        state = [b.to_host(v).clone() for s in opt.state.values() for v in s.values()
                 if isinstance(v, torch.Tensor) and v.device.type == "xla"]
        return params, state

    for _ in range(2):  # warm-up: the first step creates the optimizer state
        step(1e-3)
    before = snapshot()
    compiles = b.compile_count()
    norm = step(float("nan"))
    assert not torch.isfinite(b.to_host(norm))
    after = snapshot()
    for x, y in zip(before[0] + before[1], after[0] + after[1]):
        assert torch.equal(x, y), "a non-finite step changed the weights or optimizer state"
    assert torch.isfinite(b.to_host(step(1e-3)))
    changed = snapshot()
    assert any(not torch.equal(x, y) for x, y in zip(after[0], changed[0])), "a finite step changed nothing"
    assert b.compile_count() == compiles, "skipping a step compiled a new graph"


def test_step_closures_wait_for_the_graph_inside_a_step_and_run_at_once_at_a_timing_edge():
    b = backend()
    seen = []
    x = torch.ones(3, device=b.device)
    b.to_device({})  # a step begins
    b.step_closure(seen.append, (x * 2).sum())
    assert seen == [], "a closure inside the step ran before the graph executed"
    b.flush()
    assert seen == [6.0]
    b.sync()  # a timing edge: the host has waited for the device
    b.step_closure(seen.append, (x * 3).sum())
    assert seen == [6.0, 9.0]


def test_checkpoint_state_is_on_the_cpu():
    from optim import build_optimizer, default_optim_config

    b = backend()
    model = b.prepare_model(tiny_model())
    opt = build_optimizer(model, default_optim_config("sample"))
    batch = b.to_device(tiny_batch())
    model(batch["input_ids"], batch["doc_ids"], batch["labels"])[1].backward()
    b.optimizer_step(model, opt, None)
    tensors = list(b.model_state_dict(model).values())
    for part in b.optimizer_state_dict(model, opt).values():
        tensors += [v for s in part["state"].values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert tensors and {t.device.type for t in tensors} == {"cpu"}
    assert isinstance(b.compile_count(), int) and b.log_fields() == {"compiles": b.compile_count()}


def test_bf16_autocast_runs_the_speedrun_model():
    b = backend("bf16")
    m = b.prepare_model(tiny_model())
    assert len(m.value_embeds) == 1  # fp32 value embeddings mixed into the bf16 attention values
    batch = b.to_device(tiny_batch())
    with b.autocast():
        _, loss = m(batch["input_ids"], batch["doc_ids"], batch["labels"])
    loss.backward()
    assert torch.isfinite(b.to_host(loss))
