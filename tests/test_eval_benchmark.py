"""The benchmark: metric definitions, the splm protocol's batches, the unigram and composition
baselines, and
evaluate.py giving the same numbers for a Hugging Face model and its imported checkpoint."""

import math
import re

import numpy as np
import pytest
import torch
from train_support import write_tiny_shards

import evaluate as evaluate_py
from data.benchmark import EvalLoader
from evaluation.benchmark import evaluate, metrics
from evaluation.splm import splm_batches
from evaluation.unigram import Composition, Unigram
from runtime.backend import CPUBackend

V = 33


def explicit_metrics(true, pred):
    """Per-class loops, the textbook definitions (support-weighted averages, Gorodkin MCC)."""
    n = len(true)
    classes = sorted(set(true))
    prec = rec = f1 = 0.0
    for k in classes:
        tp = sum(1 for t, p in zip(true, pred) if t == k and p == k)
        npred, ntrue = sum(1 for p in pred if p == k), sum(1 for t in true if t == k)
        pk = tp / npred if npred else 0.0
        rk = tp / ntrue
        fk = 2 * pk * rk / (pk + rk) if pk + rk else 0.0
        prec, rec, f1 = prec + ntrue / n * pk, rec + ntrue / n * rk, f1 + ntrue / n * fk
    c = sum(1 for t, p in zip(true, pred) if t == p)
    tk = np.bincount(true, minlength=V).astype(float)
    pk = np.bincount(pred, minlength=V).astype(float)
    mcc = (c * n - tk @ pk) / math.sqrt((n * n - pk @ pk) * (n * n - tk @ tk))
    return {"acc": c / n, "precision": prec, "recall": rec, "f1": f1, "mcc": mcc}


def confusion(true, pred):
    cm = torch.zeros(V, V, dtype=torch.long)
    for t, p in zip(true, pred):
        cm[t, p] += 1
    return cm


def test_metrics_match_the_textbook_definitions():
    rng = np.random.default_rng(0)
    true = list(rng.integers(4, 24, 500))
    pred = [t if rng.random() < 0.4 else int(rng.integers(4, 26)) for t in true]
    got = metrics(1234.5, confusion(true, pred))
    want = explicit_metrics(true, pred)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-12), k
    assert got["loss"] == pytest.approx(1234.5 / 500) and got["ppl"] == pytest.approx(math.exp(1234.5 / 500))
    assert got["tokens"] == 500


def test_binary_mcc_is_the_classic_formula():
    true = [4] * 30 + [5] * 20
    pred = [4] * 25 + [5] * 5 + [4] * 8 + [5] * 12
    tp, fn, fp, tn = 25, 5, 8, 12
    classic = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert metrics(0.0, confusion(true, pred))["mcc"] == pytest.approx(classic, abs=1e-12)
    perfect = metrics(0.0, confusion(true, true))
    assert perfect["mcc"] == perfect["acc"] == perfect["f1"] == 1.0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_shards(tmp_path_factory.mktemp("eval") / "data", n_train=60, n_eval=30)


def test_evaluate_is_the_token_weighted_mean_and_batch_size_free(data):
    torch.manual_seed(0)
    model = Unigram(sorted(data.glob("*_train_*.bin")))
    valid = sorted(data.glob("*_valid_*.bin"))
    backend = CPUBackend()
    big = evaluate(model, EvalLoader(valid, 8, 1024), backend)
    small = evaluate(model, EvalLoader(valid, 1, 1024), backend)
    assert big == pytest.approx(small, rel=1e-6)
    # the same number by hand: -log p(label) over every masked position
    total, count = 0.0, 0
    for batch in EvalLoader(valid, 3, 1024):
        keep = batch["labels"] != -100
        total += float(-model.logp[batch["labels"][keep]].sum())
        count += int(keep.sum())
    assert big["tokens"] == count and big["loss"] == pytest.approx(total / count, rel=1e-6)


def sequences_and_targets(loader):
    """Every sequence of the loader as (its tokens as the model sees them, its labels), with
    the start offset of each in its row."""
    seqs, starts = [], []
    for batch in loader:
        for r in range(batch["doc_ids"].shape[0]):
            docs = batch["doc_ids"][r]
            for d in docs[docs >= 0].unique().tolist():
                where = (docs == d).nonzero().flatten()
                starts.append(int(where[0]))
                seqs.append((tuple(batch["input_ids"][r, where].tolist()), tuple(batch["labels"][r, where].tolist())))
    return seqs, starts


def test_aligned_evaluation_rows_move_sequences_but_change_no_target(data):
    """The Patch UNet's evaluation rows (doc_multiple = 2^merges) start every sequence on the
    merge grid; every sequence keeps its tokens, masks and targets, and the unigram scores the
    same."""
    valid = sorted(data.glob("*_valid_*.bin"))
    plain, plain_starts = sequences_and_targets(EvalLoader(valid, 2, 256))
    aligned, aligned_starts = sequences_and_targets(EvalLoader(valid, 2, 256, doc_multiple=8))
    assert sorted(plain) == sorted(aligned) and len(aligned) == 30
    assert all(s % 8 == 0 for s in aligned_starts) and any(s % 8 for s in plain_starts)
    model = Unigram(sorted(data.glob("*_train_*.bin")))
    assert evaluate(model, EvalLoader(valid, 2, 256, doc_multiple=8), CPUBackend()) == pytest.approx(
        evaluate(model, EvalLoader(valid, 2, 256), CPUBackend()), rel=1e-6)
    with pytest.raises(ValueError, match="doc_multiple=3 must be >= 1 and divide seq_len=256"):
        EvalLoader(valid, 2, 256, doc_multiple=3)


def test_splm_batches_follow_the_published_protocol(data):
    valid = sorted(data.glob("*_valid_*.bin"))
    batches = list(splm_batches(valid, max_tokens=64))
    lengths = [int((b["doc_ids"][r] >= 0).sum()) for b in batches for r in range(len(b["doc_ids"]))]
    assert len(lengths) == 30 and lengths == sorted(lengths, reverse=True)  # sorted, descending
    assert max(lengths) == 64  # cut to max_tokens including <cls> and <eos>
    assert [len(b["input_ids"]) for b in batches] == [4] * 7 + [2]
    for b in batches:
        real = b["doc_ids"] >= 0
        assert ((b["labels"] != -100).sum(1) >= 1).all()  # at least one mask per sequence
        assert (b["input_ids"][b["labels"] != -100] == 32).all()
        assert (b["input_ids"][real][:1] == 0).all() and (b["input_ids"][~real] == 1).all()
    again = list(splm_batches(valid, max_tokens=64))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))


def test_unigram_baseline_is_the_cross_entropy_of_the_train_frequencies(data):
    model = Unigram(sorted(data.glob("*_train_*.bin")))
    p = model.logp[4:32].exp()
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-6)
    m = evaluate(model, EvalLoader(sorted(data.glob("*_valid_*.bin")), 4, 1024), CPUBackend())
    entropy = float(-(p * p.log()).sum())
    assert m["loss"] == pytest.approx(entropy, abs=0.15)  # valid drawn from the same distribution
    assert m["loss"] < math.log(20)  # the tiny data is skewed: better than uniform


def test_composition_baseline_counts_each_documents_visible_residues(data):
    """Against a loop over the documents of packed rows: p = (the document's visible residue
    counts + alpha x unigram) / (its visible total + alpha) at each masked position."""
    train, valid = sorted(data.glob("*_train_*.bin")), sorted(data.glob("*_valid_*.bin"))
    alpha, unigram = 7.0, Unigram(train)
    model, p_train = Composition(train, alpha), unigram.logp.exp().double()
    total = count = 0.0
    loss_sum = 0.0
    for b in EvalLoader(valid, 4, 1024):
        _, loss = model(b["input_ids"], b["doc_ids"], b["labels"])
        loss_sum += float(loss)
        for r in range(b["doc_ids"].shape[0]):
            for doc in b["doc_ids"][r].unique().tolist():
                at = b["doc_ids"][r] == doc
                ids, labels = b["input_ids"][r][at], b["labels"][r][at]
                seen = ids[(ids >= 4) & (ids < 32)]
                counts = torch.bincount(seen, minlength=V).double()
                p = (counts + alpha * p_train) / (len(seen) + alpha)
                masked = labels != -100
                total -= float(p[labels[masked]].log().sum())
                count += int(masked.sum())
    assert count > 0 and loss_sum == pytest.approx(total, rel=1e-5)
    # a huge alpha is the unigram; a small one trusts the protein
    loader = EvalLoader(valid, 4, 1024)
    far = evaluate(Composition(train, 1e9), loader, CPUBackend())["loss"]
    assert far == pytest.approx(evaluate(unigram, loader, CPUBackend())["loss"], abs=1e-5)
    assert loss_sum / count != pytest.approx(far, abs=1e-3)


def test_evaluate_refuses_a_composition_without_pseudo_counts(data, capsys):
    assert evaluate_py.main(["--composition", "0", "--data", str(data), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--composition 0" in err and "must be > 0" in err


def printed(out: str) -> dict:
    line = [x for x in out.splitlines() if x.startswith("valid_loss:")][0]
    return dict(kv.split(":") for kv in line.split())


@pytest.mark.parametrize("protocol", ["benchmark", "splm"])
def test_hf_model_and_its_imported_checkpoint_score_the_same(tmp_path, data, capsys, protocol):
    transformers = pytest.importorskip("transformers")
    from hub.cli import main as hf_main

    cfg = transformers.EsmConfig(
        vocab_size=33, mask_token_id=32, pad_token_id=1, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=256, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, max_position_embeddings=1026, layer_norm_eps=1e-5,
        position_embedding_type="rotary", emb_layer_norm_before=False, token_dropout=True)
    torch.manual_seed(0)
    hf = transformers.EsmForMaskedLM(cfg)
    with torch.no_grad():
        for p in hf.parameters():  # HF initialises biases to 0 and norms to 1: make every one count
            p.add_(0.05 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")
    assert hf_main(["import", str(tmp_path / "hf"), str(tmp_path / "imported.pt")]) == 0
    common = ["--data", str(data), "--device", "cpu", "--protocol", protocol]
    capsys.readouterr()
    assert evaluate_py.main(["--hf", str(tmp_path / "hf"), *common]) == 0
    theirs = printed(capsys.readouterr().out)
    assert evaluate_py.main(["--checkpoint", str(tmp_path / "imported.pt"), *common]) == 0
    ours = printed(capsys.readouterr().out)
    # every metric, to the printed precision (4 decimals): our CPU attention sums in another
    # order than HF's masked SDPA, which may move a last digit by one; counts are exact
    assert ours.keys() == theirs.keys()
    for key in ours:
        if re.match(r"^\d+$", theirs[key]):
            assert ours[key] == theirs[key], key
        else:
            assert float(ours[key]) == pytest.approx(float(theirs[key]), abs=1.01e-4), key
    assert float(ours["valid_loss"]) > 2.5 and re.match(r"^\d+$", ours["valid_tokens"])


def test_evaluate_py_bad_checkpoint_is_one_sentence(tmp_path, data, capsys):
    assert evaluate_py.main(["--checkpoint", str(tmp_path / "none.pt"), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "none.pt" in err
