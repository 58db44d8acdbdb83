"""The Patch UNet (arch "patch_unet"): the peer's parameter count, its levels and document ids,
packed rows against documents run alone, padding, FLOPs, the aligned packing, the config checks,
a train.py run of the sample's shape, and (XLA lane) a step that compiles a fixed set of graphs."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from train_support import run_train, write_tiny_shards

import model.layers
from data.loader import TrainLoader
from data.packing import empty_rows, span, take_row, write_row
from data.shards import join_documents, write_shard
from data.tokenizer import CLS, EOS, PAD
from model import build_model, flops_per_token, get_config, param_counts
from model.config import matmul_params, unet_depths, unet_widths
from model.patch_unet import BottleneckBlock, level_doc_ids
from runtime.errors import ConfigError
from training.config import doc_multiple, load_config, model_config

MASK = 32
# two levels of merges (6 U-Net blocks), one extra block; rows of 32
SMALL = dict(n_layers=6, d_model=32, n_heads=2, d_ff=64, extra_layers=1, max_length=32)


def small(**overrides):
    return get_config("patch_unet", **{**SMALL, **overrides})


def randomized(cfg, seed=0):
    """Every parameter random, so zero-initialised projections and unit lambdas cannot make a
    test pass by accident."""
    torch.manual_seed(seed)
    m = build_model(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m


def document(n_residues, seed, n_mask=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 24, (n_residues + 2,), generator=g)
    ids[0], ids[-1] = CLS, EOS
    ids[1:1 + n_mask] = MASK
    return ids


def packed(docs, L, multiple):
    """One row of `docs` laid out by data/packing.py, each at a multiple of `multiple`."""
    tokens, doc_ids = empty_rows(1, L)
    sources = {k: d[1:-1].numpy().astype(np.uint8) for k, d in enumerate(docs)}
    pieces = [(k, 0, len(d) - 2) for k, d in enumerate(docs)]
    row, _ = take_row(pieces, L, multiple)
    assert len(row) == len(docs), "the documents must fit one row"
    offsets = write_row(tokens, doc_ids, 0, row, sources, multiple)
    starts = [o - 1 for o in offsets]
    return torch.from_numpy(tokens).long(), torch.from_numpy(doc_ids), starts


def alone(model, doc, L):
    ids = torch.full((1, L), PAD)
    ids[0, :len(doc)] = doc
    doc_ids = torch.where(torch.arange(L) < len(doc), 0, -1)[None]
    with torch.no_grad():
        return model(ids, doc_ids)[0][0, :len(doc)]


# ---------------------------------------------------------------- the peer's network


def test_preset_has_the_peers_parameter_count():
    cfg = get_config("patch_unet")
    with torch.device("meta"):
        assert param_counts(build_model(cfg))["total"] == 212_279_127  # SpeedrunningPLMs' default Patch UNet
    assert unet_widths(cfg) == [768, 960, 1152, 1344, 1536, 1536]


def test_rows_that_reach_length_one_end_in_mlp_blocks():
    # rows of 16 reach length 1 after 4 merges: the 5th and 6th levels have no attention. The
    # peer counts 165,093,199 there, 4 of them value-embedding tables (33 x 1536) that no block
    # reads and that therefore get no gradient; ours has no such tables.
    cfg = get_config("patch_unet", max_length=16)
    with torch.device("meta"):
        m = build_model(cfg)
    assert param_counts(m)["total"] == 165_093_199 - 4 * 33 * 1536
    assert unet_depths(cfg) == ([0, 1, 2, 3, 4, 4], [4, 4, 3, 2, 1, 0], 4)
    assert sum(isinstance(b.block, BottleneckBlock) for b in [*m.encoder, *m.decoder]) == 4


def test_the_head_dim_cap_keeps_six_heads_at_768():
    # 6 heads of at most 128: no level may be wider than 768 (the peer's comment in patch_unet.yaml)
    assert unet_widths(get_config("patch_unet", n_heads=6)) == [768] * 6


@pytest.mark.parametrize("overrides", [{}, dict(max_length=4)], ids=["attention", "bottleneck"])
def test_forward_and_backward_reach_every_parameter(overrides):
    m = randomized(small(**overrides))
    L = overrides.get("max_length", 32)
    ids = torch.stack([document(L - 2, seed=1, n_mask=3), document(L - 2, seed=2, n_mask=1)])
    doc_ids = torch.zeros(2, L, dtype=torch.long)
    labels = torch.where(ids == MASK, 7, -100)
    logits, loss = m(ids, doc_ids, labels)
    assert logits.shape == (2, L, 33) and logits.dtype == torch.float32
    expected = F.cross_entropy(logits.view(-1, 33), labels.view(-1), reduction="sum")
    assert torch.allclose(loss, expected, atol=1e-4)
    loss.backward()
    unused = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.any()]
    assert not unused, f"parameters without a gradient: {unused}"


def test_level_doc_ids_take_the_later_document_and_padding_only_alone():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, -1, -1, -1, -1, -1]])
    levels = level_doc_ids(doc_ids, 3)
    assert levels[1].tolist() == [[0, 1, 2, 2, 3, 3, -1, -1]]
    assert levels[2].tolist() == [[1, 2, 3, -1]]
    assert levels[3].tolist() == [[2, 3]]


def test_encode_returns_full_resolution_states():
    m = randomized(small(extra_layers=2))
    ids, doc_ids = document(30, seed=3)[None], torch.zeros(1, 32, dtype=torch.long)
    with torch.no_grad():
        states = m.encode(ids, doc_ids, all_layers=True)
        final = m.encode(ids, doc_ids)
    assert len(states) == 1 + 1 + 2  # embedding, U-Net output, 2 extra blocks
    assert all(s.shape == (1, 32, 32) for s in states)
    assert torch.equal(states[-1], final)
    assert torch.allclose(final.pow(2).mean(-1), torch.ones(1, 32), atol=1e-4)  # normed


# ---------------------------------------------------------------- documents and padding


def test_aligned_documents_in_a_packed_row_equal_documents_run_alone():
    m = randomized(small())  # 2 merges: documents at multiples of 4
    docs = [document(5, seed=4, n_mask=2), document(9, seed=5), document(1, seed=6, n_mask=1)]
    ids, doc_ids, starts = packed(docs, 32, multiple=4)
    assert starts == [0, 8, 20]
    with torch.no_grad():
        together = m(ids, doc_ids)[0][0]
    for doc, s in zip(docs, starts):
        torch.testing.assert_close(together[s:s + len(doc)], alone(m, doc, 32), atol=1e-5, rtol=0)
    # laid out back to back instead, merged tokens straddle documents and change them
    ids, doc_ids, starts = packed(docs, 32, multiple=1)
    with torch.no_grad():
        together = m(ids, doc_ids)[0][0]
    assert not torch.allclose(together[starts[1]:starts[1] + 11], alone(m, docs[1], 32), atol=1e-3)


def test_padding_never_reaches_real_tokens():
    m = randomized(small())
    ids, doc_ids, _ = packed([document(6, seed=7), document(10, seed=8)], 32, multiple=1)
    garbage = torch.where(doc_ids >= 0, ids, torch.randint(0, 33, ids.shape))
    with torch.no_grad():
        x, y = m(ids, doc_ids)[0], m(garbage, doc_ids)[0]
    real = doc_ids[0] >= 0
    assert torch.equal(x[0, real], y[0, real])


def test_attention_implementations_agree():
    weights = randomized(small()).state_dict()
    ids, doc_ids, _ = packed([document(6, seed=9), document(13, seed=10)], 32, multiple=1)
    out = {}
    with torch.no_grad():
        for impl in ("sdpa", "reference", "flex", "varlen"):  # flex: eager, forward only on the CPU
            m = build_model(small(attn_impl=impl)).eval()
            m.load_state_dict(weights)
            out[impl] = m(ids, doc_ids)[0]
    real = doc_ids[0] >= 0  # varlen leaves padding at zero, the masks let it attend to padding
    for impl in ("sdpa", "flex", "varlen"):
        torch.testing.assert_close(out[impl][0, real], out["reference"][0, real], atol=1e-5, rtol=0)


def test_rows_that_cannot_be_halved_are_refused():
    m = build_model(small())
    with pytest.raises(ValueError, match="rows of 18 tokens cannot be halved 2 times.*e.g. 32"):
        m(torch.zeros(1, 18, dtype=torch.long), torch.zeros(1, 18, dtype=torch.long))


# ---------------------------------------------------------------- FLOPs


def test_flops_per_token_counts_what_the_forward_multiplies(monkeypatch):
    """Measured from a forward over one document filling the row (so T_eff is L at depth 0 and
    L/2^d at depth d): every Linear's rows x weights, the tied-or-not decoder (F.linear), and
    the attention of every call, 12 w L_d^2 per row; all per full-resolution position."""
    cfg = small(d_model=64, n_heads=4, d_ff=96)  # widths 64, 128, 192 (input/output projections too)
    m = build_model(cfg)
    L = 32
    linear = []
    hooks = [mod.register_forward_hook(lambda mod, i, o: linear.append(mod.weight.numel() * i[0].numel() // mod.in_features))
             for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    attention = []
    real_attend = model.layers.attend

    def counting(q, k, v, mask, impl):
        B, H, Lq, hd = q.shape
        attention.append(12 * H * hd * Lq * Lq * B)
        return real_attend(q, k, v, mask, impl)

    monkeypatch.setattr(model.layers, "attend", counting)
    with torch.no_grad():
        m(document(L - 2, seed=11)[None], torch.zeros(1, L, dtype=torch.long))
    for h in hooks:
        h.remove()
    n_matmul = (sum(linear) + cfg.vocab_size * cfg.d_model * L) / L  # + the decoder, an F.linear
    assert matmul_params(cfg, per_token=True) == n_matmul
    assert flops_per_token(cfg, L) == pytest.approx(6 * n_matmul + sum(attention) / L, rel=1e-12)
    assert param_counts(m)["matmul"] == matmul_params(cfg)


# ---------------------------------------------------------------- aligned packing


def test_aligned_packing_starts_every_document_at_the_multiple(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(4, 24, int(rng.integers(1, 60)), dtype=np.uint8) for _ in range(120)]
    write_shard(tmp_path / "t_train_000000.bin", join_documents(docs))
    seen, pads, positions = [], 0, 0
    with TrainLoader([tmp_path / "t_train_000000.bin"], 4, 64, doc_multiple=8, prefetch=0) as loader:
        while True:
            batch = next(loader)
            pads, positions = pads + int((batch["doc_ids"] < 0).sum()), positions + batch["doc_ids"].numel()
            if loader.epoch:  # the first batch of the next epoch
                break
            labels, ids, doc_ids = batch["labels"], batch["input_ids"], batch["doc_ids"]
            tokens = torch.where(labels != -100, labels, ids)
            for r in range(doc_ids.shape[0]):
                row = doc_ids[r]
                for k in range(int(row.max()) + 1):
                    where = (row == k).nonzero().flatten()
                    start, n = int(where[0]), len(where)
                    assert start % 8 == 0 and tokens[r, start] == CLS and tokens[r, start + n - 1] == EOS
                    seen.append(bytes(tokens[r, start + 1:start + n - 1].tolist()))
                assert (tokens[r][row < 0] == PAD).all()
        assert loader.padding_fraction == pads / positions  # the gaps between documents count
    assert sorted(seen) == sorted(d.tobytes() for d in docs)  # every document once in the epoch
    assert span(5, 8) == 8 and span(6, 8) == 8 and span(7, 8) == 16 and span(7, 1) == 9
    with pytest.raises(ValueError, match="doc_multiple=24 must be >= 1 and divide seq_len=64"):
        TrainLoader([tmp_path / "t_train_000000.bin"], 4, 64, doc_multiple=24)


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("overrides, message", [
    (dict(n_layers=5), "n_layers=5 counts the Patch UNet's encoder and decoder blocks"),
    (dict(max_length=1000), "max_length=1000: the Patch UNet halves the row length"),
    (dict(unet=False), "cannot be turned off"),
    (dict(n_heads=64, d_model=64 * 64), "odd head dim"),
])
def test_model_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        get_config("patch_unet", **overrides)


def test_patch_unet_fields_are_refused_elsewhere():
    with pytest.raises(ValueError, match="extra_layers=2 and max_length=0 are Patch UNet settings"):
        get_config("speedrun", extra_layers=2)


def test_training_config_builds_the_model_for_the_rows():
    argv = ["--config", "config/sample.yaml", "--model", "patch_unet"]
    cfg = load_config(argv)
    mcfg = model_config(cfg)
    # the sample's shape: 4 U-Net blocks (2 levels, 1 merge) 128 and 256 wide, 4 extra blocks
    assert (mcfg.n_layers, mcfg.d_model, mcfg.extra_layers, mcfg.max_length) == (4, 128, 4, 512)
    assert unet_widths(mcfg) == [128, 256]
    assert doc_multiple(cfg) == 1 and doc_multiple(load_config([*argv, "--align_docs"])) == 2
    assert doc_multiple(load_config(["--model", "patch_unet", "--max_length", "2048", "--align_docs"])) == 32
    with pytest.raises(ConfigError, match="--max_length 500: a patch_unet model halves its rows.*e.g. 512"):
        load_config([*argv, "--max_length", "500"])
    with pytest.raises(ConfigError, match="--align_docs .* use it with --model patch_unet"):
        load_config(["--config", "config/sample.yaml", "--align_docs"])
    with pytest.raises(ConfigError, match="model_args.max_length 1024 differs from --max_length 512"):
        model_config(load_config([*argv, "--model_args.max_length", "1024"]))


def _hidden_matrices():
    """The Muon matrices of a small Patch UNet (shapes in counts of 18, 12, 5, 5, 4, 3, 3), with
    gradients drawn from a fixed seed."""
    from optim import default_optim_config
    from optim.groups import build_param_groups

    torch.manual_seed(0)
    m = build_model(small(d_model=64, n_heads=4, d_ff=96))
    params = next(g for g in build_param_groups(m, default_optim_config("patch_unet")) if g["name"] == "hidden")["params"]
    g = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    return params


def _muon_rank(rank, init_file, out_dir):
    import datetime

    import torch.distributed as dist

    from optim import Muon

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        params = _hidden_matrices()
        opt = Muon(params, lr=0.02, distributed=True, ns_dtype=torch.float32)
        for _ in range(2):
            opt.step()
        torch.save([p.detach() for p in params], f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_muon_takes_groups_that_do_not_divide_by_the_ranks(tmp_path):
    """The peer's Muon asserts that every equal-shape group divides by the world size; this
    model's groups (5, 3, ... matrices) do not, and two ranks still match one process."""
    import torch.multiprocessing as mp

    from optim import Muon

    params = _hidden_matrices()
    opt = Muon(params, lr=0.02, ns_dtype=torch.float32)
    for _ in range(2):
        opt.step()
    mp.start_processes(_muon_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    for r in (0, 1):
        spread = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        for p, q in zip(params, spread):
            torch.testing.assert_close(q, p.detach(), atol=1e-6, rtol=0)


def test_hf_export_is_refused():
    from model.hf import hf_model_from_ours

    with pytest.raises(ValueError, match="a 'patch_unet' model has no Hugging Face equivalent"):
        hf_model_from_ours({}, small())


@pytest.mark.slow
def test_train_py_trains_the_sample_shape(tmp_path):
    data = write_tiny_shards(tmp_path / "data")
    sample_shape = ["--model_args.n_layers", "4", "--model_args.d_model", "128", "--model_args.n_heads", "2",
                    "--model_args.d_ff", "384"]
    _, records = run_train(tmp_path, data, "pu", "--model", "patch_unet", *sample_shape, "--num_steps", "4",
                           "--align_docs", "true")
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in steps)
    summary = [r for r in records if r["kind"] == "summary"][0]
    assert np.isfinite(summary["val_loss"]) and summary["val_loss"] < np.log(33)
    with torch.device("meta"):  # the sample's shape on the run's rows of 128
        built = build_model(get_config("patch_unet", n_layers=4, d_model=128, n_heads=2, d_ff=384, max_length=128))
    assert records[0]["kind"] == "header" and records[0]["params"] == param_counts(built)["total"]


# ---------------------------------------------------------------- XLA


@pytest.mark.xla
def test_xla_training_steps_compile_a_fixed_set_of_graphs():
    os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    pytest.importorskip("torch_xla")
    from types import SimpleNamespace

    from optim import build_optimizer, default_optim_config
    from runtime.xla import XLABackend

    b = XLABackend(SimpleNamespace(precision="fp32"))
    b.init_distributed()
    torch.manual_seed(0)
    m = b.prepare_model(build_model(small(attn_impl="sdpa")))
    opt = build_optimizer(m, default_optim_config("patch_unet"))
    counts = []
    for step, layout in enumerate([[0] * 12 + [1] * 20, [0] * 32, [0] * 5 + [1] * 9 + [-1] * 18,
                                   [0] * 3 + [1] * 3 + [2] * 26]):
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(4, 24, (2, 32), generator=g)
        labels = torch.where(torch.rand(2, 32, generator=g) < 0.3, ids, -100)
        batch = b.to_device({"input_ids": torch.where(labels != -100, MASK, ids), "labels": labels,
                             "doc_ids": torch.tensor(layout).expand(2, 32).clone()})
        _, loss = m(batch["input_ids"], batch["doc_ids"], batch["labels"])
        loss.backward()
        b.optimizer_step(m, opt, 1.0, scale=torch.tensor(0.1, device=b.device))
        assert np.isfinite(float(b.to_host(loss)))
        counts.append(b.compile_count())
    assert counts[0] > 0 and counts[1] == counts[2] == counts[3], f"new document layouts compiled new graphs: {counts}"
    # neuronx-cc refuses scatters into integers (NCC_EVRF016): the level ids and positions use none
    import torch_xla
    from test_xla_graphs import scatter_types

    _, loss = m(batch["input_ids"], batch["doc_ids"], batch["labels"])
    loss.backward()
    hlo = torch_xla._XLAC._get_xla_tensors_hlo([p.grad for p in m.parameters()])
    assert scatter_types(hlo) and set(scatter_types(hlo)) <= {"f32"}, sorted(set(scatter_types(hlo)))
