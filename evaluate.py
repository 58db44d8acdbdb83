"""Score a model on the benchmark (DESIGN, "The benchmark") and print the metrics table.

    python evaluate.py --checkpoint checkpoints/RUN [--data sample] [--split valid|test]
    python evaluate.py --hf facebook/esm2_t6_8M_UR50D --data omg_prot50 --protocol splm
    python evaluate.py --checkpoint checkpoints/RUN --fasta seqs.fasta.gz   # any sequences
    python evaluate.py --unigram --data sample       # the residue-frequency baseline
    python evaluate.py --composition 50 --data sample   # each protein's own composition

--checkpoint takes a training checkpoint (a step directory, or a run directory: its newest
step) or a weights file (model.io / `python -m hub import`). --hf takes a Hugging Face
EsmForMaskedLM directory or Hub id, run as Hugging Face runs it (one padded sequence per row).
--protocol splm is the published SpeedrunningPLMs evaluation (reference table, §8.1).
--data DIR needs only the shards it scores: an evaluation-only dataset (`python -m data.prepare
--eval_only`, no train shards) works, except with --unigram and --composition.
--fasta scores every sequence of a file (FASTA plain or gzip, or any input of data.prepare)
without a prepared dataset: each rank prepares it as an evaluation-only dataset, cut to 1024
tokens, in a private temporary directory removed afterwards. The file's i-th (non-empty)
sequence gets the benchmark masks of index i, and the numbers are printed as valid_*, like
--data DIR --split valid of `data.prepare FILE --eval_only`. --split, --unigram and
--composition need --data.
Runs under torchrun too: sequences are dealt to ranks and the sums reduced.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from data.shards import ShardError
from evaluation.benchmark import BENCH_LENGTH, evaluate
from evaluation.inputs import (
    dataset_files,
    doc_multiple,
    fasta_split,
    load_checkpoint_model,
    load_hf_model,
)
from evaluation.splm import evaluate_splm
from evaluation.unigram import Composition, Unigram
from runtime.backend import leave
from runtime.devices import DEVICES, get_backend
from runtime.errors import ConfigError
from training.runlog import format_line


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="training checkpoint directory or weights file")
    what.add_argument("--hf", help="Hugging Face EsmForMaskedLM directory or Hub id")
    what.add_argument("--unigram", action="store_true", help="the residue-frequency baseline of --data's train split")
    what.add_argument("--composition", type=float, metavar="ALPHA",
                      help="the composition baseline: each protein's visible residues plus ALPHA pseudo-counts of the unigram")
    source = ap.add_mutually_exclusive_group()
    source.add_argument("--data", help="sample | omg_prot50 | a shard directory (default sample)")
    source.add_argument("--fasta", help="score every sequence of this FASTA file (plain or gzip)")
    ap.add_argument("--data_cache", default=None, help="cache directory of sample/omg_prot50")
    ap.add_argument("--split", choices=("valid", "test"), help="split of --data (default valid)")
    ap.add_argument("--protocol", default="benchmark", choices=("benchmark", "splm"))
    ap.add_argument("--device", default="auto", choices=DEVICES)
    ap.add_argument("--batch_size", type=int, default=16384, help="tokens per batch per rank (benchmark protocol)")
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except (ConfigError, ShardError, FileNotFoundError) as e:
        print(f"evaluate.py: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from data.benchmark import EvalLoader

    baseline = "--unigram" if args.unigram else "--composition" if args.composition is not None else None
    if args.composition is not None and not args.composition > 0:
        raise ConfigError(f"--composition {args.composition:g}: ALPHA, the unigram's pseudo-counts, must be > 0 (e.g. 50).")
    if args.fasta and baseline:
        raise ConfigError(f"{baseline} needs the train split of a --data dataset; --fasta has none.")
    if args.fasta and args.split:
        raise ConfigError("--split picks a split of --data; --fasta scores every sequence of "
                          f"{args.fasta}, so leave --split out.")
    data, split_name = args.data or "sample", args.split or "valid"
    backend = get_backend(args.device)
    backend.init_distributed()
    tmp = None
    try:
        if args.fasta:  # each rank its own copy: same file, same shards, nothing shared
            tmp = tempfile.mkdtemp(prefix="evaluate-fasta-")
            split, where = fasta_split(args.fasta, Path(tmp))
        else:
            files = dataset_files(data, args.data_cache)
            split, where = getattr(files, split_name), f"{data}/{split_name}"
            if not split:
                raise ConfigError(f"--data {data} has no {split_name} shards; "
                                  "prepare it with --valid/--test sequences.")
        if baseline:
            if not files.train:
                raise ConfigError(f"{baseline} needs train shards and --data {data} has none; "
                                  "pass a dataset with a train split.")
            if args.unigram:
                model, name = Unigram(files.train), f"unigram of {data}/train"
            else:
                model, name = (Composition(files.train, args.composition),
                               f"composition (alpha {args.composition:g}) toward the unigram of {data}/train")
        elif args.checkpoint:
            attention = backend.model_defaults().get("attn_impl", "sdpa")
            model, name = load_checkpoint_model(args.checkpoint, attention), args.checkpoint
        else:
            model, name = load_hf_model(args.hf), f"hf:{args.hf}"
        model = model.to(backend.device)
        if args.protocol == "splm":
            m = evaluate_splm(model, split, backend)
        else:
            loader = EvalLoader(split, max(1, args.batch_size // BENCH_LENGTH), BENCH_LENGTH,
                                rank=backend.rank, world_size=backend.world_size,
                                doc_multiple=doc_multiple(model))
            m = evaluate(model, loader, backend)
        if backend.is_main:
            print(f"{name} on {where}, {args.protocol} protocol, {m['tokens']} masked tokens")
            print(f"{'metric':<10} value")
            for k, v in m.items():
                print(f"{k:<10} {v if isinstance(v, int) else f'{v:.4f}'}")
            print(format_line({f"{split_name}_{k}": v for k, v in m.items()}))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        backend.shutdown()
    return 0


if __name__ == "__main__":
    leave(main())
