"""The CUDA backend: NCCL, bf16 autocast, torch.compile and flex attention on NVIDIA GPUs."""

from __future__ import annotations

import torch

from runtime import hardware
from runtime.backend import Backend


class CUDABackend(Backend):
    """NCCL DDP or FSDP2, bf16 autocast, torch.compile, flex attention, TF32."""

    name = "cuda"
    dist_backend = "nccl"
    compile_default = True
    flex_backward = True
    muon_dtype = torch.bfloat16

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.dtype = None if self._option("precision", "auto") == "fp32" else torch.bfloat16
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
        return {"device_ids": [self.local_rank], "broadcast_buffers": False, "gradient_as_bucket_view": True}

    def rng_state(self):
        return {**super().rng_state(), "cuda": torch.cuda.get_rng_state(self.device)}

    def set_rng_state(self, state):
        super().set_rng_state(state)
        torch.cuda.set_rng_state(state["cuda"], self.device)

    def sync(self):
        torch.cuda.synchronize(self.device)

    def memory_stats(self):
        return {"mem": torch.cuda.max_memory_allocated(self.device) / 2**30,
                "mem_reserved": torch.cuda.max_memory_reserved(self.device) / 2**30}

    def reset_peak_memory(self):
        torch.cuda.empty_cache()  # blocks cached by a previous configuration are not its peak
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_flops(self):
        return hardware.peak_flops(torch.cuda.get_device_name(self.device))

    def describe(self):
        return f"cuda x{self.world_size} ({torch.cuda.get_device_name(self.device)})"
