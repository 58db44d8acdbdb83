"""Score a model on the benchmark (DESIGN, "The benchmark") and print the metrics table.

    python evaluate.py --checkpoint checkpoints/RUN [--data sample] [--split valid|test]
    python evaluate.py --hf facebook/esm2_t6_8M_UR50D --data omg_prot50 --protocol splm
    python evaluate.py --checkpoint checkpoints/RUN --fasta seqs.fasta.gz   # any sequences
    python evaluate.py --unigram --data sample       # the residue-frequency baseline

--checkpoint takes a training checkpoint (a step directory, or a run directory: its newest
step) or a weights file (model.io / `python -m hub import`). --hf takes a Hugging Face
EsmForMaskedLM directory or Hub id, run as Hugging Face runs it (one padded sequence per row).
--protocol splm is the published SpeedrunningPLMs evaluation (reference table, §8.1).
--data DIR needs only the shards it scores: an evaluation-only dataset (`python -m data.prepare
--eval_only`, no train shards) works, except with --unigram.
--fasta scores every sequence of a file (FASTA plain or gzip, or any input of data.prepare)
without a prepared dataset: each rank prepares it as an evaluation-only dataset, cut to 1024
tokens, in a private temporary directory removed afterwards. The file's i-th (non-empty)
sequence gets the benchmark masks of index i, and the numbers are printed as valid_*, like
--data DIR --split valid of `data.prepare FILE --eval_only`. --split and --unigram need --data.
Runs under torchrun too: sequences are dealt to ranks and the sums reduced.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from data.shards import ShardError
from data.tokenizer import PAD, VOCAB_SIZE
from evaluation.benchmark import BENCH_LENGTH, evaluate
from evaluation.splm import evaluate_splm
from evaluation.unigram import Unigram
from runtime.devices import get_backend
from runtime.errors import ConfigError
from training.runlog import format_line


class HFMaskedLM(nn.Module):
    """A Hugging Face EsmForMaskedLM behind the project's model interface: each document of a
    packed row is cut out and run as its own padded sequence, positions starting at 0, as HF
    users feed it; the logits are put back in place."""

    def __init__(self, hf_model: nn.Module, sequences_per_call: int = 16):
        super().__init__()
        self.hf, self.per_call = hf_model, sequences_per_call

    def forward(self, input_ids, doc_ids, labels=None):
        B, L = input_ids.shape
        spans = []  # (row, start, end) of every document
        for r in range(B):
            ids = doc_ids[r].tolist()
            start = 0
            for j in range(1, L + 1):
                if j == L or ids[j] != ids[start]:
                    if ids[start] >= 0:
                        spans.append((r, start, j))
                    start = j
        logits = torch.zeros(B, L, VOCAB_SIZE, device=input_ids.device)
        for i in range(0, len(spans), self.per_call):
            chunk = spans[i:i + self.per_call]
            width = max(e - s for _, s, e in chunk)
            ids = torch.full((len(chunk), width), PAD, dtype=torch.long, device=input_ids.device)
            mask = torch.zeros_like(ids)
            for k, (r, s, e) in enumerate(chunk):
                ids[k, : e - s] = input_ids[r, s:e]
                mask[k, : e - s] = 1
            out = self.hf(input_ids=ids, attention_mask=mask).logits.float()
            for k, (r, s, e) in enumerate(chunk):
                logits[r, s:e] = out[k, : e - s, :VOCAB_SIZE]
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.view(-1, VOCAB_SIZE), labels.view(-1),
                                               ignore_index=-100, reduction="sum")
        return logits, loss


def load_checkpoint_model(path: str) -> nn.Module:
    from model import build_model
    from model.io import load_state_dict_checked, load_weights
    from training.checkpoint import list_checkpoints

    p = Path(path)
    if p.is_dir():
        steps = [p] if (p / "common.pt").is_file() else list_checkpoints(p)
        if not steps:
            raise ConfigError(f"--checkpoint {path} holds no checkpoint (no common.pt or step_*/); pass a step directory or a weights file.")
        p = steps[-1] / "common.pt"
    elif not p.is_file():
        raise ConfigError(f"--checkpoint {path} does not exist; pass a checkpoint directory or a weights file.")
    try:
        cfg, state = load_weights(p)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    model = build_model(cfg)
    load_state_dict_checked(model, state)
    return model


def load_hf_model(name: str) -> nn.Module:
    try:
        from transformers import EsmForMaskedLM
    except ImportError:
        raise ConfigError("--hf needs the transformers package; pip install -r requirements-dev.txt.") from None
    try:
        hf = EsmForMaskedLM.from_pretrained(name)
    except OSError as e:
        raise ConfigError(f"--hf {name}: cannot load a Hugging Face ESM model ({str(e).splitlines()[0]}); "
                          "pass a local directory or check the id and your network/HF_TOKEN.") from None
    return HFMaskedLM(hf.float())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="training checkpoint directory or weights file")
    what.add_argument("--hf", help="Hugging Face EsmForMaskedLM directory or Hub id")
    what.add_argument("--unigram", action="store_true", help="the residue-frequency baseline of --data's train split")
    source = ap.add_mutually_exclusive_group()
    source.add_argument("--data", help="sample | omg_prot50 | a shard directory (default sample)")
    source.add_argument("--fasta", help="score every sequence of this FASTA file (plain or gzip)")
    ap.add_argument("--data_cache", default=None, help="cache directory of sample/omg_prot50")
    ap.add_argument("--split", choices=("valid", "test"), help="split of --data (default valid)")
    ap.add_argument("--protocol", default="benchmark", choices=("benchmark", "splm"))
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu", "xla"))
    ap.add_argument("--batch_size", type=int, default=16384, help="tokens per batch per rank (benchmark protocol)")
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except (ConfigError, ShardError, FileNotFoundError) as e:
        print(f"evaluate.py: {e}", file=sys.stderr)
        return 2


def dataset_files(spec: str, cache: str | None):
    """--data's shards. A directory is read as it is, so that an evaluation-only dataset (no
    train shards, which resolve_dataset and training require) can be scored."""
    from data.datasets import DOWNLOADS, find_shards, resolve_dataset

    if spec == "sample" or spec in DOWNLOADS or not Path(spec).is_dir():
        return resolve_dataset(spec, cache)
    try:
        return find_shards(spec)
    except ValueError as e:  # shards of several datasets in one directory
        raise ConfigError(f"--data {spec}: {e}") from None


def fasta_split(path: str, out: Path) -> tuple[list[Path], str]:
    """The valid shards of `path` prepared as an evaluation-only dataset in `out` (data.prepare
    --eval_only: input order, so the masks follow each sequence's position), and a label."""
    from data.datasets import find_shards
    from data.prepare import PrepareError, prepare

    try:
        s = prepare([path], out, "fasta", eval_only=True, max_length=BENCH_LENGTH, quiet=True)
    except PrepareError as e:
        raise ConfigError(f"--fasta {e}") from None
    v = s["splits"]["valid"]
    cut = f"{v['truncated']:,} cut to {BENCH_LENGTH} tokens"
    return find_shards(out).valid, f"{path} ({v['sequences']:,} sequences, {cut})"


def _run(args) -> int:
    from data.benchmark import EvalLoader

    if args.fasta and args.unigram:
        raise ConfigError("--unigram needs the train split of a --data dataset; --fasta has none.")
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
        if args.unigram:
            if not files.train:
                raise ConfigError(f"--unigram needs train shards and --data {data} has none; "
                                  "pass a dataset with a train split.")
            model, name = Unigram(files.train), f"unigram of {data}/train"
        elif args.checkpoint:
            model, name = load_checkpoint_model(args.checkpoint), args.checkpoint
        else:
            model, name = load_hf_model(args.hf), f"hf:{args.hf}"
        model = model.to(backend.device)
        if args.protocol == "splm":
            m = evaluate_splm(model, split, backend)
        else:
            loader = EvalLoader(split, max(1, args.batch_size // BENCH_LENGTH), BENCH_LENGTH,
                                rank=backend.rank, world_size=backend.world_size)
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
    sys.exit(main())
