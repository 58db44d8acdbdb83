"""Context n-gram embeddings: a hashed lookup of each position's neighbouring residues.

Position t reads, for each order k, three keys made of the tokens around it (never its own):
its left k tokens (t-k .. t-1), its right k tokens (t+1 .. t+k), and both together. Each key is
hashed into one shared table of `ngram_buckets` rows and the rows are summed into the token
embedding. A neighbour outside the position's document (another packed document, padding, the
row's edge) enters every key as one sentinel value, so a packed row gives exactly what its
documents give alone. A <mask> neighbour enters as itself: a key with a masked neighbour is a
different key, as the corrupted context is different evidence.

The table is memory the network can write into cheaply: compute per token is a few lookups,
whatever the table's size. On data with repeated stretches (homologous proteins) it learns
"what sits between these neighbours"; on data without repeats it adds little (docs/models.md).
"""

from __future__ import annotations

import torch
from torch import nn

SENTINEL = 64  # above every token id (the ESM vocabulary has 33)
_MULT = 131  # the base of the polynomial hash of a k-mer (> SENTINEL, so k-mers do not collide)
_KIND_SALT = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D)  # left, right, both
_MOD = 2**31 - 1  # a prime; every product below stays under 2^63


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
    """Integer hashes (B, L), three per order (left, right, both), before the bucket modulus."""
    kmax = max(orders)
    left = [neighbours(input_ids, doc_ids, -j).long() for j in range(1, kmax + 1)]
    right = [neighbours(input_ids, doc_ids, j).long() for j in range(1, kmax + 1)]
    keys, hl, hr = [], torch.zeros_like(left[0]), torch.zeros_like(left[0])
    for k in range(1, kmax + 1):
        hl = (hl * _MULT + left[k - 1] + 1) % _MOD
        hr = (hr * _MULT + right[k - 1] + 1) % _MOD
        if k in orders:
            salt = k * 0x100000001B3
            keys.append((hl * 7919 + _KIND_SALT[0] + salt) % _MOD)
            keys.append((hr * 7919 + _KIND_SALT[1] + salt) % _MOD)
            keys.append(((hl * 1000003 + hr) % _MOD * 7919 + _KIND_SALT[2] + salt) % _MOD)
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
