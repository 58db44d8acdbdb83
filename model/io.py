"""Weights files: save, load (also from a full training checkpoint), checked state-dict loading."""

from __future__ import annotations

import pickle
from dataclasses import asdict

import torch
from torch import nn

from model.config import ModelConfig

FORMAT = "esm-speedrun/1"
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP wrappers


def _unwrapped_state_dict(sd: dict) -> dict:
    out = {}
    for key, value in sd.items():
        for prefix in _WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def save_weights(path, model: nn.Module, cfg: ModelConfig) -> None:
    sd = {k: v.detach().cpu() for k, v in _unwrapped_state_dict(model.state_dict()).items()}
    torch.save({"format": FORMAT, "model_config": asdict(cfg), "model": sd}, path)


def load_weights(path) -> tuple[ModelConfig, dict]:
    """Reads a weights file or a full training checkpoint (any dict with "model_config" and
    "model"); returns (config, state_dict) on the CPU."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # training checkpoints may carry non-tensor state (e.g. numpy RNG) beside the weights
        blob = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(blob, dict) or "model_config" not in blob or "model" not in blob:
        raise ValueError(
            f"{path}: not an esm-speedrun weights file or checkpoint (no 'model_config' and "
            "'model' entries); for Hugging Face weights use `python -m hub import`."
        )
    return ModelConfig.from_dict(dict(blob["model_config"])), _unwrapped_state_dict(blob["model"])


def _describe(shapes: dict) -> str:
    """A model's shape in words, read from its parameter names and shapes."""
    emb = shapes.get("embed.weight")
    layers = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
    d = f"d_model {emb[1]}" if emb is not None else "unknown width"
    return f"{layers} layers x {d}"


def load_state_dict_checked(model: nn.Module, sd: dict) -> None:
    """Strict load whose error names both shapes instead of torch's list of tensors."""
    model.load_state_dict(check_state_dict(model, sd), strict=True)


def check_state_dict(model: nn.Module, sd: dict) -> dict:
    """`sd` without wrapper prefixes, after checking that it has exactly the model's names and
    (global) shapes; otherwise a ValueError naming the first difference."""
    sd = _unwrapped_state_dict(sd)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in sd.items()}
    wrong = [k for k in want if k in have and want[k] != have[k]]
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if wrong or missing or unexpected:
        detail = (
            f"'{wrong[0]}' is {have[wrong[0]]} in the checkpoint but {want[wrong[0]]} in the model"
            if wrong
            else f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
        raise ValueError(
            f"checkpoint ({_describe(have)}) does not fit the model ({_describe(want)}): {detail}; "
            "build the model from the checkpoint's own config (model.io.load_weights)."
        )
    return sd
