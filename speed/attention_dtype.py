"""Attention's forward + backward in bf16 against float32 on this machine, by head dim: the
measurement behind the CPU backend's attn_fp32_max_head_dim (runtime/backend.py).

    python -m speed.attention_dtype [--head_dims 16,24,32,48,64,128] [--lengths 340,1024]
                                    [--width 640] [--reps 10] [--threads N] [--math]

For each head dim D and document length L: one document of L tokens, width // D heads, bf16
q, k, v; SDPA with no mask (what attention costs per document) run as bf16, and run in float32
after an upcast (what the model does with attn_fp32_max_head_dim >= D), backward included.
Both alternate rep by rep; the table gives medians and float32's time over bf16's. --math adds
the same two on SDPA's math backend (scores materialised, no recomputation in the backward),
the alternative to the flash kernel that the default picks.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from speed.attention import median_ms, set_threads_line


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise SystemExit(f"speed.attention_dtype: {flag} takes a comma list of integers, e.g. 16,32.") from None


def _timers(head_dim: int, length: int, width: int, seed: int, math: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    heads = max(1, width // head_dim)
    qkv = [torch.randn(1, heads, length, head_dim, generator=g).bfloat16().requires_grad_() for _ in range(3)]

    def run(upcast: bool, backend=None):
        def once():
            q, k, v = (t.float() for t in qkv) if upcast else qkv
            with sdpa_kernel(backend) if backend else contextlib.nullcontext():
                out = F.scaled_dot_product_attention(q, k, v)
            out.bfloat16().sum().backward()
        return once

    timers = {"bf16": run(False), "float32": run(True)}
    if math:
        timers.update({"bf16 math": run(False, SDPBackend.MATH), "float32 math": run(True, SDPBackend.MATH)})
    return timers


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head_dims", default="16,24,32,48,64,128")
    p.add_argument("--lengths", default="340,1024")
    p.add_argument("--width", type=int, default=640, help="heads x head dim")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--math", action="store_true", help="also time SDPA's math backend in both dtypes")
    args = p.parse_args(argv)
    head_dims, lengths = _ints(args.head_dims, "--head_dims"), _ints(args.lengths, "--lengths")
    print(set_threads_line(args.threads, f"median of {args.reps} alternating repeats, forward + backward, no mask"))
    math = " | bf16 math ms | float32 math ms" if args.math else ""
    print(f"| head dim | heads | L | bf16 ms | float32 ms | float32 / bf16{math} |")
    print("|--:|--:|--:|--:|--:|--:|" + "--:|" * (2 * args.math))
    for head_dim in head_dims:
        for length in lengths:
            ms = median_ms(_timers(head_dim, length, args.width, seed=0, math=args.math), args.reps)
            bf16, fp32 = ms["bf16"], ms["float32"]
            more = f" {ms['bf16 math']:.1f} | {ms['float32 math']:.1f} |" if args.math else ""
            print(f"| {head_dim} | {max(1, args.width // head_dim)} | {length} | {bf16:.1f} | {fp32:.1f} | "
                  f"{fp32 / bf16:.2f} |{more}", flush=True)


if __name__ == "__main__":
    main()
