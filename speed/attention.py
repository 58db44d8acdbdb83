"""Our attention implementations side by side on this machine, in one process, interleaved.

    python -m speed.attention [--presets esm2_8m,sample] [--shapes 1x1024,4x1024,16x512]
                              [--impls sdpa,varlen,nomask] [--reps 7] [--threads N]

For each preset and B x L shape: real packed rows of the shipped sample (data/packing.py, first
fit, whole sequences cut to L), and per implementation
  attention   the attention call alone, forward + backward, at the model's heads and head dim
  step        the model's forward + backward on the same rows (no optimizer)
`nomask` is SDPA with no mask at all, what a micro-batch of whole rows runs (`--whole_rows`):
the same shapes, timed on the same rows although they hold several documents (its numbers are
a cost, not a result). Implementations run round-robin, one repeat each in turn, so a change of
load hits all alike;
the table gives medians and each implementation's time over the first one's. `sum l^2 / B L^2`
is the share of the dense score matrix that the documents need.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from model import build_model, get_config
from model.attention import attend, build_mask
from model.config import ATTN_IMPLS
from speed.models import Workload

SAMPLE_SHAPE = dict(n_layers=4, d_model=128, n_heads=2, d_ff=384)  # config/sample.yaml's model
NO_MASK = "nomask"  # SDPA with no mask: the cost of a whole-row micro-batch


def _config(preset: str, impl: str):
    impl = "sdpa" if impl == NO_MASK else impl
    return get_config(preset, attn_impl=impl, **(SAMPLE_SHAPE if preset == "sample" else {}))


def _timers(preset: str, impls: list[str], batch: int, length: int, seed: int) -> tuple[dict, float]:
    """Per implementation, the two zero-argument callables timed (attention alone, model step),
    and the share of the dense score matrix that the rows' documents need."""
    rows, _ = Workload(length, seed).packed(batch)
    ids, doc_ids, labels = rows["input_ids"], rows["doc_ids"], rows["labels"]
    cfg = _config(preset, impls[0])
    g = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(batch, length, cfg.n_heads, cfg.head_dim, generator=g).transpose(1, 2).requires_grad_()
           for _ in range(3)]
    timers = {}
    for impl in impls:
        torch.manual_seed(seed)
        model = build_model(_config(preset, impl))

        whole = impl == NO_MASK

        def attention(impl=impl, whole=whole):
            out = attend(*qkv, build_mask(doc_ids, impl, whole_rows=whole), impl)
            torch.autograd.grad(out.sum(), qkv)

        def step(model=model, whole=whole):
            _, loss = model(ids, doc_ids, labels, whole_rows=whole)
            loss.backward()
            model.zero_grad(set_to_none=True)

        timers[impl] = {"attention": attention, "step": step}
    needed = sum(float((np.bincount(r[r >= 0]).astype(np.float64) ** 2).sum()) for r in doc_ids.numpy())
    return timers, needed / (batch * length**2)


def set_threads_line(threads: int, how: str) -> str:
    """Sets torch's threads (0: its default) and names the run's setting for a table's head."""
    if threads:
        torch.set_num_threads(threads)
    return f"# torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}, {how}"


def median_ms(fns: dict, reps: int) -> dict:
    for fn in fns.values():
        fn()  # warm-up
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def _shape(text: str) -> tuple[int, int]:
    try:
        b, n = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"speed.attention: --shapes takes BxL items such as 4x1024, not {text!r}.") from None
    return b, n


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="esm2_8m,sample")
    p.add_argument("--shapes", default="1x1024,4x1024,16x512")
    p.add_argument("--impls", default="sdpa,varlen")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    impls = [i for i in args.impls.split(",") if i]
    if not impls or set(impls) - {*ATTN_IMPLS, NO_MASK} or "flex" in impls:
        raise SystemExit(f"speed.attention: --impls {args.impls!r}: use a comma list of sdpa, varlen, reference, "
                         f"{NO_MASK}.")
    print(set_threads_line(args.threads, f"median of {args.reps} interleaved repeats"))
    print("| model | B x L | sum l^2 / B L^2 | impl | attention fwd+bwd ms | vs first | model fwd+bwd ms | vs first |")
    print("|---|---|--:|---|--:|--:|--:|--:|")
    for preset in [x for x in args.presets.split(",") if x]:
        for batch, length in (_shape(s) for s in args.shapes.split(",") if s):
            timers, share = _timers(preset, impls, batch, length, args.seed)
            ms = median_ms({(i, k): fn for i, fns in timers.items() for k, fn in fns.items()}, args.reps)
            for impl in impls:
                a, s = ms[(impl, "attention")], ms[(impl, "step")]
                a0, s0 = ms[(impls[0], "attention")], ms[(impls[0], "step")]
                print(f"| {preset} | {batch} x {length} | {share:.2f} | {impl} | {a:.1f} | {a / a0:.2f} "
                      f"| {s:.1f} | {s / s0:.2f} |", flush=True)
    print(f"# load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
