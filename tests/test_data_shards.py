import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from data import shards
from data.shards import (
    ShardError,
    document_bounds,
    join_documents,
    read_shard,
    shard_stats,
    write_shard,
)
from data.tokenizer import CLS, EOS, encode

TOKENS = [CLS, 20, 15, 7, EOS, CLS, 5, EOS]  # <cls>MKV<eos><cls>A<eos>


def hand_built(tokens, magic=20240520, version=1, count=None, extra=b"") -> bytes:
    """A shard written from the format description alone, not through data.shards."""
    header = struct.pack(
        "<256i", magic, version, len(tokens) if count is None else count, *[0] * 253
    )
    return header + bytes(tokens) + extra


def test_hand_built_shard_is_read(tmp_path):
    path = tmp_path / "x_train_000000.bin"
    path.write_bytes(hand_built(TOKENS))
    assert read_shard(path).tolist() == TOKENS
    starts, ends = document_bounds(read_shard(path))
    assert starts.tolist() == [0, 5] and ends.tolist() == [5, 8]


def test_write_is_byte_identical_to_the_format(tmp_path):
    tokens = join_documents([encode("MKV"), encode("A")])
    assert tokens.tolist() == TOKENS
    write_shard(tmp_path / "a.bin", tokens)
    assert (tmp_path / "a.bin").read_bytes() == hand_built(TOKENS)
    assert os.listdir(tmp_path) == ["a.bin"]  # no temporary left behind


def test_write_is_atomic(tmp_path, monkeypatch):
    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(shards.os, "fsync", crash)
    with pytest.raises(OSError):
        write_shard(tmp_path / "a.bin", np.array(TOKENS))
    assert os.listdir(tmp_path) == []


CORRUPT = {
    "empty": (b"", "empty"),
    "count zero": (hand_built([], count=0), "empty"),
    "short header": (b"\x00" * 100, "truncated header"),
    "magic": (hand_built(TOKENS, magic=20240521), "wrong magic"),
    "version": (hand_built(TOKENS, version=2), "unknown version 2"),
    "truncated": (hand_built(TOKENS)[:-3], "truncated"),
    "trailing": (hand_built(TOKENS, extra=b"\x00\x00"), "2 trailing bytes"),
    "uint16": (hand_built(TOKENS, extra=bytes(len(TOKENS))), "trailing bytes"),
    "token id": (hand_built([CLS, 33, EOS]), "token id 33"),
    "no eos": (hand_built([CLS, 5, 6]), "does not end at <eos>"),
    "no cls": (hand_built([5, 6, EOS]), "does not start with <cls>"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_shard_messages(tmp_path, case):
    content, fault = CORRUPT[case]
    path = tmp_path / "bad_train_000000.bin"
    path.write_bytes(content)
    with pytest.raises(ShardError) as err:
        read_shard(path)
    assert str(path) in str(err.value) and fault in str(err.value)
    assert "re-download or re-prepare" in str(err.value)


def test_malformed_documents_are_refused(tmp_path):
    path = tmp_path / "m.bin"
    path.write_bytes(hand_built([CLS, 5, CLS, 6, EOS]))
    with pytest.raises(ShardError, match="not well-formed"):
        shard_stats(path)


def test_stats(tmp_path):
    write_shard(tmp_path / "s.bin", join_documents([encode("MKV"), encode("A"), encode("LLLLL")]))
    assert shard_stats(tmp_path / "s.bin") == {
        "tokens": 15,
        "documents": 3,
        "mean_length": 5.0,
        "max_length": 7,
    }


def test_verify_cli_exit_codes(tmp_path):
    good, bad = tmp_path / "good.bin", tmp_path / "bad.bin"
    good.write_bytes(hand_built(TOKENS))
    bad.write_bytes(hand_built(TOKENS, version=3))
    cmd = [sys.executable, "-m", "data.shards", "verify"]
    ok = subprocess.run([*cmd, str(good)], capture_output=True, text=True)
    assert ok.returncode == 0 and "good.bin" in ok.stdout and ok.stderr == ""
    assert ok.stdout.splitlines()[1].split()[1:] == ["8", "2", "4.0", "5"]
    fail = subprocess.run([*cmd, str(good), str(bad)], capture_output=True, text=True)
    assert fail.returncode == 1
    assert (
        "bad.bin" in fail.stderr
        and "unknown version 3" in fail.stderr
        and "good.bin" in fail.stdout
    )
