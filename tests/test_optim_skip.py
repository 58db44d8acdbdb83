"""The optimizer step of the CPU/CUDA backends: the gradient scale and clipping in one pass (none
when there is nothing to do), and a non-finite step skipped on the device through found_inf by
both fused AdamW and Muon."""

from __future__ import annotations

import pytest
import torch

from model import build_model, get_config
from optim import build_optimizer, default_optim_config
from optim.muon import Muon
from runtime.backend import CPUBackend, scale_and_clip


def tiny():
    torch.manual_seed(0)
    return build_model(get_config("sample", n_layers=2, d_model=32, n_heads=2, d_ff=64))


def backward(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 24, (2, 16), generator=g)
    labels = torch.where(torch.rand(2, 16, generator=g) < 0.3, ids, -100)
    model(ids, torch.zeros_like(ids), labels)[1].backward()


def state_of(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            [v.clone() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)])


def test_a_non_finite_step_is_skipped_on_the_device_by_adamw_and_muon():
    model = tiny()
    opt = build_optimizer(model, default_optim_config("sample"), fused=True)  # Muon + fused AdamW
    assert set(opt.parts) == {"adamw", "muon"}
    backend = CPUBackend()
    for _ in range(2):  # the first steps create the optimizer state
        backward(model)
        norm, stepped = backend.optimizer_step(model, opt, 1.0)
        assert bool(stepped)
    before = state_of(model, opt)
    backward(model)
    next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")
    norm, stepped = backend.optimizer_step(model, opt, 1.0)
    assert not bool(stepped) and not torch.isfinite(norm)
    after = state_of(model, opt)
    for a, b in zip(before[0] + before[1], after[0] + after[1]):
        assert torch.equal(a, b), "a skipped step changed weights or optimizer state"
    backward(model)
    assert bool(backend.optimizer_step(model, opt, 1.0)[1])
    assert any(not torch.equal(a, p) for a, p in zip(after[0], model.parameters()))


def test_muon_with_found_inf_zero_is_muon_without_it():
    one, two = tiny(), tiny()
    opts = []
    for model in (one, two):
        mats = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n and "lm_head" not in n]
        opts.append(Muon(mats, lr=0.02, weight_decay=0.1, ns_dtype=torch.float32))
    opts[1].found_inf = torch.zeros(())
    for _ in range(3):
        for model, opt in zip((one, two), opts):
            backward(model)
            opt.step()
            opt.zero_grad()
    for a, b in zip(one.parameters(), two.parameters()):  # the gated add rounds like the plain one
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_scaling_and_clipping_are_one_pass_and_none_when_off(monkeypatch):
    calls = []
    real = torch._foreach_mul_
    monkeypatch.setattr(torch, "_foreach_mul_", lambda *a: calls.append(1) or real(*a))
    grads = [torch.full((3,), 2.0), torch.full((4,), -1.0)]
    raw = torch.linalg.vector_norm(torch.cat(grads))
    kept = [g.clone() for g in grads]
    norm = scale_and_clip(grads, None, 1.0)
    assert calls == [] and all(torch.equal(a, b) for a, b in zip(grads, kept))
    assert torch.allclose(norm, raw)
    norm = scale_and_clip(grads, None, torch.tensor(0.5))
    assert calls == [1] and torch.allclose(norm, 0.5 * raw)
    assert torch.allclose(torch.linalg.vector_norm(torch.cat(grads)), 0.5 * raw)
    scaled = torch.linalg.vector_norm(torch.cat(grads))
    norm = scale_and_clip(grads, 1.0, torch.tensor(2.0))  # the norm is of the scaled gradient
    assert calls == [1, 1] and torch.allclose(norm, 2 * scaled)
    assert torch.allclose(torch.linalg.vector_norm(torch.cat(grads)), torch.tensor(1.0), atol=1e-5)


@pytest.mark.parametrize("accum", [1, 3])
def test_scaling_after_backward_is_scaling_the_loss(accum):
    """train.py backpropagates summed losses and scales the gradients in the optimizer step:
    the gradients equal those of the mean loss over every target of the step."""
    model, ref = tiny(), tiny()
    for seed in range(accum):
        backward(model, seed)
    g = torch.Generator()
    count = 0
    for seed in range(accum):
        g.manual_seed(seed)
        ids = torch.randint(4, 24, (2, 16), generator=g)
        count += int((torch.where(torch.rand(2, 16, generator=g) < 0.3, ids, -100) != -100).sum())
    losses = []
    for seed in range(accum):
        g.manual_seed(seed)
        ids = torch.randint(4, 24, (2, 16), generator=g)
        labels = torch.where(torch.rand(2, 16, generator=g) < 0.3, ids, -100)
        losses.append(ref(ids, torch.zeros_like(ids), labels)[1])
    (sum(losses) / count).backward()
    scale_and_clip([p.grad for p in model.parameters()], None, torch.tensor(1.0 / count))
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_a_checkpoint_of_an_unfused_adamw_resumes_into_a_fused_one():
    """Checkpoints from XLA (no fused AdamW) or from before keep `fused: None` in their groups;
    loaded here, the optimizer stays fused, so the device-side skip keeps working."""
    old_model, model = tiny(), tiny()
    old = build_optimizer(old_model, default_optim_config("sample"), fused=False)
    backward(old_model)
    old.step()
    new = build_optimizer(model, default_optim_config("sample"), fused=True)
    new.load_state_dict(old.state_dict())
    assert all(g["fused"] for g in new.parts["adamw"].param_groups)
    backward(model)
    assert bool(CPUBackend().optimizer_step(model, new, 1.0)[1])
