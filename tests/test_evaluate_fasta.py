"""evaluate.py --fasta: any sequences scored by the benchmark, each with the masks of its position
in the file, exactly as the evaluation-only dataset of `data.prepare --eval_only` is scored."""

import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
from train_support import ROOT

import evaluate as evaluate_py
from data.benchmark import benchmark_mask_count
from data.prepare import prepare
from model import build_model, get_config
from model.io import save_weights


def write_fasta(path, seqs):
    records = (f">s{i} a description\n{s[:70]}\n{s[70:]}\n" for i, s in enumerate(seqs))
    path.write_text("".join(records))
    return path


def random_sequences(n, seed, hi=1500):
    rng = np.random.default_rng(seed)
    residues = list("ACDEFGHIKLMNPQRSTVWY")
    return ["".join(rng.choice(residues, rng.integers(5, hi))) for _ in range(n)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = get_config("sample", n_layers=1, d_model=32, n_heads=2, d_ff=64)
    model = build_model(cfg)
    with torch.no_grad():  # far from uniform, so that which positions are masked shows in the loss
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("ck") / "tiny.pt"
    save_weights(path, model, cfg)
    return str(path)


@pytest.fixture
def scored(monkeypatch):
    """The metrics of each evaluate.py run, as computed (the printout rounds them)."""
    runs, real = [], evaluate_py.evaluate
    def spy(*args, **kwargs):
        runs.append(real(*args, **kwargs))
        return runs[-1]

    monkeypatch.setattr(evaluate_py, "evaluate", spy)
    return runs


def printed(out: str) -> dict:
    line = [x for x in out.splitlines() if x.startswith("valid_loss:")][0]
    return dict(kv.split(":") for kv in line.split())


def test_fasta_scores_exactly_like_its_eval_only_dataset(tmp_path, checkpoint, scored, capsys,
                                                         monkeypatch):
    seqs = random_sequences(24, seed=0)  # several longer than 1024 tokens
    fasta = write_fasta(tmp_path / "a.fasta", seqs)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    ck = ["--checkpoint", checkpoint, "--device", "cpu", "--batch_size", "4096"]
    assert evaluate_py.main([*ck, "--fasta", str(fasta)]) == 0
    out = capsys.readouterr().out
    assert not list((tmp_path / "tmp").iterdir())  # the temporary dataset is gone
    cut = sum(len(s) > 1022 for s in seqs)
    assert cut > 0 and f"on {fasta} (24 sequences, {cut} cut to 1024 tokens)" in out

    prepare([fasta], tmp_path / "d", "mine", eval_only=True, max_length=1024, seed=5, quiet=True)
    assert evaluate_py.main([*ck, "--data", str(tmp_path / "d"), "--split", "valid"]) == 0
    assert scored[1] == scored[0]  # every metric, to the last bit: the same masks
    assert printed(capsys.readouterr().out) == printed(out)
    assert scored[0]["tokens"] == sum(benchmark_mask_count(min(len(s), 1022)) for s in seqs)

    # the metrics are those of the sequences, and of their positions (the masks follow the index)
    assert evaluate_py.main([*ck, "--fasta", str(write_fasta(tmp_path / "r.fa", seqs[::-1]))]) == 0
    assert scored[2]["tokens"] == scored[0]["tokens"] and scored[2]["loss"] != scored[0]["loss"]
    other = write_fasta(tmp_path / "b.fa", random_sequences(24, seed=1))
    assert evaluate_py.main([*ck, "--fasta", str(other)]) == 0
    assert scored[3]["tokens"] != scored[0]["tokens"]


@pytest.mark.parametrize("model", ["hf", "splm"])
def test_fasta_with_hf_and_the_splm_protocol(tmp_path, checkpoint, capsys, model):
    """--hf (benchmark protocol) and --protocol splm (checkpoint) score --fasta like --data."""
    fasta = write_fasta(tmp_path / "a.fa", random_sequences(12, seed=2, hi=300))
    if model == "hf":
        transformers = pytest.importorskip("transformers")
        cfg = transformers.EsmConfig(
            vocab_size=33, mask_token_id=32, pad_token_id=1, hidden_size=32, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=64, max_position_embeddings=1026,
            position_embedding_type="rotary", emb_layer_norm_before=False, token_dropout=True)
        torch.manual_seed(0)
        transformers.EsmForMaskedLM(cfg).save_pretrained(tmp_path / "hf")
        args = ["--hf", str(tmp_path / "hf")]
    else:
        args = ["--checkpoint", checkpoint, "--protocol", "splm"]
    args += ["--device", "cpu"]
    assert evaluate_py.main([*args, "--fasta", str(fasta)]) == 0
    theirs = printed(capsys.readouterr().out)
    prepare([fasta], tmp_path / "d", "d", eval_only=True, quiet=True)
    assert evaluate_py.main([*args, "--data", str(tmp_path / "d")]) == 0
    assert printed(capsys.readouterr().out) == theirs
    assert int(theirs["valid_tokens"]) > 12


def test_missing_fasta_is_one_line_naming_the_file(tmp_path):
    missing = tmp_path / "missing.fasta.gz"
    cmd = [sys.executable, "evaluate.py", "--checkpoint", "none.pt", "--fasta", str(missing)]
    run = subprocess.run([*cmd, "--device", "cpu"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    want = f"evaluate.py: --fasta {missing}: input file not found; check the path"
    assert run.stderr.strip() == want


@pytest.mark.parametrize("case", ["empty", "garbage", "split", "unigram"])
def test_unusable_fasta_or_options_are_one_line(tmp_path, checkpoint, capsys, case):
    fasta = tmp_path / f"{case}.fa"
    fasta.write_bytes(b"\x00\x01PK\x03\x04" * 50 if case == "garbage" else b">only a header\n")
    if case in ("split", "unigram"):
        write_fasta(fasta, ["MKVL"])
    model = ["--unigram"] if case == "unigram" else ["--checkpoint", checkpoint]
    extra = ["--split", "test"] if case == "split" else []
    assert evaluate_py.main([*model, "--fasta", str(fasta), "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("evaluate.py: "), err
    word = {"empty": "no usable sequences", "garbage": "binary data",
            "split": "leave --split out", "unigram": "--unigram needs the train split"}[case]
    assert word in err and (case == "unigram" or str(fasta) in err), err
