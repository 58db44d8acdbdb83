import threading

import pytest

from data import datasets
from data.datasets import find_shards, resolve_dataset
from data.shards import join_documents, read_shard, write_shard
from data.tokenizer import encode


def shard(path, *seqs):
    write_shard(path, join_documents([encode(s) for s in seqs]))


def test_sample_is_prepared_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ESM_SPEEDRUN_CACHE", str(tmp_path))
    files = resolve_dataset("sample")
    assert files.name == "sample" and [len(f) for f in (files.train, files.valid, files.test)] == [
        1,
        1,
        1,
    ]
    assert files.train[0].parent == tmp_path / "sample"
    counts = [
        int((read_shard(f) == 0).sum()) for f in (files.train[0], files.valid[0], files.test[0])
    ]
    assert counts == [18_000, 1_000, 1_000]
    mtime = files.train[0].stat().st_mtime_ns
    assert resolve_dataset("sample").train[0].stat().st_mtime_ns == mtime  # not prepared again


def test_concurrent_first_use_is_safe(tmp_path, monkeypatch):
    small = tmp_path / "small.txt"
    small.write_text("\n".join("MKV" + "A" * (i % 17) + "LC" * (i % 5) for i in range(60)) + "\n")
    monkeypatch.setattr(datasets, "SAMPLE_FASTA", small)
    monkeypatch.setattr(datasets, "SAMPLE_SPLITS", {"valid": 5, "test": 5, "seed": 0})
    results, errors = [], []

    def rank():
        try:
            results.append(resolve_dataset("sample", cache_dir=tmp_path / "cache"))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=rank) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3
    assert all(r.train == results[0].train for r in results)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["sample"]  # no staging left
    assert len(find_shards(tmp_path / "cache" / "sample").valid) == 1


def test_missing_download_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        resolve_dataset("omg_prot50", cache_dir=tmp_path)
    assert "python -m data.download --dataset omg_prot50 --num_chunks N" in str(err.value)
    with pytest.raises(FileNotFoundError, match="python -m data.prepare"):
        resolve_dataset(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no \\*_train_NNNNNN.bin"):
        resolve_dataset(str(tmp_path))


def test_directory_of_shards_in_both_namings(tmp_path):
    for name in (
        "omgprot50_train_000010.bin",
        "omgprot50_train_000002.bin",
        "omgprot50_val_000000.bin",
        "omgprot50_test_000000.bin",
    ):
        shard(tmp_path / name, "MKV")
    (tmp_path / "notes.txt").write_text("not a shard")
    files = resolve_dataset(str(tmp_path))
    assert [p.name for p in files.train] == [
        "omgprot50_train_000002.bin",
        "omgprot50_train_000010.bin",
    ]
    assert [p.name for p in files.valid] == ["omgprot50_val_000000.bin"] and len(files.test) == 1
    (tmp_path / "omg_prot50").mkdir()
    shard(tmp_path / "omg_prot50" / "omg_prot50_train_000000.bin", "MKV")
    assert resolve_dataset("omg_prot50", cache_dir=tmp_path).name == "omg_prot50"
    shard(tmp_path / "omg_prot50_train_000000.bin", "MKV")
    with pytest.raises(ValueError, match="several datasets \\(omg_prot50, omgprot50\\)"):
        resolve_dataset(str(tmp_path))
