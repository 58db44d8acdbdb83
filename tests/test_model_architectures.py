"""Both networks on packed rows: document isolation, padding, token dropout, loss, switches."""

import pytest
import torch
import torch.nn.functional as F

from model import build_model, get_config

MASK = 32
# tiny shapes of each architecture: fast on 2 CPU cores
TINY = dict(n_layers=4, d_model=32, n_heads=4, d_ff=64)


def tiny(arch, **overrides):
    return get_config("esm2_8m" if arch == "esm2" else "sample", **TINY, **overrides)


def randomized(cfg, seed=0):
    """A model whose every parameter is random, so zero-initialised projections and unit
    norms/lambdas cannot make a test pass by accident."""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def document(length, n_mask, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 24, (length,), generator=g)
    ids[0], ids[-1] = 0, 2
    ids[1:1 + n_mask] = MASK
    return ids


NGRAMS = dict(ngram_buckets=97, ngram_orders=(1, 2, 4))  # context n-gram embeddings (model/ngram.py)


@pytest.mark.parametrize("impl", ["sdpa", "varlen"])
@pytest.mark.parametrize("arch, extra", [("esm2", {}), ("speedrun", {}), ("speedrun", NGRAMS),
                                         ("speedrun", {**NGRAMS, "ngram_to": "logits"})])
def test_packed_row_equals_documents_run_alone(arch, extra, impl):
    model = randomized(tiny(arch, attn_impl=impl, **extra))
    # very different <mask> shares per document: ESM2's rescale must be per document
    a, b = document(9, 4, seed=1), document(13, 0, seed=2)
    packed = torch.cat([a, b, torch.ones(2, dtype=torch.long)])[None]
    doc_ids = torch.tensor([[0] * 9 + [1] * 13 + [-1] * 2])
    with torch.no_grad():
        together, _ = model(packed, doc_ids)
        alone_a, _ = model(a[None], torch.zeros(1, 9, dtype=torch.long))
        alone_b, _ = model(b[None], torch.zeros(1, 13, dtype=torch.long))
    assert torch.allclose(together[0, :9], alone_a[0], atol=1e-5)
    assert torch.allclose(together[0, 9:22], alone_b[0], atol=1e-5)


@pytest.mark.parametrize("arch", ["esm2", "speedrun"])
def test_padding_inputs_do_not_change_real_outputs(arch):
    model = randomized(tiny(arch))
    ids = torch.cat([document(10, 2, seed=3), torch.ones(6, dtype=torch.long)])[None]
    doc_ids = torch.tensor([[0] * 10 + [-1] * 6])
    other = ids.clone()
    other[0, 10:] = torch.tensor([5, MASK, 7, 0, 2, MASK])  # garbage where the padding was
    with torch.no_grad():
        x, _ = model(ids, doc_ids)
        y, _ = model(other, doc_ids)
    assert torch.equal(x[0, :10], y[0, :10])


@pytest.mark.parametrize("arch", ["esm2", "speedrun"])
def test_attention_implementations_agree_in_the_model(arch):
    model = randomized(tiny(arch))
    ids = torch.stack([document(12, 3, seed=4), document(12, 1, seed=5)])
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    outs = {}
    with torch.no_grad():
        for impl in ("sdpa", "reference", "varlen"):
            model.cfg.attn_impl = impl
            outs[impl], _ = model(ids, doc_ids)
    assert torch.allclose(outs["sdpa"], outs["reference"], atol=1e-5)
    assert torch.allclose(outs["varlen"], outs["reference"], atol=1e-5)  # no padding here


@pytest.mark.parametrize("arch", ["esm2", "speedrun"])
def test_loss_is_sum_of_cross_entropy_over_targets(arch):
    model = randomized(tiny(arch))
    ids = torch.stack([document(12, 2, seed=6), document(12, 0, seed=7)])
    doc_ids = torch.zeros(2, 12, dtype=torch.long)
    labels = torch.full((2, 12), -100)
    labels[0, 1:3] = torch.tensor([5, 9])
    labels[1, 4] = 11
    logits, loss = model(ids, doc_ids, labels)
    assert logits.dtype == torch.float32 and logits.shape == (2, 12, 33)
    expected = sum(F.cross_entropy(logits[b, t], labels[b, t]) for b, t in [(0, 1), (0, 2), (1, 4)])
    assert torch.allclose(loss, expected, atol=1e-5)
    _, empty = model(ids, doc_ids, torch.full((2, 12), -100))
    assert empty.item() == 0.0  # a micro-batch without targets adds zero, not NaN


SWITCHES_OFF = {
    "norm": "layer", "qk_norm": False, "rotary": False, "activation": "gelu",
    "zero_init": False, "value_embeds": False, "unet": False, "logit_softcap": 0.0,
    "tie_embeddings": True, "token_dropout": False,
}


@pytest.mark.parametrize("switch", sorted(SWITCHES_OFF))
def test_each_speedrun_switch_turns_off_and_changes_the_model(switch):
    on_cfg, off_cfg = tiny("speedrun"), tiny("speedrun", **{switch: SWITCHES_OFF[switch]})
    on, off = randomized(on_cfg), build_model(off_cfg)
    ids = torch.stack([document(12, 3, seed=8), document(12, 2, seed=9)])
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    labels = torch.where(ids == MASK, 5, -100)
    _, loss = off(ids, doc_ids, labels)  # the ablated model trains
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in off.parameters())  # no parameter left unused

    if switch == "zero_init":
        assert not build_model(on_cfg).blocks[0].attn.o.weight.any()
        assert off.blocks[0].attn.o.weight.any()
    elif set(on.state_dict()) != set(off.state_dict()):
        assert switch in ("value_embeds", "unet", "tie_embeddings")
    else:  # same parameters, different computation
        off.load_state_dict(on.state_dict())
        with torch.no_grad():
            assert not torch.allclose(on(ids, doc_ids)[0], off(ids, doc_ids)[0], atol=1e-4)


def test_softcap_bounds_logits():
    model = randomized(tiny("speedrun", logit_softcap=2.0))
    logits, _ = model(document(12, 0, seed=10)[None], torch.zeros(1, 12, dtype=torch.long))
    assert logits.abs().max() < 2.0


def test_speedrun_parameter_names_route_for_optim():
    names = dict(build_model(tiny("speedrun")).named_parameters())
    assert "embed.weight" in names and "value_embeds.0.weight" in names
    assert {n for n in names if n.startswith("lm_head.")} == {
        "lm_head.dense.weight", "lm_head.decoder.weight", "lm_head.bias"}
    tied = dict(build_model(tiny("speedrun", tie_embeddings=True)).named_parameters())
    assert "lm_head.decoder.weight" not in tied
