"""Learning-rate schedules and the Muon momentum warm-up.

Every schedule is a pure function of (step, num_steps, cfg) returning a factor of the peak LR.
`step` is the 0-based index of the update about to be taken; `num_steps` is the run's length.
Warm-up is linear with factor (step + 1) / warmup_steps, so the first update already moves the
weights and the peak is reached at step warmup_steps - 1.
"""

from __future__ import annotations

import math

from .config import OptimConfig

# The ESM2 recipe's decay: to 10% of the peak at 90% of training, then held (Lin et al. 2023;
# BioNeMo holds 0.1x after 0.9 T). Fixed here because they are the recipe, not knobs.
ESM2_DECAY_END_FRAC = 0.9
ESM2_FINAL_FRAC = 0.1


def warmup_factor(step: int, warmup_steps: int) -> float:
    return 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)


def _ramp(step: int, start: int, end: int) -> float:
    """0 at `start`, 1 at `end`, clamped to [0, 1]."""
    return min(1.0, max(0.0, (step - start) / max(1, end - start)))


def cosine(step: int, num_steps: int, cfg: OptimConfig, warmup_steps: int) -> float:
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps)
    progress = _ramp(step, warmup_steps, num_steps)
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))


def wsd(step: int, num_steps: int, cfg: OptimConfig, warmup_steps: int) -> float:
    """Warm-up, stable at the peak, then linear to min_lr_frac over the last cooldown_frac."""
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps)
    cooldown_start = max(warmup_steps, num_steps - round(cfg.cooldown_frac * num_steps))
    return 1.0 - (1 - cfg.min_lr_frac) * _ramp(step, cooldown_start, num_steps)


def esm2(step: int, num_steps: int, cfg: OptimConfig, warmup_steps: int) -> float:
    """ESM2: warm-up to the peak, linear to 10% of it at 90% of training, then held at 10%."""
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps)
    decay_end = round(ESM2_DECAY_END_FRAC * num_steps)
    return 1.0 - (1 - ESM2_FINAL_FRAC) * _ramp(step, warmup_steps, decay_end)


def constant(step: int, num_steps: int, cfg: OptimConfig, warmup_steps: int) -> float:
    return warmup_factor(step, warmup_steps)


SCHEDULE_FUNCTIONS = {"cosine": cosine, "wsd": wsd, "esm2": esm2, "constant": constant}


def lr_factor(step: int, num_steps: int, cfg: OptimConfig, *, warmup: bool = True) -> float:
    """The factor of the peak LR at `step`; `warmup=False` gives the same schedule without warm-up."""
    check_schedule_fits(num_steps, cfg)
    warmup_steps = cfg.warmup_steps if warmup else 0
    return SCHEDULE_FUNCTIONS[cfg.schedule](step, num_steps, cfg, warmup_steps)


def _warmup_limit(num_steps: int, cfg: OptimConfig) -> int:
    """The step the warm-up must end before: where the decay ends (esm2) or the run ends."""
    return round(ESM2_DECAY_END_FRAC * num_steps) if cfg.schedule == "esm2" else num_steps


def fitted_warmup(num_steps: int, cfg: OptimConfig) -> int:
    """cfg.warmup_steps when it fits the run; else a tenth of what the warm-up must end before
    (the usual share of a warm-up), so that a shortened run keeps the schedule's shape."""
    limit = _warmup_limit(num_steps, cfg)
    return cfg.warmup_steps if cfg.warmup_steps < limit else limit // 10


def check_schedule_fits(num_steps: int, cfg: OptimConfig) -> None:
    if not (isinstance(num_steps, int) and num_steps >= 1):
        raise ValueError(f"num_steps={num_steps!r} must be a whole number >= 1")
    # The decay phase must start after the warm-up, or the schedule silently loses its shape.
    end = _warmup_limit(num_steps, cfg)
    if cfg.warmup_steps >= end:
        where = "90% of num_steps" if cfg.schedule == "esm2" else "num_steps"
        raise ValueError(
            f"optim config: warmup_steps={cfg.warmup_steps} does not fit before {where} "
            f"({end}) of a {num_steps}-step run; lower warmup_steps or train longer"
        )


def muon_momentum(step: int, cfg: OptimConfig) -> float:
    """Linear Muon momentum warm-up from muon_momentum_start to muon_momentum."""
    frac = _ramp(step, 0, cfg.muon_momentum_warmup_steps) if cfg.muon_momentum_warmup_steps else 1.0
    return (1 - frac) * cfg.muon_momentum_start + frac * cfg.muon_momentum


def apply_schedule(optimizer, step: int, ocfg: OptimConfig, num_steps: int) -> float:
    """Set every group's lr (base_lr x factor) and Muon momentum for `step`; return the factor.

    Groups with "lr_warmup": False (the Muon groups) follow the same schedule without the
    warm-up, as in the speedrun recipe: Muon's momentum warm-up already eases its first steps.
    The returned factor is that of the warmed-up (AdamW) groups.
    """
    factor = lr_factor(step, num_steps, ocfg)
    no_warmup_factor = lr_factor(step, num_steps, ocfg, warmup=False)
    momentum = muon_momentum(step, ocfg)
    for group in optimizer.param_groups:
        f = factor if group.get("lr_warmup", True) else no_warmup_factor
        group["lr"] = group["base_lr"] * f
        if "momentum" in group:
            group["momentum"] = momentum
    return factor
