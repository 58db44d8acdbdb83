"""The .bin token shard, byte-compatible with Synthyra/omg_prot50_packed.

Layout: 256 little-endian int32 header ([0] magic 20240520, [1] version 1, [2] token count,
[3..255] zero), then the tokens as uint8. Documents are `<cls> residues <eos>` back to back.

    python -m data.shards verify FILE...     # per file: tokens, documents, mean/max length
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from data.tokenizer import CLS, EOS, VOCAB_SIZE

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_TOKENS = 2**31 - 1  # the header stores the count as int32
_REMEDY = "re-download or re-prepare this shard"
_CLS, _EOS = np.array([CLS], np.uint8), np.array([EOS], np.uint8)


class ShardError(ValueError):
    """A shard that cannot be used; the message names the file, the fault and what to do."""


def _fail(path, fault: str):
    raise ShardError(f"{path}: {fault}; {_REMEDY}")


def read_header(path) -> int:
    """Validate the header and the file size; return the token count."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: no such shard file; check the path or prepare/download the data")
    size = path.stat().st_size
    if size == 0:
        _fail(path, "the file is empty (0 bytes)")
    if size < HEADER_BYTES:
        _fail(path, f"truncated header ({size} bytes, a header is {HEADER_BYTES})")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        _fail(path, f"wrong magic number {header[0]} (expected {MAGIC}), not a token shard")
    if header[1] != VERSION:
        _fail(path, f"unknown version {header[1]} (this reader knows version {VERSION})")
    if np.any(header[3:]):
        _fail(path, "reserved header fields 3..255 are not zero")
    count = int(header[2])
    if count <= 0:
        _fail(path, f"the file is empty (header token count {count})")
    payload = size - HEADER_BYTES
    if payload < count:
        _fail(
            path, f"truncated: the header announces {count} tokens but only {payload} bytes follow"
        )
    if payload > count:
        _fail(
            path,
            f"{payload - count} trailing bytes after the {count} tokens the header announces"
            " (a uint16 llm.c shard is twice the size)",
        )
    return count


def read_shard(path, check_tokens: bool = True) -> np.memmap:
    """Memory-map a validated shard's tokens (uint8). Raises ShardError naming file and fault."""
    count = read_header(path)
    tokens = np.memmap(path, dtype=np.uint8, mode="r", offset=HEADER_BYTES, shape=(count,))
    if check_tokens:
        top = int(tokens.max())
        if top >= VOCAB_SIZE:
            where = int(np.argmax(tokens >= VOCAB_SIZE))
            _fail(path, f"token id {top} >= {VOCAB_SIZE} (first bad one at position {where})")
        if tokens[0] != CLS:
            _fail(path, f"the file does not start with <cls> (first token id {tokens[0]})")
        if tokens[-1] != EOS:
            _fail(
                path,
                f"the file does not end at <eos> (last token id {tokens[-1]}), "
                "its last document is cut",
            )
    return tokens


def document_bounds(tokens: np.ndarray, path="<tokens>") -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of every document, end exclusive; each is `<cls> residues <eos>`."""
    starts = np.flatnonzero(tokens == CLS)
    ends = np.flatnonzero(tokens == EOS) + 1
    if len(starts) != len(ends) or starts[0] != 0 or np.any(starts[1:] != ends[:-1]):
        _fail(
            path,
            "documents are not well-formed <cls> residues <eos> runs "
            f"({len(starts)} <cls> and {len(ends)} <eos>)",
        )
    return starts, ends


def join_documents(residues) -> np.ndarray:
    """The shard token stream `<cls> r <eos><cls> r <eos>...` of residue-id arrays."""
    parts = []
    for r in residues:
        parts += (_CLS, np.asarray(r, dtype=np.uint8), _EOS)
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def write_shard(path, tokens: np.ndarray) -> None:
    """Write a shard atomically: a killed writer leaves no partial file under the final name."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not 0 < len(tokens) <= MAX_TOKENS:
        raise ValueError(
            f"{path}: a shard holds 1..{MAX_TOKENS} tokens in a 1-D array, got shape {tokens.shape}"
        )
    if tokens.dtype != np.uint8:
        if tokens.min() < 0 or tokens.max() >= VOCAB_SIZE:
            raise ValueError(f"{path}: token ids must lie in 0..{VOCAB_SIZE - 1}")
        tokens = tokens.astype(np.uint8)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, len(tokens))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def shard_stats(path) -> dict:
    """Tokens, documents, mean and max document length (tokens, <cls>/<eos> included)."""
    tokens = read_shard(path)
    starts, ends = document_bounds(tokens, path)
    lengths = ends - starts
    return {
        "tokens": len(tokens),
        "documents": len(starts),
        "mean_length": float(lengths.mean()),
        "max_length": int(lengths.max()),
    }


def _verify(files: list[str]) -> int:
    bad = 0
    print(f"{'file':<48} {'tokens':>14} {'documents':>11} {'mean_len':>9} {'max_len':>8}")
    for f in files:
        try:
            s = shard_stats(f)
        except ShardError as e:
            print(f"error: {e}", file=sys.stderr)
            bad += 1
            continue
        print(
            f"{f:<48} {s['tokens']:>14,} {s['documents']:>11,} {s['mean_length']:>9.1f} "
            f"{s['max_length']:>8,}"
        )
    if bad:
        print(f"{bad} of {len(files)} shard(s) failed verification", file=sys.stderr)
    return 1 if bad else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data.shards",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="validate shards and print their statistics")
    verify.add_argument("files", nargs="+", metavar="FILE")
    args = parser.parse_args(argv)
    return _verify(args.files)


if __name__ == "__main__":
    sys.exit(main())
