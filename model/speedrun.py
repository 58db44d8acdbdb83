"""The speedrun architecture (SpeedrunningPLMs / modded-nanogpt block), every feature a switch:
RMSNorm, QK-norm, rotary, ReLU^2, zero-init projections, value embeddings, U-Net skips,
logit soft-cap, untied head (see ModelConfig)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import build_mask, doc_positions, rotary_cos_sin, rotary_inv_freq
from model.config import ModelConfig
from model.layers import MLP, SelfAttention, lm_output, token_dropout, weightless_norm
from model.ngram import NgramEmbedding


class SpeedrunBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, value_mix: bool):
        super().__init__()
        self.cfg = cfg
        # x <- l0 x + l1 x0: lets each layer re-read the embedding (starts as identity)
        self.x0_lambdas = nn.Parameter(torch.tensor([1.0, 0.0])) if cfg.unet else None
        self.attn = SelfAttention(cfg, value_mix=value_mix)
        self.mlp = MLP(cfg)

    def forward(self, x, x0, ve, rope, mask):
        norm = lambda t: weightless_norm(t, self.cfg.norm, self.cfg.norm_eps)
        if self.x0_lambdas is not None:
            x = self.x0_lambdas[0] * x + self.x0_lambdas[1] * x0
        x = x + self.attn(norm(x), rope, mask, ve)
        return x + self.mlp(norm(x))


class SpeedrunLMHead(nn.Module):
    """dense -> GELU -> norm -> decoder + bias, as ESM2's head but bias-free and weightless."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.dense = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.decoder = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x, embed_weight):
        h = weightless_norm(F.gelu(self.dense(x)), self.cfg.norm, self.cfg.norm_eps)
        weight = embed_weight if self.decoder is None else self.decoder.weight
        return F.linear(h, weight, self.bias)


class Speedrun(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        L = cfg.n_layers
        self.n_skip = L // 2  # encoder layers [0, n_skip) feed decoder layers [L - n_skip, L)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        width = cfg.d_model if cfg.ngram_to == "input" else cfg.vocab_size
        self.ngram = NgramEmbedding(cfg.ngram_buckets, cfg.ngram_orders, width, cfg.ngram_gain) if cfg.ngram_buckets else None
        # One value embedding per encoder layer, shared with its mirror decoder layer (U-Net).
        n_ve = self.n_skip if cfg.value_embeds else 0
        self.value_embeds = nn.ModuleList(nn.Embedding(cfg.vocab_size, cfg.d_model) for _ in range(n_ve))
        self.ve_index = [min(i, L - 1 - i) if min(i, L - 1 - i) < n_ve else None for i in range(L)]
        self.blocks = nn.ModuleList(SpeedrunBlock(cfg, j is not None) for j in self.ve_index)
        self.skip_weights = nn.Parameter(torch.ones(self.n_skip)) if cfg.unet else None
        self.lm_head = SpeedrunLMHead(cfg)
        self.register_buffer("inv_freq", rotary_inv_freq(cfg.head_dim, cfg.rope_base), persistent=False)
        if cfg.zero_init:  # each block starts as the identity; Muon grows them from zero
            for block in self.blocks:
                nn.init.zeros_(block.attn.o.weight)
                nn.init.zeros_(block.mlp.fc2.weight)

    def encode(self, input_ids, doc_ids, window=None, all_layers=False, whole_rows=False):
        """The final hidden states (B, L, d), after the last norm; with all_layers, the list
        [embedding output, block 1, ..., block n] whose last entry is normed (as HF's)."""
        cfg = self.cfg
        norm = lambda t: weightless_norm(t, cfg.norm, cfg.norm_eps)
        mask = build_mask(doc_ids, cfg.attn_impl, window, whole_rows)
        rope = rotary_cos_sin(doc_positions(doc_ids), self.inv_freq) if cfg.rotary else None
        x = self.embed(input_ids)
        if cfg.token_dropout:  # the following norm cancels ESM2's per-document rescale
            x = token_dropout(x, input_ids, doc_ids, rescale=False)
        if self.ngram is not None and cfg.ngram_to == "input":
            x = x + self.ngram(input_ids, doc_ids)
        x = x0 = norm(x)
        ves = [ve(input_ids) for ve in self.value_embeds]
        skips, hidden = [], [x]
        for i, block in enumerate(self.blocks):
            if self.skip_weights is not None and i >= cfg.n_layers - self.n_skip:
                x = x + self.skip_weights[i - (cfg.n_layers - self.n_skip)] * skips.pop()
            j = self.ve_index[i]
            x = block(x, x0, None if j is None else ves[j], rope, mask)
            if self.skip_weights is not None and i < self.n_skip:
                skips.append(x)
            hidden.append(x)
        hidden[-1] = norm(x)
        return hidden if all_layers else hidden[-1]

    def forward(self, input_ids, doc_ids, labels=None, loss_weights=None, window=None, whole_rows=False):
        logits = self.lm_head(self.encode(input_ids, doc_ids, window, whole_rows=whole_rows), self.embed.weight).float()
        if self.ngram is not None and self.cfg.ngram_to == "logits":
            logits = logits + self.ngram(input_ids, doc_ids).float()
        if self.cfg.logit_softcap > 0:
            logits = self.cfg.logit_softcap * torch.tanh(logits / self.cfg.logit_softcap)
        return lm_output(logits, labels, loss_weights)
