"""How much of a held-out split's residue context also occurs in the train split.

    python -m data.overlap --data sample [--split valid] [--orders 3,5,8]

For each order k, a residue of the held-out split whose k residues on each side (inside its own
document) occur around some residue of the train split has a "train context". The table gives
the share of held-out residues with one, and the cross-entropy (nats) of a lookup that predicts
those residues from the train residues seen in the same context (add-0.05 smoothing over the 20
amino acids). A high share at a long k means near-copies of train proteins sit in the held-out
split: a model that memorises the train split is rewarded on it, which the validation loss of
a clustered dataset (OMGprot50, at 50% identity) does not reward. Model-free; no masking.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from data.datasets import dataset_shards
from data.shards import ShardError, document_bounds, read_shard

SMOOTH = 0.05  # pseudo-count per amino acid of the lookup
N_AMINO = 20
_BASE = np.uint64(1_000_003)  # polynomial hash of a context, wrapping modulo 2^64


def contexts(tokens: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hash of the k tokens left and right, the token itself, its index) of every position
    whose whole +-k window lies inside its document (<cls> and <eos> count as part of it)."""
    starts, ends = document_bounds(tokens)
    doc = np.repeat(np.arange(len(starts)), ends - starts)
    n = len(tokens)
    pos = np.arange(k, n - k)
    ok = (doc[pos - k] == doc[pos]) & (doc[pos + k] == doc[pos])
    pos = pos[ok]
    t = tokens.astype(np.uint64)
    h = np.zeros(len(pos), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(1, k + 1):  # left and right interleaved: order matters, sides differ
            h = (h * _BASE + t[pos - j] + np.uint64(1)) * _BASE + t[pos + j] + np.uint64(100)
    return h, tokens[pos].astype(np.int64), pos


def overlap(train: np.ndarray, held: np.ndarray, k: int) -> tuple[float, float, int]:
    """(share of held-out positions with a train context, lookup nats over those, their count)."""
    tk, tt, _ = contexts(train, k)
    hk, ht, _ = contexts(held, k)
    if not len(tk) or not len(hk):  # documents shorter than the window: nothing to compare
        return 0.0, float("nan"), 0
    uniq, rank = np.unique(tk, return_inverse=True)  # each train context numbered
    pairs = np.sort(rank.reshape(-1) * 64 + tt)  # (context number, residue), sorted
    where = np.searchsorted(uniq, hk).clip(max=len(uniq) - 1)
    seen = uniq[where] == hk
    if not seen.any():
        return 0.0, float("nan"), 0
    ctx, res = where[seen] * 64, ht[seen]
    count = lambda a, b: np.searchsorted(pairs, b, "left") - np.searchsorted(pairs, a, "left")
    total, hits = count(ctx, ctx + 64), count(ctx + res, ctx + res + 1)
    nll = -np.log((hits + SMOOTH) / (total + SMOOTH * N_AMINO))
    return float(seen.mean()), float(nll.mean()), int(seen.sum())


def read_splits(spec: str, cache: str | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(train tokens, `split` tokens) of dataset `spec`, each split's shards joined in order.
    FileNotFoundError when either split is missing; ShardError for a bad shard."""
    files = dataset_shards(spec, cache)
    held_files = getattr(files, split)
    if not files.train or not held_files:
        raise FileNotFoundError(f"--data {spec} needs train and {split} shards.")
    join = lambda paths: np.concatenate([np.asarray(read_shard(p)) for p in paths])
    return join(files.train), join(held_files)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="sample", help="sample | omg_prot50 | a shard directory")
    ap.add_argument("--data_cache", default=None)
    ap.add_argument("--split", default="valid", choices=("valid", "test"))
    ap.add_argument("--orders", default="3,5,8", help="context lengths k, comma-separated")
    args = ap.parse_args(argv)
    try:
        orders = [int(k) for k in args.orders.split(",")]
        if not orders or min(orders) < 1:
            raise ValueError
    except ValueError:
        print(f"data.overlap: --orders {args.orders!r} must be whole numbers >= 1, e.g. 3,5,8", file=sys.stderr)
        return 2
    try:
        train, held = read_splits(args.data, args.data_cache, args.split)
    except (ShardError, ValueError, FileNotFoundError) as e:
        print(f"data.overlap: {e}", file=sys.stderr)
        return 2
    print(f"{args.data}: {args.split} ({len(held):,} tokens) against train ({len(train):,} tokens)")
    print("| k | held-out residues with a train context (+-k) | lookup cross-entropy there (nats) |")
    print("|--:|--:|--:|")
    for k in orders:
        share, nll, _ = overlap(train, held, k)
        print(f"| {k} | {share:.4f} | {nll:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
