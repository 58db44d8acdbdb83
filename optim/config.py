"""The optimizer config: one validated dataclass, and the defaults of each model preset."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields, replace

from .autoclip import MAX_HISTORY, MIN_HISTORY

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd", "esm2", "constant")


@dataclass(frozen=True)
class OptimConfig:
    """Hyper-parameters of the optimizer and its schedule.

    The defaults are the speedrun recipe (Muon for hidden matrices + Adam for the rest);
    `default_optim_config("esm2_...")` gives the ESM2 recipe. Any `lr_*` left as None falls
    back to `lr`, which is how the ESM2 recipe puts every group at one peak LR.
    """

    name: str = "muon"  # "muon": Muon for hidden matrices; "adamw": AdamW for everything
    lr: float = 1e-3  # AdamW peak LR, and the fallback of every lr_* left None
    lr_embed: float | None = 0.06  # token and value embeddings
    lr_head: float | None = 0.008  # every parameter under lm_head.
    lr_scalar: float | None = 0.04  # norms, biases, learned scalars (ndim < 2)
    lr_hidden: float | None = 0.05  # hidden matrices (Muon, or AdamW with name="adamw")
    betas: tuple[float, float] = (0.8, 0.95)
    eps: float = 1e-10
    weight_decay: float = 0.0  # AdamW, decoupled; never applied to ndim < 2 parameters
    muon_weight_decay: float = 0.0  # decoupled decay of the Muon matrices
    muon_momentum: float = 0.95
    muon_momentum_start: float = 0.85
    muon_momentum_warmup_steps: int = 300
    muon_ns_steps: int = 5
    schedule: str = "wsd"
    warmup_steps: int = 1000  # AdamW groups only; Muon groups start at their peak LR
    cooldown_frac: float = 0.4  # wsd: the last fraction of training decays linearly
    min_lr_frac: float = 0.0  # cosine and wsd end at this fraction of the peak
    grad_clip: float | str | None = None  # max global grad norm (runtime), "auto" (below), None = off
    # grad_clip "auto": clip to this percentile of the pre-clip norms of the last
    # grad_clip_history steps (optim/autoclip.py). 10000 = the speedrun's num_steps: the
    # default runs clip by their whole history, as the peer; longer ones by the newest 10000.
    grad_clip_percentile: float = 10.0
    grad_clip_history: int = 10000

    def __post_init__(self):
        # YAML gives lists; a frozen dataclass needs object.__setattr__ to normalise.
        if isinstance(self.betas, list):
            object.__setattr__(self, "betas", tuple(self.betas))
        self._validate()

    def _validate(self):
        def bad(key, why):
            raise ValueError(f"optim config: {key}={getattr(self, key)!r} {why}")

        if self.name not in OPTIMIZERS:
            bad("name", f"is not one of {', '.join(OPTIMIZERS)}; pick one of them")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"is not one of {', '.join(SCHEDULES)}; pick one of them")
        if not _positive(self.lr):
            bad("lr", "must be a positive number")
        for key in ("lr_embed", "lr_head", "lr_scalar", "lr_hidden"):
            if getattr(self, key) is not None and not _positive(getattr(self, key)):
                bad(key, "must be a positive number, or null to use lr")
        if not (
            isinstance(self.betas, tuple)
            and len(self.betas) == 2
            and all(_number(b) and 0 <= b < 1 for b in self.betas)
        ):
            bad("betas", "must be two numbers in [0, 1), e.g. [0.9, 0.98]")
        if not _positive(self.eps):
            bad("eps", "must be a positive number, e.g. 1e-8")
        for key in ("weight_decay", "muon_weight_decay"):
            if not (_number(getattr(self, key)) and getattr(self, key) >= 0):
                bad(key, "must be a number >= 0")
        for key in ("muon_momentum", "muon_momentum_start"):
            if not (_number(getattr(self, key)) and 0 <= getattr(self, key) < 1):
                bad(key, "must be a number in [0, 1), e.g. 0.95")
        for key in ("muon_momentum_warmup_steps", "warmup_steps"):
            if not (_integer(getattr(self, key)) and getattr(self, key) >= 0):
                bad(key, "must be a whole number >= 0")
        if not (_integer(self.muon_ns_steps) and self.muon_ns_steps >= 1):
            bad("muon_ns_steps", "must be a whole number >= 1, e.g. 5")
        for key in ("cooldown_frac", "min_lr_frac"):
            if not (_number(getattr(self, key)) and 0 <= getattr(self, key) <= 1):
                bad(key, "must be a number in [0, 1]")
        if self.grad_clip is not None and self.grad_clip != "auto" and not _positive(self.grad_clip):
            bad("grad_clip", "must be a positive number, auto (a percentile of recent norms), or null to turn clipping off")
        if not (_number(self.grad_clip_percentile) and 0 < self.grad_clip_percentile <= 100):
            bad("grad_clip_percentile", "must be a number in (0, 100], e.g. 10")
        if not (_integer(self.grad_clip_history) and MIN_HISTORY <= self.grad_clip_history <= MAX_HISTORY):
            bad("grad_clip_history", f"must be a whole number of steps in [{MIN_HISTORY}, {MAX_HISTORY}], e.g. 10000 "
                f"(clipping starts after {MIN_HISTORY} norms)")

    def group_lr(self, role: str) -> float:
        """Peak LR of a parameter role ("embed", "head", "scalar", "hidden")."""
        value = getattr(self, f"lr_{role}")
        return self.lr if value is None else value

    @classmethod
    def from_dict(cls, values: dict, base: OptimConfig | None = None) -> OptimConfig:
        """`base` (default: OptimConfig()) with the keys of `values` replaced; unknown keys are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, known, n=1)
                hints.append(f"{key} (did you mean {close[0]}?)" if close else key)
            raise ValueError(
                f"optim config: unknown key(s) {', '.join(hints)}; "
                f"known keys are {', '.join(sorted(known))}"
            )
        return replace(base if base is not None else cls(), **values)


def default_optim_config(preset_name: str) -> OptimConfig:
    """The optimizer recipe that goes with a model preset: ESM2's for esm2_*, Muon for the rest."""
    if preset_name.startswith("esm2_"):
        # Lin et al. 2023, Supplementary A.1: Adam(W) 0.9/0.98, eps 1e-8, wd 0.01, peak 4e-4,
        # 2,000 warm-up steps; the 15B model used wd 0.1 and peak 1.6e-4.
        big = preset_name == "esm2_15b"
        return OptimConfig(
            name="adamw",
            lr=1.6e-4 if big else 4e-4,
            lr_embed=None,
            lr_head=None,
            lr_scalar=None,
            lr_hidden=None,
            betas=(0.9, 0.98),
            eps=1e-8,
            weight_decay=0.1 if big else 0.01,
            schedule="esm2",
            warmup_steps=2000,
            min_lr_frac=0.1,
        )
    if preset_name == "speedrun":
        return OptimConfig()
    if preset_name == "sample":
        # A CPU run of a few hundred steps: the same recipe with a warm-up that fits in it.
        return OptimConfig(warmup_steps=50)
    if preset_name == "patch_unet":
        # SpeedrunningPLMs' example_yamls/patch_unet.yaml: its Adam LRs and a cosine schedule
        return OptimConfig(lr_embed=0.05, lr_head=0.01, lr_scalar=0.05, lr_hidden=0.05, schedule="cosine")
    raise ValueError(
        f"optim config: no default recipe for model preset {preset_name!r}; "
        "use an esm2_* preset, speedrun, sample or patch_unet, or give the optim settings explicitly"
    )


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _integer(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _positive(x) -> bool:
    return _number(x) and x > 0
