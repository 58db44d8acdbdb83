"""The unigram baseline of evaluate.py --unigram: residue frequencies of a training set."""

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
        logits = self.logp.expand(*input_ids.shape, V)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100, reduction="sum")
        return logits, loss
