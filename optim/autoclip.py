"""Automatic gradient clipping (`grad_clip: auto`): clip to a percentile of the recent norms.

AutoClip (Seetharaman et al. 2020, github.com/pseeth/autoclip), as SpeedrunningPLMs has it
(`utils.py` AutoGradClipper): each step's pre-clip global gradient norm joins a history, and
the gradients are clipped to the p-th percentile of that history, current norm included,
once it holds MIN_HISTORY norms (no clipping before). Differences, each a fix:
- the history is a fixed-size ring buffer on the device (the `history` newest norms), and
  the percentile is computed there with a sort and elementwise ops (static shapes, no gather
  or scatter: one graph on XLA), so no step reads anything on the host (the peer reads one
  value per parameter per step, then runs np.percentile over a Python list of up to a
  million norms);
- a non-finite norm (a skipped step) never enters the history (in the peer one NaN makes
  every later threshold NaN, and clipping to NaN turns the gradients into NaN);
- the history is state, saved in checkpoints, so a resumed run clips as an unbroken one.
"""

from __future__ import annotations

import math

import torch

MIN_HISTORY = 10  # norms in the history before clipping starts (the peer's choice)
# neuronx-cc compiles a sort into its TopK, which takes at most 16384 values (aws-neuron-sdk#1339)
MAX_HISTORY = 16384


class AutoClip:
    """The ring buffer of norms and the threshold. `clip(norm)` records a norm, returns the
    threshold to clip to (inf: no clipping yet). All tensors stay on `device`."""

    def __init__(self, percentile: float, history: int, device=None):
        # percentile in (0, 100], history in [MIN_HISTORY, MAX_HISTORY]: OptimConfig checks them
        self.percentile = float(percentile)
        # built on the host and moved: device data, not a pending op (XLA: no graph of its own)
        self.norms = torch.zeros(history, dtype=torch.float32).to(device)
        self.count = torch.zeros((), dtype=torch.long).to(device)  # finite norms recorded, ever
        self.threshold = torch.full((), math.inf).to(device)  # the last one, for the log
        self._slots = torch.arange(history).to(device)

    @classmethod
    def from_config(cls, ocfg, device=None) -> AutoClip | float | None:
        """What the runtime clips with: an AutoClip for `grad_clip: auto`, else grad_clip itself."""
        if ocfg.grad_clip != "auto":
            return ocfg.grad_clip
        return cls(ocfg.grad_clip_percentile, ocfg.grad_clip_history, device)

    def clip(self, norm: torch.Tensor) -> torch.Tensor:
        """Records `norm` (the pre-clip global gradient norm) unless it is not finite, and
        returns the p-th percentile of the history, inf while it holds < MIN_HISTORY norms."""
        norm = norm.detach().float()
        finite = torch.isfinite(norm)
        size = self.norms.numel()
        write = (self._slots == self.count % size) & finite
        self.norms = torch.where(write, norm, self.norms)
        self.count = self.count + finite.long()
        filled = self.count.clamp(max=size)
        value = percentile(self.norms, filled, self.percentile, self._slots)
        self.threshold = torch.where(self.count >= MIN_HISTORY, value, math.inf)
        return self.threshold

    def state_dict(self) -> dict:
        """Host copies (called outside the step, when saving)."""
        return {"norms": self.norms.detach().cpu(), "count": self.count.detach().cpu()}

    def load_state_dict(self, state: dict) -> None:
        norms = state["norms"]
        if norms.shape != self.norms.shape:
            raise ValueError(f"AutoClip: the saved history holds {norms.numel()} norms, this run's "
                             f"grad_clip_history is {self.norms.numel()}; resume with the same setting")
        device = self.norms.device
        self.norms = norms.to(device=device, dtype=torch.float32)
        self.count = state["count"].to(device=device, dtype=torch.long)


def percentile(values: torch.Tensor, n: torch.Tensor, q: float, slots: torch.Tensor | None = None) -> torch.Tensor:
    """The q-th percentile (0..100) of values[:n], numpy's default ("linear") method, for a
    1-d `values` and a device tensor n >= 1: position q/100 * (n - 1) in sorted order,
    linearly interpolated between its two neighbours. Static shapes: the slots from n on sort
    last as +inf, and the two neighbours are picked by comparison, not by indexing."""
    if slots is None:
        slots = torch.arange(values.numel(), device=values.device)
    ordered = torch.sort(torch.where(slots < n, values, math.inf)).values
    last = (n.clamp(min=1) - 1).float()
    pos = q / 100 * last
    lo = pos.floor()
    hi = torch.minimum(lo + 1, last)

    def at(k):  # the k-th smallest of values[:n]
        return torch.where(slots == k.long(), ordered, 0.0).sum()

    low = at(lo)
    return low + (at(hi) - low) * (pos - lo)
