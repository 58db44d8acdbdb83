"""Model configuration, presets, parameter counts and training FLOPs per token."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from model.ngram import MOD as NGRAM_MAX_BUCKETS

ARCHS = ("esm2", "speedrun", "patch_unet")
ATTN_IMPLS = ("sdpa", "flex", "varlen", "reference")
# Fields that choose how attention is computed on a device, not what the model is: the weights
# do not depend on them, so a checkpoint resumes or evaluates with another device's choice.
EXECUTION_FIELDS = ("attn_impl", "attn_fp32_max_head_dim")
ACTIVATIONS = ("gelu", "relu2")
NORMS = ("layer", "rms")

# The speedrun switches, at the values that make the network ESM2. An `esm2` config must hold
# exactly these, so an ablation flag can never be silently ignored by the ESM2 network.
ESM2_SWITCHES = dict(
    norm="layer",
    qk_norm=False,
    rotary=True,
    activation="gelu",
    zero_init=False,
    value_embeds=False,
    unet=False,
    logit_softcap=0.0,
    tie_embeddings=True,
    ngram_buckets=0,
)


@dataclass
class ModelConfig:
    arch: str = "speedrun"  # "esm2" (faithful ESM2, HF-interoperable) | "speedrun"
    n_layers: int = 24
    d_model: int = 768
    n_heads: int = 6
    d_ff: int = 2048
    vocab_size: int = 33
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    token_dropout: bool = True  # zero <mask> embeddings; ESM2 also rescales per document
    attn_impl: str = "sdpa"  # chosen by runtime/: "flex" on CUDA compiled, "varlen" on the eager CPU
    # Under autocast, attention runs in float32 when head_dim <= this (0: never). Chosen by
    # runtime/: a CPU's bf16 attention kernels are slower than its fp32 ones at small head dims.
    attn_fp32_max_head_dim: int = 0
    # Speedrun switches (each one flag for an ablation); ESM2_SWITCHES turns them all off.
    norm: str = "rms"  # weightless RMSNorm, or weightless LayerNorm
    qk_norm: bool = True
    rotary: bool = True
    activation: str = "relu2"
    zero_init: bool = True  # zero-initialised attention output and MLP down projections
    value_embeds: bool = True
    unet: bool = True  # U-Net skips with learned weights, plus the x0 residual mix
    logit_softcap: float = 32.0  # 0 turns it off
    tie_embeddings: bool = False
    # > 0: context n-gram embeddings (model/ngram.py) hashed into this many table rows, one
    # left, right and two-sided key per order in ngram_orders; 0 turns them off
    ngram_buckets: int = 0
    ngram_orders: tuple = (1, 2, 3, 4, 6, 8)
    ngram_to: str = "input"  # where the looked-up rows go: "input" (d_model) or "logits" (vocab)
    # the rows are multiplied by this (their init divided by it): under Adam, whose steps have a
    # size set by the learning rate, a row that a key meets once an epoch moves `gain` times faster
    ngram_gain: float = 1.0
    # Patch UNet only (arch "patch_unet"; 0 elsewhere): n_layers counts its encoder + decoder
    # blocks, extra_layers the full-resolution blocks after it, max_length the row length it is
    # built for (a power of two; training sets it to the run's max_length).
    extra_layers: int = 0
    max_length: int = 0

    def __post_init__(self):
        if isinstance(self.ngram_orders, list):  # YAML and JSON give lists
            self.ngram_orders = tuple(self.ngram_orders)
        _validate(self)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"model config has unknown fields {unknown}; known fields are {sorted(known)}."
            )
        return cls(**d)


def _validate(c: ModelConfig) -> None:
    def need(ok: bool, msg: str):
        if not ok:
            raise ValueError(msg)

    need(c.arch in ARCHS, f"model arch {c.arch!r} is unknown; use one of {ARCHS}.")
    for name in ("n_layers", "d_model", "n_heads", "d_ff"):
        v = getattr(c, name)
        need(isinstance(v, int) and v > 0, f"model {name}={v!r} must be a positive integer.")
    need(
        c.d_model % c.n_heads == 0,
        f"model d_model={c.d_model} is not divisible by n_heads={c.n_heads}; "
        "pick a head count that divides the hidden size.",
    )
    need(
        c.head_dim % 2 == 0,
        f"model head dim {c.head_dim} (d_model/n_heads) must be even for rotary embeddings.",
    )
    need(c.vocab_size >= 33, f"model vocab_size={c.vocab_size} must be at least 33 (the ESM vocabulary).")
    need(c.attn_impl in ATTN_IMPLS, f"model attn_impl {c.attn_impl!r} is unknown; use one of {ATTN_IMPLS}.")
    need(c.attn_fp32_max_head_dim >= 0, f"model attn_fp32_max_head_dim {c.attn_fp32_max_head_dim} must be >= 0 "
         "(0: attention in the autocast dtype).")
    need(c.activation in ACTIVATIONS, f"model activation {c.activation!r} is unknown; use one of {ACTIVATIONS}.")
    need(c.norm in NORMS, f"model norm {c.norm!r} is unknown; use one of {NORMS}.")
    need(c.logit_softcap >= 0, f"model logit_softcap={c.logit_softcap} must be >= 0 (0 turns it off).")
    need(isinstance(c.ngram_buckets, int) and 0 <= c.ngram_buckets <= NGRAM_MAX_BUCKETS,
         f"model ngram_buckets={c.ngram_buckets!r} must be a whole number from 0 (off) to "
         f"{NGRAM_MAX_BUCKETS} (the number of values its hash takes, model/ngram.py).")
    need(isinstance(c.ngram_orders, tuple) and len(c.ngram_orders) > 0
         and all(isinstance(k, int) and 1 <= k <= 16 for k in c.ngram_orders),
         f"model ngram_orders={c.ngram_orders!r} must be a non-empty list of context lengths from 1 to 16.")
    need(c.norm_eps > 0 and c.rope_base > 0, "model norm_eps and rope_base must be positive.")
    if c.arch == "esm2":
        wrong = {k: getattr(c, k) for k, v in ESM2_SWITCHES.items() if getattr(c, k) != v}
        need(
            not wrong,
            f"model arch 'esm2' is fixed by ESM2 but got speedrun settings {wrong}; "
            "drop them or use arch='speedrun'.",
        )
    need(c.ngram_gain > 0, f"model ngram_gain={c.ngram_gain!r} must be > 0.")
    need(c.ngram_to in ("input", "logits"), f"model ngram_to {c.ngram_to!r} must be 'input' or 'logits'.")
    need(c.ngram_buckets == 0 or c.arch == "speedrun",
         f"model ngram_buckets={c.ngram_buckets}: n-gram embeddings are built into arch 'speedrun' "
         f"only (this is arch {c.arch!r}); set ngram_buckets to 0.")
    if c.arch != "patch_unet":
        need(
            c.extra_layers == 0 and c.max_length == 0,
            f"model extra_layers={c.extra_layers} and max_length={c.max_length} are Patch UNet "
            f"settings; drop them or use arch='patch_unet' (this is arch {c.arch!r}).",
        )
        return
    need(c.n_layers % 2 == 0, f"model n_layers={c.n_layers} counts the Patch UNet's encoder and "
         "decoder blocks, one of each per level; make it even.")
    need(isinstance(c.extra_layers, int) and c.extra_layers >= 0,
         f"model extra_layers={c.extra_layers!r} must be a whole number >= 0.")
    need(isinstance(c.max_length, int) and c.max_length >= 2 and c.max_length & (c.max_length - 1) == 0,
         f"model max_length={c.max_length!r}: the Patch UNet halves the row length at every level, "
         "so it must be a power of two (e.g. 512, 1024, 2048).")
    need(c.unet, "model arch 'patch_unet' is a U-Net: its skips and x0 mix cannot be turned off (unet=True).")
    odd = [w for w in unet_widths(c) if (w // c.n_heads) % 2]
    need(not odd, f"model Patch UNet widths {unet_widths(c)} give an odd head dim at width {odd[:1]} "
         f"with n_heads={c.n_heads}; rotary needs even head dims, pick another head count.")


# ---------------------------------------------------------------- the Patch UNet's shape

MAX_HEAD_DIM = 128  # the peer's cap (Triton's shared memory in flex attention kernels)


def unet_widths(cfg: ModelConfig) -> list[int]:
    """Width of each encoder level (SpeedrunningPLMs' get_hidden_sizes, its float arithmetic
    kept): d_model scaled linearly towards 2 d_model, rounded up to lcm(64, n_heads), at most
    n_heads * 128 (rounded down to that multiple) so no head is wider than 128."""
    n, h = cfg.n_layers // 2, cfg.n_heads
    align = 64 * h // math.gcd(64, h)
    cap = h * MAX_HEAD_DIM // align * align
    return [min(int(((cfg.d_model * (1.0 + i / max(n - 1, 1)) + align - 1) // align) * align), cap)
            for i in range(n)]


def unet_mlp_width(cfg: ModelConfig, width: int) -> int:
    """MLP width of a level: d_ff at the base width; elsewhere d_ff/d_model times the width,
    rounded up to a multiple of 256 (the peer's correction_fn)."""
    if width == cfg.d_model:
        return cfg.d_ff
    return int(((cfg.d_ff / cfg.d_model * width) + 255) // 256 * 256)


def unet_depths(cfg: ModelConfig) -> tuple[list[int], list[int], int]:
    """(depth of each encoder block, of each decoder block, number of merges). A block at
    depth d sees rows of max_length / 2^d tokens; merging stops at length 1, where blocks
    have no attention (the peer's BottleneckMLP): depth log2(max_length)."""
    n, bottom = cfg.n_layers // 2, cfg.max_length.bit_length() - 1
    encoder = [min(i, bottom) for i in range(n)]
    return encoder, encoder[::-1], min(n - 1, bottom)


def unet_attends(cfg: ModelConfig, depth: int) -> bool:
    """Blocks attend above length 1; at length 1 they are MLPs (the peer's BottleneckMLP)."""
    return depth < cfg.max_length.bit_length() - 1


def unet_merges(cfg: ModelConfig) -> int:
    return unet_depths(cfg)[2]


def doc_alignment(cfg: ModelConfig) -> int:
    """Where a document must start in a row for the model to see it whole: anywhere (1), but
    for the Patch UNet at multiples of 2^merges, so no merged token of any level mixes two
    documents (data.packing.span)."""
    return 1 << unet_merges(cfg) if cfg.arch == "patch_unet" else 1


def _esm2(n_layers, d_model, n_heads):
    return dict(arch="esm2", n_layers=n_layers, d_model=d_model, n_heads=n_heads,
                d_ff=4 * d_model, **ESM2_SWITCHES)


PRESETS: dict[str, dict] = {
    "esm2_8m": _esm2(6, 320, 20),
    "esm2_35m": _esm2(12, 480, 20),
    "esm2_150m": _esm2(30, 640, 20),
    "esm2_650m": _esm2(33, 1280, 20),
    "esm2_3b": _esm2(36, 2560, 40),
    "esm2_15b": _esm2(48, 5120, 40),
    # SpeedrunningPLMs' default research model: 133,065,357 parameters.
    "speedrun": dict(arch="speedrun", n_layers=24, d_model=768, n_heads=6, d_ff=2048),
    # Small enough to learn something on a 2-core CPU in minutes (~3.3M parameters).
    "sample": dict(arch="speedrun", n_layers=6, d_model=256, n_heads=4, d_ff=768),
    # SpeedrunningPLMs' Patch UNet (example_yamls/patch_unet.yaml): 6 encoder + 6 decoder
    # levels from 768 to 1536 wide, 4 full-resolution blocks after, rows of 2048; 212,279,127 parameters.
    "patch_unet": dict(arch="patch_unet", n_layers=12, d_model=768, n_heads=12, d_ff=1536,
                       extra_layers=4, max_length=2048, token_dropout=False),
}


def get_config(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"model preset {name!r} is unknown; use one of {sorted(PRESETS)}.")
    return ModelConfig.from_dict({**PRESETS[name], **overrides})


def matmul_params(cfg: ModelConfig, per_token: bool = False) -> float:
    """N_matmul: the weights of the matrix multiplies (lookups excluded). per_token=True weighs
    each matrix by the share of the row's positions it multiplies, which only the Patch UNet's
    coarser levels make less than 1: the N of the FLOPs formula."""
    d = cfg.d_model
    if cfg.arch != "patch_unet":
        return cfg.n_layers * (4 * d * d + 2 * d * cfg.d_ff) + d * d + cfg.vocab_size * d
    return sum(n * (share if per_token else 1) for n, share in _unet_matmuls(cfg))


def _unet_matmuls(cfg: ModelConfig) -> list[tuple[int, float]]:
    """(weights, share of positions) of every matrix of the Patch UNet (model/patch_unet.py)."""
    d, widths = cfg.d_model, unet_widths(cfg)
    encoder, decoder, merges = unet_depths(cfg)
    out = [(2 * d * widths[0], 1.0)] if widths[0] != d else []  # input and output projections
    for depth in encoder + decoder:
        w = widths[depth]
        block = 2 * w * unet_mlp_width(cfg, w) + (4 * w * w if unet_attends(cfg, depth) else 0)
        out.append((block + (d * w if w != d else 0), 0.5**depth))  # + the x0 projection
    out += [(2 * 2 * widths[k] * widths[k + 1], 0.5 ** (k + 1)) for k in range(merges)]  # merge + expand
    extra = cfg.extra_layers * (4 * d * d + 2 * d * cfg.d_ff)
    return out + [(extra + d * d + cfg.vocab_size * d, 1.0)]  # the extra blocks and the head


def param_counts(model: torch.nn.Module) -> dict:
    """Counts unique parameters (works on meta-device models). `matmul` is measured from the
    module's Linear weights plus the tied decoder, so it checks `matmul_params`."""
    named = dict(model.named_parameters())  # named_parameters() already de-duplicates ties
    total = sum(p.numel() for p in named.values())
    embed = sum(p.numel() for n, p in named.items() if "embed" in n)
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    if model.cfg.tie_embeddings:
        matmul += model.embed.weight.numel()
    return dict(total=total, non_embedding=total - embed, matmul=matmul)


def flops_per_token(cfg: ModelConfig, t_eff: float) -> float:
    """Training FLOPs per token: 6 N_matmul + 12 L d T_eff (PaLM App. B, no causal halving).
    Patch UNet: N_matmul weighed by the positions each matrix sees (matmul_params per_token),
    and a block at depth d adds 12 w_d (T_eff / 2^d) per position of its level, 2^d fewer."""
    if cfg.arch != "patch_unet":
        return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layers * cfg.d_model * float(t_eff)
    encoder, decoder, _ = unet_depths(cfg)
    widths = unet_widths(cfg)
    levels = sum(widths[k] * 0.25**k for k in encoder + decoder if unet_attends(cfg, k))
    attention = 12.0 * (levels + cfg.extra_layers * cfg.d_model) * float(t_eff)
    return 6.0 * matmul_params(cfg, per_token=True) + attention


def t_eff(doc_ids: torch.Tensor) -> float:
    """Effective attention length sum(l_i^2)/sum(l_i) over the real documents of a batch."""
    from model.attention import doc_lengths

    lengths = doc_lengths(doc_ids).double()
    total = lengths.sum()
    return float((lengths * lengths).sum() / total) if total > 0 else 0.0
