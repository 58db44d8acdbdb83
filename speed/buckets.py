"""Length-bucketed micro-batches (data/buckets.py) against full rows, on the shipped sample.

    python -m speed.buckets [--lengths 512,1024] [--counts 2,4,8] [--batches 60]
                            [--time PRESET] [--reps 3] [--xla PRESET] [--threads N]

Three tables:
  packing   for each row length L and bucket set: padding, dense attention scores per real
            token against full rows, the share of micro-batches of whole rows (one document
            per row: attended with no mask) and the bound the documents set (sum l^2 / sum l),
            over the first --batches micro-batches of 8,192 token slots of the training loader.
            Evenly spaced buckets (length_buckets) beside powers of two, the other design, each
            also with whole_rows.
  time      (--time PRESET) the model's forward + backward with dense masked SDPA (the
            attention XLA and Neuron run; none on whole rows) over the same micro-batches, full
            rows against length_buckets n, with and without whole_rows, interleaved rep by rep;
            ms per 1,000 real tokens.
  xla       (--xla PRESET, needs torch_xla) the bytes XLA's CPU compiler assigns to one
            training micro-step (forward + backward, fp32) at each bucket shape of L=1024, and
            at L with no mask (whole rows), compiled without running (the buffer assignment).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from data.buckets import bucket_lengths
from data.datasets import resolve_dataset
from data.loader import TrainLoader
from data.shards import document_bounds, read_shard

SLOTS = 8192  # token slots per micro-batch, the sample run's batch
XLA_SLOTS = 4 * 1024  # the speedrun's micro-batch on one trn1 NeuronCore, (4, 1024)
SAMPLE_SHAPE = dict(n_layers=4, d_model=128, n_heads=2, d_ff=384)  # config/sample.yaml's model


WHOLE = " + whole rows"  # a design's name with whole_rows on


def loader(length: int, lengths: list[int] | None, seed: int = 0, whole: bool = False) -> TrainLoader:
    """The sample's training loader at rows of `length`, bucketed into `lengths` (None: full rows)."""
    files = resolve_dataset("sample", None).train
    return TrainLoader(files, SLOTS // length, length, seed=seed, length_buckets=lengths or 1, prefetch=0,
                       whole_rows=whole)


def designs(length: int, counts: list[int]) -> list[tuple[str, list[int] | None]]:
    """Full rows, even buckets and powers of two; then full rows and even buckets with whole rows."""
    out = [("full rows", None)]
    for n in counts:
        if length % n == 0 and n > 1:
            out.append((f"even, n={n}", bucket_lengths(length, n)))
    for n in counts:
        if n > 2 and length >> (n - 1) >= 8:  # n=2 is the even n=2
            out.append((f"powers of 2, n={n}", [length >> k for k in reversed(range(n))]))
    return out + [(name + WHOLE, lengths) for name, lengths in out if not name.startswith("powers")]


def packing_row(length: int, lengths, batches: int, whole: bool = False) -> dict:
    ld = loader(length, lengths, whole=whole)
    scores = real = slots = whole_batches = 0
    shapes = set()
    for _ in range(batches):
        b = next(ld)
        ids = b["doc_ids"]
        shapes.add((tuple(ids.shape), b.get("whole_rows", False)))
        whole_batches += b.get("whole_rows", False)
        scores += ids.shape[0] * ids.shape[1] ** 2
        real += int((ids >= 0).sum())
        slots += ids.numel()
    return {"pad": 1 - real / slots, "scores": scores / real, "shapes": len(shapes), "whole": whole_batches / batches}


def bound(length: int) -> float:
    """sum l^2 / sum l over the sample's training documents cut to `length`: the keys per real
    token that attention needs when every document is attended alone."""
    path = resolve_dataset("sample", None).train[0]
    tokens = np.asarray(read_shard(path))
    starts, ends = document_bounds(tokens, path)
    spans = np.minimum(ends - starts, length).astype(np.float64)
    return float((spans**2).sum() / spans.sum())


def time_table(preset: str, length: int, counts: list[int], batches: int, reps: int) -> None:
    from model import build_model, get_config

    cfg = get_config(preset, attn_impl="sdpa", **(SAMPLE_SHAPE if preset == "sample" else {}))
    torch.manual_seed(0)
    model = build_model(cfg)
    runs = {}
    for n in [1, *(c for c in counts if c > 1 and length % c == 0)]:
        for whole in (False, True):
            ld = loader(length, bucket_lengths(length, n) if n > 1 else None, whole=whole)
            name = (f"length_buckets {n}" if n > 1 else "full rows") + (WHOLE if whole else "")
            runs[name] = [next(ld) for _ in range(batches)]

    def once(micro):
        t = time.perf_counter()
        for b in micro:
            _, loss = model(b["input_ids"], b["doc_ids"], b["labels"], whole_rows=b.get("whole_rows", False))
            loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    for micro in runs.values():
        once(micro[:2])  # warm-up: every kernel once
    times = {k: [] for k in runs}
    for _ in range(reps):
        for k, micro in runs.items():
            times[k].append(once(micro))
    print(f"\n## time: {preset}, dense masked SDPA (none on whole rows), forward + backward over {batches} "
          f"micro-batches of {SLOTS} slots at L={length}, median of {reps} interleaved repeats")
    print("| rows | real tokens | whole-row micro-batches | ms per 1,000 real tokens | vs full rows |")
    print("|---|--:|--:|--:|--:|")
    first = None
    for k, micro in runs.items():
        real = sum(int((b["doc_ids"] >= 0).sum()) for b in micro)
        per = 1e6 * statistics.median(times[k]) / real
        first = first or per
        whole = sum(b.get("whole_rows", False) for b in micro)
        print(f"| {k} | {real:,} | {whole} of {len(micro)} | {per:.1f} | {per / first:.2f} |", flush=True)


XLA_PROBE = r"""
import glob, os, re, sys
import torch, torch_xla
sys.path.insert(0, os.getcwd())
from model import build_model, get_config
preset, rows, length, whole = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "whole"
torch.manual_seed(0)
model = build_model(get_config(preset, attn_impl="sdpa")).to(torch_xla.device())
g = torch.Generator().manual_seed(0)
ids = torch.randint(4, 24, (rows, length), generator=g)
docs = (torch.arange(length) // (length if whole else 300)).expand(rows, length).contiguous()
labels = torch.where(torch.rand(rows, length, generator=g) < 0.2, ids, -100)
dev = torch_xla.device()
_, loss = model(ids.to(dev), docs.to(dev), labels.to(dev), whole_rows=whole)
loss.backward()
torch_xla._XLAC._xla_warm_up_cache([loss, *(p.grad for p in model.parameters())], [])
"""


def xla_table(preset: str, length: int, counts: list[int]) -> None:
    """Compiles one fwd+bwd micro-step per shape in a fresh torch_xla process (PJRT CPU) and
    reads 'Total bytes used' from the compiled graph's buffer assignment."""
    shapes = {(XLA_SLOTS // b, b, "masked") for n in [1, *counts] if length % n == 0 for b in bucket_lengths(length, n)}
    shapes.add((XLA_SLOTS // length, length, "whole"))
    print(f"\n## xla: {preset}, one training micro-step (forward + backward, fp32), XLA CPU compiler's "
          "buffer assignment")
    print("| rows x L | attention | GiB assigned | vs rows of L |")
    print("|---|---|--:|--:|")
    full = None
    for rows, b, kind in sorted(shapes, key=lambda s: (-s[1], s[2])):
        with tempfile.TemporaryDirectory() as dump:
            env = {**os.environ, "PJRT_DEVICE": "CPU", "XLA_FLAGS": f"--xla_dump_to={dump} --xla_dump_hlo_as_text "
                   "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"}
            proc = subprocess.run([sys.executable, "-c", XLA_PROBE, preset, str(rows), str(b), kind], env=env,
                                  capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"speed.buckets: the XLA probe failed:\n{proc.stderr[-2000:]}")
            used = max((int(m.group(1)) for f in Path(dump).glob("*buffer-assignment.txt")
                        if (m := re.search(r"Total bytes used: (\d+)", f.read_text()))), default=0)
        full = full or used
        mask = "no mask (whole rows)" if kind == "whole" else "masked"
        print(f"| {rows} x {b} | {mask} | {used / 2**30:.2f} | {used / full:.2f} |", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="512,1024")
    p.add_argument("--counts", default="2,4,8")
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--time", default="", help="a preset to time (sample, esm2_8m, ...); empty: no timing")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--xla", default="", help="a preset to compile on torch_xla's CPU runtime; empty: none")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x]
        counts = [int(x) for x in args.counts.split(",") if x]
    except ValueError:
        raise SystemExit("speed.buckets: --lengths and --counts take comma lists of integers, e.g. 512,1024.") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"\n## packing: the sample's training loader, first {args.batches} micro-batches of {SLOTS} slots")
    print("| L | rows | graphs (shapes x mask) | padding | attention scores per real token | vs full rows | "
          "whole-row micro-batches | bound sum l^2/sum l |")
    print("|--:|---|--:|--:|--:|--:|--:|--:|")
    for length in lengths:
        full, need = None, bound(length)
        for name, bucket_set in designs(length, counts):
            r = packing_row(length, bucket_set, args.batches, whole=name.endswith(WHOLE))
            full = full or r["scores"]
            print(f"| {length} | {name} | {r['shapes']} | {r['pad']:.3f} | {r['scores']:.0f} | "
                  f"{r['scores'] / full:.2f} | {r['whole']:.2f} | {need:.0f} |", flush=True)
    if args.time:
        time_table(args.time, lengths[-1], counts, args.batches // 6 or 1, args.reps)
    if args.xla:
        xla_table(args.xla, lengths[-1], counts)


if __name__ == "__main__":
    main()
