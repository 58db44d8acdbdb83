"""get_backend: a device name (auto, cpu, cuda, xla) to its backend (runtime/backend.py)."""

from __future__ import annotations

import torch

from runtime.backend import Backend, CPUBackend
from runtime.errors import ConfigError


def get_backend(name: str = "auto", cfg=None) -> Backend:
    """auto = cuda when a GPU is visible, else cpu; xla only when asked (runtime/xla.py)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return CPUBackend(cfg)
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked but no CUDA GPU is visible; use --device cpu or auto.")
        from runtime.cuda import CUDABackend

        return CUDABackend(cfg)
    if name == "xla":
        try:
            from runtime.xla import XLABackend
        except ImportError as e:
            raise ConfigError(f"--device xla needs torch_xla ({e}); install requirements-xla.txt (the .venv-xla environment of ./run.sh test-xla) or pick another --device.") from None
        return XLABackend(cfg)
    raise ConfigError(f"device {name!r} is unknown; use auto, cuda, cpu or xla.")
