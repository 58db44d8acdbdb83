"""The CUDA lane's gate: `./run.sh test-cuda` runs it with the lane's Python before `pytest -m cuda`,
so that the lane fails (exit 1, one sentence) instead of passing by skipping every test where
torch is a CPU build or no GPU is visible."""

from __future__ import annotations

import sys

import torch


def problem() -> str | None:
    """Why this Python cannot run the CUDA lane, in one sentence; None when it can."""
    if torch.version.cuda is None:
        return (f"{sys.executable} has torch {torch.__version__}, a CPU build; remove .venv-cuda and run "
                "./run.sh test-cuda again with pip reaching the default index, whose Linux torch wheel "
                "is the CUDA build (a CPU wheel source in the pip configuration gives the CPU build).")
    if not torch.cuda.is_available():
        return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU; run ./run.sh test-cuda "
                "on a machine whose NVIDIA driver lists a GPU in nvidia-smi, with CUDA_VISIBLE_DEVICES "
                "unset or naming one.")
    return None


if __name__ == "__main__":
    if (why := problem()) is not None:
        print(f"run.sh test-cuda: {why}", file=sys.stderr)
        sys.exit(1)
    print(f"run.sh test-cuda: {torch.cuda.device_count()} GPU(s), {torch.cuda.get_device_name()}")
