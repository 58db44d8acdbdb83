"""Masked-language-model masking for training (the benchmark's fixed masks: data/benchmark.py).

Maskable positions are residues (ids 4..31): <cls>, <pad>, <eos> are never masked, nor <unk>,
which carries nothing to predict. Training masks use fixed-shape tensor ops only, so
`mask_tokens` runs unchanged on any device (CPU, CUDA, XLA) and never changes the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from data.tokenizer import AA_HIGH, AA_LOW, FIRST_RESIDUE_ID, IGNORE, MASK

RULES = ("esm2", "all_mask")


@dataclass(frozen=True)
class MaskingConfig:
    """rule: "esm2" (80% <mask> / 10% random amino acid / 10% unchanged) or "all_mask".

    rate: fraction of residues selected; with rate_start and rate_schedule_steps > 0 the rate
    moves linearly from rate_start to rate over that many optimizer steps, then stays.
    """

    rule: str = "esm2"
    rate: float = 0.15
    rate_start: float | None = None
    rate_schedule_steps: int = 0

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"masking rule {self.rule!r} is unknown; use one of {RULES}")
        for name in ("rate", "rate_start"):
            r = getattr(self, name)
            if r is not None and not 0.0 < r <= 1.0:
                raise ValueError(f"masking {name}={r} must lie in (0, 1]")
        if self.rate_schedule_steps < 0:
            raise ValueError(f"rate_schedule_steps={self.rate_schedule_steps} must be >= 0")

    def rate_at(self, step: int) -> float:
        if self.rate_start is None or self.rate_schedule_steps == 0:
            return self.rate
        t = min(step / self.rate_schedule_steps, 1.0)
        return self.rate_start + t * (self.rate - self.rate_start)


def maskable(tokens: torch.Tensor) -> torch.Tensor:
    """Residue positions (bool), the only ones a rule may select."""
    return (tokens >= FIRST_RESIDUE_ID) & (tokens != MASK)


def mask_tokens(
    tokens: torch.Tensor,
    rate: float | torch.Tensor,
    rule: str = "esm2",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (input_ids, labels); labels hold the original id where selected, else -100.

    Random numbers come from `generator` (drawn on its device, then moved), so a CPU generator
    gives the same masks whatever device `tokens` live on. `rate` may be a 0-d tensor, which
    keeps a scheduled rate out of a compiled graph's constants.
    """
    if rule not in RULES:
        raise ValueError(f"masking rule {rule!r} is unknown; use one of {RULES}")
    src = generator.device if generator is not None else tokens.device

    def draw(fn, *args):
        return fn(*args, tokens.shape, generator=generator, device=src).to(tokens.device)

    # One uniform u per position: u < rate selects it, and given selection u / rate is again
    # uniform, so u < 0.8 rate picks <mask> and u < 0.9 rate a random amino acid.
    u = draw(torch.rand)
    residue = maskable(tokens)
    selected = residue & (u < rate)
    labels = torch.where(selected, tokens, IGNORE)
    if rule == "all_mask":
        return torch.where(selected, MASK, tokens), labels
    random_aa = draw(torch.randint, AA_LOW, AA_HIGH)
    inputs = torch.where(residue & (u < 0.9 * rate), random_aa, tokens)
    inputs = torch.where(residue & (u < 0.8 * rate), MASK, inputs)
    return inputs, labels
