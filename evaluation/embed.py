"""Embeddings of protein sequences (`python embed.py`, docs/models.md "Embeddings").

    model, name = load_model("checkpoints/RUN")     # ours, or a Hugging Face ESM2 model
    emb = embed(model.to(backend.device), ["MKTAYIAK", ...], pooling="mean", layer=-1, backend=backend)

Each sequence is tokenised as `<cls> residues <eos>`, cropped to `max_length` tokens, and packed
with the others into (B, max_length) rows (data/packing.py, the benchmark's first-fit packer;
attention stays inside each sequence, so a packed sequence gets what it gets alone; a Patch
UNet's sequences start at multiples of 2^merges, a Hugging Face model's rows hold one each). The
hidden states are model.encode(..., all_layers=True)[layer]: 0 = the embedding output, i = block
i, -1 = the last block after the final norm. Pooling:
    mean  the average over the residue positions (not <cls>, <eos> or padding) -> (N, d)
    cls   the hidden state at the <cls> position                               -> (N, d)
    none  the residue positions of each sequence                               -> N arrays (n_i, d)
always float32 and in input order. The forward runs under the backend's autocast: fp32 on the
CPU, bf16 on the accelerators.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from data.packing import WINDOW, empty_rows, take_row, write_row
from data.tokenizer import encode
from evaluation.benchmark import BENCH_LENGTH
from evaluation.inputs import doc_multiple, load_checkpoint_model, load_hf_model
from runtime.errors import ConfigError

POOLINGS = ("mean", "cls", "none")


class HFEncoder(nn.Module):
    """A Hugging Face EsmForMaskedLM's encoder behind model.encode. HF has no per-document
    attention, so its rows hold one sequence each (`one_sequence_per_row`), positions from 0,
    cut to the batch's longest sequence, as HF users feed it; its hidden_states follow the same
    convention as ours (embedding output, then each layer, the last one normed)."""

    one_sequence_per_row = True

    def __init__(self, hf_mlm: nn.Module):
        super().__init__()
        self.esm = hf_mlm.esm

    def encode(self, input_ids, doc_ids, window=None, all_layers=False):
        if window is not None or (doc_ids > 0).any():
            raise ValueError("HFEncoder takes one whole sequence per row (doc_ids 0 or -1) and no window.")
        width = max(1, int((doc_ids >= 0).sum(1).max()))
        out = self.esm(input_ids=input_ids[:, :width], attention_mask=(doc_ids[:, :width] >= 0).long(),
                       output_hidden_states=True)
        pad = (0, 0, 0, input_ids.shape[1] - width)
        hidden = [nn.functional.pad(h, pad) for h in out.hidden_states]
        return hidden if all_layers else hidden[-1]


def load_model(spec: str, device_attention: str = "sdpa") -> tuple[nn.Module, str]:
    """(model with .encode, label) for a checkpoint of ours (weights file, step or run directory,
    any architecture) or a Hugging Face EsmForMaskedLM (a directory with config.json, or a Hub
    id), resolved as evaluate.py resolves --checkpoint and --hf."""
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        return HFEncoder(load_hf_model(spec).hf), f"hf:{spec}"
    if path.exists() or not _looks_like_hub_id(spec):
        try:
            return load_checkpoint_model(spec, device_attention), spec
        except ConfigError as e:  # its messages name the input as --checkpoint (evaluate.py's)
            raise ConfigError(str(e).removeprefix("--checkpoint ")) from None
    try:
        return HFEncoder(load_hf_model(spec).hf), f"hf:{spec}"
    except ConfigError as e:
        reason = str(e).removeprefix(f"--hf {spec}: ")
        raise ConfigError(f"{spec} is no file or directory here, and as a Hugging Face id: {reason}") from None


def _looks_like_hub_id(spec: str) -> bool:
    """`name` or `owner/name`, without a file extension of ours (a missing `run/x.pt` is a typo,
    not a Hub id)."""
    parts = spec.split("/")
    return (len(parts) <= 2 and all(parts) and not spec.startswith(".")
            and not spec.endswith((".pt", ".pth", ".bin", ".safetensors")))


def read_sequences(path: str) -> list[bytes]:
    """Every sequence of a FASTA file (plain or gzip; or any input of data.prepare), in order."""
    from data.prepare import PrepareError, iter_sequences

    try:
        return list(iter_sequences([path]))
    except PrepareError as e:
        raise ConfigError(str(e)) from None


def tokenize(sequences, max_length: int) -> tuple[list[np.ndarray], int]:
    """Residue ids of each sequence, cropped to max_length - 2 residues, and how many were cropped."""
    if max_length < 3:
        raise ConfigError(f"max_length {max_length} leaves no room for a residue; use at least 3.")
    ids, cropped = [], 0
    for i, seq in enumerate(sequences):
        residues = encode(seq)
        if residues.size == 0:
            raise ConfigError(f"sequence {i + 1} is empty; remove it so that outputs stay aligned with inputs.")
        cropped += residues.size > max_length - 2
        ids.append(residues[: max_length - 2])
    return ids, cropped


def embed(model: nn.Module, sequences, *, pooling: str = "mean", layer: int = -1,
          max_length: int = BENCH_LENGTH, batch_tokens: int = 16384, backend=None,
          progress: bool = True) -> np.ndarray | list[np.ndarray]:
    """Embeddings of `sequences` (str or bytes of residues), float32, in input order: (N, d) for
    mean and cls pooling, a list of N (n_i, d) arrays for none. The model must be on
    backend.device (the CPU when backend is None); sequences longer than max_length - 2
    residues are cropped to it; rows are max_length tokens (for the Patch UNet rounded up to a
    multiple of doc_multiple), batch_tokens // that rows per forward."""
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling {pooling!r} is unknown; use one of {', '.join(POOLINGS)}.")
    if backend is None:
        from runtime.devices import get_backend

        backend = get_backend("cpu")
    ids, _ = tokenize(sequences, max_length)
    multiple = doc_multiple(model)
    L = -(-max_length // multiple) * multiple  # rows of whole aligned spans
    rows = _pack(ids, L, multiple, getattr(model, "one_sequence_per_row", False))
    B = max(1, batch_tokens // L)
    out: list = [None] * len(ids)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tqdm(total=len(ids), unit=" seq", desc="embedding", disable=not progress) as bar:
            for b in range(0, len(rows), B):
                chunk = rows[b : b + B]
                hidden, offsets = _forward(model, chunk, ids, B, L, multiple, layer, backend)
                for r, row in enumerate(chunk):
                    for o, (i, _, n, _) in zip(offsets[r], row):
                        out[i] = _pool(hidden[r], o, n, pooling)
                bar.update(sum(len(row) for row in chunk))
    finally:
        model.train(was_training)
    return out if pooling == "none" else np.stack(out) if out else np.zeros((0, 0), np.float32)


def _pack(ids: list[np.ndarray], seq_len: int, multiple: int, one_per_row: bool) -> list[list]:
    """Rows of pieces (index, 0, residues, index), filled first-fit in input order from a window
    of WINDOW pieces (data.packing: 2.5% padding on the shipped sample at rows of 1024); one piece
    per row where the model needs it, longest first, so that a batch's rows have like lengths."""
    pending = [(i, 0, len(ids[i]), i) for i in range(len(ids))]
    if one_per_row:
        return [[p] for p in sorted(pending, key=lambda p: -p[2])]
    rows, queue = [], pending[WINDOW:]
    pending = pending[:WINDOW]
    while pending:
        rows.append(take_row(pending, seq_len, multiple)[0])
        take = WINDOW - len(pending)
        pending += queue[:take]
        queue = queue[take:]
    return rows


def _forward(model, chunk, ids, B, seq_len, multiple, layer, backend) -> tuple[np.ndarray, list[list[int]]]:
    """The chosen layer's hidden states (B, L, d) of one batch of rows, float32 on the host, and
    each row's offsets of its sequences' first residues. Always B rows (all-padding ones past
    the data), so that every batch has one shape."""
    tokens, docs = empty_rows(B, seq_len)
    offsets = [write_row(tokens, docs, r, row, ids, multiple) for r, row in enumerate(chunk)]
    batch = backend.to_device({"input_ids": torch.from_numpy(tokens).long(), "doc_ids": torch.from_numpy(docs)})
    with backend.autocast():
        hidden = model.encode(batch["input_ids"], batch["doc_ids"], all_layers=True)
    if not -len(hidden) <= layer < len(hidden):
        raise ConfigError(f"layer {layer} is out of range: this model has hidden states 0..{len(hidden) - 1} "
                          f"(0 = embedding output, {len(hidden) - 1} or -1 = the last block, normed).")
    return backend.to_host(hidden[layer].float()).numpy(), offsets


def _pool(h: np.ndarray, first: int, n: int, pooling: str) -> np.ndarray:
    """One sequence's embedding from its row `h` (L, d): residues at first..first+n-1, <cls> before."""
    if pooling == "cls":
        return h[first - 1].copy()
    residues = h[first : first + n]
    return residues.mean(0) if pooling == "mean" else residues.copy()
