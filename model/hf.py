"""Hugging Face interop for the esm2 architecture: our ESM2 <-> transformers' EsmForMaskedLM.

Configs and state dicts only; the files and the Hub (`python -m hub import|export|push`) are in
hub/. ESM2's contact head (a logistic regression on attention maps, unused by masked LM) is
dropped on import and zero-initialised on export.
"""

from __future__ import annotations

import torch

from model.config import ESM2_SWITCHES, ModelConfig

_LAYER_MAP = {  # ours (under blocks.{i}.) -> HF (under esm.encoder.layer.{i}.)
    "ln1": "attention.LayerNorm",
    "attn.q": "attention.self.query",
    "attn.k": "attention.self.key",
    "attn.v": "attention.self.value",
    "attn.o": "attention.output.dense",
    "ln2": "LayerNorm",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_TOP_MAP = {
    "embed": "esm.embeddings.word_embeddings",
    "norm": "esm.encoder.emb_layer_norm_after",
    "lm_head.dense": "lm_head.dense",
    "lm_head.norm": "lm_head.layer_norm",
}


def _key_map(n_layers: int) -> dict:
    """Our parameter name -> HF parameter name, for every parameter of ESM2."""
    pairs = {"lm_head.bias": "lm_head.bias"}
    mods = dict(_TOP_MAP)
    for i in range(n_layers):
        mods.update({f"blocks.{i}.{a}": f"esm.encoder.layer.{i}.{b}" for a, b in _LAYER_MAP.items()})
    for ours, theirs in mods.items():
        for leaf in ("weight", "bias"):
            pairs[f"{ours}.{leaf}"] = f"{theirs}.{leaf}"
    pairs.pop("embed.bias")
    return pairs


def config_from_hf(hf_cfg) -> ModelConfig:
    checks = {
        "position_embedding_type": (hf_cfg.position_embedding_type, "rotary"),
        "emb_layer_norm_before": (bool(hf_cfg.emb_layer_norm_before), False),
        "vocab_size": (hf_cfg.vocab_size, 33),
        "hidden_act": (getattr(hf_cfg, "hidden_act", "gelu"), "gelu"),
        "is_folding_model": (bool(hf_cfg.is_folding_model), False),
    }
    bad = {k: got for k, (got, want) in checks.items() if got != want}
    if bad:
        raise ValueError(
            f"Hugging Face config has {bad}, which is not the ESM2 architecture; only ESM2 "
            "masked-LM checkpoints (rotary, 33 tokens, no embedding LayerNorm) can be imported."
        )
    return ModelConfig(
        arch="esm2", n_layers=hf_cfg.num_hidden_layers, d_model=hf_cfg.hidden_size,
        n_heads=hf_cfg.num_attention_heads, d_ff=hf_cfg.intermediate_size,
        norm_eps=hf_cfg.layer_norm_eps, rope_base=getattr(hf_cfg, "rope_theta", 10000.0),
        token_dropout=bool(hf_cfg.token_dropout), **ESM2_SWITCHES,
    )


def hf_config(cfg: ModelConfig, **extra):
    from transformers import EsmConfig
    from transformers.models.esm.configuration_esm import get_default_vocab_list

    return EsmConfig(
        vocab_size=cfg.vocab_size, mask_token_id=32, pad_token_id=1, cls_token_id=0, eos_token_id=2,
        hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.d_ff, hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, max_position_embeddings=1026, layer_norm_eps=cfg.norm_eps,
        position_embedding_type="rotary", rope_theta=cfg.rope_base, emb_layer_norm_before=False,
        token_dropout=cfg.token_dropout, vocab_list=list(get_default_vocab_list()),
        architectures=["EsmForMaskedLM"], **extra,
    )


def state_dict_from_hf(hf_sd: dict, cfg: ModelConfig) -> dict:
    return {ours: hf_sd[theirs].detach().clone() for ours, theirs in _key_map(cfg.n_layers).items()}


def hf_model_from_ours(sd: dict, cfg: ModelConfig):
    """An EsmForMaskedLM holding our esm2 state dict (the contact head zeroed)."""
    from transformers import EsmForMaskedLM

    if cfg.arch != "esm2":
        raise ValueError(f"a '{cfg.arch}' model has no Hugging Face equivalent; only esm2-architecture "
                         "checkpoints can be exported (train an esm2_* preset for that).")
    hf = EsmForMaskedLM(hf_config(cfg))
    hf_sd = {theirs: sd[ours] for ours, theirs in _key_map(cfg.n_layers).items()}
    hf_sd["lm_head.decoder.weight"] = sd["embed.weight"]  # tied in both
    missing, unexpected = hf.load_state_dict(hf_sd, strict=False)
    params = dict(hf.named_parameters(remove_duplicate=False))
    leftover = [k for k in missing if k in params and not k.startswith("esm.contact_head")]
    if leftover or unexpected:
        raise RuntimeError(f"export left HF parameters unset {leftover} or unknown {unexpected}.")
    torch.nn.init.zeros_(hf.esm.contact_head.regression.weight)
    torch.nn.init.zeros_(hf.esm.contact_head.regression.bias)
    return hf
