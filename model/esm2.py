"""Faithful ESM2 (facebookresearch/esm `esm2.py`), weight-compatible with HF EsmForMaskedLM."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import build_mask, doc_positions, rotary_cos_sin, rotary_inv_freq
from model.config import ModelConfig
from model.layers import MLP, PAD_ID, SelfAttention, lm_output, token_dropout


class ESM2Block(nn.Module):
    """Pre-LayerNorm block with biases everywhere."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = SelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, mask):
        x = x + self.attn(self.ln1(x), rope, mask)
        return x + self.mlp(self.ln2(x))


class ESM2LMHead(nn.Module):
    """RobertaLMHead: dense -> GELU -> LayerNorm -> tied decoder + bias."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x, decoder_weight):
        return F.linear(self.norm(F.gelu(self.dense(x))), decoder_weight, self.bias)


class ESM2(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=PAD_ID)
        self.blocks = nn.ModuleList(ESM2Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)  # ESM2's emb_layer_norm_after
        self.lm_head = ESM2LMHead(cfg)
        self.register_buffer("inv_freq", rotary_inv_freq(cfg.head_dim, cfg.rope_base), persistent=False)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        # BERT/HF-ESM initialisation, for training from scratch
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding):
            with torch.no_grad():
                m.weight[PAD_ID].zero_()

    def encode(self, input_ids, doc_ids, window=None, all_layers=False, whole_rows=False):
        """The final hidden states (B, L, d), after the last LayerNorm; with all_layers, the
        list [embedding output, block 1, ..., block n] whose last entry is normed (as HF's
        hidden_states)."""
        mask = build_mask(doc_ids, self.cfg.attn_impl, window, whole_rows)
        rope = rotary_cos_sin(doc_positions(doc_ids), self.inv_freq)
        x = self.embed(input_ids)
        if self.cfg.token_dropout:
            x = token_dropout(x, input_ids, doc_ids, rescale=True)
        x = x * (doc_ids >= 0).unsqueeze(-1).to(x.dtype)  # ESM2 zeroes padding embeddings
        hidden = [x]
        for block in self.blocks:
            x = block(x, rope, mask)
            hidden.append(x)
        hidden[-1] = self.norm(x)
        return hidden if all_layers else hidden[-1]

    def forward(self, input_ids, doc_ids, labels=None, loss_weights=None, window=None, whole_rows=False):
        logits = self.lm_head(self.encode(input_ids, doc_ids, window, whole_rows=whole_rows), self.embed.weight)
        return lm_output(logits, labels, loss_weights)
