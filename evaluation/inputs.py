"""What evaluate.py scores and on what: models (our checkpoints, Hugging Face ESM) and sequences
(a prepared dataset, or any FASTA file prepared on the fly as an evaluation-only dataset)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from data.tokenizer import PAD, VOCAB_SIZE
from evaluation.benchmark import BENCH_LENGTH
from model.config import ModelConfig, doc_alignment
from runtime.errors import ConfigError
from training.checkpoint import weights_file


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


def load_checkpoint_model(path: str, device_attention: str = "sdpa") -> nn.Module:
    """Our model from a weights file or a training checkpoint (step or run directory). A model
    trained with another device's attention (flex on a GPU, varlen on the CPU) runs with
    `device_attention`, the one the evaluating device picks: the weights do not depend on it."""
    from model import build_model
    from model.io import load_state_dict_checked, load_weights

    try:
        cfg, state = load_weights(weights_file(path))
    except ValueError as e:  # CheckpointError is one too
        raise ConfigError(f"--checkpoint {e}") from None
    if cfg.attn_impl != "reference":  # the plain formula is only ever chosen on purpose
        cfg = dataclasses.replace(cfg, attn_impl=device_attention)
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


def dataset_files(spec: str, cache: str | None):
    """--data's shards (data.datasets.dataset_shards), its ValueError as a ConfigError."""
    from data.datasets import dataset_shards

    try:
        return dataset_shards(spec, cache)
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


def doc_multiple(model: nn.Module) -> int:
    """Where a sequence may start in a row: anywhere (1), but for the Patch UNet at multiples of
    2^merges, so that no merged token of any level mixes two sequences (data.packing.span, as
    training's align_docs lays them out); the benchmark lays its rows out the same way."""
    cfg = getattr(model, "cfg", None)
    return doc_alignment(cfg) if isinstance(cfg, ModelConfig) else 1
