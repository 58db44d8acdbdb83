"""A model's benchmark loss split into residues copied from train and novel ones.

    python -m evaluation.overlap --checkpoint checkpoints/RUN [--data sample] [--split valid] [--k 8]

A held-out residue is "copied" when its k residues on each side occur around some train residue
(data.overlap, the same definition); the rest are "novel". Each sequence is scored alone with
the benchmark's masks (DESIGN, "The benchmark": the same positions, cut to 1024 tokens), so the
two losses weight their masked residues as the benchmark does and their token-weighted mean is
the benchmark loss. On the CPU, one sequence per row; a diagnostic, not part of the benchmark.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F

from data.benchmark import benchmark_mask_positions
from data.overlap import contexts, read_splits
from data.shards import ShardError, document_bounds
from data.tokenizer import EOS, MASK, PAD
from evaluation.benchmark import BENCH_LENGTH

ROWS = 16  # sequences per forward pass


def copied_positions(train: np.ndarray, held: np.ndarray, k: int) -> np.ndarray:
    """Boolean per token of `held`: its +-k context occurs in `train`."""
    keys, _, pos = contexts(held, k)
    out = np.zeros(len(held), bool)
    out[pos[np.isin(keys, contexts(train, k)[0])]] = True
    return out


@torch.no_grad()
def loss_by_overlap(model, train: np.ndarray, held: np.ndarray, k: int) -> dict:
    """{"copied": (loss, count), "novel": (loss, count)} over the benchmark's masked residues."""
    copied = copied_positions(train, held, k)
    starts, ends = document_bounds(held)
    sums, counts = np.zeros(2), np.zeros(2, dtype=np.int64)
    model.eval()
    for first in range(0, len(starts), ROWS):
        docs = range(first, min(first + ROWS, len(starts)))
        ids = torch.full((len(docs), BENCH_LENGTH), PAD, dtype=torch.long)
        doc_ids = torch.full((len(docs), BENCH_LENGTH), -1, dtype=torch.long)
        targets, groups = [], []
        for r, g in enumerate(docs):
            n = min(ends[g] - starts[g] - 2, BENCH_LENGTH - 2)
            row = torch.from_numpy(held[starts[g] : starts[g] + n + 1].astype(np.int64))
            ids[r, : n + 2] = torch.cat([row, torch.tensor([EOS])])  # <cls> residues <eos>
            doc_ids[r, : n + 2] = 0
            at = benchmark_mask_positions(n, g) + 1  # after <cls>
            targets.append((r, at, ids[r, at].clone()))
            groups.append(copied[starts[g] + at].astype(np.int64))
            ids[r, at] = MASK
        logits, _ = model(ids, doc_ids)
        for (r, at, labels), group in zip(targets, groups):
            ce = F.cross_entropy(logits[r, at].float(), labels, reduction="none").numpy()
            np.add.at(sums, group, ce)
            np.add.at(counts, group, 1)
    return {name: (sums[j] / counts[j] if counts[j] else math.nan, int(counts[j]))
            for j, name in ((1, "copied"), (0, "novel"))}


def main(argv=None) -> int:
    from evaluation.inputs import load_checkpoint_model
    from runtime.errors import ConfigError

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="training checkpoint directory or weights file")
    ap.add_argument("--data", default="sample", help="sample | omg_prot50 | a shard directory")
    ap.add_argument("--data_cache", default=None)
    ap.add_argument("--split", default="valid", choices=("valid", "test"))
    ap.add_argument("--k", type=int, default=8, help="context length on each side (data.overlap)")
    args = ap.parse_args(argv)
    try:
        if args.k < 1:
            raise ConfigError(f"--k {args.k}: the context length must be >= 1, e.g. 8.")
        train, held = read_splits(args.data, args.data_cache, args.split)
        model = load_checkpoint_model(args.checkpoint)
    except (ConfigError, ShardError, ValueError, FileNotFoundError) as e:
        print(f"evaluation.overlap: {e}", file=sys.stderr)
        return 2
    out = loss_by_overlap(model, train, held, args.k)
    total = sum(loss * n for loss, n in out.values() if n) / sum(n for _, n in out.values())
    print(f"{args.checkpoint} on {args.data}/{args.split}, residues by their +-{args.k} context in train:")
    print("| residues | masked | loss |\n|---|--:|--:|")
    for name, (loss, n) in out.items():
        print(f"| {name} | {n:,} | {loss:.4f} |")
    print(f"| all | {sum(n for _, n in out.values()):,} | {total:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
