"""Loader + masking throughput, per process, at the speedrun batch shape.

    python -m speed.loader [--files SHARD...] [--batch_size 64] [--seq_len 1024] [--batches 100]
                         [--step_ms 20] [--threads N]

Without --files, the shipped sample is prepared (train split only) into a temporary folder.
Prints tokens/s of packing alone, masking alone, the whole producer (pack + mask, no thread),
and, with the prefetch thread, the wait the training loop sees per batch when its step takes
--step_ms (simulated by sleeping), against what producing that batch costs.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from data.datasets import SAMPLE_FASTA, find_shards
from data.loader import TrainLoader
from data.masking import MaskingConfig
from data.prepare import prepare


def _timed(fn, n: int) -> float:
    """Seconds per call of fn, after two warm-up calls."""
    fn()
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def _wait_per_batch(loader: TrainLoader, batches: int, step_ms: float) -> float:
    """Mean seconds the training loop waits in next() when each step takes step_ms."""
    next(loader)
    time.sleep(0.5)  # the queue fills, as it does during the first (compiling) steps
    waits = []
    for _ in range(batches):
        t = time.perf_counter()
        next(loader)
        waits.append(time.perf_counter() - t)
        time.sleep(step_ms / 1000)
    return sum(waits) / len(waits)


def run(files, batch_size: int, seq_len: int, batches: int, step_ms: float) -> list[tuple]:
    """Rows of (stage, ms per batch or a percentage, Mtokens/s or '')."""
    tokens, masking = batch_size * seq_len, MaskingConfig()
    sync = TrainLoader(files, batch_size, seq_len, masking=masking, prefetch=0)
    packed = torch.from_numpy(sync._packer.next_tokens()[0])
    timings = [
        ("pack (whole documents into rows)", _timed(sync._packer.next_tokens, batches)),
        ("mask (esm2 15%, 80/10/10)", _timed(lambda: sync.mask(packed, 0), batches)),
        ("producer: pack + mask, no thread", _timed(lambda: next(sync), batches)),
    ]
    with TrainLoader(files, batch_size, seq_len, masking=masking, prefetch=4) as loader:
        timings.append(
            ("prefetch thread, consumer does nothing", _timed(lambda: next(loader), batches))
        )
    rows = [(name, f"{s * 1e3:.2f}", f"{tokens / s / 1e6:.1f}") for name, s in timings]
    with TrainLoader(files, batch_size, seq_len, masking=masking, prefetch=4) as loader:
        wait = _wait_per_batch(loader, batches, step_ms)
    hidden = max(0.0, 1 - wait / timings[2][1])
    return rows + [
        (f"consumer-visible wait per batch, {step_ms:g} ms step", f"{wait * 1e3:.2f}", ""),
        ("share of producer cost hidden by prefetch", f"{hidden:.1%}", ""),
        ("padding fraction", f"{sync.padding_fraction:.1%}", ""),
    ]


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m speed.loader",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--files", nargs="*", help="train shards (default: the sample, prepared now)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--step_ms", type=float, default=20.0, help="simulated training step time")
    p.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)"
    )
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        files = a.files
        if not files:
            prepare([SAMPLE_FASTA], tmp, "sample", valid=0, test=0, quiet=True)
            files = find_shards(tmp).train
        rows = run(files, a.batch_size, a.seq_len, a.batches, a.step_ms)
    threads = torch.get_num_threads()
    print(f"B x L = {a.batch_size} x {a.seq_len}, {a.batches} batches, torch threads {threads}")
    print(f"| {'stage':<48} | {'ms/batch':>9} | {'Mtokens/s':>9} |")
    print(f"|{'-' * 50}|{'-' * 10}:|{'-' * 10}:|")
    for name, value, rate in rows:
        print(f"| {name:<48} | {value:>9} | {rate:>9} |")


if __name__ == "__main__":
    main()
