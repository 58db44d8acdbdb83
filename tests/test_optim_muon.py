"""Muon on one process: Newton-Schulz, the momentum rule, the update scale."""

import pytest
import torch

from optim import Muon, zeropower_via_newtonschulz5


def with_singular_values(rows, cols, svals, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(svals), generator=g))
    v, _ = torch.linalg.qr(torch.randn(cols, len(svals), generator=g))
    return u @ torch.diag(svals) @ v.T, u @ v.T


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,cols", [(32, 32), (24, 64), (64, 24)])
def test_newton_schulz_is_near_the_polar_factor(rows, cols, dtype):
    # Singular values spread over a decade: all >= 1% of the Frobenius norm, where 5 quintic
    # steps land every one in [0.68, 1.14] in exact arithmetic (bf16 widens it slightly).
    k = min(rows, cols)
    g, polar = with_singular_values(rows, cols, torch.logspace(0, -1, k))
    out = zeropower_via_newtonschulz5(g, dtype=dtype)
    assert out.dtype == dtype and out.shape == (rows, cols)
    s = torch.linalg.svdvals(out.float())
    assert s.min() > 0.65 and s.max() < 1.2, (s.min(), s.max())
    # Same singular vectors as the exact U V^T: only the singular values are approximate.
    rel = (out.float() - polar).norm() / polar.norm()
    assert rel < 0.25, rel


def test_newton_schulz_ignores_scale_and_keeps_orientation():
    g, _ = with_singular_values(16, 40, torch.linspace(1, 0.5, 16))
    a = zeropower_via_newtonschulz5(g).float()
    b = zeropower_via_newtonschulz5(1000 * g).float()
    # Scaling changes only bf16 rounding (a few % of the norm after 5 steps).
    assert (a - b).norm() / a.norm() < 0.1
    # A tall input is iterated in its transposed (wide) form, so the result is exactly a.T.
    assert torch.equal(zeropower_via_newtonschulz5(g.T).float(), a.T)


def one_muon_step(p, grad, **kw):
    p = torch.nn.Parameter(p.clone())
    opt = Muon([p], **kw)
    p.grad = grad.clone()
    opt.step()
    return p.detach(), opt


def test_update_is_lr_times_shape_scale_times_ns_of_nesterov_grad():
    torch.manual_seed(0)
    for rows, cols in [(48, 12), (12, 48)]:
        p0, grad = torch.randn(rows, cols), torch.randn(rows, cols)
        p1, _ = one_muon_step(p0, grad, lr=0.1, momentum=0.9)
        # First step: buf = 0.1 g; Nesterov g' = lerp(g, buf, 0.9) = 0.19 g; NS is scale-free.
        expected_dir = zeropower_via_newtonschulz5(0.19 * grad).float()
        scale = max(1.0, rows / cols) ** 0.5
        torch.testing.assert_close(p0 - p1, 0.1 * scale * expected_dir, atol=1e-6, rtol=1e-5)


def test_momentum_buffer_is_an_exponential_average_of_grads():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    opt = Muon([p], lr=0.01, momentum=0.9)
    grads = [torch.full((4, 4), 1.0), torch.full((4, 4), 3.0)]
    for g in grads:
        p.grad = g.clone()
        opt.step()
    # buf <- lerp(buf, g, 0.1): 0.1 after the first grad, 0.9 * 0.1 + 0.1 * 3 = 0.39 after the second.
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], torch.full((4, 4), 0.39))


def test_parameters_with_more_than_two_dims_are_flattened():
    torch.manual_seed(1)
    p0, grad = torch.randn(6, 2, 3, 4), torch.randn(6, 2, 3, 4)
    p1, _ = one_muon_step(p0, grad, lr=0.1)
    p1_flat, _ = one_muon_step(p0.reshape(6, 24), grad.reshape(6, 24), lr=0.1)
    assert p1.shape == (6, 2, 3, 4)
    torch.testing.assert_close(p1.reshape(6, 24), p1_flat)


def test_decoupled_weight_decay_shrinks_before_the_update():
    torch.manual_seed(2)
    p0, grad = torch.randn(8, 8), torch.randn(8, 8)
    plain, _ = one_muon_step(p0, grad, lr=0.1)
    decayed, _ = one_muon_step(p0, grad, lr=0.1, weight_decay=0.5)
    torch.testing.assert_close(decayed - plain, -0.05 * p0)


def test_parameters_without_grad_are_left_alone_and_vectors_are_refused():
    a, b = torch.nn.Parameter(torch.ones(4, 4)), torch.nn.Parameter(torch.ones(4, 4))
    opt = Muon([a, b], lr=0.1)
    a.grad = torch.randn(4, 4)
    opt.step()
    assert torch.equal(b, torch.ones(4, 4)) and not torch.equal(a, torch.ones(4, 4))
    assert b not in opt.state
    with pytest.raises(ValueError, match=r"shape \(4,\).*AdamW"):
        Muon([torch.nn.Parameter(torch.ones(4))])
