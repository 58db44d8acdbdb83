"""Masked diffusion (--masked_diffusion true): each phase of the masking, the 1/t weights, the
switch after mask_rate_steps (also in prefetched and resumed loaders), and a training loss that
does not depend on how the global batch is split."""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from train_support import ROOT, TORCHRUN, losses, run_train, write_tiny_shards

from data.loader import TrainLoader
from data.masking import DIFFUSION_MIN_RATE, MaskingConfig, document_rates, mask_batch, maskable
from data.shards import join_documents, write_shard
from data.tokenizer import IGNORE, MASK
from training.config import ConfigError, make_config

L = 512
WORKER = str(Path(__file__).with_name("train_ddp_worker.py"))


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    """600 documents of 150-500 residues: long enough that a document's masked fraction is
    close to its rate, short enough that rows pack several of them."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(4, 24, int(rng.integers(150, 500)), dtype=np.uint8) for _ in range(600)]
    path = tmp_path_factory.mktemp("diffusion") / "d_train_000000.bin"
    write_shard(path, join_documents(docs))
    return path


def loader(shard, masking, rows=8, **kw) -> TrainLoader:
    return TrainLoader([shard], rows, L, seed=5, masking=masking, prefetch=kw.pop("prefetch", 0), **kw)


def original(batch):
    return torch.where(batch["labels"] != IGNORE, batch["labels"], batch["input_ids"])


def documents(batch):
    """(residue positions, target positions) boolean (L,) masks of every document of the batch."""
    residues = maskable(original(batch))
    targets = batch["labels"] != IGNORE
    for r in range(batch["doc_ids"].shape[0]):
        ids = batch["doc_ids"][r]
        for k in ids[ids >= 0].unique().tolist():
            doc = ids == k
            yield r, residues[r] & doc, targets[r] & doc


def ks_uniform(samples, lo=DIFFUSION_MIN_RATE, hi=1.0) -> float:
    """Kolmogorov-Smirnov distance of the samples from U[lo, hi)."""
    x = np.sort(np.asarray(samples, dtype=np.float64))
    cdf = (x - lo) / (hi - lo)
    n = len(x)
    return float(max((np.arange(1, n + 1) / n - cdf).max(), (cdf - np.arange(n) / n).max()))


DIFFUSION = MaskingConfig(rule="esm2", rate=0.15, diffusion="sequence", diffusion_from=3)


def test_warm_up_is_exactly_the_masked_language_modelling_run(shard):
    """Before diffusion_from (in optimizer steps: batch index // micro-steps), the batches are
    those of the same run without diffusion (80/10/10 here), with weight 1 on each target and
    the targets counted, which is the plain MLM loss."""
    plain = loader(shard, MaskingConfig(rule="esm2", rate=0.15), micro_steps_per_step=2)
    mixed = loader(shard, DIFFUSION, micro_steps_per_step=2)
    for _ in range(6):  # steps 0, 1, 2: two micro-batches each
        want, got = next(plain), next(mixed)
        assert set(got) == {"input_ids", "labels", "doc_ids", "loss_weights", "loss_counted"}
        for k in want:
            assert torch.equal(got[k], want[k]), k
        targets = got["labels"] != IGNORE
        assert torch.equal(got["loss_weights"], targets.float())
        assert torch.equal(got["loss_counted"], targets)
    selected = got["labels"] != IGNORE
    assert (got["input_ids"][selected] != MASK).any()  # the esm2 rule's 10% random / 10% kept
    rate = selected.sum() / maskable(original(got)).sum()
    assert abs(float(rate) - 0.15) < 0.02


def test_diffusion_phase_masks_all_with_a_uniform_rate_per_sequence_and_weights_one_over_t(shard):
    masking = MaskingConfig(rule="esm2", rate=0.15, diffusion="sequence", diffusion_from=0)
    ld = loader(shard, masking)
    rates, fractions, expected, variance, got_targets = [], [], 0.0, 0.0, 0
    for _ in range(40):
        b = next(ld)
        targets = b["labels"] != IGNORE
        assert (b["input_ids"][targets] == MASK).all(), "diffusion masks every selected residue"
        assert torch.equal(b["input_ids"][~targets], original(b)[~targets])
        assert torch.equal(b["loss_counted"], maskable(original(b)))  # every residue counted
        assert (b["loss_weights"][~targets] == 0).all()
        for r, residues, chosen in documents(b):
            w = b["loss_weights"][r][chosen]
            n, k = int(residues.sum()), int(chosen.sum())
            fractions.append(k / n)
            if k:  # the document's weight is one value, 1/t with t in [1e-3, 1)
                assert torch.all(w == w[0]) and 1.0 < float(w[0]) <= 1 / DIFFUSION_MIN_RATE
                t = 1 / float(w[0])
                rates.append(t)
                expected += n * t
                variance += n * t * (1 - t)
                got_targets += k
    assert len(fractions) > 300
    # Each document's share of <mask> follows U[1e-3, 1): KS distance below the 1% critical
    # value (1.63 / sqrt(n)) plus the binomial spread of documents of >= 150 residues.
    assert ks_uniform(fractions, 0.0) < 1.63 / math.sqrt(len(fractions)) + 0.04
    # The weights say which rate each document drew: the targets it got fit those rates.
    assert abs(got_targets - expected) < 4 * math.sqrt(variance)
    assert len(set(rates)) == len(rates), "documents share a rate"


def test_document_rates_are_one_uniform_draw_per_document():
    doc_ids = torch.tensor([[0] * 5 + [1] * 3 + [2] * 8, [0] * 12 + [-1] * 4]).repeat(2000, 1)
    t = document_rates(doc_ids, torch.Generator().manual_seed(0))
    first = t.gather(1, torch.tensor([[0, 5, 8]] * 2 + [[0, 0, 0]] * 2).repeat(1000, 1))
    for r in range(4):
        for k in doc_ids[r].unique().tolist():
            if k >= 0:
                assert torch.all(t[r][doc_ids[r] == k] == t[r][doc_ids[r] == k][0])
    draws = first[0::4].flatten().tolist() + first[2::4, 0].tolist()
    assert min(draws) >= DIFFUSION_MIN_RATE and max(draws) < 1.0
    assert ks_uniform(draws) < 1.63 / math.sqrt(len(draws))


def test_per_batch_rate_is_one_per_micro_batch_across_row_chunks(shard):
    """rows x L = 20480 positions: the loader masks in two chunks, the rate is still one."""
    masking = MaskingConfig(rule="all_mask", rate=0.2, diffusion="batch")
    ld = loader(shard, masking, rows=40)
    rates = []
    for _ in range(12):
        b = next(ld)
        targets = b["labels"] != IGNORE
        w = b["loss_weights"][targets]
        assert torch.all(w == w[0])
        t = 1 / float(w[0])
        assert abs(float(targets.sum() / b["loss_counted"].sum()) - t) < 0.02
        rates.append(t)
    assert len(set(rates)) == len(rates)
    # the draws themselves: rows of 4000 residues (a row without a target, which tells nothing,
    # has probability (1 - t)^4000: only for t below ~0.002)
    weights = [float(mask_batch(torch.full((1, 4000), 5), torch.zeros(1, 4000, dtype=torch.long), 0,
                                masking, torch.Generator().manual_seed(s))["loss_weights"].max())
               for s in range(500)]
    drawn = [1 / w for w in weights if w > 0]
    assert len(drawn) > 495 and ks_uniform(drawn) < 1.63 / math.sqrt(len(drawn))


def test_resume_across_the_switch_yields_the_same_batches(shard):
    """Steps 0-2 warm-up, from step 3 diffusion, 2 micro-batches a step; a loader stopped at
    batch 4 or 7 (before and after the switch, with batches already prefetched) and restored
    continues exactly."""
    kw = dict(micro_steps_per_step=2)
    reference = loader(shard, DIFFUSION, **kw)
    expected = [next(reference) for _ in range(12)]
    assert "loss_weights" in expected[0] and (expected[5]["loss_weights"] <= 1).all()
    assert (expected[6]["loss_weights"] > 1).any()  # batch 6 = step 3: diffusion
    for stop in (4, 7):
        first = loader(shard, DIFFUSION, prefetch=3, **kw)
        for _ in range(stop):
            next(first)
        state = first.state_dict()
        next(first)  # runs on; its thread holds later batches
        resumed = loader(shard, DIFFUSION, prefetch=2, **kw)
        resumed.load_state_dict(state)
        for want in expected[stop:]:
            got = next(resumed)
            assert all(torch.equal(got[k], want[k]) for k in want)
        first.close()
        resumed.close()


class GradCapture:
    """An optimizer that records the (scaled) gradients it would apply."""

    def __init__(self, model):
        self.model, self.grads = model, None

    def step(self):
        self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=True)


def tiny_model():
    from model import build_model, get_config

    torch.manual_seed(0)
    return build_model(get_config("sample", n_layers=2, d_model=64, n_heads=2, d_ff=128))


def test_loss_is_the_weighted_sum_over_residues_whatever_the_micro_batches(shard):
    """The same 4 diffusion rows as one micro-batch or as two: the same loss, sum(CE/t) over
    the targets / the residues, and the same gradient, though the two halves have different
    rates (so a per-micro-batch normalisation would differ)."""
    from runtime.backend import CPUBackend
    from train import train_step

    backend = CPUBackend(SimpleNamespace(fsdp=False))
    backend.init_distributed()
    model = tiny_model()
    batch = next(loader(shard, MaskingConfig(rule="all_mask", diffusion="sequence"), rows=4))
    halves = [{k: v[i:i + 2] for k, v in batch.items()} for i in (0, 2)]
    results = []
    for micro in ([batch], halves):
        opt = GradCapture(model)
        loss_sum, count, *_ = train_step(model, micro, opt, backend, None)
        results.append((float(loss_sum / count), opt.grads))
    (one, g1), (two, g2) = results
    with torch.no_grad():
        logits, _ = model(batch["input_ids"], batch["doc_ids"])
    ce = torch.nn.functional.cross_entropy(logits.view(-1, 33), batch["labels"].view(-1), reduction="none",
                                           ignore_index=IGNORE)
    by_hand = float((ce * batch["loss_weights"].view(-1)).sum() / maskable(original(batch)).sum())
    assert one == pytest.approx(by_hand, rel=1e-5) and two == pytest.approx(one, rel=1e-6)
    for k in g1:  # sums in another order: float32 round-off of the largest entries
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-5 * float(g1[k].abs().max()), msg=k)
    per_half = [float((ce.view(4, L)[i:i + 2] * batch["loss_weights"][i:i + 2]).sum()
                      / batch["loss_counted"][i:i + 2].sum()) for i in (0, 2)]
    assert abs(sum(per_half) / 2 - one) > 1e-3 * one  # a mean of halves is not this loss


@pytest.mark.slow
def test_two_ranks_match_one_rank_with_weighted_targets(tmp_path):
    """Over gloo: 2 ranks x 4 rows = 1 rank x 2 micro-batches of the same rows, with per-row
    rates and 1/t weights (tests/train_ddp_worker.py, option weighted)."""
    out = {}
    for world, accum in ((2, 1), (1, 2)):
        path = tmp_path / f"w{world}.pt"
        cmd = [*TORCHRUN, f"--nproc_per_node={world}", WORKER, str(path), str(accum), "adamw", "weighted"]
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[world] = torch.load(path)
    assert out[2]["losses"] == pytest.approx(out[1]["losses"], rel=1e-6, abs=1e-7)
    assert len(set(out[1]["losses"])) == len(out[1]["losses"])
    for k, w in out[1]["weights"].items():
        torch.testing.assert_close(out[2]["weights"][k], w, rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.slow
def test_train_py_pauses_and_resumes_across_the_switch_identically(tmp_path):
    """train.py with a 3-step warm-up and a growing window: 8 steps straight = 2 + resume to 8
    (the resume starts in the warm-up and crosses the switch); a resume without the switch is
    refused."""
    data = write_tiny_shards(tmp_path / "data")
    window = ("--num_steps", "8", "--attn_window", "100", "--attn_window_start", "10", "--attn_window_steps", "6")
    both = (*window, "--masked_diffusion", "true", "--mask_rate_steps", "3")
    _, straight = run_train(tmp_path, data, "straight", *both)
    _, mlm = run_train(tmp_path, data, "mlm", *window)  # the same run without diffusion
    # equal up to float rounding: the diffusion path weighs its loss by its own ops, which some
    # processors' kernels round differently (an AMD EPYC of Zen 4: 2 ulps at step 3)
    assert losses(straight)[3] == pytest.approx(losses(mlm)[3], rel=1e-6)
    assert losses(straight)[4] != pytest.approx(losses(mlm)[4], rel=1e-4)
    run_train(tmp_path, data, "paused", *both, "--steps_this_run", "2")
    _, resumed = run_train(tmp_path, data, "paused", *both, "--resume", "auto")
    assert losses(resumed) == losses(straight)
    assert "step:3 masked diffusion from step 4 on" in (tmp_path / "logs" / "paused.txt").read_text()
    proc, _ = run_train(tmp_path, data, "paused", *window, "--mask_rate_steps", "3", "--resume", "auto", rc=None)
    assert proc.returncode == 2 and "masked_diffusion=True there vs None here" in proc.stderr


def test_config_switch_fields_and_identity():
    base = {"data": "sample", "num_steps": 100}
    off = make_config(base)
    on = make_config({**base, "masked_diffusion": True, "mask_rate_steps": 40, "diffusion_rate_per": "batch"})
    assert "masked_diffusion" not in off.identity()  # checkpoints from before the switch resume
    assert on.identity()["masked_diffusion"] is True and on.identity()["diffusion_rate_per"] == "batch"
    with pytest.raises(ConfigError, match="mask_rate_steps 100 .* leaves no diffusion step"):
        make_config({**base, "masked_diffusion": True, "mask_rate_steps": 100})
    with pytest.raises(ConfigError, match="diffusion_rate_per.*sequence, batch"):
        make_config({**base, "diffusion_rate_per": "token"})
    with pytest.raises(ValueError, match="diffusion='token' is unknown"):
        MaskingConfig(diffusion="token")
