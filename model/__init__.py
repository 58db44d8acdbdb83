"""The networks: faithful ESM2, the speedrun architecture and the Patch UNet, behind one interface:
model(input_ids, doc_ids, labels=None, loss_weights=None, window=None, whole_rows=False)
    -> (float32 logits (B, L, 33), summed (weighted) loss or None),
model.encode(input_ids, doc_ids, window=None, all_layers=False, whole_rows=False) -> final hidden
    states (B, L, d) or the list [embedding output, block 1, ..., block n] (the last normed, as HF's).
whole_rows=True promises that every row is one document or padding only (the loader's flag):
attention then runs without a mask, with the same result."""

from torch import nn

from model.config import PRESETS, ModelConfig, flops_per_token, get_config, param_counts, t_eff
from model.esm2 import ESM2
from model.patch_unet import PatchUNet
from model.speedrun import Speedrun

NETWORKS = {"esm2": ESM2, "speedrun": Speedrun, "patch_unet": PatchUNet}


def build_model(cfg: ModelConfig) -> nn.Module:
    return NETWORKS[cfg.arch](cfg)


__all__ = [
    "PRESETS", "ModelConfig", "build_model", "flops_per_token", "get_config", "param_counts", "t_eff",
]
