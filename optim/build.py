"""build_optimizer: one optimizer object over AdamW and (optionally) Muon."""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import OptimConfig
from .groups import build_param_groups
from .muon import Muon


class CombinedOptimizer:
    """Several torch optimizers behind the torch.optim.Optimizer surface the trainer uses.

    param_groups is the concatenation of the parts' groups (the same dicts, so setting
    group["lr"] reaches the part). state_dict() maps each part's name to its state dict.
    """

    def __init__(self, parts: dict[str, torch.optim.Optimizer]):
        self.parts = parts

    @property
    def param_groups(self) -> list[dict]:
        # Recomputed on each access: a part's load_state_dict replaces its group dicts.
        return [g for part in self.parts.values() for g in part.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for part in self.parts.values() for p, s in part.state.items()}

    @property
    def found_inf(self):
        return getattr(self, "_found_inf", None)

    @found_inf.setter
    def found_inf(self, value) -> None:
        """A device tensor, 1.0 to skip the next step (non-finite gradients): every part skips it
        on the device, as torch's fused optimizers do with GradScaler's found_inf."""
        self._found_inf = value
        for part in self.parts.values():
            part.found_inf = value

    def step(self, closure=None):
        first, *rest = self.parts.values()
        loss = first.step(closure)  # the closure (if any) runs once, in the first part
        for part in rest:
            part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts.values():
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != set(self.parts):
            raise ValueError(
                f"optimizer checkpoint has parts {sorted(state_dict)} but this optimizer has "
                f"{sorted(self.parts)}; resume with the optim config the checkpoint was saved with"
            )
        for name, part in self.parts.items():
            fused = [g.get("fused") for g in part.param_groups]
            part.load_state_dict(state_dict[name])
            _keep_fused(part, fused)

    def __repr__(self) -> str:
        groups = ", ".join(f"{g['name']}:{g['optimizer']}" for g in self.param_groups)
        return f"CombinedOptimizer({groups})"


def _keep_fused(part: torch.optim.Optimizer, fused: list) -> None:
    """torch's load_state_dict brings back the saved groups' `fused` flag, but whether AdamW is
    fused is this device's choice (the backend's found_inf needs it), not state of the run: a
    checkpoint from XLA or from before, resumed here, keeps this optimizer's flag, with its step
    counters where a fused step wants them (on the parameter's device, float32)."""
    for group, flag in zip(part.param_groups, fused):
        if "fused" not in group or group["fused"] == flag:
            continue
        group["fused"] = flag
        for p in group["params"]:
            state = part.state.get(p, {})
            if flag and isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].to(p.device, torch.float32)


def build_optimizer(
    model: nn.Module, ocfg: OptimConfig, *, distributed: bool = False, fused: bool = False,
    ns_dtype: torch.dtype = torch.bfloat16,
) -> CombinedOptimizer:
    """AdamW for embeddings, head and scalars (and hidden matrices with name="adamw"); Muon for
    hidden matrices with name="muon".

    distributed: spread Muon's orthogonalisation across the ranks of torch.distributed (used
    only when it is initialised with more than one rank). fused: the caller's choice for
    AdamW(fused=...) on devices that support it (never on XLA); foreach is torch's default.
    ns_dtype: the caller's (the runtime's) dtype for Muon's Newton-Schulz iteration.
    """
    groups = build_param_groups(model, ocfg)
    parts: dict[str, torch.optim.Optimizer] = {}
    adam_groups = [g for g in groups if g["optimizer"] == "adamw"]
    muon_groups = [g for g in groups if g["optimizer"] == "muon"]
    if adam_groups:
        parts["adamw"] = torch.optim.AdamW(
            adam_groups, lr=ocfg.lr, betas=ocfg.betas, eps=ocfg.eps, fused=fused or None
        )
    if muon_groups:
        parts["muon"] = Muon(
            muon_groups,
            lr=ocfg.group_lr("hidden"),
            momentum=ocfg.muon_momentum_start,
            ns_steps=ocfg.muon_ns_steps,
            distributed=distributed,
            ns_dtype=ns_dtype,
        )
    return CombinedOptimizer(parts)
