"""Pieces shared by the two architectures: attention block, MLP, norms, token dropout, loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import apply_rotary, attend, per_doc_gather, per_doc_sum
from model.config import ModelConfig

MASK_ID = 32  # ESM vocabulary (DESIGN "Tokens")
PAD_ID = 1
ESM2_MASK_RATIO_TRAIN = 0.15 * 0.8  # hard-coded in ESM2: the share of <mask> seen in training


def weightless_norm(x: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    if kind == "rms":
        return F.rms_norm(x, (x.size(-1),), eps=eps)
    return F.layer_norm(x, (x.size(-1),), eps=eps)


class SelfAttention(nn.Module):
    """Multi-head attention with separate q, k, v, o (as ESM2 and HF name them). ESM2 has
    biases; the speedrun variant is bias-free and may add QK-norm and a value embedding."""

    def __init__(self, cfg: ModelConfig, value_mix: bool = False):
        super().__init__()
        self.cfg = cfg
        d, bias = cfg.d_model, cfg.arch == "esm2"
        self.q = nn.Linear(d, d, bias=bias)
        self.k = nn.Linear(d, d, bias=bias)
        self.v = nn.Linear(d, d, bias=bias)
        self.o = nn.Linear(d, d, bias=bias)
        # v <- l0 v + l1 ve (modded-nanogpt value embeddings), starting at an even mix
        self.value_lambdas = nn.Parameter(torch.tensor([0.5, 0.5])) if value_mix else None

    def forward(self, x, rope, mask, ve=None):
        B, L, d = x.shape
        heads = lambda t: t.view(B, L, self.cfg.n_heads, self.cfg.head_dim).transpose(1, 2)
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        dtype = q.dtype  # the matmul dtype (bf16 under autocast)
        if self.cfg.qk_norm:
            q = weightless_norm(q, "rms", self.cfg.norm_eps)
            k = weightless_norm(k, "rms", self.cfg.norm_eps)
        if ve is not None:
            v = self.value_lambdas[0] * v + self.value_lambdas[1] * heads(ve)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        # autocast can leave the norms and the value mix in float32; the kernels need one dtype
        if self.cfg.head_dim <= self.cfg.attn_fp32_max_head_dim:  # float32, where the device asks
            with torch.autocast(q.device.type, enabled=False):  # autocast would cast SDPA back to bf16
                y = attend(q.float(), k.float(), v.float(), mask, self.cfg.attn_impl)
        else:
            y = attend(q.to(dtype), k.to(dtype), v.to(dtype), mask, self.cfg.attn_impl)
        return self.o(y.transpose(1, 2).reshape(B, L, d))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        bias = cfg.arch == "esm2"
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=bias)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=bias)
        self.activation = cfg.activation

    def forward(self, x):
        h = self.fc1(x)
        # F.gelu's default is the exact erf form ESM2 uses; relu^2 is the speedrun MLP
        h = F.gelu(h) if self.activation == "gelu" else F.relu(h).square()
        return self.fc2(h)


def token_dropout(x, input_ids, doc_ids, rescale: bool):
    """Zero the <mask> embeddings. ESM2 then rescales each document by
    (1 - 0.12) / (1 - its observed <mask> share), counting <cls>/<eos> in the denominator;
    counted per document (not per row) so that packed rows equal documents run alone."""
    is_mask = input_ids == MASK_ID
    x = x.masked_fill(is_mask[..., None], 0.0)
    if not rescale:
        return x
    real = (doc_ids >= 0).float()
    n_mask = per_doc_gather(per_doc_sum(is_mask.float() * real, doc_ids), doc_ids)
    n_tok = per_doc_gather(per_doc_sum(real, doc_ids), doc_ids).clamp_min(1.0)
    # clamp: an all-<mask> fragment is all zeros anyway, avoid 0 * inf = NaN
    keep = (1.0 - n_mask / n_tok).clamp_min(1e-6)
    return (x * (1.0 - ESM2_MASK_RATIO_TRAIN) / keep[..., None]).to(x.dtype)


def lm_output(logits: torch.Tensor, labels: torch.Tensor | None, weights: torch.Tensor | None = None):
    """(float32 logits, SUM of cross-entropy over labels != -100), each target's term times
    its `weights` entry (B, L) when given. ignore_index over all positions rather than boolean
    indexing keeps one static graph on XLA; an all-ignored batch gives 0, not NaN."""
    logits = logits.float()
    if labels is None:
        return logits, None
    flat = logits.view(-1, logits.size(-1))
    if weights is None:
        return logits, F.cross_entropy(flat, labels.view(-1), ignore_index=-100, reduction="sum")
    ce = F.cross_entropy(flat, labels.view(-1), ignore_index=-100, reduction="none")
    return logits, (ce * weights.reshape(-1).float()).sum()
