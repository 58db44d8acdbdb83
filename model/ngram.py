"""Context n-gram embeddings: a hashed lookup of each position's neighbouring residues.

Position t reads, for each order k, three keys made of the tokens around it (never its own):
its left k tokens (t-k .. t-1), its right k tokens (t+1 .. t+k), and both together. Each key is
hashed into one shared table of `ngram_buckets` rows and the rows are summed into the token
embedding (or onto the logits: ngram_to). A neighbour outside the position's document (another
packed document, padding, the row's edge) enters every key as one sentinel value, so a packed row
gives exactly what its documents give alone. A <mask> neighbour enters as itself: a key with a
masked neighbour is a different key, as the corrupted context is different evidence.

The table is memory the network can write into cheaply: compute per token is a few lookups,
whatever the table's size. Measured on the sample (BENCHMARKS.md, "The CPU speedrun" #18-#21),
it memorises train contexts, but little of that reaches validation: a long key survives only
where none of its neighbours is masked, so the same long key rarely recurs.
"""

from __future__ import annotations

import torch
from torch import nn

SENTINEL = 64  # above every token id (the ESM vocabulary has 33)
# Every intermediate of the hash stays below 2^31, so it is the same in int32 as in int64:
# neuronx-cc computes int64 as int32 unless told otherwise (--native-int64, Neuron 2.32).
MOD = 1_048_583  # a prime just above 2^20: a kind of key takes MOD values, so more rows are idle
_BASE = 131  # of the polynomial hash of a k-mer (> SENTINEL + 1: k-mers of k <= 2 map exactly)
_MIX = 1021  # joins the left and right hashes, and spreads a key before its salt
_KIND_SALT = (0x1234567, 0x2345678, 0x3456789)  # left, right, both; each < 2^26


def neighbours(input_ids: torch.Tensor, doc_ids: torch.Tensor, offset: int) -> torch.Tensor:
    """The token at t + offset for each t, or SENTINEL where that is outside t's document."""
    B, L = input_ids.shape
    fill_ids = torch.full((B, abs(offset)), SENTINEL, dtype=input_ids.dtype, device=input_ids.device)
    fill_doc = torch.full((B, abs(offset)), -2, dtype=doc_ids.dtype, device=doc_ids.device)
    if offset > 0:
        ids = torch.cat([input_ids[:, offset:], fill_ids], 1)
        docs = torch.cat([doc_ids[:, offset:], fill_doc], 1)
    else:
        ids = torch.cat([fill_ids, input_ids[:, :offset]], 1)
        docs = torch.cat([fill_doc, doc_ids[:, :offset]], 1)
    same = (docs == doc_ids) & (doc_ids >= 0)
    return torch.where(same, ids, torch.full_like(ids, SENTINEL))


def context_keys(input_ids: torch.Tensor, doc_ids: torch.Tensor, orders: tuple[int, ...]) -> list[torch.Tensor]:
    """Integer keys in [0, 2^31) of input_ids' dtype, (B, L) each, three per order (left,
    right, both); NgramEmbedding takes them modulo its rows."""
    kmax = max(orders)
    left = [neighbours(input_ids, doc_ids, -j) for j in range(1, kmax + 1)]
    right = [neighbours(input_ids, doc_ids, j) for j in range(1, kmax + 1)]
    keys, hl, hr = [], torch.zeros_like(left[0]), torch.zeros_like(left[0])
    for k in range(1, kmax + 1):
        hl = (hl * _BASE + left[k - 1] + 1) % MOD  # < 2^20 * 131 + 65 < 2^28
        hr = (hr * _BASE + right[k - 1] + 1) % MOD
        if k in orders:
            both = (hl * _MIX + hr) % MOD  # < 2^30 + 2^20
            for h, salt in zip((hl, hr, both), _KIND_SALT):
                keys.append(h * _MIX + salt + (k << 25))  # < 1.08e9 + 5.5e7 + 5.4e8 < 2^31
    return keys


class NgramEmbedding(nn.Module):
    """sum over the context keys of table[hash(key) mod buckets], times gain / sqrt(#keys)."""

    def __init__(self, buckets: int, orders: tuple[int, ...], d_model: int, gain: float = 1.0):
        super().__init__()
        self.buckets, self.orders, self.gain = buckets, tuple(orders), gain
        self.embed = nn.Embedding(buckets, d_model)
        nn.init.normal_(self.embed.weight, std=0.02 / gain)

    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
        keys = context_keys(input_ids, doc_ids, self.orders)
        idx = torch.stack(keys, 0) % self.buckets  # (n_keys, B, L)
        return self.embed(idx).sum(0) * (self.gain * len(keys) ** -0.5)
