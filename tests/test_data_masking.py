import numpy as np
import pytest
import torch

from data.benchmark import benchmark_mask_count, benchmark_mask_positions
from data.masking import MaskingConfig, mask_tokens
from data.tokenizer import AA_HIGH, AA_LOW, CLS, EOS, IGNORE, MASK, PAD, UNK


def batch(seed=0, b=64, length=1024):
    """Rows of documents with <cls>/<eos>, some <unk>, padded tails."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(4, 29, (b, length), generator=g)
    t[:, 0], t[:, 300], t[:, 301], t[:, 700] = CLS, EOS, CLS, EOS
    t[:, 701:] = PAD
    t[:, 50] = UNK
    return t


def test_esm2_statistics():
    tokens = batch()
    inputs, labels = mask_tokens(tokens, 0.15, "esm2", torch.Generator().manual_seed(1))
    residues = (tokens >= 4) & (tokens != MASK)
    sel = labels != IGNORE
    assert not sel[~residues].any()  # never <cls>, <eos>, <pad>, <unk>
    assert torch.equal(labels[sel], tokens[sel])
    assert torch.equal(inputs[~sel], tokens[~sel])
    rate = sel.sum().item() / residues.sum().item()
    assert abs(rate - 0.15) < 0.005
    n = sel.sum().item()
    to_mask = (inputs[sel] == MASK).sum().item() / n
    changed = inputs[sel] != tokens[sel]
    to_random = (changed & (inputs[sel] != MASK)).sum().item() / n
    kept = (~changed).sum().item() / n
    assert abs(to_mask - 0.8) < 0.01
    # a random amino acid equals the original with probability 1/20 (originals here are 4..28)
    assert abs(to_random - 0.1 * (1 - 0.8 / 20)) < 0.008
    assert abs(kept - (0.1 + 0.1 * 0.8 / 20)) < 0.008
    replaced = inputs[sel][changed & (inputs[sel] != MASK)]
    assert replaced.min() >= AA_LOW and replaced.max() < AA_HIGH
    assert set(replaced.unique().tolist()) == set(range(AA_LOW, AA_HIGH))


def test_all_mask_rule_and_tensor_rate():
    tokens = batch(2)
    inputs, labels = mask_tokens(
        tokens, torch.tensor(0.3), "all_mask", torch.Generator().manual_seed(3)
    )
    sel = labels != IGNORE
    assert (inputs[sel] == MASK).all() and torch.equal(inputs[~sel], tokens[~sel])
    assert abs(sel.sum().item() / ((tokens >= 4) & (tokens != MASK)).sum().item() - 0.3) < 0.01
    full, _ = mask_tokens(tokens, 1.0, "all_mask")
    assert torch.equal(full == MASK, (tokens >= 4) & (tokens != MASK))


def test_same_generator_seed_same_masks():
    tokens = batch()
    a = mask_tokens(tokens, 0.15, "esm2", torch.Generator().manual_seed(5))
    b = mask_tokens(tokens, 0.15, "esm2", torch.Generator().manual_seed(5))
    c = mask_tokens(tokens, 0.15, "esm2", torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_rate_schedule_and_validation():
    cfg = MaskingConfig(rule="all_mask", rate=0.2, rate_start=0.1, rate_schedule_steps=100)
    assert [cfg.rate_at(s) for s in (0, 50, 100, 10_000)] == pytest.approx([0.1, 0.15, 0.2, 0.2])
    assert MaskingConfig(rate=0.3).rate_at(5) == 0.3
    for bad in (
        dict(rule="bert"),
        dict(rate=0.0),
        dict(rate_start=1.5),
        dict(rate_schedule_steps=-1),
    ):
        with pytest.raises(ValueError):
            MaskingConfig(**bad)
    with pytest.raises(ValueError, match="unknown"):
        mask_tokens(batch(), 0.15, "bert")


def test_benchmark_masks():
    assert [benchmark_mask_count(n) for n in (0, 1, 3, 4, 10, 100, 1022)] == [
        0,
        1,
        1,
        1,
        2,
        15,
        153,
    ]
    for n in (0, 1, 5, 333, 1022):
        pos = benchmark_mask_positions(n, 7)
        assert len(pos) == len(set(pos.tolist())) == benchmark_mask_count(n)
        assert all(0 <= p < n for p in pos)
    assert np.array_equal(benchmark_mask_positions(500, 3), benchmark_mask_positions(500, 3))
    assert not np.array_equal(benchmark_mask_positions(500, 3), benchmark_mask_positions(500, 4))


@pytest.mark.xla
def test_masks_on_an_xla_device_equal_the_cpu_masks():
    xm = pytest.importorskip("torch_xla.core.xla_model")
    tokens = batch(b=4, length=768)
    cpu = mask_tokens(tokens, 0.15, "esm2", torch.Generator().manual_seed(11))
    dev = mask_tokens(tokens.to(xm.xla_device()), 0.15, "esm2", torch.Generator().manual_seed(11))
    assert torch.equal(cpu[0], dev[0].cpu()) and torch.equal(cpu[1], dev[1].cpu())
