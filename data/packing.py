"""Row packing shared by the training loader and the benchmark: whole documents
`<cls> residues <eos>` laid back to back into fixed-length rows, right-padded with <pad>.

A piece is one document as packed: (file id, offset of its first residue, residue count[, g]).
Rows are filled first-fit from a window of the next WINDOW pieces, which keeps padding small
without reading ahead more than a few rows. The benchmark depends on this file: changing it
changes the official evaluation (leaderboard rules).
"""

from __future__ import annotations

import numpy as np

from data.shards import document_bounds, read_shard
from data.tokenizer import CLS, EOS, PAD

WINDOW = 64  # documents considered when filling a row; larger = less padding, more reordering
MIN_DOC = 3  # <cls> residue <eos>: a row with less room left than this is closed


def span(n_residues: int, multiple: int = 1) -> int:
    """Positions a piece takes in a row: <cls> residues <eos>, padded up to a multiple of
    `multiple` (the Patch UNet's alignment, so no merged token mixes two documents)."""
    return -(-(n_residues + 2) // multiple) * multiple


def take_row(pending: list, seq_len: int, multiple: int = 1) -> tuple[list, int]:
    """Remove from `pending` the pieces of one row, first fit in window order; return them and
    the room left (padding). The window's head always goes first, so nothing starves."""
    row, kept, room = [], [], seq_len
    for i, piece in enumerate(pending):
        if room < MIN_DOC:
            kept += pending[i:]
            break
        if span(piece[2], multiple) <= room:
            row.append(piece)
            room -= span(piece[2], multiple)
        else:
            kept.append(piece)
    pending[:] = kept
    return row, room


def write_row(tokens: np.ndarray, docs: np.ndarray, r: int, row: list, sources: dict,
              multiple: int = 1) -> list:
    """Lay the row's pieces into row r, each at a multiple of `multiple` (the positions
    between are padding); return each piece's offset of its first residue."""
    o, offsets = 0, []
    for k, (f, s, n, *_) in enumerate(row):
        tokens[r, o] = CLS
        tokens[r, o + 1 : o + 1 + n] = sources[f][s : s + n]
        tokens[r, o + 1 + n] = EOS
        docs[r, o : o + n + 2] = k
        offsets.append(o + 1)
        o += span(n, multiple)
    return offsets


def empty_rows(batch_size: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.full((batch_size, seq_len), PAD, np.uint8),
        np.full((batch_size, seq_len), -1, np.int64),
    )


def shard_tokens(path) -> np.ndarray:
    """A validated shard's tokens as a plain ndarray view of the map (slicing a np.memmap
    subclass costs several microseconds per document)."""
    return np.asarray(read_shard(path))


def open_shard(path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, starts, ends) of a validated shard."""
    tokens = shard_tokens(path)
    return (tokens, *document_bounds(tokens, path))
