"""Embed every sequence of a FASTA file with a trained model (docs/models.md, "Embeddings").

    python embed.py CHECKPOINT seqs.fasta[.gz] --out emb.npy [--pooling mean|cls|none] [--layer -1]

CHECKPOINT: one of our checkpoints (a weights file, a step directory, or a run directory: its
newest step; any architecture) or a Hugging Face EsmForMaskedLM (a directory or a Hub id).
Row i of emb.npy (float32, N x d) is the i-th sequence of the file (records without residues
are skipped, as everywhere in the project): mean = the average over its
residues (<cls>, <eos> and padding left out), cls = the <cls> position. --pooling none writes an
.npz of N per-residue arrays, keys "0", "1", ... in file order. --layer picks the hidden state:
0 = the embedding output, i = block i, -1 = the last block after the final norm. Sequences
longer than --max_length - 2 residues are cropped (counted on stderr). fp32 on the CPU, bf16
autocast on accelerators (--precision fp32 to keep fp32).
"""

from __future__ import annotations

import argparse
import os
import sys
import types
from pathlib import Path

import numpy as np

from evaluation.benchmark import BENCH_LENGTH
from evaluation.embed import POOLINGS, embed, load_model, read_sequences, tokenize
from runtime.devices import DEVICES, get_backend
from runtime.errors import ConfigError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="our weights file or checkpoint directory, or a Hugging Face ESM2 dir/id")
    ap.add_argument("fasta", help="sequences: FASTA (plain or .gz), or one sequence per line")
    ap.add_argument("--out", required=True, help="emb.npy (mean, cls) or emb.npz (none)")
    ap.add_argument("--pooling", default="mean", choices=POOLINGS, help="default mean")
    ap.add_argument("--layer", type=int, default=-1, help="hidden state: 0 embeddings .. -1 last, normed")
    ap.add_argument("--max_length", type=int, default=BENCH_LENGTH, help="tokens per sequence with <cls>/<eos>")
    ap.add_argument("--batch_tokens", type=int, default=16384, help="tokens per forward")
    ap.add_argument("--device", default="auto", choices=DEVICES)
    ap.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                    help="auto: bf16 autocast on accelerators, fp32 on the CPU")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except ConfigError as e:
        print(f"embed.py: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    suffix = ".npz" if args.pooling == "none" else ".npy"
    if Path(args.out).suffix != suffix:
        what = "per-residue arrays (--pooling none) go" if suffix == ".npz" else f"--pooling {args.pooling} goes"
        raise ConfigError(f"--out {args.out}: {what} to a {suffix} file; name it *{suffix}.")
    if not Path(args.out).resolve().parent.is_dir():
        raise ConfigError(f"--out {args.out}: its folder does not exist; create it first.")
    if args.max_length < 3:
        raise ConfigError(f"--max_length {args.max_length} leaves no room for a residue; use at least 3.")
    if args.batch_tokens < args.max_length:
        raise ConfigError(f"--batch_tokens {args.batch_tokens} is less than one row of --max_length "
                          f"{args.max_length}; raise it.")
    if not Path(args.fasta).is_file():
        raise ConfigError(f"{args.fasta} does not exist; pass a FASTA file (plain or .gz).")
    sequences = read_sequences(args.fasta)
    if not sequences:
        raise ConfigError(f"{args.fasta} holds no sequences; pass a FASTA file.")
    _, cropped = tokenize(sequences, args.max_length)
    backend = get_backend(args.device, types.SimpleNamespace(precision=args.precision))
    backend.init_distributed()
    try:
        if backend.world_size > 1:
            raise ConfigError("embed.py runs in one process; start it with python, not torchrun.")
        model, name = load_model(args.checkpoint)
        model = model.to(backend.device)
        out = embed(model, sequences, pooling=args.pooling, layer=args.layer, max_length=args.max_length,
                    batch_tokens=args.batch_tokens, backend=backend, progress=not args.quiet)
    finally:
        backend.shutdown()
    tmp = Path(args.out).with_name(Path(args.out).name + ".part" + suffix)  # np.save keeps the suffix
    if args.pooling == "none":
        np.savez(tmp, **{str(i): a for i, a in enumerate(out)})
        shape = f"{len(out)} arrays of (residues, {out[0].shape[1]})"
    else:
        np.save(tmp, out)
        shape = f"({out.shape[0]}, {out.shape[1]})"
    os.replace(tmp, args.out)
    crop = f", {cropped} cropped to {args.max_length - 2} residues" if cropped else ""
    print(f"{name}: {len(sequences)} sequences{crop}, {args.pooling} pooling of layer {args.layer} "
          f"-> {args.out} {shape} float32", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
