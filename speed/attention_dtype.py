"""Attention's forward + backward in bf16 against float32 on this machine, by head dim: the
measurement behind the CPU backend's attn_fp32_max_head_dim (runtime/backend.py).

    python -m speed.attention_dtype [--head_dims 16,24,32,48,64,128] [--lengths 340,1024]
                                    [--width 640] [--reps 10] [--threads N]

For each head dim D and document length L: one document of L tokens, width // D heads, bf16
q, k, v; SDPA with no mask (what attention costs per document) run as bf16, and run in float32
after an upcast (what the model does with attn_fp32_max_head_dim >= D), backward included.
Both alternate rep by rep; the table gives medians and float32's time over bf16's.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from speed.attention import median_ms, set_threads_line


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise SystemExit(f"speed.attention_dtype: {flag} takes a comma list of integers, e.g. 16,32.") from None


def _timers(head_dim: int, length: int, width: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    heads = max(1, width // head_dim)
    qkv = [torch.randn(1, heads, length, head_dim, generator=g).bfloat16().requires_grad_() for _ in range(3)]

    def run(upcast: bool):
        def once():
            q, k, v = (t.float() for t in qkv) if upcast else qkv
            F.scaled_dot_product_attention(q, k, v).bfloat16().sum().backward()
        return once

    return {"bf16": run(False), "float32": run(True)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head_dims", default="16,24,32,48,64,128")
    p.add_argument("--lengths", default="340,1024")
    p.add_argument("--width", type=int, default=640, help="heads x head dim")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args(argv)
    head_dims, lengths = _ints(args.head_dims, "--head_dims"), _ints(args.lengths, "--lengths")
    print(set_threads_line(args.threads, f"median of {args.reps} alternating repeats, forward + backward, no mask"))
    print("| head dim | heads | L | bf16 ms | float32 ms | float32 / bf16 |")
    print("|--:|--:|--:|--:|--:|--:|")
    for head_dim in head_dims:
        for length in lengths:
            ms = median_ms(_timers(head_dim, length, args.width, seed=0), args.reps)
            bf16, fp32 = ms["bf16"], ms["float32"]
            print(f"| {head_dim} | {max(1, args.width // head_dim)} | {length} | {bf16:.1f} | {fp32:.1f} | "
                  f"{fp32 / bf16:.2f} |", flush=True)


if __name__ == "__main__":
    main()
