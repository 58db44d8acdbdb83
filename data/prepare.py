"""Turn protein sequences into .bin shards: `DIR/{NAME}_{split}_{i:06d}.bin`.

    python -m data.prepare INPUT... --out DIR --name NAME [--valid N] [--test N] [--seed S]
                           [--shard_tokens T] [--max_length L] [--dedup]
    python -m data.prepare INPUT... --out DIR --name NAME --eval_only [--max_length L]

INPUT: FASTA (plain or .gz), one sequence per line (plain or .gz), or parquet with a
`sequence` column. Splits are drawn by seed over the (deduplicated) sequences in input order;
valid/test documents are cut to L tokens (<cls> and <eos> kept), train documents stay whole.
--eval_only makes an evaluation-only dataset instead: every usable sequence goes to valid, in
input order (no draw, so the benchmark's masks of sequence i are fixed by its position), and
no train or test shards are written (`python evaluate.py --data DIR`).
All shards are written to a staging folder and moved into place at the end, so a killed run
leaves no half shard under a final name.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import shutil
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.shards import join_documents, write_shard
from data.tokenizer import encode_with_unknowns

SPLITS = ("train", "valid", "test")
HELD_OUT = 1000  # default --valid and --test sequences
FORMATS = "FASTA, one sequence per line (plain or gzip) or parquet with a 'sequence' column"


class PrepareError(ValueError):
    """Unusable input or options; the message names the input and what to do."""


def _open_text(path: Path):
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def _iter_parquet(path: Path) -> Iterator[bytes]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PrepareError(
            f"{path}: reading parquet needs pyarrow; install it "
            "(pip install pyarrow) or convert the file to FASTA"
        ) from None
    pf = pq.ParquetFile(path)
    if "sequence" not in pf.schema_arrow.names:
        raise PrepareError(
            f"{path}: parquet input needs a 'sequence' column, found "
            f"{pf.schema_arrow.names}; rename the column holding the sequences"
        )
    for batch in pf.iter_batches(columns=["sequence"], batch_size=65536):
        for s in batch.column(0).to_pylist():
            yield (s or "").encode("utf-8")


def _iter_lines(path: Path) -> Iterator[bytes]:
    """FASTA (records start with '>') or one sequence per line, detected from the first line."""
    with _open_text(path) as f:
        fasta = None
        parts: list[bytes] = []
        for line in f:
            line = line.strip()
            if not line:
                continue
            if b"\0" in line:
                raise PrepareError(f"{path}: binary data, not text; pass {FORMATS}")
            if fasta is None:
                fasta = line.startswith(b">")
            if not fasta:
                yield line
            elif line.startswith(b">"):
                if parts:
                    yield b"".join(parts)
                parts = []
            elif not line.startswith(b";"):  # ';' lines are old-style FASTA comments
                parts.append(line)
        if fasta and parts:
            yield b"".join(parts)


def iter_sequences(paths) -> Iterator[bytes]:
    """Raw sequences of all inputs in order; a trailing '*' (stop codon) is dropped."""
    for path in map(Path, paths):
        if not path.is_file():
            raise PrepareError(f"{path}: input file not found; check the path")
        reader = _iter_parquet if path.suffix == ".parquet" else _iter_lines
        try:
            for seq in reader(path):
                yield seq.rstrip(b"*")
        except PrepareError:
            raise
        except (OSError, EOFError, ValueError, zlib.error) as e:  # e.g. a truncated .gz
            raise PrepareError(f"{path}: cannot read it ({e}); pass {FORMATS}") from None


class _SplitWriter:
    """Appends whole documents and starts a new shard before one would exceed shard_tokens."""

    def __init__(self, out: Path, name: str, split: str, shard_tokens: int):
        self.out, self.prefix, self.limit = out, f"{name}_{split}", shard_tokens
        self.parts: list[np.ndarray] = []
        self.size = self.shards = self.sequences = self.tokens = self.truncated = 0

    def add(self, residues: np.ndarray, max_length: int | None):
        if max_length is not None and len(residues) + 2 > max_length:
            residues = residues[: max_length - 2]
            self.truncated += 1
        n = len(residues) + 2
        if self.size + n > self.limit and self.size > 0:
            self.flush()
        self.parts.append(residues)
        self.size += n
        self.sequences += 1
        self.tokens += n

    def flush(self):
        if self.size:
            write_shard(
                self.out / f"{self.prefix}_{self.shards:06d}.bin", join_documents(self.parts)
            )
            self.shards += 1
            self.parts, self.size = [], 0


def _scan(inputs, dedup: bool) -> tuple[int, int, set[int]]:
    """First pass: count the sequences kept, and find empty ones and repeats to drop."""
    seen: set[bytes] = set()
    dropped: set[int] = set()
    n_read = n_dup = 0
    for i, seq in enumerate(tqdm(iter_sequences(inputs), desc="scanning", unit=" seq", delay=2)):
        n_read += 1
        if not seq:
            dropped.add(i)
        elif dedup:
            ids, _ = encode_with_unknowns(seq)
            digest = hashlib.blake2b(ids.tobytes(), digest_size=16).digest()
            if digest in seen:
                dropped.add(i)
                n_dup += 1
            seen.add(digest)
    return n_read, n_dup, dropped


def prepare(
    inputs,
    out,
    name: str,
    *,
    valid: int | None = None,
    test: int | None = None,
    seed: int = 0,
    shard_tokens: int = 10**8,
    max_length: int = 1024,
    dedup: bool = False,
    eval_only: bool = False,
    quiet: bool = False,
) -> dict:
    """Write the shards and return a summary (sequences, tokens, unknowns, drops, per split).

    valid/test default to 1000 sequences each. eval_only=True makes an evaluation-only dataset:
    every usable sequence in valid, in input order (valid may only be None or that count),
    test None or 0, no train shards."""
    out = Path(out)
    where = ", ".join(map(str, inputs))
    if not name or "/" in name or name.startswith("."):
        raise PrepareError(f"--name {name!r}: give a plain dataset name such as 'uniprot'")
    if eval_only and test:
        raise PrepareError(
            f"--eval_only writes no test split (got --test {test}); pass --test 0 or leave it out"
        )
    if not eval_only:
        valid = HELD_OUT if valid is None else valid
        test = HELD_OUT if test is None else test
    if min(valid or 0, test or 0) < 0 or shard_tokens < 3 or max_length < 3:
        raise PrepareError("--valid/--test must be >= 0, --shard_tokens and --max_length >= 3")
    n_read, n_dup, dropped = _scan(inputs, dedup)
    n_kept = n_read - len(dropped)
    if n_kept == 0:
        raise PrepareError(f"{where}: no usable sequences; pass {FORMATS}")
    if eval_only:
        if valid not in (None, n_kept):
            raise PrepareError(
                f"{where}: --eval_only puts all {n_kept} usable sequences in valid; "
                f"leave out --valid or pass --valid {n_kept}"
            )
        split_of = np.ones(n_kept, np.uint8)  # all valid, in input order: no draw by seed
    else:
        if valid + test >= n_kept:
            raise PrepareError(
                f"{where}: {n_kept} usable sequences cannot give {valid} valid + {test} test "
                "and leave any for training; pass smaller --valid/--test, or pass --eval_only "
                "to make an evaluation-only dataset"
            )
        split_of = np.zeros(n_kept, np.uint8)  # 0 train, 1 valid, 2 test; drawn by seed
        held = np.random.default_rng(seed).permutation(n_kept)[: valid + test]
        split_of[held[:valid]], split_of[held[valid:]] = 1, 2

    out.mkdir(parents=True, exist_ok=True)
    stage = out / f".{name}.prepare-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        writers = [_SplitWriter(stage, name, s, shard_tokens) for s in SPLITS]
        cuts = (None, max_length, max_length)
        unknowns = k = 0
        bar = tqdm(total=n_kept, desc="writing", unit=" seq", delay=2, disable=quiet or None)
        for i, seq in enumerate(iter_sequences(inputs)):
            if i in dropped:
                continue
            ids, n_unk = encode_with_unknowns(seq)
            unknowns += n_unk
            s = split_of[k]
            writers[s].add(ids, cuts[s])
            k += 1
            bar.update()
        bar.close()
        for w in writers:
            w.flush()
        for old in out.glob(f"{name}_*_[0-9][0-9][0-9][0-9][0-9][0-9].bin"):
            old.unlink()  # a previous run's extra shards must not mix with this run's
        for f in sorted(stage.iterdir()):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    summary = {
        "sequences_read": n_read,
        "empty_dropped": n_read - n_kept - n_dup,
        "duplicates_dropped": n_dup,
        "unknowns": unknowns,
        "splits": {
            w.prefix.rsplit("_", 1)[1]: {
                "sequences": w.sequences,
                "tokens": w.tokens,
                "truncated": w.truncated,
                "shards": w.shards,
            }
            for w in writers
        },
    }
    if not quiet:
        _print_summary(summary, out, name)
    return summary


def _print_summary(s: dict, out: Path, name: str):
    print(
        f"read {s['sequences_read']:,} sequences; dropped {s['empty_dropped']:,} empty and "
        f"{s['duplicates_dropped']:,} duplicates; {s['unknowns']:,} characters became <unk>"
    )
    print(f"{'split':<6} {'sequences':>10} {'tokens':>14} {'truncated':>10} {'shards':>7}")
    for split, v in s["splits"].items():
        print(
            f"{split:<6} {v['sequences']:>10,} {v['tokens']:>14,} {v['truncated']:>10,} "
            f"{v['shards']:>7}"
        )
    written = [split for split, v in s["splits"].items() if v["shards"]]
    splits = written[0] if len(written) == 1 else "{" + ",".join(written) + "}"
    print(f"shards: {out}/{name}_{splits}_NNNNNN.bin")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data.prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--name", required=True, help="dataset name, the shard file prefix")
    p.add_argument(
        "--valid", type=int, help="validation sequences (default 1000; all with --eval_only)"
    )
    p.add_argument("--test", type=int, help="test sequences (default 1000; 0 with --eval_only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split draw (default 0)")
    p.add_argument("--shard_tokens", type=float, default=1e8, help="max tokens per shard")
    p.add_argument(
        "--max_length",
        type=int,
        default=1024,
        help="valid/test documents are cut to this many tokens (default 1024)",
    )
    p.add_argument("--dedup", action="store_true", help="drop exact duplicate sequences")
    p.add_argument(
        "--eval_only",
        action="store_true",
        help="evaluation-only dataset: every sequence in valid, in input order; no train/test",
    )
    a = p.parse_args(argv)
    try:
        prepare(
            a.inputs,
            a.out,
            a.name,
            valid=a.valid,
            test=a.test,
            seed=a.seed,
            shard_tokens=int(a.shard_tokens),
            max_length=a.max_length,
            dedup=a.dedup,
            eval_only=a.eval_only,
        )
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
