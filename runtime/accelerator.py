"""AcceleratorBackend: what the CUDA and Neuron backends share (runtime/cuda.py, runtime/neuron.py).

Both are CUDA-style PyTorch devices: a device module `torch.<name>` (torch.cuda, torch.neuron)
with synchronize, the device RNG state and peak-memory counters; bf16 autocast around the
forward with fp32 parameters (precision fp32: none); DDP or FSDP2 over the device's collective
library; fused AdamW and bf16 Newton-Schulz. A subclass names the device, places this rank on
it and says what differs (CUDA: pinned copies, TF32, flex attention; Neuron: its compiler).
"""

from __future__ import annotations

import torch

from runtime.backend import Backend


class AcceleratorBackend(Backend):
    """A device with a torch.<name> module; `name` is its torch device type."""

    muon_dtype = torch.bfloat16

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.dtype = None if self._option("precision", "auto") == "fp32" else torch.bfloat16

    @property
    def module(self):
        """torch.cuda or torch.neuron: the device's runtime API."""
        return getattr(torch, self.name)

    def ddp_options(self) -> dict:
        return {"broadcast_buffers": False, "gradient_as_bucket_view": True}

    def rng_state(self):
        return {**super().rng_state(), self.name: self.module.get_rng_state(self.device)}

    def set_rng_state(self, state):
        super().set_rng_state(state)
        self.module.set_rng_state(state[self.name], self.device)

    def sync(self):
        self.module.synchronize(self.device)

    def memory_stats(self):
        return {"mem": self.module.max_memory_allocated(self.device) / 2**30}

    def reset_peak_memory(self):
        self.module.reset_peak_memory_stats(self.device)

    def device_name(self) -> str:
        """What describe() puts in brackets, and what runtime/hardware.py reads the peak from."""
        raise NotImplementedError

    def describe(self):
        return f"{self.name} x{self.world_size} ({self.device_name()})"
