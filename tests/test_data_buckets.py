"""Length-bucketed micro-batches (data/buckets.py): a few shapes, the same on every rank at
every micro-step, whole documents, every document once per epoch, and an exact resume."""

from collections import Counter

import numpy as np
import pytest
import torch
from test_data_loader import epoch_documents, make_docs, segments, write

from data.buckets import BucketPacker, bucket_lengths, bucket_of, check_buckets
from data.loader import TrainLoader
from data.masking import MaskingConfig
from data.packing import span
from data.tokenizer import PAD

L, ROWS = 64, 4  # rows of 64, 4 per unbucketed micro-batch: 256 token slots


@pytest.fixture
def mixed(tmp_path):
    """Documents of 1 to 61 residues (spans 3 to 63): every bucket of 64 gets some."""
    docs = make_docs(5, 240, lo=1, hi=60)
    return [write(tmp_path, "t_train_000000.bin", docs[:130]), write(tmp_path, "t_train_000001.bin", docs[130:])], docs


def test_bucket_lengths_and_the_bucket_of_a_span():
    assert bucket_lengths(1024, 4) == [256, 512, 768, 1024]
    assert bucket_lengths(512, 1) == [512]
    lengths = bucket_lengths(64, 4)
    assert [bucket_of(s, lengths) for s in (3, 16, 17, 48, 49, 64)] == [0, 0, 1, 2, 3, 3]
    with pytest.raises(ValueError, match="longer than the rows"):
        bucket_of(65, lengths)


@pytest.mark.parametrize("n", [0, 3, 16])
def test_a_bucket_count_that_does_not_cut_the_rows_evenly_is_refused(n):
    with pytest.raises(ValueError, match=f"length_buckets={n}"):
        check_buckets(64, n)
    check_buckets(4, 1)  # one bucket is full rows, of any length


def test_the_refusal_names_a_count_that_fits():
    with pytest.raises(ValueError, match="such as 8"):
        check_buckets(1024, 3)
    with pytest.raises(ValueError, match="such as 1"):
        check_buckets(9, 2)


@pytest.mark.parametrize("n", [2, 4])
def test_micro_batches_take_the_bucket_shapes_and_hold_whole_documents(mixed, n):
    files, docs = mixed
    loader = TrainLoader(files, ROWS, L, length_buckets=n, prefetch=0)
    shapes = Counter()
    known = {d.tobytes() for d in docs}
    for _ in range(40):
        b = next(loader)
        rows, length = b["doc_ids"].shape
        shapes[length] += 1
        assert length in bucket_lengths(L, n) and rows == ROWS * L // length
        assert all(b[k].shape == (rows, length) for k in ("input_ids", "labels", "doc_ids"))
        assert torch.equal(b["doc_ids"] == -1, b["input_ids"] == PAD)
        assert set(segments(b)) <= known
    assert len(shapes) == n, f"some bucket never came up in 40 micro-batches: {shapes}"


def test_short_documents_go_in_short_rows(mixed):
    """Each row starts with a document of its own bucket: a row of 64 never holds only documents
    that a row of 32 would take (their attention would cost twice what they need). (When an
    epoch's last pieces drain, a bucket's pool may run dry and its rows take shorter ones.)"""
    files, _ = mixed
    loader = TrainLoader(files, ROWS, L, length_buckets=2, prefetch=0)
    for _ in range(20):  # the first of about 30 micro-batches per epoch
        b = next(loader)
        if b["doc_ids"].shape[1] == L:
            for row in b["doc_ids"]:
                if (row >= 0).any():
                    assert int((row == 0).sum()) > L // 2 or (row < 0).all()


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_rank_runs_the_same_shapes_and_the_ranks_cover_every_document_once(mixed, world_size):
    files, docs = mixed
    loaders = [TrainLoader(files, ROWS, L, rank=r, world_size=world_size, seed=4, length_buckets=4, prefetch=0)
               for r in range(world_size)]
    seen, shapes = Counter(), []
    while loaders[0].epoch == 0:
        batches = [next(ld) for ld in loaders]
        assert len({ld.epoch for ld in loaders}) == 1
        if loaders[0].epoch > 0:
            break
        shapes.append(batches[0]["doc_ids"].shape)
        assert all(b["doc_ids"].shape == shapes[-1] for b in batches), "ranks disagree on the bucket"
        for b in batches:
            seen.update(segments(b))
    assert seen == Counter(d.tobytes() for d in docs)
    assert len(set(shapes)) > 1


def test_bucketed_epochs_hold_the_same_documents_as_unbucketed_ones(mixed):
    files, docs = mixed
    plain = epoch_documents(TrainLoader(files, ROWS, L, seed=2, prefetch=0))
    bucketed = epoch_documents(TrainLoader(files, ROWS, L, seed=2, length_buckets=4, prefetch=0))
    assert Counter(plain) == Counter(bucketed) == Counter(d.tobytes() for d in docs)


def test_attention_cost_and_padding_fall_against_full_rows(tmp_path):
    """Documents of 10 to 60 residues in rows of 256: full rows pay 256 keys per token, rows
    of 64 about what the documents need. The price is padding: two or three such documents
    fill a row of 256 closely, one or two a row of 64 less so (13% here against 2%)."""
    docs = make_docs(6, 600, lo=10, hi=60)
    files = [write(tmp_path, "t_train_000000.bin", docs)]
    cost = {}
    for n in (1, 4):
        loader = TrainLoader(files, 4, 256, length_buckets=n, prefetch=0)
        scores = real = 0
        for _ in range(30):
            ids = next(loader)["doc_ids"]
            scores += ids.shape[0] * ids.shape[1] ** 2
            real += int((ids >= 0).sum())
        cost[n] = (scores / real, loader.padding_fraction)
    assert cost[4][0] < 0.4 * cost[1][0], cost
    assert cost[4][1] < 0.15, cost


def test_a_bucketed_loader_resumes_bit_exact(mixed):
    files, _ = mixed
    kw = dict(seed=3, masking=MaskingConfig(rule="esm2", rate=0.2), rank=1, world_size=2, length_buckets=4)
    reference = TrainLoader(files, ROWS, L, prefetch=0, **kw)
    expected = [next(reference) for _ in range(60)]
    first = TrainLoader(files, ROWS, L, prefetch=3, **kw)
    for _ in range(23):
        next(first)
    state = first.state_dict()
    assert any(state["pools"]), "the state names no pending piece: the resume point tests nothing"
    resumed = TrainLoader(files, ROWS, L, prefetch=2, **kw)
    resumed.load_state_dict(state)
    for want in expected[23:]:
        got = next(resumed)
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert resumed.padding_fraction == reference.padding_fraction
    first.close()
    resumed.close()


def test_a_state_with_other_buckets_is_refused_both_ways(mixed):
    files, _ = mixed
    bucketed = TrainLoader(files, ROWS, L, length_buckets=4, prefetch=0).state_dict()
    plain = TrainLoader(files, ROWS, L, prefetch=0).state_dict()
    with pytest.raises(ValueError, match="length_buckets=4 but this loader has 1"):
        TrainLoader(files, ROWS, L, prefetch=0).load_state_dict(bucketed)
    with pytest.raises(ValueError, match="length_buckets=1 but this loader has 4"):
        TrainLoader(files, ROWS, L, length_buckets=4, prefetch=0).load_state_dict(plain)


def test_the_pools_stay_below_the_lookahead_of_every_bucket(mixed):
    files, _ = mixed
    loader = TrainLoader(files, ROWS, L, length_buckets=4, prefetch=0, world_size=2)
    packer = loader._packer
    assert isinstance(packer, BucketPacker)
    for _ in range(50):
        next(loader)
        pooled = [sum(span(p[2]) for p in pool) for pool in packer.pools]
        assert pooled == packer.pool_tokens
        assert max(pooled) < packer.fill + L and sum(pooled) < 4 * (packer.fill + L)


def test_the_loss_of_a_bucketed_batch_is_that_of_its_documents_alone(mixed):
    """Short rows change where a document sits, not what the model computes on it."""
    from model import build_model, get_config

    files, _ = mixed
    torch.manual_seed(0)
    model = build_model(get_config("sample", n_layers=1, d_model=32, n_heads=2, d_ff=64, attn_impl="sdpa"))
    loader = TrainLoader(files, ROWS, L, length_buckets=4, masking=MaskingConfig(rate=0.3), prefetch=0)
    b = next(loader)
    logits, _ = model(b["input_ids"], b["doc_ids"])
    for r in range(b["doc_ids"].shape[0]):
        for k in b["doc_ids"][r].unique().tolist():
            if k < 0:
                continue
            where = b["doc_ids"][r] == k
            alone, _ = model(b["input_ids"][r][where][None], torch.zeros(1, int(where.sum()), dtype=torch.long))
            np.testing.assert_allclose(logits[r][where].detach().numpy(), alone[0].detach().numpy(), atol=2e-5)


# ------------------------------------------------------------------ whole rows (whole_rows=True)


@pytest.fixture
def with_whole(tmp_path):
    """The mixed documents plus 60 of exactly 62 residues, which fill a row of 64 alone."""
    docs = make_docs(7, 200, lo=1, hi=60, long=(60,) * 60)  # make_docs adds 2 residues to each
    return [write(tmp_path, "t_train_000000.bin", docs[::2]), write(tmp_path, "t_train_000001.bin", docs[1::2])], docs


def is_whole(doc_ids: torch.Tensor) -> bool:
    """Every row one document filling it, or padding only."""
    return bool(((doc_ids == 0).all(1) | (doc_ids == -1).all(1)).all())


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("n", [1, 4])
def test_whole_rows_come_in_micro_batches_of_their_own_on_every_rank_at_once(with_whole, n, world_size):
    files, docs = with_whole
    loaders = [TrainLoader(files, ROWS, L, rank=r, world_size=world_size, seed=5, length_buckets=n,
                           whole_rows=True, prefetch=0) for r in range(world_size)]
    seen, flags = Counter(), []
    while True:
        batches = [next(ld) for ld in loaders]
        if loaders[0].epoch > 0:
            break
        flags.append(batches[0].get("whole_rows", False))
        assert all(b.get("whole_rows", False) == flags[-1] for b in batches), "ranks disagree on whole rows"
        assert all(b["doc_ids"].shape == batches[0]["doc_ids"].shape for b in batches)
        for b in batches:
            if flags[-1]:
                assert b["doc_ids"].shape == (ROWS, L) and is_whole(b["doc_ids"])
            elif b["doc_ids"].shape[1] == L:  # a piece that fills a row of L never lands in a mixed one
                assert not any((row == 0).all() for row in b["doc_ids"])
            seen.update(segments(b))
    assert seen == Counter(d.tobytes() for d in docs), "an epoch lost or repeated documents"
    assert sum(flags) >= 60 // (ROWS * world_size) and not all(flags)


def test_without_whole_rows_the_same_documents_fill_rows_beside_others(with_whole):
    """The control: the plain loader puts the row-filling documents in mixed micro-batches and
    never marks one whole, so the test above sees what the switch does."""
    files, _ = with_whole
    loader = TrainLoader(files, ROWS, L, seed=5, prefetch=0)
    batches = [next(loader) for _ in range(40)]
    assert not any("whole_rows" in b for b in batches)
    assert any((row == 0).all() for b in batches for row in b["doc_ids"]) and not all(is_whole(b["doc_ids"]) for b in batches)


@pytest.mark.parametrize("kw", [dict(whole_rows=True), dict(whole_rows=True, length_buckets=4)])
def test_a_whole_rows_loader_resumes_bit_exact(with_whole, kw):
    files, _ = with_whole
    kw = dict(seed=3, masking=MaskingConfig(rule="esm2", rate=0.2), rank=1, world_size=2, **kw)
    expected = [next(ld) for ld in [TrainLoader(files, ROWS, L, prefetch=0, **kw)] for _ in range(50)]
    first = TrainLoader(files, ROWS, L, prefetch=3, **kw)
    for _ in range(17):
        next(first)
    state = first.state_dict()
    resumed = TrainLoader(files, ROWS, L, prefetch=2, **kw)
    resumed.load_state_dict(state)
    for want in expected[17:]:
        got = next(resumed)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want if k != "whole_rows")
    assert any("whole_rows" in b for b in expected[17:])
    first.close()
    resumed.close()


def test_a_state_with_other_whole_rows_is_refused(with_whole):
    files, _ = with_whole
    whole = TrainLoader(files, ROWS, L, whole_rows=True, prefetch=0).state_dict()
    with pytest.raises(ValueError, match="whole_rows=True but this loader has False"):
        TrainLoader(files, ROWS, L, prefetch=0).load_state_dict(whole)
