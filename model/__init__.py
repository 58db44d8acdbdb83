"""The networks: faithful ESM2 and the speedrun architecture, behind one interface:
model(input_ids, doc_ids, labels=None) -> (float32 logits (B, L, 33), summed loss or None)."""

from torch import nn

from model.config import PRESETS, ModelConfig, flops_per_token, get_config, param_counts, t_eff
from model.esm2 import ESM2
from model.speedrun import Speedrun


def build_model(cfg: ModelConfig) -> nn.Module:
    return ESM2(cfg) if cfg.arch == "esm2" else Speedrun(cfg)


__all__ = [
    "PRESETS", "ModelConfig", "build_model", "flops_per_token", "get_config", "param_counts", "t_eff",
]
