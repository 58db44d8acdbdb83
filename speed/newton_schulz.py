"""Muon's Newton-Schulz iteration in bf16 against fp32 on this machine, for one model's matrices.

    python -m speed.newton_schulz [--config config/sample.yaml] [--reps 5] [--threads N]

Builds the config's model, takes the matrices Muon updates (build_param_groups), and times one
optimizer step's worth of orthogonalisation (every matrix once, 5 iterations) in each dtype:
the median over --reps after one warm-up. This is what set `muon_dtype` per backend (fp32 on the
CPU, even one with bf16 units: see runtime/backend.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from model import build_model
from optim import build_param_groups, zeropower_via_newtonschulz5
from training.config import ConfigError, load_config, model_config, optim_config


def _ms_per_step(matrices: list[torch.Tensor], dtype: torch.dtype, reps: int) -> float:
    def step():
        for g in matrices:
            zeropower_via_newtonschulz5(g, dtype=dtype)

    step()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="config/sample.yaml")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = load_config(["--config", args.config, "--device", "cpu"])
        model = build_model(model_config(cfg))
        groups = build_param_groups(model, optim_config(cfg))
    except ConfigError as e:
        raise SystemExit(f"speed.newton_schulz: {e}") from None
    g = torch.Generator().manual_seed(0)
    matrices = [torch.randn(p.reshape(p.shape[0], -1).shape, generator=g)
                for group in groups if group["optimizer"] == "muon" for p in group["params"]]
    print(f"# {args.config}: {len(matrices)} Muon matrices, {sum(m.numel() for m in matrices):,} elements; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print("| dtype | ms per optimizer step (median) |")
    print("|---|--:|")
    ms = {dt: _ms_per_step(matrices, dt, args.reps) for dt in (torch.bfloat16, torch.float32)}
    for dt, v in ms.items():
        print(f"| {str(dt).removeprefix('torch.')} | {v:.1f} |")
    print(f"bf16 / fp32: {ms[torch.bfloat16] / ms[torch.float32]:.1f}x")


if __name__ == "__main__":
    main()
