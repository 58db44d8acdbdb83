import gzip
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data import prepare as prepare_mod
from data.datasets import SAMPLE_FASTA, find_shards, resolve_dataset
from data.prepare import PrepareError, prepare
from data.shards import document_bounds, read_shard
from data.tokenizer import decode


def sequences(n, seed=0, lo=5, hi=60):
    rng = np.random.default_rng(seed)
    return [
        "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), rng.integers(lo, hi))) for _ in range(n)
    ]


def write_fasta(path, seqs, width=13):
    lines = []
    for i, s in enumerate(seqs):
        lines.append(f">seq{i} some description")
        lines += [s[j : j + width] for j in range(0, len(s), width)]
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def documents(directory, split):
    """Decoded residues of every document of a split, in shard order."""
    out = []
    for f in getattr(find_shards(directory), split):
        tokens = read_shard(f)
        for s, e in zip(*document_bounds(tokens)):
            out.append(decode(tokens[s + 1 : e - 1]))
    return out


def test_all_input_formats_round_trip(tmp_path):
    seqs = sequences(30)
    fasta = write_fasta(tmp_path / "a.fasta.gz", seqs[:10])
    text = tmp_path / "b.txt"
    text.write_text("\n".join(s.lower() for s in seqs[10:20]) + "\n\n")
    inputs = [fasta, text]
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"id": list(range(10)), "sequence": seqs[20:]}), tmp_path / "c.parquet")
    inputs.append(tmp_path / "c.parquet")
    summary = prepare(inputs, tmp_path / "out", "t", valid=0, test=0, quiet=True)
    assert documents(tmp_path / "out", "train") == seqs
    assert summary["splits"]["train"]["sequences"] == 30 and summary["unknowns"] == 0


def test_unknowns_empty_and_duplicates_are_reported(tmp_path):
    text = tmp_path / "x.txt"
    text.write_text("MKJV*\nMKJV\nAAAA\n*\nAAAA\n")  # '*' alone is an empty sequence
    s = prepare([text], tmp_path / "out", "x", valid=0, test=0, dedup=True, quiet=True)
    assert (s["sequences_read"], s["empty_dropped"], s["duplicates_dropped"], s["unknowns"]) == (
        5,
        1,
        2,
        1,
    )
    assert documents(tmp_path / "out", "train") == ["MK<unk>V", "AAAA"]


def test_splits_are_deterministic_cut_and_sharded(tmp_path):
    seqs = sequences(200, lo=5, hi=120)
    fasta = write_fasta(tmp_path / "in.fa", seqs)
    kw = dict(valid=20, test=10, shard_tokens=1000, max_length=50, quiet=True)
    prepare([fasta], tmp_path / "a", "d", seed=1, **kw)
    prepare([fasta], tmp_path / "b", "d", seed=1, **kw)
    prepare([fasta], tmp_path / "c", "d", seed=2, **kw)
    a, b = sorted((tmp_path / "a").iterdir()), sorted((tmp_path / "b").iterdir())
    assert [p.name for p in a] == [p.name for p in b]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    assert documents(tmp_path / "a", "valid") != documents(tmp_path / "c", "valid")
    train, valid, test = (documents(tmp_path / "a", s) for s in ("train", "valid", "test"))
    assert (len(train), len(valid), len(test)) == (170, 20, 10)
    assert all(len(s) <= 48 for s in valid + test)  # 50 tokens with <cls> and <eos>
    assert max(map(len, train)) == max(map(len, seqs)) > 48  # train stays whole
    full = {s[:48]: s for s in seqs}
    assert sorted(train + [full[s] for s in valid + test]) == sorted(seqs)
    for f in find_shards(tmp_path / "a").train:
        assert len(read_shard(f)) <= 1000
    assert len(find_shards(tmp_path / "a").train) > 1


def test_failed_run_leaves_previous_shards_and_no_partial_file(tmp_path, monkeypatch):
    fasta = write_fasta(tmp_path / "in.fa", sequences(100))
    out = tmp_path / "out"
    prepare([fasta], out, "d", valid=10, test=10, shard_tokens=500, quiet=True)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def dying_write(path, tokens):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a run killed while writing its third shard
        real_write(path, tokens)

    real_write = prepare_mod.write_shard
    monkeypatch.setattr(prepare_mod, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        prepare([fasta], out, "d", valid=5, test=5, shard_tokens=500, seed=9, quiet=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_bad_inputs_give_one_clear_error(tmp_path):
    fasta = write_fasta(tmp_path / "in.fa", sequences(10))
    with pytest.raises(PrepareError, match="10 usable sequences cannot give 5 valid \\+ 5 test"):
        prepare([fasta], tmp_path / "o", "d", valid=5, test=5, quiet=True)
    with pytest.raises(PrepareError, match="input file not found"):
        prepare([tmp_path / "missing.fa"], tmp_path / "o", "d", quiet=True)
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"seq": ["MK"]}), tmp_path / "p.parquet")
    with pytest.raises(PrepareError, match="needs a 'sequence' column"):
        prepare([tmp_path / "p.parquet"], tmp_path / "o", "d", valid=0, test=0, quiet=True)
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.bin"))


def test_eval_only_puts_every_sequence_in_valid_in_input_order(tmp_path):
    seqs = sequences(60, lo=5, hi=120)
    fasta = write_fasta(tmp_path / "in.fa.gz", seqs)
    out = tmp_path / "a"
    prepare([fasta], out, "d", valid=20, test=10, quiet=True)  # a full dataset, then replaced
    kw = dict(eval_only=True, max_length=50, shard_tokens=1000, quiet=True)
    s = prepare([fasta], out, "d", seed=1, **kw)
    prepare([fasta], tmp_path / "b", "d", seed=2, **kw)
    files = find_shards(out)
    assert files.train == [] and files.test == [] and len(files.valid) > 1
    assert not [p for p in out.iterdir() if "_valid_" not in p.name]  # no train/test, no stage
    assert documents(out, "valid") == [x[:48] for x in seqs]  # input order, cut to 50 tokens
    assert s["splits"]["valid"]["truncated"] == sum(len(x) > 48 for x in seqs) > 0
    assert s["splits"]["train"]["sequences"] == s["splits"]["test"]["sequences"] == 0
    a, b = sorted(out.iterdir()), sorted((tmp_path / "b").iterdir())
    assert [x.read_bytes() for x in a] == [y.read_bytes() for y in b]  # --seed plays no part
    with pytest.raises(FileNotFoundError, match="holds no \\*_train_NNNNNN.bin shards"):
        resolve_dataset(str(out))  # what training reads: it still refuses a dataset to train on


def test_eval_only_is_asked_for_explicitly(tmp_path, capsys):
    fasta = write_fasta(tmp_path / "in.fa", sequences(10))
    cli = [str(fasta), "--out", str(tmp_path / "o"), "--name", "n", "--valid", "10"]
    assert prepare_mod.main([*cli, "--test", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(fasta) in err
    assert "cannot give 10 valid + 0 test" in err and "pass --eval_only" in err
    assert not (tmp_path / "o").exists()
    assert prepare_mod.main([*cli, "--eval_only"]) == 0
    assert f"shards: {tmp_path / 'o'}/n_valid_NNNNNN.bin" in capsys.readouterr().out
    assert len(documents(tmp_path / "o", "valid")) == 10 and not find_shards(tmp_path / "o").train
    with pytest.raises(PrepareError, match="--eval_only writes no test split \\(got --test 2\\)"):
        prepare([fasta], tmp_path / "p", "d", eval_only=True, test=2, quiet=True)
    with pytest.raises(PrepareError, match="puts all 10 usable sequences in valid; .* --valid 10"):
        prepare([fasta], tmp_path / "p", "d", eval_only=True, valid=5, quiet=True)
    assert not (tmp_path / "p").exists()


def test_unreadable_inputs_are_refused_naming_the_file(tmp_path):
    good = gzip.compress(b">a\nMKV\n" * 200)
    cases = {
        "empty.fa": (b"", "no usable sequences"),
        "headers.fa": (b">a\n>b\n", "no usable sequences"),
        "cut.fa.gz": (good[: len(good) // 2], "cannot read it"),
        "binary.fa": (bytes(range(256)) * 4, "binary data, not text"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(PrepareError, match=message) as e:
            prepare([tmp_path / name], tmp_path / "o", "d", eval_only=True, quiet=True)
        assert str(e.value).startswith(str(tmp_path / name)) and "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()


def prepare_cli(*args):
    cmd = [sys.executable, "-m", "data.prepare", str(SAMPLE_FASTA), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_cli_prepares_the_real_sample(tmp_path):
    t = time.perf_counter()
    run = prepare_cli("--out", tmp_path, "--name", "sample")
    seconds = time.perf_counter() - t
    assert run.returncode == 0, run.stderr
    assert "train      18,000" in run.stdout and "valid       1,000" in run.stdout
    files = find_shards(tmp_path)
    assert [len(x) for x in (files.train, files.valid, files.test)] == [1, 1, 1]
    print(f"prepared the 20k sample in {seconds:.1f} s")
    bad = prepare_cli("--out", tmp_path, "--name", "s", "--valid", "20000")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert Path(SAMPLE_FASTA).name in bad.stderr
