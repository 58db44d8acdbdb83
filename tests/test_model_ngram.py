"""Context n-gram embeddings (model/ngram.py): what each key reads, document isolation, routing."""

import pytest
import torch

from model import build_model
from model.config import ModelConfig
from model.ngram import MOD, SENTINEL, NgramEmbedding, context_keys, neighbours
from optim.build import build_optimizer
from optim.config import OptimConfig
from tests.test_model_architectures import MASK, document, randomized, tiny  # packed = alone: there


def test_neighbours_stop_at_documents_padding_and_row_edges():
    ids = torch.tensor([[0, 5, 6, 2, 0, 7, 2, 1]])
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1, -1]])
    S = SENTINEL
    assert neighbours(ids, docs, -1).tolist() == [[S, 0, 5, 6, S, 0, 7, S]]
    assert neighbours(ids, docs, 2).tolist() == [[6, 2, S, S, 2, S, S, S]]


def test_a_key_reads_its_side_only_and_never_the_position_itself():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 24, (1, 20), generator=g)
    docs = torch.zeros(1, 20, dtype=torch.long)
    t, orders = 10, (1, 3)
    base = [k[0, t] for k in context_keys(ids, docs, orders)]  # left1, right1, both1, left3, right3, both3

    def changed_at(j):
        other = ids.clone()
        other[0, j] = 30 if ids[0, j] != 30 else 31
        return [bool(a != k[0, t]) for a, k in zip(base, context_keys(other, docs, orders))]

    assert changed_at(t) == [False] * 6  # its own token (masked in training) is in no key
    assert changed_at(t - 1) == [True, False, True, True, False, True]
    assert changed_at(t + 2) == [False, False, False, False, True, True]
    assert changed_at(t - 4) == [False] * 6  # beyond the longest order
    assert len(set(torch.stack(base).tolist())) == 6  # six different keys


def test_keys_fit_int32_so_neurons_int64_downcast_changes_nothing():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 33, (4, 200), generator=g)
    docs = torch.randint(0, 3, (4, 200), generator=g).sort(1).values
    orders = tuple(range(1, 17))  # every order the config allows
    wide, narrow = context_keys(ids, docs, orders), context_keys(ids.int(), docs.int(), orders)
    assert all(w.dtype == torch.int64 and n.dtype == torch.int32 for w, n in zip(wide, narrow))
    assert all(torch.equal(w, n.long()) for w, n in zip(wide, narrow))
    assert min(int(w.min()) for w in wide) >= 0 and max(int(w.max()) for w in wide) < 2**31
    with pytest.raises(ValueError, match=str(MOD)):
        ModelConfig(ngram_buckets=MOD + 1)


def test_ngram_embeddings_change_the_model_train_and_route_to_the_embedding_group():
    on = randomized(tiny("speedrun", ngram_buckets=64))
    off = build_model(tiny("speedrun"))
    state = {k: v for k, v in on.state_dict().items() if not k.startswith("ngram.")}
    off.load_state_dict(state)
    ids = torch.stack([document(12, 3, seed=8), document(12, 2, seed=9)])
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    with torch.no_grad():
        assert not torch.allclose(on(ids, doc_ids)[0], off(ids, doc_ids)[0], atol=1e-4)
    labels = torch.where(ids == MASK, 5, -100)
    on.train()
    _, loss = on(ids, doc_ids, labels)
    loss.backward()
    grad = on.ngram.embed.weight.grad
    used = torch.stack(context_keys(ids, doc_ids, on.ngram.orders)).remainder(64).unique()
    assert grad[used].abs().sum(-1).gt(0).any() and not grad[[r for r in range(64) if r not in used.tolist()]].any()
    opt = build_optimizer(on, OptimConfig())
    group = next(g for g in opt.param_groups if any(p is on.ngram.embed.weight for p in g["params"]))
    assert group["name"] == "embed"


def test_gain_scales_the_output_and_divides_the_init():
    torch.manual_seed(0)
    one = NgramEmbedding(50, (2, 5), 16)
    torch.manual_seed(0)
    eight = NgramEmbedding(50, (2, 5), 16, gain=8.0)
    assert torch.allclose(eight.embed.weight * 8, one.embed.weight)
    ids, docs = torch.randint(4, 24, (3, 11)), torch.zeros(3, 11, dtype=torch.long)
    assert eight(ids, docs).shape == (3, 11, 16)
    assert torch.allclose(eight(ids, docs), one(ids, docs), atol=1e-6)  # the same start
    with torch.no_grad():
        one.embed.weight.fill_(1.0), eight.embed.weight.fill_(1.0)
    assert torch.allclose(eight(ids, docs), 8 * one(ids, docs))  # the same row moves 8x the output


@pytest.mark.parametrize("bad, match", [
    (dict(ngram_buckets=-1), "ngram_buckets"),
    (dict(ngram_buckets=8, ngram_orders=()), "ngram_orders"),
    (dict(ngram_buckets=8, ngram_orders=(0, 2)), "ngram_orders"),
    (dict(ngram_buckets=8, ngram_to="output"), "ngram_to"),
    (dict(ngram_buckets=8, ngram_gain=0.0), "ngram_gain"),
    (dict(arch="esm2", n_layers=2, d_model=32, n_heads=2, d_ff=64, norm="layer", qk_norm=False,
          activation="gelu", zero_init=False, value_embeds=False, unet=False, logit_softcap=0.0,
          tie_embeddings=True, ngram_buckets=8), "speedrun settings"),
    (dict(arch="patch_unet", n_layers=2, max_length=64, ngram_buckets=8), "ngram"),
])
def test_bad_ngram_settings_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**bad)


def test_orders_from_yaml_lists_become_a_tuple():
    assert ModelConfig.from_dict({"ngram_buckets": 8, "ngram_orders": [1, 3]}).ngram_orders == (1, 3)
