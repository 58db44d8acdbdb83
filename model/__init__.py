"""The networks: faithful ESM2 and the speedrun architecture, behind one interface:
model(input_ids, doc_ids, labels=None, loss_weights=None, window=None)
    -> (float32 logits (B, L, 33), summed (weighted) loss or None),
model.encode(input_ids, doc_ids, window=None, all_layers=False) -> final hidden states (B, L, d)
    or the list [embedding output, block 1, ..., block n] (the last normed, as HF's)."""

from torch import nn

from model.config import PRESETS, ModelConfig, flops_per_token, get_config, param_counts, t_eff
from model.esm2 import ESM2
from model.speedrun import Speedrun


def build_model(cfg: ModelConfig) -> nn.Module:
    return ESM2(cfg) if cfg.arch == "esm2" else Speedrun(cfg)


__all__ = [
    "PRESETS", "ModelConfig", "build_model", "flops_per_token", "get_config", "param_counts", "t_eff",
]
