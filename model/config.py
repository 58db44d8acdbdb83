"""Model configuration, presets, parameter counts and training FLOPs per token."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

ARCHS = ("esm2", "speedrun")
ATTN_IMPLS = ("sdpa", "flex", "reference")
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
    attn_impl: str = "sdpa"  # chosen by runtime/: "flex" is the CUDA fast path
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

    def __post_init__(self):
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
    need(c.activation in ACTIVATIONS, f"model activation {c.activation!r} is unknown; use one of {ACTIVATIONS}.")
    need(c.norm in NORMS, f"model norm {c.norm!r} is unknown; use one of {NORMS}.")
    need(c.logit_softcap >= 0, f"model logit_softcap={c.logit_softcap} must be >= 0 (0 turns it off).")
    need(c.norm_eps > 0 and c.rope_base > 0, "model norm_eps and rope_base must be positive.")
    if c.arch == "esm2":
        wrong = {k: getattr(c, k) for k, v in ESM2_SWITCHES.items() if getattr(c, k) != v}
        need(
            not wrong,
            f"model arch 'esm2' is fixed by ESM2 but got speedrun settings {wrong}; "
            "drop them or use arch='speedrun'.",
        )


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
}


def get_config(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"model preset {name!r} is unknown; use one of {sorted(PRESETS)}.")
    return ModelConfig.from_dict({**PRESETS[name], **overrides})


def matmul_params(cfg: ModelConfig) -> int:
    """N_matmul of the FLOPs formula: the weights every token multiplies (lookups excluded)."""
    d = cfg.d_model
    return cfg.n_layers * (4 * d * d + 2 * d * cfg.d_ff) + d * d + cfg.vocab_size * d


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
    """Training FLOPs per token: 6 N_matmul + 12 L d T_eff (PaLM App. B, no causal halving)."""
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layers * cfg.d_model * float(t_eff)


def t_eff(doc_ids: torch.Tensor) -> float:
    """Effective attention length sum(l_i^2)/sum(l_i) over the real documents of a batch."""
    from model.attention import doc_lengths

    lengths = doc_lengths(doc_ids).double()
    total = lengths.sum()
    return float((lengths * lengths).sum() / total) if total > 0 else 0.0
