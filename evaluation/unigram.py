"""The baselines of evaluate.py: --unigram (residue frequencies of a training set) and
--composition (each protein's own visible residues, smoothed toward those frequencies)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from data.tokenizer import FIRST_RESIDUE_ID, MASK
from data.tokenizer import VOCAB_SIZE as V


class Unigram(nn.Module):
    """Predicts the residue frequencies of a training set at every position (add-one
    smoothed over residue ids): the floor a model that learns only composition reaches."""

    def __init__(self, train_files):
        super().__init__()
        from data.shards import read_shard

        counts = np.zeros(V, dtype=np.float64)
        for f in train_files:
            counts += np.bincount(np.asarray(read_shard(f)), minlength=V)[:V]
        counts[:FIRST_RESIDUE_ID] = 0
        counts[MASK] = 0
        counts[FIRST_RESIDUE_ID:MASK] += 1
        logp = np.full(V, -1e4)
        logp[FIRST_RESIDUE_ID:MASK] = np.log(counts[FIRST_RESIDUE_ID:MASK] / counts.sum())
        self.register_buffer("logp", torch.tensor(logp, dtype=torch.float32))

    def forward(self, input_ids, doc_ids, labels=None):
        return self.scored(self.logp.expand(*input_ids.shape, V), labels)

    @staticmethod
    def scored(logits, labels):
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100, reduction="sum")
        return logits, loss


class Composition(Unigram):
    """Predicts every position of a protein from the residues its input shows (each visible
    residue of the same document, what any model sees), smoothed toward the training set's
    frequencies with `alpha` pseudo-counts: p = (own counts + alpha x unigram) / (own total +
    alpha). The floor a model reaches that learns only each protein's composition."""

    def __init__(self, train_files, alpha: float):
        super().__init__(train_files)
        if not alpha > 0:
            raise ValueError(f"Composition: alpha={alpha}, the unigram's pseudo-counts, must be > 0")
        self.alpha = float(alpha)

    def forward(self, input_ids, doc_ids, labels=None):
        B, L = doc_ids.shape
        visible = (input_ids >= FIRST_RESIDUE_ID) & (input_ids < MASK)
        seen = nn.functional.one_hot(input_ids.clamp(0, V - 1), V).float() * visible[..., None]
        slots = (doc_ids + 1)[..., None].expand(B, L, V)  # slot 0: padding, j + 1: document j
        counts = torch.zeros(B, L + 1, V, device=seen.device).scatter_add(1, slots, seen).gather(1, slots)
        p = (counts + self.alpha * self.logp.exp()) / (counts.sum(-1, keepdim=True) + self.alpha)
        return self.scored(p.log().clamp(min=-1e4), labels)
