"""Masked-language-model masking for training (the benchmark's fixed masks: data/benchmark.py).

Maskable positions are residues (ids 4..31): <cls>, <pad>, <eos> are never masked, nor <unk>,
which carries nothing to predict. Training masks use fixed-shape tensor ops only, so
`mask_tokens` runs unchanged on any device (CPU, CUDA, XLA) and never changes the graph.

Masked diffusion (`MaskingConfig.diffusion`): each sequence (or micro-batch) draws a rate
t ~ U[1e-3, 1), each of its residues becomes <mask> with probability t, and each target's
cross-entropy is weighted by 1/t; the loss's denominator counts every residue, so the
training loss is the masked-diffusion bound on the negative log-likelihood per residue
(docs/training.md, "Masked diffusion").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from data.tokenizer import AA_HIGH, AA_LOW, FIRST_RESIDUE_ID, IGNORE, MASK

RULES = ("esm2", "all_mask")
RATE_PER = ("sequence", "batch")  # masked diffusion: one rate per document, or per micro-batch
# t ~ U[DIFFUSION_MIN_RATE, 1), as SpeedrunningPLMs (and MDLM): a target's weight 1/t stays <= 1000.
DIFFUSION_MIN_RATE = 1e-3


@dataclass(frozen=True)
class MaskingConfig:
    """rule: "esm2" (80% <mask> / 10% random amino acid / 10% unchanged) or "all_mask".

    rate: fraction of residues selected; with rate_start and rate_schedule_steps > 0 the rate
    moves linearly from rate_start to rate over that many optimizer steps, then stays.
    diffusion: "" (masked language modelling throughout), or masked diffusion from optimizer
    step `diffusion_from` on, with one rate per "sequence" or per "batch" (micro-batch);
    the steps before it are a warm-up of the masked language modelling above.
    """

    rule: str = "esm2"
    rate: float = 0.15
    rate_start: float | None = None
    rate_schedule_steps: int = 0
    diffusion: str = ""
    diffusion_from: int = 0

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"masking rule {self.rule!r} is unknown; use one of {RULES}")
        for name in ("rate", "rate_start"):
            r = getattr(self, name)
            if r is not None and not 0.0 < r <= 1.0:
                raise ValueError(f"masking {name}={r} must lie in (0, 1]")
        if self.rate_schedule_steps < 0 or self.diffusion_from < 0:
            raise ValueError(
                f"rate_schedule_steps={self.rate_schedule_steps} and "
                f"diffusion_from={self.diffusion_from} must be >= 0"
            )
        if self.diffusion not in ("", *RATE_PER):
            raise ValueError(
                f"masking diffusion={self.diffusion!r} is unknown; use '' (off) or one of {RATE_PER}"
            )

    def rate_at(self, step: int) -> float:
        if self.rate_start is None or self.rate_schedule_steps == 0:
            return self.rate
        t = min(step / self.rate_schedule_steps, 1.0)
        return self.rate_start + t * (self.rate - self.rate_start)

    def diffusion_at(self, step: int) -> bool:
        """Whether optimizer step `step` trains masked diffusion (else masked language modelling)."""
        return bool(self.diffusion) and step >= self.diffusion_from


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


def diffusion_rate(generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """One masked-diffusion rate t ~ U[DIFFUSION_MIN_RATE, 1), a 0-d float32 tensor."""
    src = generator.device if generator is not None else device
    u = torch.rand((), generator=generator, device=src).to(device)
    return DIFFUSION_MIN_RATE + (1.0 - DIFFUSION_MIN_RATE) * u


def document_rates(doc_ids: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, L) float32: each position gets the rate t ~ U[DIFFUSION_MIN_RATE, 1) of its document,
    one draw per document of each row (padding shares document 0's rate and is never masked).
    Fixed shape: a row draws L rates, of which document k takes the k-th."""
    src = generator.device if generator is not None else doc_ids.device
    u = torch.rand(doc_ids.shape, generator=generator, device=src).to(doc_ids.device)
    return (DIFFUSION_MIN_RATE + (1.0 - DIFFUSION_MIN_RATE) * u).gather(1, doc_ids.clamp(min=0))


def mask_batch(
    tokens: torch.Tensor,
    doc_ids: torch.Tensor,
    step: int,
    masking: MaskingConfig,
    generator: torch.Generator | None = None,
    batch_rate: torch.Tensor | None = None,
) -> dict:
    """The masked fields of a (B, L) batch of token ids at optimizer step `step`.

    Masked language modelling: {input_ids, labels} at masking.rate_at(step) with masking.rule.
    A masked-diffusion run adds, in both of its phases (so every batch of the run has the same
    fields and XLA one graph), loss_weights (float32: the weight of each target's
    cross-entropy, 0 elsewhere) and loss_counted (bool: what the loss's denominator counts):
    - warm-up (step < diffusion_from): the masking above, weights 1, the targets counted,
      which is exactly the masked-language-modelling loss;
    - diffusion: every residue of a sequence of rate t becomes <mask> with probability t,
      weights 1/t, every residue counted.
    batch_rate: under per-batch diffusion the micro-batch's rate, when it is masked in parts
    (the loader's row chunks); drawn here when None.
    """
    if not masking.diffusion_at(step):
        input_ids, labels = mask_tokens(tokens, masking.rate_at(step), masking.rule, generator)
        if not masking.diffusion:
            return {"input_ids": input_ids, "labels": labels}
        targets = labels != IGNORE
        return {"input_ids": input_ids, "labels": labels,
                "loss_weights": targets.float(), "loss_counted": targets}
    if masking.diffusion == "sequence":
        t = document_rates(doc_ids, generator)
    else:
        t = batch_rate if batch_rate is not None else diffusion_rate(generator, tokens.device)
        t = t.to(tokens.device).expand(tokens.shape)
    input_ids, labels = mask_tokens(tokens, t, "all_mask", generator)
    weights = torch.where(labels != IGNORE, 1.0 / t, 0.0)
    return {"input_ids": input_ids, "labels": labels,
            "loss_weights": weights, "loss_counted": maskable(tokens)}
