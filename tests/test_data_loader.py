from collections import Counter

import numpy as np
import pytest
import torch

from data.benchmark import EvalLoader, benchmark_mask_count
from data.loader import TrainLoader
from data.masking import MaskingConfig
from data.shards import join_documents, write_shard
from data.tokenizer import CLS, EOS, IGNORE, MASK, PAD

L = 64


def make_docs(seed, n, lo=1, hi=40, long=()):
    """Distinct residue arrays (ids 4..23); `long` adds documents of those residue counts."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(4, 24, rng.integers(lo, hi), dtype=np.uint8) for _ in range(n)]
    docs += [rng.integers(4, 24, k, dtype=np.uint8) for k in long]
    docs = [
        np.concatenate([[4 + i % 20, 4 + i // 20 % 20], d]).astype(np.uint8)
        for i, d in enumerate(docs)
    ]
    assert len({d.tobytes() for d in docs}) == len(docs)
    return docs


def write(tmp_path, name, docs):
    path = tmp_path / name
    write_shard(path, join_documents(docs))
    return path


@pytest.fixture
def shards(tmp_path):
    docs = make_docs(0, 150)
    return [
        write(tmp_path, "t_train_000000.bin", docs[:80]),
        write(tmp_path, "t_train_000001.bin", docs[80:]),
    ], docs


def original(batch):
    return torch.where(batch["labels"] != IGNORE, batch["labels"], batch["input_ids"])


def segments(batch):
    """Residue bytes of every document in the batch, checking each is <cls> ... <eos>."""
    tokens, doc_ids = original(batch), batch["doc_ids"]
    out = []
    for r in range(tokens.shape[0]):
        ids = doc_ids[r][doc_ids[r] >= 0]
        n = int(ids.max()) + 1 if len(ids) else 0
        assert torch.equal(ids, torch.sort(ids).values) and set(ids.tolist()) == set(range(n))
        for k in range(n):
            seg = tokens[r][doc_ids[r] == k]
            assert (
                seg[0] == CLS
                and seg[-1] == EOS
                and not ((seg[1:-1] == CLS) | (seg[1:-1] == EOS)).any()
            )
            out.append(seg[1:-1].numpy().astype(np.uint8).tobytes())
    return out


def epoch_documents(loader, epochs=1):
    """Documents of every batch of the first `epochs` epochs (a batch never mixes epochs)."""
    seen = [[] for _ in range(epochs)]
    while True:
        batch = next(loader)
        if loader.epoch >= epochs:
            return seen if epochs > 1 else seen[0]
        seen[loader.epoch] += segments(batch)


def test_batches_are_fixed_shape_whole_documents(tmp_path):
    docs = make_docs(1, 60, long=(200, 63, 62))
    loader = TrainLoader([write(tmp_path, "a.bin", docs)], 4, L, prefetch=0)
    known = {d.tobytes() for d in docs}
    for _ in range(12):
        b = next(loader)
        for k in ("input_ids", "labels", "doc_ids"):
            assert b[k].shape == (4, L) and b[k].dtype == torch.long
        assert torch.equal(b["doc_ids"] == -1, b["input_ids"] == PAD)
        assert (b["labels"][b["doc_ids"] == -1] == IGNORE).all()
        for seg in segments(b):
            if len(seg) < L - 2:
                assert seg in known
            else:  # a crop of one of the long documents: L-2 consecutive residues
                assert len(seg) == L - 2 and any(seg in d.tobytes() for d in docs[-3:])
    assert 0 < loader.padding_fraction < 0.2


def test_split_crop_keeps_every_residue(tmp_path):
    docs = make_docs(2, 5, long=(150,))
    loader = TrainLoader([write(tmp_path, "a.bin", docs)], 2, L, crop="split", prefetch=0)
    got = epoch_documents(loader)
    chunks = [s for s in got if s not in {d.tobytes() for d in docs}]
    assert b"".join(sorted(chunks, key=lambda c: docs[-1].tobytes().index(c))) == docs[-1].tobytes()
    assert [len(c) for c in sorted(chunks, key=len, reverse=True)] == [62, 62, 28]


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_rank_partition_is_disjoint_and_complete(shards, world_size):
    files, docs = shards
    seen = Counter()
    for rank in range(world_size):
        loader = TrainLoader(files, 3, L, rank=rank, world_size=world_size, seed=4, prefetch=0)
        seen.update(epoch_documents(loader))
    assert seen == Counter(d.tobytes() for d in docs)


def test_epochs_are_reshuffled_and_seeded(shards):
    files, docs = shards
    a, b = (TrainLoader(files, 3, L, seed=s, prefetch=0) for s in (1, 1))
    e0, e1 = epoch_documents(a, 2)
    assert sorted(e0) == sorted(e1) and e0 != e1
    assert epoch_documents(b) == e0
    assert epoch_documents(TrainLoader(files, 3, L, seed=2, prefetch=0)) != e0


def test_resume_is_bit_exact(shards):
    files, _ = shards
    kw = dict(seed=3, masking=MaskingConfig(rule="esm2", rate=0.2), rank=1, world_size=2)
    reference = TrainLoader(files, 3, L, prefetch=0, **kw)
    expected = [next(reference) for _ in range(40)]  # about three epochs of this rank
    first = TrainLoader(files, 3, L, prefetch=3, **kw)
    for _ in range(17):
        next(first)
    state = first.state_dict()
    for _ in range(5):  # run on, then rewind the same loader (its prefetch is ahead)
        next(first)
    resumed = TrainLoader(files, 3, L, prefetch=2, **kw)
    resumed.load_state_dict(state)
    first.load_state_dict(state)
    for want in expected[17:]:
        for got in (next(resumed), next(first)):
            assert all(torch.equal(got[k], want[k]) for k in want)
    assert resumed.epoch == reference.epoch >= 2
    assert resumed.padding_fraction == reference.padding_fraction
    first.close()
    resumed.close()


def test_state_of_another_setup_is_refused(shards):
    files, _ = shards
    state = TrainLoader(files, 3, L, world_size=2, prefetch=0).state_dict()
    with pytest.raises(ValueError, match="world_size=2 but this loader has 1"):
        TrainLoader(files, 3, L, prefetch=0).load_state_dict(state)


def test_mask_rate_follows_optimizer_steps(shards):
    files, _ = shards
    masking = MaskingConfig(rule="all_mask", rate=0.05, rate_start=1.0, rate_schedule_steps=2)
    loader = TrainLoader(files, 4, L, masking=masking, micro_steps_per_step=2, prefetch=0)
    batches = [next(loader) for _ in range(6)]
    for b in batches[:2]:  # step 0: rate 1.0, every residue masked
        assert torch.equal(b["input_ids"] == MASK, original(b) >= 4)
    late = torch.stack(
        [(b["labels"] != IGNORE).sum() / (original(b) >= 4).sum() for b in batches[4:]]
    )
    assert (late < 0.15).all()


def test_too_many_ranks_is_a_clear_error(tmp_path):
    f = write(tmp_path, "a.bin", make_docs(3, 2))
    with pytest.raises(ValueError, match="rank 3 of 4 gets no document"):
        next(TrainLoader([f], 2, L, rank=3, world_size=4, prefetch=0))


def eval_masks(loader):
    """sequence residues -> masked residue offsets, for every sequence the loader yields."""
    out = {}
    for b in loader:
        tokens, ids = original(b), b["doc_ids"]
        for r in range(tokens.shape[0]):
            for k in ids[r][ids[r] >= 0].unique().tolist():
                where = ids[r] == k
                seg, masked = tokens[r][where], b["labels"][r][where] != IGNORE
                assert torch.equal(
                    b["input_ids"][r][where][masked], torch.full_like(seg[masked], MASK)
                )
                key = seg[1:-1].numpy().astype(np.uint8).tobytes()
                assert key not in out
                out[key] = torch.nonzero(masked).flatten().tolist()
    return out


def test_eval_covers_each_sequence_once_with_fixed_masks(tmp_path):
    docs = make_docs(5, 25, hi=120)
    files = [
        write(tmp_path, "v_valid_000000.bin", docs[:13]),
        write(tmp_path, "v_valid_000001.bin", docs[13:]),
    ]
    cut = {d.tobytes(): d[: L - 2].tobytes() for d in docs}
    baseline = eval_masks(EvalLoader(files, 2, L))
    assert sorted(baseline) == sorted(cut.values())
    for key, pos in baseline.items():
        assert len(pos) == benchmark_mask_count(len(key)) and min(pos) >= 1
    assert baseline == eval_masks(EvalLoader(files, 2, L))
    for world_size in (2, 3, 4):
        loaders = [
            EvalLoader(files, 2, L, rank=r, world_size=world_size) for r in range(world_size)
        ]
        assert len({len(x) for x in loaders}) == 1
        merged = {}
        for loader in loaders:
            batches = list(loader)
            assert len(batches) == len(loader)
            part = eval_masks(batches)
            assert not set(part) & set(merged)
            merged.update(part)
        assert merged == baseline
    assert any(len(d) > L - 2 for d in docs)


def test_eval_pads_ranks_that_run_out(tmp_path):
    f = write(tmp_path, "v_valid_000000.bin", make_docs(6, 5, lo=50, hi=60))
    loaders = [EvalLoader([f], 1, L, rank=r, world_size=4) for r in range(4)]
    assert [len(x) for x in loaders] == [2, 2, 2, 2]
    last = list(loaders[3])
    assert (last[1]["labels"] == IGNORE).all() and (last[1]["input_ids"] == PAD).all()
    assert (last[1]["doc_ids"] == -1).all() and (last[0]["labels"] != IGNORE).any()
