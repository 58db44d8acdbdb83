"""The CUDA lane, for issue 13's fixes: what only a GPU can show about them (skipped without one;
`./run.sh test-cuda`). Their logic is tested on the CPU in test_host_reads.py and test_cuda_path.py."""

from __future__ import annotations

import pytest
import torch
from train_support import TINY, write_tiny_shards

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (./run.sh test-cuda on one)"),
]


def test_a_training_step_never_synchronises_with_the_gpu(tmp_path, monkeypatch):
    """CUDA's own sync detector (set_sync_debug_mode("error")) around every train_step of a
    compiled bf16 run with grad accumulation and clipping: no step blocks the host."""
    import train

    real, calls = train.train_step, []

    def strict(*args, **kwargs):
        calls.append(1)
        if len(calls) <= 2:  # compilation and the allocator's warm-up may synchronise
            return real(*args, **kwargs)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(train, "train_step", strict)
    data = write_tiny_shards(tmp_path / "data")
    rc = train.main([*TINY, "--device", "cuda", "--data", str(data), "--num_steps", "6", "--grad_accum", "2",
                     "--optim.grad_clip", "1.0", "--log_dir", str(tmp_path / "logs"),
                     "--checkpoint_dir", str(tmp_path / "ckpt"), "--log_name", "nosync"])
    assert rc == 0 and len(calls) == 6


def test_eager_cuda_runs_sdpa_and_compiled_runs_flex():
    from types import SimpleNamespace

    from runtime.cuda import CUDABackend

    for compile, impl in (("false", None), ("true", "flex")):
        backend = CUDABackend(SimpleNamespace(compile=compile, precision="auto", fsdp=False))
        assert backend.model_defaults().get("attn_impl") == impl
