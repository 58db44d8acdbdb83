"""Sliding-window attention (--attn_window, growing from --attn_window_start): masks against a
float64 brute force, the model at max_length 2048, the schedule, and a window that changes
without recompiling (torch.compile here; XLA: tests/test_xla_window.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from model.attention import attend, build_mask
from training.config import ConfigError, make_config

DOC_IDS = torch.tensor([
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, -1, -1, -1, -1],
    [0] * 24,
])
L = DOC_IDS.shape[1]


def brute_force(q, k, v, doc_ids, window):
    """float64 softmax over the keys of the query's document at most `window` positions away,
    written out key by key."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros_like(q)
    B, H, n, _ = q.shape
    for b in range(B):
        for h in range(H):
            for i in range(n):
                keys = [j for j in range(n) if doc_ids[b, j] == doc_ids[b, i] and abs(i - j) <= window]
                scores = torch.stack([q[b, h, i] @ k[b, h, j] for j in keys]) / q.shape[-1] ** 0.5
                out[b, h, i] = (scores.softmax(0)[:, None] * v[b, h, keys]).sum(0)
    return out


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("impl", ["sdpa", "reference", "flex", "varlen"])
@pytest.mark.parametrize("window", [0, 1, 3, 7, L - 1])
def test_window_attention_agrees_with_a_float64_brute_force(impl, window):
    torch.manual_seed(window)
    q, k, v = (torch.randn(2, 2, L, 8) for _ in range(3))
    expected = brute_force(q, k, v, DOC_IDS, window)
    real = (DOC_IDS >= 0)[:, None, :, None].expand_as(q)
    for w in (window, torch.tensor(window)):  # a Python int, or the 0-d tensor train.py passes
        try:
            with torch.no_grad():
                got = attend(q, k, v, build_mask(DOC_IDS, impl, w), impl)
        except (RuntimeError, NotImplementedError) as e:
            if impl != "flex":
                raise
            pytest.skip(f"flex attention does not run on this platform: {e}")
        assert torch.allclose(got.double()[real], expected[real], atol=1e-5)
        assert torch.isfinite(got).all()


def tiny_model(arch="sample"):
    """Random weights everywhere: the speedrun blocks start as the identity (zero-init), which
    would hide what attention sees."""
    from model import build_model, get_config

    torch.manual_seed(0)
    model = build_model(get_config(arch, n_layers=2, d_model=32, n_heads=2, d_ff=64))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("arch", ["sample", "esm2_8m"])
def test_the_window_reaches_every_layer_at_max_length_2048(arch):
    """One document of 2046 residues in a row of 2048: with a window of 64 and 2 layers, the
    first 10 positions see at most 2 x 64 + 10 positions far; a token beyond that changes
    nothing there, one inside changes them; without the window both do. Training works."""
    model = tiny_model(arch)
    ids = torch.randint(4, 24, (1, 2048))
    ids[0, 0], ids[0, -1] = 0, 2
    doc_ids = torch.zeros(1, 2048, dtype=torch.long)
    window = torch.tensor(64)
    far, near = ids.clone(), ids.clone()
    far[0, 2 * 64 + 10] = 4 + (ids[0, 138] - 3) % 20
    near[0, 64] = 4 + (ids[0, 64] - 3) % 20
    with torch.no_grad():
        base = model(ids, doc_ids, window=window)[0][0, :10]
        assert torch.equal(model(far, doc_ids, window=window)[0][0, :10], base)
        assert not torch.allclose(model(near, doc_ids, window=window)[0][0, :10], base)
        full = model(ids, doc_ids)[0][0, :10]
        assert not torch.allclose(model(far, doc_ids)[0][0, :10], full)
    labels = torch.where(torch.rand(1, 2048) < 0.2, ids, -100)
    _, loss = model(ids, doc_ids, labels, window=window)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_a_window_as_wide_as_the_row_is_no_window():
    model = tiny_model()
    ids = torch.randint(4, 24, (2, L))
    with torch.no_grad():
        whole = model(ids, DOC_IDS)[0]
        assert torch.equal(model(ids, DOC_IDS, window=torch.tensor(L - 1))[0], whole)
        assert not torch.allclose(model(ids, DOC_IDS, window=torch.tensor(2))[0], whole)


def test_train_step_hands_the_window_to_the_model():
    from runtime.backend import CPUBackend
    from train import train_step

    backend = CPUBackend(SimpleNamespace(fsdp=False))
    backend.init_distributed()
    model = tiny_model()
    ids = torch.randint(4, 24, (2, L))
    labels = torch.where(torch.rand(2, L) < 0.4, ids, -100)
    batch = {"input_ids": torch.where(labels != -100, 32, ids), "labels": labels, "doc_ids": DOC_IDS}
    idle = SimpleNamespace(step=lambda: None, zero_grad=lambda set_to_none=True: model.zero_grad())
    with torch.no_grad():
        want = {w: float(model(batch["input_ids"], DOC_IDS, labels, window=w)[1]) for w in (2, None)}
    for w in (2, None):
        loss_sum, *_ = train_step(model, [batch], idle, backend, None, None if w is None else torch.tensor(w))
        assert float(loss_sum) == pytest.approx(want[w], rel=1e-6)
    assert abs(want[2] - want[None]) > 1e-4 * want[None]  # far more than the tolerance above


def test_torch_compile_keeps_one_graph_as_the_window_changes():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = tiny_model()
    ids = torch.randint(4, 24, (2, L))
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        for w in (3, 9, 17):
            got = compiled(ids, DOC_IDS, window=torch.tensor(w))[0]
            assert torch.allclose(got, model(ids, DOC_IDS, window=w)[0], atol=1e-5)
        assert counter.frame_count >= 1
        frames = counter.frame_count
        compiled(ids, DOC_IDS, window=torch.tensor(5))
        assert counter.frame_count == frames, "a new window value compiled again"
        compiled(ids, DOC_IDS, window=4)  # the control: a Python int is a constant of the graph
        compiled(ids, DOC_IDS, window=6)
        assert counter.frame_count > frames
    torch._dynamo.reset()


def test_the_window_grows_linearly_and_stays():
    cfg = make_config({"data": "sample", "attn_window": 1024, "attn_window_start": 128,
                       "attn_window_steps": 7, "max_length": 2048})
    assert [cfg.attn_window_at(s) for s in range(10)] == [128, 256, 384, 512, 640, 768, 896, 1024, 1024, 1024]
    uneven = make_config({"data": "sample", "attn_window": 100, "attn_window_start": 10, "attn_window_steps": 4})
    assert [uneven.attn_window_at(s) for s in range(6)] == [10, 32, 55, 77, 100, 100]  # rounded down
    fixed = make_config({"data": "sample", "attn_window": 300})
    assert {fixed.attn_window_at(s) for s in (0, 5, 10_000)} == {300}
    assert make_config({"data": "sample"}).attn_window_at(7) == 0


def test_window_options_are_checked_and_part_of_the_run():
    base = {"data": "sample"}
    for bad, words in (({"attn_window": -1}, "attn_window.*>= 0"),
                       ({"attn_window_start": 64, "attn_window_steps": 10}, "attn_window_start 64 must lie in 1..attn_window"),
                       ({"attn_window": 512, "attn_window_start": 1024, "attn_window_steps": 10}, "1..attn_window"),
                       ({"attn_window": 512, "attn_window_start": 64}, "go together"),
                       ({"attn_window": 512, "attn_window_steps": 64}, "go together")):
        with pytest.raises(ConfigError, match=words):
            make_config({**base, **bad})
    grown = make_config({**base, "attn_window": 512, "attn_window_start": 64, "attn_window_steps": 10}).identity()
    assert (grown["attn_window"], grown["attn_window_start"], grown["attn_window_steps"]) == (512, 64, 10)
    assert "attn_window" not in make_config(base).identity()  # earlier checkpoints still resume
