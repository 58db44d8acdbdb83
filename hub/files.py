"""Our checkpoints <-> Hugging Face EsmForMaskedLM directories on disk (python -m hub import|export).

CHECKPOINT: a weights file, a train.py step directory, or a run directory (its newest step).
"""

from __future__ import annotations

import os
import tempfile

import torch

from model import build_model
from model.config import ModelConfig
from model.hf import config_from_hf, hf_model_from_ours, state_dict_from_hf
from model.io import load_state_dict_checked, load_weights, save_weights
from training.checkpoint import weights_file


def import_hf(hf_dir: str, checkpoint: str) -> ModelConfig:
    from transformers import EsmForMaskedLM

    hf = EsmForMaskedLM.from_pretrained(hf_dir, dtype=torch.float32)
    cfg = config_from_hf(hf.config)
    model = build_model(cfg)
    load_state_dict_checked(model, state_dict_from_hf(hf.state_dict(), cfg))
    save_weights(checkpoint, model, cfg)
    return cfg


def export_hf(checkpoint: str, out_dir: str) -> ModelConfig:
    from transformers import EsmTokenizer

    cfg, sd = load_weights(weights_file(checkpoint))
    try:
        hf = hf_model_from_ours(sd, cfg)
    except ValueError as e:
        raise ValueError(f"{checkpoint}: {e}") from None
    _quiet_save(hf, out_dir)
    _save_tokenizer(out_dir, EsmTokenizer)
    return cfg


def _quiet_save(hf, out_dir: str) -> None:
    """save_pretrained without its one-shard progress bar on stderr."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        hf.save_pretrained(out_dir)
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _save_tokenizer(out_dir: str, tokenizer_cls) -> None:
    from transformers.models.esm.configuration_esm import get_default_vocab_list

    with tempfile.TemporaryDirectory() as tmp:
        vocab = os.path.join(tmp, "vocab.txt")
        with open(vocab, "w") as f:
            f.write("\n".join(get_default_vocab_list()) + "\n")
        tokenizer_cls(vocab).save_pretrained(out_dir)
