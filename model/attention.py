"""Attention over packed rows, rotary embeddings, and per-document helpers.

A row holds whole documents back to back; `doc_ids` (B, L) numbers them 0, 1, 2, ... and marks
padding -1. Everything here uses fixed-shape ops (scatter/gather, no boolean indexing or
data-dependent shapes) so that the same code compiles to one graph on XLA, except the
"varlen" implementation, which cuts rows into documents on the host (the CPU only; under
torch.compile it stays an eager island between compiled graphs).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

try:  # flex attention is the CUDA fast path; the others never need it
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - very old torch
    create_block_mask = flex_attention = None


# ---------------------------------------------------------------- per-document reductions


def per_doc_sum(values: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) values -> (B, L+1) sums per document; slot 0 collects padding, slot j+1 doc j."""
    B, L = doc_ids.shape
    out = torch.zeros(B, L + 1, dtype=values.dtype, device=values.device)
    return out.scatter_add(1, doc_ids + 1, values)


def per_doc_gather(table: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, L+1) per-document table -> (B, L): each position gets its document's entry."""
    return table.gather(1, doc_ids + 1)


def doc_lengths(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) -> (B, L) lengths of documents 0..L-1 of each row (0 where there is none)."""
    return per_doc_sum(torch.ones_like(doc_ids), doc_ids)[:, 1:]


def doc_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its own document, so rotary restarts at every document.

    A document is a run of equal ids (the loaders never split one; trailing padding is a run
    too). No integer scatter, which neuronx-cc rejects (NCC_EVRF016): a cumulative count
    numbers the runs, a float32 scatter-add (exact: positions are far below 2^24) files each
    run's first index under its number, and a gather hands it to the run's tokens.
    """
    B, L = doc_ids.shape
    idx = torch.arange(L, device=doc_ids.device).expand(B, L)
    starts = torch.diff(doc_ids, dim=1, prepend=doc_ids[:, :1] - 1) != 0
    run = starts.long().cumsum(1) - 1
    first = torch.zeros(B, L, dtype=torch.float32, device=doc_ids.device)
    first = first.scatter_add(1, run, torch.where(starts, idx, 0).float())
    return idx - first.gather(1, run).long()


# ---------------------------------------------------------------- rotary


def rotary_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor):
    """(B, L) positions -> cos, sin of shape (B, 1, L, head_dim), in float32."""
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """ESM2's half-split rotary over the full head dim: x cos + rotate_half(x) sin."""
    # tensor_split, not split/chunk: with XLA_DISABLE_FUNCTIONALIZATION=1 (Neuron's default)
    # torch-xla's split along the last dim can return wrong data (pytorch/xla#8640).
    x1, x2 = torch.tensor_split(x, 2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


# ---------------------------------------------------------------- masks and attention


def doc_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Boolean block-diagonal mask (B, 1, L, L): True where query and key share a document.
    Padding (-1) attends only to padding, so no softmax row is empty and none reaches real tokens."""
    return (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]


def window_mask(L: int, window, device) -> torch.Tensor:
    """(L, L) boolean: True where |query - key| <= window. `window` may be a 0-d device tensor,
    so a window that changes during training changes no graph (XLA, torch.compile)."""
    idx = torch.arange(L, device=device)
    return (idx[:, None] - idx[None, :]).abs() <= window


def flex_block_mask(doc_ids: torch.Tensor, window=None):
    if create_block_mask is None:
        raise RuntimeError("attn_impl 'flex' needs torch.nn.attention.flex_attention (torch >= 2.5).")
    B, L = doc_ids.shape

    def same_doc(b, h, q, k):
        return doc_ids[b, q] == doc_ids[b, k]

    def same_doc_near(b, h, q, k):
        return (doc_ids[b, q] == doc_ids[b, k]) & ((q - k).abs() <= window)

    # Traceable by dynamo, so a compiled model builds it inside its graph (as SpeedrunningPLMs).
    return create_block_mask(same_doc if window is None else same_doc_near, B, None, L, L, device=doc_ids.device)


class DocRuns(NamedTuple):
    """The varlen plan: the (B, L) rows read as one stream of runs (a document, or a row's
    padding), with each run's length, whether it is padding, and its window mask (or None)."""

    lengths: list
    padding: list
    masks: list


def doc_runs(doc_ids: torch.Tensor, window=None) -> DocRuns:
    """Cuts every row into its runs of equal ids (a run never crosses a row end). Reads the ids
    on the host, so the shapes it gives depend on the data: eager execution only."""
    B, L = doc_ids.shape
    flat = doc_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::L] = True
    first = starts.nonzero().flatten()
    lengths = torch.diff(first, append=first.new_tensor([B * L])).tolist()
    padding = (flat[first] < 0).tolist()
    cache: dict = {}
    masks = [None if window is None or pad else cache.setdefault(n, window_mask(n, window, doc_ids.device))
             for n, pad in zip(lengths, padding)]
    return DocRuns(lengths, padding, masks)


def varlen_attention(q, k, v, runs: DocRuns):
    """Attention document by document: one SDPA call per run, with no mask (its fast kernels),
    so the cost is sum(l_i^2) over the documents instead of rows x L^2. Padding positions get
    zeros (they attend to nothing real and nothing real attends to them)."""
    B, H, L, D = q.shape
    flat = lambda t: torch.split(t.transpose(1, 2).reshape(B * L, H, D), runs.lengths)
    heads = lambda t: t.transpose(0, 1)[None]  # (n, H, D) -> (1, H, n, D), a view
    out = [
        torch.zeros_like(qi) if pad else
        F.scaled_dot_product_attention(heads(qi), heads(ki), heads(vi), attn_mask=m)[0].transpose(0, 1)
        for qi, ki, vi, pad, m in zip(flat(q), flat(k), flat(v), runs.padding, runs.masks)
    ]
    return torch.cat(out).view(B, L, H, D).transpose(1, 2)


class VarlenIds(NamedTuple):
    """The varlen plan of a compiled model: only tensors (dynamo guards their shapes, never the
    data-dependent run lengths); the runs are cut in the eager island, `varlen_island`."""

    doc_ids: torch.Tensor
    window: object


_last_runs: list = [None, None, None, None]  # doc_ids, its version, window, runs: shared by a forward's layers


@torch.compiler.disable
def varlen_island(q, k, v, doc_ids, window):
    """varlen_attention outside the compiled graphs (a graph break on each side). The runs are
    cut once per forward: every layer passes the same doc_ids tensor (an in-place change to it
    bumps its version, which cuts them again)."""
    if not (_last_runs[0] is doc_ids and _last_runs[1] == doc_ids._version and _last_runs[2] is window):
        _last_runs[:] = doc_ids, doc_ids._version, window, doc_runs(doc_ids, window)
    return varlen_attention(q, k, v, _last_runs[3])


def build_mask(doc_ids: torch.Tensor, impl: str, window=None, whole_rows: bool = False):
    """The mask object `attend` expects for this implementation, built once per forward.
    window: None (whole documents) or the largest |query - key| a query may attend to.
    whole_rows: the caller knows (from the host, never from reading doc_ids) that every row is
    one document or padding only, so without a window there is nothing to mask: None."""
    if whole_rows and window is None:
        return None
    if impl == "flex":
        return flex_block_mask(doc_ids, window)
    if impl == "varlen":
        return VarlenIds(doc_ids, window) if torch.compiler.is_compiling() else doc_runs(doc_ids, window)
    mask = doc_mask(doc_ids)
    return mask if window is None else mask & window_mask(doc_ids.shape[1], window, doc_ids.device)


def reference_attention(q, k, v, mask):
    """Plain math, for tests and as the readable definition."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def attend(q, k, v, mask, impl: str):
    """q, k, v: (B, H, L, head_dim); scale 1/sqrt(head_dim); bidirectional within documents.
    mask None: rows of one document each (build_mask's whole_rows), SDPA with no mask at all."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v)
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if impl == "flex":
        return flex_attention(q, k, v, block_mask=mask)
    if impl == "varlen":
        return varlen_island(q, k, v, *mask) if isinstance(mask, VarlenIds) else varlen_attention(q, k, v, mask)
    return reference_attention(q, k, v, mask)
