"""The CUDA backend: NCCL, bf16 autocast, torch.compile and flex attention on NVIDIA GPUs.

What it shares with the Neuron backend (device RNG, sync, peak memory, DDP options, bf16
autocast) is in runtime/accelerator.py."""

from __future__ import annotations

import torch

from runtime import hardware
from runtime.accelerator import AcceleratorBackend


class CUDABackend(AcceleratorBackend):
    """NCCL DDP or FSDP2, bf16 autocast, torch.compile, flex attention, TF32."""

    name = "cuda"
    dist_backend = "nccl"
    compile_default = True
    flex_backward = True
    profiled_by = ("cpu", "cuda")  # the host's ops and the CUDA kernels they launch

    def __init__(self, cfg=None):
        super().__init__(cfg)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def _set_device(self) -> None:
        self.device = torch.device("cuda", self.local_rank)
        torch.cuda.set_device(self.device)

    def to_device(self, batch: dict) -> dict:
        # Through pinned memory (PyTorch's caching host allocator), so the copy is asynchronous:
        # from pageable memory a "non_blocking" copy makes the host wait for the device.
        return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}

    def model_defaults(self) -> dict:
        # Flex attention only compiled: eager flex materialises every score matrix (about
        # 1.5 GiB per layer at 64 x 1024 for the speedrun model), SDPA's kernels do not.
        return {"attn_impl": "flex"} if self.compile else {}

    def ddp_options(self) -> dict:
        return {"device_ids": [self.local_rank], **super().ddp_options()}

    def memory_stats(self):
        return {**super().memory_stats(), "mem_reserved": torch.cuda.max_memory_reserved(self.device) / 2**30}

    def reset_peak_memory(self):
        torch.cuda.empty_cache()  # blocks cached by a previous configuration are not its peak
        super().reset_peak_memory()

    def peak_flops(self):
        return hardware.peak_flops(self.device_name())

    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.device)
