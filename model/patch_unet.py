"""The Patch UNet (SpeedrunningPLMs' BatchedUnetTransformer): a U-Net over the sequence.

Each encoder level halves the row by concatenating adjacent token pairs and projecting them
(PatchMerge) to a wider level (model.config.unet_widths); the decoder mirrors it (PatchExpand,
then the encoder's output of that level through a learned skip weight); `extra_layers`
full-resolution blocks and the LM head follow. Every block is a speedrun block of its level's
width; the embedding x0 is average-pooled to the level and projected to its width, and each
block has its own value embedding, looked up at full resolution and average-pooled. Where the
row reaches length 1 a block is an MLP without attention (the peer's BottleneckMLP).

Documents: the ids of a level are the max over each pair of the level above, so a merged token
that straddles two documents joins the later one (padding, -1, never wins); attention at every
level stays inside those ids. Padding positions enter as zeros, so padding never reaches a
real token. Documents laid out at multiples of 2^merges (TrainConfig.align_docs) never share
a merged token, and a packed row then equals its documents run alone (docs/models.md).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from model.attention import build_mask, doc_positions, rotary_cos_sin, rotary_inv_freq
from model.config import ModelConfig, unet_attends, unet_depths, unet_mlp_width, unet_widths
from model.layers import MLP, token_dropout, weightless_norm
from model.speedrun import Speedrun, SpeedrunBlock, SpeedrunLMHead


class PatchMerge(nn.Module):
    """(B, L, d_in) -> (B, L/2, d_out): each adjacent pair concatenated and projected."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(2 * d_in, d_out, bias=False)

    def forward(self, x):
        B, L, d = x.shape
        return self.proj(x.reshape(B, L // 2, 2 * d))


class PatchExpand(nn.Module):
    """(B, L, d_in) -> (B, 2L, d_out): each token projected to a pair."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(d_in, 2 * d_out, bias=False)

    def forward(self, x):
        B, L, _ = x.shape
        return self.proj(x).reshape(B, 2 * L, -1)


class BottleneckBlock(nn.Module):
    """A block at length 1, where attention has nothing to mix: the x0 mix and the MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.x0_lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))
        self.mlp = MLP(cfg)

    def forward(self, x, x0, ve, rope, mask):
        x = self.x0_lambdas[0] * x + self.x0_lambdas[1] * x0
        return x + self.mlp(weightless_norm(x, self.cfg.norm, self.cfg.norm_eps))


class LevelBlock(nn.Module):
    """The block of one U-Net level at that level's width, with the projection of the
    (pooled) embedding x0 to it and the level's own value embedding."""

    def __init__(self, cfg: ModelConfig, width: int, attends: bool):
        super().__init__()
        level = dataclasses.replace(cfg, arch="speedrun", d_model=width, d_ff=unet_mlp_width(cfg, width),
                                    extra_layers=0, max_length=0)
        self.x0_proj = nn.Linear(cfg.d_model, width, bias=False) if width != cfg.d_model else None
        use_ve = cfg.value_embeds and attends
        self.value_embed = nn.Embedding(cfg.vocab_size, width) if use_ve else None
        self.block = SpeedrunBlock(level, value_mix=use_ve) if attends else BottleneckBlock(level)

    def forward(self, x, x0, input_ids, real, depth, rope, mask):
        x0 = x0 if self.x0_proj is None else self.x0_proj(x0)
        ve = None if self.value_embed is None else pool(self.value_embed(input_ids) * real, depth)
        return self.block(x, x0, ve, rope, mask)


def pool(x: torch.Tensor, depth: int) -> torch.Tensor:
    """(B, L, d) full-resolution values averaged over the 2^depth positions of each token of
    that depth (the peer's repeated pairwise mean, in one step)."""
    if depth == 0:
        return x
    B, L, d = x.shape
    return x.reshape(B, L >> depth, 1 << depth, d).mean(2)


def level_doc_ids(doc_ids: torch.Tensor, merges: int) -> list[torch.Tensor]:
    """Document ids of depths 0..merges: each the max over the pairs of the one above, so a
    merged token joins the later of two documents, and padding (-1) only a pure-padding one."""
    ids = [doc_ids]
    for _ in range(merges):
        B, L = ids[-1].shape
        ids.append(ids[-1].reshape(B, L // 2, 2).amax(-1))
    return ids


class PatchUNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, widths = cfg.d_model, unet_widths(cfg)
        self.encoder_depths, self.decoder_depths, self.merges = unet_depths(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.ngram = None  # Speedrun.forward's n-gram logits: not built into this arch (ModelConfig)
        # only when d_model is not a multiple of lcm(64, n_heads), or its heads exceed 128
        self.input_proj = nn.Linear(d, widths[0], bias=False) if widths[0] != d else None
        self.output_proj = nn.Linear(widths[0], d, bias=False) if widths[0] != d else None

        def level(depth):
            return LevelBlock(cfg, widths[depth], unet_attends(cfg, depth))

        self.encoder = nn.ModuleList(level(k) for k in self.encoder_depths)
        self.decoder = nn.ModuleList(level(k) for k in self.decoder_depths)
        self.merge = nn.ModuleList(PatchMerge(widths[k], widths[k + 1]) for k in range(self.merges))
        self.expand = nn.ModuleList(PatchExpand(widths[k + 1], widths[k]) for k in range(self.merges))
        self.skip_weights = nn.Parameter(torch.ones(len(self.decoder)))
        full = dataclasses.replace(cfg, arch="speedrun", unet=False, extra_layers=0, max_length=0)
        self.extra = nn.ModuleList(SpeedrunBlock(full, value_mix=False) for _ in range(cfg.extra_layers))
        self.lm_head = SpeedrunLMHead(cfg)
        self.attention_depths = sorted({k for k in self.encoder_depths if unet_attends(cfg, k)})
        for k in self.attention_depths:
            inv_freq = rotary_inv_freq(widths[k] // cfg.n_heads, cfg.rope_base)
            self.register_buffer(f"inv_freq_{k}", inv_freq, persistent=False)
        # the extra blocks' heads, d_model / n_heads wide, differ from depth 0's with input_proj
        self.register_buffer("inv_freq", rotary_inv_freq(cfg.head_dim, cfg.rope_base), persistent=False)
        if cfg.zero_init:  # every block starts as the identity, as the speedrun's
            for block in [*self.encoder, *self.decoder, *self.extra]:
                inner = getattr(block, "block", block)
                if isinstance(inner, SpeedrunBlock):
                    nn.init.zeros_(inner.attn.o.weight)
                nn.init.zeros_(inner.mlp.fc2.weight)

    def encode(self, input_ids, doc_ids, window=None, all_layers=False, whole_rows=False):
        """The final hidden states (B, L, d), after the last norm; with all_layers, the
        full-resolution list [embedding output, U-Net output, extra block 1, ..., n] whose last
        entry is normed. `window` restricts attention at every level to keys at most that
        many of the level's tokens away (the peer's one window for all levels)."""
        cfg = self.cfg
        L = input_ids.shape[1]
        if L % (1 << self.merges):
            raise ValueError(
                f"Patch UNet rows of {L} tokens cannot be halved {self.merges} times; use rows of a "
                f"power of two tokens (max_length), e.g. {1 << (L - 1).bit_length()}.")
        norm = lambda t: weightless_norm(t, cfg.norm, cfg.norm_eps)
        ids = level_doc_ids(doc_ids, self.merges)
        masks = {k: build_mask(ids[k], cfg.attn_impl, window, whole_rows) for k in self.attention_depths}
        ropes = {k: rotary_cos_sin(doc_positions(ids[k]), getattr(self, f"inv_freq_{k}")) if cfg.rotary else None
                 for k in self.attention_depths}
        # Padding enters as zeros (embedding, x0 and value embeddings) and bias-free blocks keep
        # it zero, so a merged token that takes in padding holds nothing of it.
        real = (doc_ids >= 0)[..., None].to(self.embed.weight.dtype)
        x = self.embed(input_ids)
        if cfg.token_dropout:
            x = token_dropout(x, input_ids, doc_ids, rescale=False)
        x = x0 = norm(x * real)
        hidden, x0s = [x], {}

        def run(block, x, depth):
            if depth not in x0s:
                x0s[depth] = pool(x0, depth)
            return block(x, x0s[depth], input_ids, real, depth, ropes.get(depth), masks.get(depth))

        if self.input_proj is not None:
            x = self.input_proj(x)
        skips = []
        for i, (block, depth) in enumerate(zip(self.encoder, self.encoder_depths)):
            x = run(block, x, depth)
            skips.append(x)
            if i < self.merges:
                x = self.merge[i](x)
        for j, (block, depth) in enumerate(zip(self.decoder, self.decoder_depths)):
            if j and depth < self.decoder_depths[j - 1]:
                x = self.expand[depth](x)
            x = run(block, x + self.skip_weights[j] * skips.pop(), depth)
        if self.output_proj is not None:
            x = self.output_proj(x)
        hidden.append(x)
        rope = ropes[0]
        if cfg.rotary and self.input_proj is not None:
            rope = rotary_cos_sin(doc_positions(doc_ids), self.inv_freq)
        for block in self.extra:
            x = block(x, None, None, rope, masks[0])
            hidden.append(x)
        hidden[-1] = norm(x)
        return hidden if all_layers else hidden[-1]

    # the speedrun's head, soft-cap and loss, unchanged
    forward = Speedrun.forward
