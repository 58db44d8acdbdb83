"""The benchmark's data: validation/test sequences with fixed masks (DESIGN, "The benchmark").

Every sequence of the split once across ranks, cut to the benchmark length, 15% of its
residues replaced by <mask> at positions drawn from a seed mixed with the sequence's global
index, so the masks are the same in every run, on any world size and batch size. This file,
data/packing.py, data/shards.py, data/tokenizer.py and evaluation/benchmark.py are the official
benchmark code that leaderboard.py checks in every submitted log.
"""

from __future__ import annotations

import numpy as np
import torch

from data.packing import MIN_DOC, WINDOW, empty_rows, open_shard, take_row, write_row
from data.tokenizer import IGNORE, MASK

BENCHMARK_RATE_PERCENT = 15
BENCHMARK_SEED = 20240520  # mixed with the sequence index: same masks in every run


def benchmark_mask_count(n_residues: int) -> int:
    """round(15% of n) with halves rounded up, and at least one for any non-empty sequence,
    so that every sequence counts (the SpeedrunningPLMs benchmark's rule for short ones)."""
    if n_residues <= 0:
        return 0
    return max(1, (BENCHMARK_RATE_PERCENT * n_residues + 50) // 100)


def benchmark_mask_positions(n_residues: int, seq_index: int) -> np.ndarray:
    """Sorted residue offsets (0-based, after <cls>) masked in benchmark sequence `seq_index`.

    Depends only on (n_residues, seq_index): identical on any world size, run or batch size.
    """
    rng = np.random.default_rng([BENCHMARK_SEED, seq_index])
    order = np.argsort(rng.random(n_residues), kind="stable")
    return np.sort(order[: benchmark_mask_count(n_residues)])


class EvalLoader:
    """Every sequence of `files` exactly once across ranks, cut to seq_len tokens, with the
    benchmark masks (15% of residues -> <mask>, positions fixed by the sequence's global
    index). Rank r takes sequences r, r+W, ...; every rank yields len(loader) batches, the
    ones past its own data all padding with labels -100. doc_multiple: each sequence starts at a
    multiple of it (data.packing.span; the Patch UNet's alignment), which moves sequences between
    rows but changes no sequence, mask or target."""

    def __init__(self, files, batch_size: int, seq_len: int, *, rank: int = 0, world_size: int = 1,
                 doc_multiple: int = 1):
        if not files:
            raise ValueError(
                "EvalLoader got no shards; prepare or download a dataset with valid/test splits"
            )
        if batch_size < 1 or seq_len < MIN_DOC or not 0 <= rank < world_size:
            raise ValueError(
                f"EvalLoader needs batch_size >= 1, seq_len >= {MIN_DOC} and "
                f"0 <= rank < world_size (got {batch_size}, {seq_len}, {rank}, {world_size})"
            )
        if doc_multiple < 1 or seq_len % doc_multiple:
            raise ValueError(f"EvalLoader doc_multiple={doc_multiple} must be >= 1 and divide seq_len={seq_len}")
        self.B, self.L, self.multiple = batch_size, seq_len, doc_multiple
        self._sources, pieces = {}, []
        for fid, path in enumerate(files):
            tokens, starts, ends = open_shard(path)
            self._sources[fid] = tokens
            n = np.minimum(ends - starts - 2, seq_len - 2)
            base = len(pieces)
            pieces += [
                (fid, int(s) + 1, int(k), base + i) for i, (s, k) in enumerate(zip(starts, n))
            ]
        self.num_sequences = len(pieces)
        rows_per_rank = [self._pack(pieces[r::world_size]) for r in range(world_size)]
        self._rows = rows_per_rank[rank]
        self._len = max(-(-len(rows) // batch_size) for rows in rows_per_rank)

    def _pack(self, pieces: list) -> list:
        rows, pending, nxt = [], [], 0
        while nxt < len(pieces) or pending:
            take = WINDOW - len(pending)
            pending += pieces[nxt : nxt + take]
            nxt += take
            rows.append(take_row(pending, self.L, self.multiple)[0])
        return rows

    def __len__(self) -> int:
        return self._len

    def __iter__(self):
        for b in range(self._len):
            tokens, docs = empty_rows(self.B, self.L)
            masked = []
            for r, row in enumerate(self._rows[b * self.B : (b + 1) * self.B]):
                for o, (_, _, n, g) in zip(write_row(tokens, docs, r, row, self._sources, self.multiple), row):
                    masked.append(r * self.L + o + benchmark_mask_positions(n, g))
            input_ids = torch.from_numpy(tokens).long()
            labels = torch.full_like(input_ids, IGNORE)
            if masked:
                flat = torch.from_numpy(np.concatenate(masked))
                labels.view(-1)[flat] = input_ids.view(-1)[flat]
                input_ids.view(-1)[flat] = MASK
            yield {"input_ids": input_ids, "labels": labels, "doc_ids": torch.from_numpy(docs)}
