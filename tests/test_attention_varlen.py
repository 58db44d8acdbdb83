"""Attention document by document ("varlen", the eager CPU's default): the same numbers as the
masked attention in float64, forward and backward, on rows and in the models; who may run it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from model import build_model, get_config
from model.attention import attend, build_mask, doc_runs, reference_attention
from runtime.backend import CPUBackend
from runtime.errors import ConfigError
from training.checkpoint import CheckpointError, check_same_run

DOC_IDS = torch.tensor([
    [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 2, 2, -1, -1],
    [0] * 16,  # one document over the whole row: no mask at all
    [0, 0, 0, 0, 0, 0, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1],
    [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],  # starts with doc 0 after a row ending in 1
])


def test_runs_follow_documents_and_never_cross_a_row():
    runs = doc_runs(DOC_IDS)
    assert runs.lengths == [5, 7, 2, 2, 16, 6, 3, 7, 3, 13]
    assert runs.padding == [False, False, False, True, False, False, False, True, False, False]
    assert sum(runs.lengths) == DOC_IDS.numel() and runs.masks == [None] * 10
    # the same id on both sides of a row end is two runs
    assert doc_runs(torch.zeros(3, 4, dtype=torch.long)).lengths == [4, 4, 4]


def test_varlen_equals_the_float64_masked_reference_forward_and_backward():
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 3, 16, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    real = (DOC_IDS >= 0)[:, None, :, None]
    upstream = torch.randn(4, 3, 16, 8, dtype=torch.float64) * real  # padding outputs unused

    def run(impl):
        out = attend(q, k, v, build_mask(DOC_IDS, impl), impl)
        grads = torch.autograd.grad((out * upstream).sum(), (q, k, v))
        return out, grads

    (ref, ref_grads), (got, got_grads) = run("reference"), run("varlen")
    torch.testing.assert_close(got * real, ref * real, atol=1e-12, rtol=0)
    assert torch.equal(got * ~real, torch.zeros_like(got))  # padding attends to nothing
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=0)


def test_varlen_takes_views_of_any_layout():
    """The model hands (B, H, L, D) views of (B, L, H, D) projections; contiguous works too."""
    torch.manual_seed(1)
    base = [torch.randn(4, 16, 3, 8) for _ in range(3)]
    views = [t.transpose(1, 2) for t in base]
    dense = [t.contiguous() for t in views]
    mask = build_mask(DOC_IDS, "varlen")
    real = (DOC_IDS >= 0)[:, None, :, None]
    expected = reference_attention(*dense, build_mask(DOC_IDS, "sdpa")) * real
    for qkv in (views, dense):
        torch.testing.assert_close(attend(*qkv, mask, "varlen") * real, expected, atol=1e-5, rtol=0)


def packed_rows(rows: int, length: int, seed: int):
    """Rows of several random documents `<cls> residues <eos>` each, even lengths (so Patch UNet
    pairs never straddle two), the tails padded; 15% of residues are targets."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.ones(rows, length, dtype=torch.long)
    doc_ids = torch.full((rows, length), -1)
    for r in range(rows):
        o, d = 0, 0
        while length - o >= 6:
            n = 2 * int(torch.randint(2, min(16, (length - o) // 2) + 1, (1,), generator=g))
            ids[r, o], ids[r, o + 1:o + n - 1], ids[r, o + n - 1] = 0, torch.randint(4, 24, (n - 2,), generator=g), 2
            doc_ids[r, o:o + n] = d
            o, d = o + n, d + 1
    labels = torch.where((torch.rand(rows, length, generator=g) < 0.15) & (ids > 3), ids, -100)
    return ids, doc_ids, labels


@pytest.mark.parametrize("preset", ["sample", "esm2_8m", "patch_unet"])
def test_a_training_step_gives_the_same_loss_and_gradients(preset):
    """A packed batch of several documents per row: loss and every gradient as the dense mask."""
    ids, doc_ids, labels = packed_rows(rows=3, length=64, seed=5)
    args = dict(n_layers=2, d_model=32, n_heads=2, d_ff=64)
    if preset == "patch_unet":
        args.update(extra_layers=1, max_length=64)
    results = {}
    for impl in ("sdpa", "varlen"):
        torch.manual_seed(0)
        model = build_model(get_config(preset, attn_impl=impl, **args))
        with torch.no_grad():  # no zero-initialised projection may hide attention
            for p in model.parameters():
                p.add_(0.2 * torch.randn_like(p))
        _, loss = model(ids, doc_ids, labels)
        loss.backward()
        results[impl] = loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    (loss_s, grads_s), (loss_v, grads_v) = results["sdpa"], results["varlen"]
    torch.testing.assert_close(loss_v, loss_s, atol=1e-4, rtol=1e-5)
    assert grads_s.keys() == grads_v.keys() and grads_s
    for name in grads_s:
        torch.testing.assert_close(grads_v[name], grads_s[name], atol=1e-5, rtol=1e-4, msg=name)


def test_the_eager_cpu_picks_varlen_the_compiled_takes_it_and_static_shapes_refuse_it():
    eager = CPUBackend(SimpleNamespace(fsdp=False, compile="false"))
    compiled = CPUBackend(SimpleNamespace(fsdp=False, compile="true"))
    assert eager.model_defaults() == {"attn_impl": "varlen"}
    assert compiled.model_defaults() == {}
    bf16 = CPUBackend(SimpleNamespace(fsdp=False, compile="false", precision="bf16"))
    assert bf16.model_defaults() == {"attn_impl": "varlen", "attn_fp32_max_head_dim": 24}
    varlen = get_config("sample", attn_impl="varlen")
    eager.check_trainable(varlen)
    compiled.check_trainable(varlen)  # an eager island between compiled graphs
    device = CPUBackend(SimpleNamespace(fsdp=False, compile="false"))
    device.host_batches, device.name = False, "xla"  # as every accelerator's backend
    with pytest.raises(ConfigError, match="varlen.*xla, whose batches live on the device"):
        device.check_trainable(varlen)


def test_a_run_resumes_under_another_attention_but_not_another_model(tmp_path):
    from dataclasses import asdict

    sdpa, varlen = asdict(get_config("sample")), asdict(get_config("sample", attn_impl="varlen"))
    common = {"model_config": sdpa, "identity": {"seed": 0}}
    check_same_run(common, varlen, {"seed": 0}, tmp_path)  # the weights do not depend on it
    fp32 = asdict(get_config("sample", attn_impl="varlen", attn_fp32_max_head_dim=24))
    check_same_run(common, fp32, {"seed": 0}, tmp_path)  # nor on the attention's dtype
    wider = asdict(get_config("sample", attn_impl="varlen", d_model=64))
    with pytest.raises(CheckpointError, match="d_model=.*there vs 64 here"):
        check_same_run(common, wider, {"seed": 0}, tmp_path)


def test_compiled_varlen_is_an_eager_island_with_the_eager_numbers_and_no_recompiles():
    """Under torch.compile, varlen attention runs between compiled graphs: the same loss and
    gradients as the eager model, and batches with other document layouts (other run lengths)
    reuse the graphs instead of compiling new ones."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = build_model(get_config("sample", attn_impl="varlen", n_layers=2, d_model=32, n_heads=2, d_ff=64))
    compiled = torch.compile(model)
    for seed in range(4):
        batch = packed_rows(rows=3, length=64, seed=seed)
        model.zero_grad()
        _, eager_loss = model(*batch)
        eager_loss.backward()
        eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        _, loss = compiled(*batch)
        loss.backward()
        torch.testing.assert_close(loss, eager_loss, atol=1e-4, rtol=1e-5)
        for n, g in eager_grads.items():
            torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, atol=1e-5, rtol=1e-4, msg=n)
        if seed == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert graphs > 1  # the island splits the forward
    assert counters["stats"]["unique_graphs"] == graphs  # three more layouts, no new graph


@pytest.mark.parametrize("impl", ["sdpa", "varlen"])
def test_attention_runs_in_float32_under_bf16_autocast_up_to_the_head_dim_asked(impl, monkeypatch):
    """A CPU's bf16 attention kernels are slow at small head dims (BENCHMARKS.md): with
    attn_fp32_max_head_dim the kernel gets float32 q, k, v with autocast off (autocast would
    cast SDPA back to bf16), and the loss stays that of bf16 attention to bf16's precision."""
    import model.layers as layers

    seen = []
    real_attend = layers.attend

    def spy(q, k, v, mask, impl):
        seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
        return real_attend(q, k, v, mask, impl)

    monkeypatch.setattr(layers, "attend", spy)
    ids, doc_ids, labels = packed_rows(rows=3, length=64, seed=5)
    losses = {}
    for limit in (0, 16, 8):  # sample shape here: head_dim 16
        torch.manual_seed(0)
        model = build_model(get_config("sample", n_layers=2, d_model=32, n_heads=2, d_ff=64, attn_impl=impl,
                                       attn_fp32_max_head_dim=limit))
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, losses[limit] = model(ids, doc_ids, labels)
        want = (torch.float32, False) if model.cfg.head_dim <= limit else (torch.bfloat16, True)
        assert seen and set(seen) == {want}, (limit, seen)
    torch.testing.assert_close(losses[16], losses[0], rtol=2e-2, atol=0)
    assert losses[8] == losses[0]  # above the limit nothing changes
