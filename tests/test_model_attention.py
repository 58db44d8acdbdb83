"""Attention over packed rows: every implementation against a float64 per-document reference."""

import pytest
import torch

from model.attention import attend, build_mask, doc_positions

DOC_IDS = torch.tensor([
    [0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2, -1, -1],
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
])


def per_document_reference(q, k, v, doc_ids):
    """float64 softmax attention run on each document alone (no mask machinery)."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros_like(q)
    for b in range(doc_ids.shape[0]):
        for d in doc_ids[b].unique().tolist():
            if d < 0:
                continue
            idx = (doc_ids[b] == d).nonzero().squeeze(1)
            qs, ks, vs = q[b][:, idx], k[b][:, idx], v[b][:, idx]
            w = torch.softmax(qs @ ks.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
            out[b][:, idx] = w @ vs
    return out


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("impl", ["sdpa", "reference", "flex"])
def test_attention_agrees_with_float64_reference(impl):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8) for _ in range(3))
    expected = per_document_reference(q, k, v, DOC_IDS)
    try:
        with torch.no_grad():  # flex has no CPU backward; forward runs eagerly
            got = attend(q, k, v, build_mask(DOC_IDS, impl), impl)
    except (RuntimeError, NotImplementedError) as e:
        if impl != "flex":
            raise
        pytest.skip(f"flex attention does not run on this platform: {e}")
    real = (DOC_IDS >= 0)[:, None, :, None].expand_as(q)
    assert torch.allclose(got.double()[real], expected[real], atol=1e-5)
    assert torch.isfinite(got).all()  # padding rows attend to padding: no empty softmax


def test_padding_never_reaches_real_positions():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 3, 16, 8) for _ in range(3))
    pad = (DOC_IDS < 0)[:, None, :, None].expand_as(q)
    k2, v2 = k.masked_fill(pad, 1e3), v.masked_fill(pad, -1e3)
    for impl in ("sdpa", "reference"):
        mask = build_mask(DOC_IDS, impl)
        a, b = attend(q, k, v, mask, impl), attend(q, k2, v2, mask, impl)
        assert torch.equal(a[~pad], b[~pad])


def test_positions_restart_in_every_document():
    expected = [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5]
    assert doc_positions(DOC_IDS)[0, :14].tolist() == expected
    assert doc_positions(DOC_IDS)[1].tolist() == list(range(16))


# ------------------------------------------------------------------ whole rows: no mask at all

WHOLE_IDS = torch.tensor([[0] * 16, [-1] * 16, [0] * 16])  # one document per row, or padding only


@pytest.mark.parametrize("impl", ["sdpa", "varlen", "reference"])
def test_whole_rows_attend_without_a_mask_and_agree_with_the_reference(impl):
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 16, 8, dtype=torch.float64) for _ in range(3))
    assert build_mask(WHOLE_IDS, impl, whole_rows=True) is None
    got = attend(q, k, v, None, impl)
    masked = attend(q, k, v, build_mask(WHOLE_IDS, impl), impl)
    want = per_document_reference(q, k, v, WHOLE_IDS)
    real = WHOLE_IDS >= 0  # padding rows' outputs reach nothing (both graphs let padding see padding)
    torch.testing.assert_close(got.transpose(1, 2)[real], want.transpose(1, 2)[real], rtol=0, atol=1e-12)
    torch.testing.assert_close(got.transpose(1, 2)[real], masked.transpose(1, 2)[real], rtol=0, atol=1e-12)


def test_a_window_keeps_its_mask_on_whole_rows():
    mask = build_mask(WHOLE_IDS, "sdpa", window=3, whole_rows=True)
    assert mask is not None and not bool(mask[0, 0, 0, 5]) and bool(mask[0, 0, 0, 3])


@pytest.mark.parametrize("arch", ["esm2", "speedrun", "patch_unet"])
def test_a_model_on_whole_rows_gives_the_masked_numbers_and_the_flag_really_drops_the_mask(arch):
    """The same loss and gradients with whole_rows as with the mask; and on rows of two
    documents the flag changes the logits, so the equality above is not a flag ignored."""
    from model import build_model, get_config

    torch.manual_seed(0)
    shape = dict(n_layers=2, d_model=32, n_heads=2, d_ff=64, attn_impl="sdpa")
    model = build_model(get_config({"esm2": "esm2_8m", "speedrun": "sample", "patch_unet": "patch_unet"}[arch],
                                   **shape)).double()
    with torch.no_grad():  # off the zero init, where the speedrun's blocks start as the identity
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(4, 24, (3, 16))
    labels = torch.where(torch.rand(3, 16) < 0.3, ids, -100)
    ids[1] = 1  # <pad>: a row of padding only
    labels[1] = -100

    def run(doc_ids, whole):
        model.zero_grad()
        logits, loss = model(ids, doc_ids, labels, whole_rows=whole)
        loss.backward()
        return logits, loss, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    (logits_m, loss_m, grads_m), (logits_w, loss_w, grads_w) = run(WHOLE_IDS, False), run(WHOLE_IDS, True)
    torch.testing.assert_close(logits_w[WHOLE_IDS >= 0], logits_m[WHOLE_IDS >= 0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(loss_w, loss_m, rtol=1e-12, atol=0)
    for a, b in zip(grads_w, grads_m):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    two_docs = torch.tensor([[0] * 8 + [1] * 8, [-1] * 16, [0] * 16])
    assert not torch.allclose(run(two_docs, True)[0][0], run(two_docs, False)[0][0])
