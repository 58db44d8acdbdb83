"""get_backend: a device name (DEVICES) to its backend (runtime/backend.py)."""

from __future__ import annotations

import torch

from runtime import neuron
from runtime.backend import Backend, CPUBackend
from runtime.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "neuron", "xla")  # the choices of --device everywhere


def get_backend(name: str = "auto", cfg=None) -> Backend:
    """auto = cuda when a GPU is visible, else neuron when TorchNeuron sees a Trainium device
    (runtime/neuron.py), else cpu; xla only when asked (runtime/xla.py)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "neuron" if neuron.visible() else "cpu"
    if name == "cpu":
        return CPUBackend(cfg)
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked but no CUDA GPU is visible; use --device cpu or auto.")
        from runtime.cuda import CUDABackend

        return CUDABackend(cfg)
    if name == "neuron":
        return neuron.NeuronBackend(cfg)
    if name == "xla":
        try:
            from runtime.xla import XLABackend
        except ImportError as e:
            raise ConfigError(f"--device xla needs torch_xla ({e}); install requirements-xla.txt (the .venv-xla environment of ./run.sh test-xla) or pick another --device.") from None
        return XLABackend(cfg)
    raise ConfigError(f"device {name!r} is unknown; use one of {', '.join(DEVICES)}.")
