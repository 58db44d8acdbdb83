"""The `splm` protocol (evaluate.py --protocol splm): the published cousin of the benchmark.

SpeedrunningPLMs' evaluation/benchmark_esm.py: sequences cut to 1022 tokens including
<cls>/<eos>, >= 1 mask per sequence, batches of 4 sorted by length descending, loss = mean of
per-batch mean losses. Same protocol, not the same random draws. It reproduces the published
ESM2 reference losses; the token-weighted benchmark (evaluation/benchmark.py) stays the default.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from data.tokenizer import CLS, EOS, FIRST_RESIDUE_ID, MASK, PAD
from data.tokenizer import VOCAB_SIZE as V
from evaluation.benchmark import accumulate, metrics
from runtime.errors import ConfigError


def documents(tokens: np.ndarray) -> list[np.ndarray]:
    """Residues of each `<cls> residues <eos>` document of a shard's token stream."""
    starts = np.flatnonzero(tokens == CLS)
    ends = np.append(starts[1:], len(tokens))
    docs = []
    for s, e in zip(starts, ends):
        doc = np.asarray(tokens[s + 1:e])
        docs.append(doc[doc >= FIRST_RESIDUE_ID] if (doc < FIRST_RESIDUE_ID).any() else doc)
    return docs


def splm_batches(files, *, max_tokens: int = 1022, batch_size: int = 4, rate: float = 0.15, seed: int = 42):
    """The SPLM benchmark batches, in order (CPU tensors of this batch's own length)."""
    from data.shards import read_shard

    seqs = [d[: max_tokens - 2] for f in files for d in documents(read_shard(f))]
    seqs.sort(key=len, reverse=True)  # stable: ties keep file order
    g = torch.Generator().manual_seed(seed)
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        width = len(chunk[0]) + 2
        ids = torch.full((len(chunk), width), PAD, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        doc_ids = torch.full_like(ids, -1)
        for r, res in enumerate(chunk):
            n = len(res)
            row = torch.from_numpy(np.concatenate([[CLS], res, [EOS]]).astype(np.int64))
            chosen = torch.rand(n, generator=g) < rate
            if not chosen.any():  # at least one masked residue per sequence
                chosen[torch.randint(n, (1,), generator=g)] = True
            pos = chosen.nonzero().view(-1) + 1
            labels[r, pos] = row[pos]
            row[pos] = MASK
            ids[r, : n + 2] = row
            doc_ids[r, : n + 2] = 0
        yield {"input_ids": ids, "labels": labels, "doc_ids": doc_ids}


@torch.no_grad()
def evaluate_splm(model: nn.Module, files, backend) -> dict:
    """Loss = mean over batches of each batch's mean loss; batches are dealt to ranks in turn."""
    if backend.static_shapes:
        raise ConfigError(f"--protocol splm cannot run on --device {backend.name}: its batches are as wide as their "
                          "longest sequence, so nearly every batch compiles a new graph; use --protocol benchmark "
                          "there, or --device cpu or cuda.")
    model = backend.eval_model(model)
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)  # (sum of batch means, batches) on the host
    cm = torch.zeros(V * V + 1, dtype=torch.long, device=backend.device)
    for i, batch in enumerate(splm_batches(files)):
        if i % backend.world_size != backend.rank:
            continue
        count = int((batch["labels"] != -100).sum())
        loss = accumulate(model, backend.to_device(batch), cm, backend)
        totals += torch.tensor([float(backend.to_host(loss)) / count, 1.0], dtype=torch.float64)
    totals = backend.to_host(backend.all_reduce_sum(totals.float())).double()
    cm = backend.to_host(backend.all_reduce_sum(cm))[: V * V].view(V, V)
    out = metrics(0.0, cm)
    out["loss"] = float(totals[0] / totals[1])
    out["ppl"] = math.exp(out["loss"])
    return out
