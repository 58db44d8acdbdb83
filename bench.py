"""Model speed: forward + backward + optimizer step on real protein sequences.

CPU (default): ours (esm2_8m, packed rows) against Hugging Face EsmForMaskedLM (SDPA) fed the
same sequences in padded batches, side by side, same real residues; prints residues/s and the
ratio.

    python bench.py                                  # esm2_8m, 8 x 1024 packed rows, CPU
    python bench.py --device cuda --preset speedrun --compile --attn flex --dtype bf16 --batch 64

On CUDA it prints tokens/s and MFU = flops_per_token(6N + 12 L d T_eff) * tokens/s / peak.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import os
import time
from pathlib import Path

import numpy as np
import torch

from data.tokenizer import CLS, EOS, MASK, PAD, encode
from model import build_model, flops_per_token, get_config, param_counts, t_eff
from model.config import ATTN_IMPLS

SAMPLE = Path(__file__).parent / "data" / "sample" / "uniprot_sample_20k.fasta.gz"
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, torchtitan's table


def read_documents(max_len: int, limit: int) -> list[np.ndarray]:
    """`<cls> residues <eos>` of the sample's sequences, cut to max_len like users do."""
    docs, parts = [], []
    with gzip.open(SAMPLE, "rt") as f:
        for line in f:
            if line.startswith(">"):
                if parts:
                    docs.append("".join(parts))
                    parts = []
                if len(docs) >= limit:
                    break
            else:
                parts.append(line.strip())
    out = []
    for seq in docs:
        ids = np.concatenate([[CLS], encode(seq), [EOS]]).astype(np.int64)
        out.append(ids[:max_len])
    return out


def with_masks(docs: list[np.ndarray], rng: np.random.Generator):
    """15% of residues -> <mask> (labels there), the same positions for both models."""
    masked = []
    for ids in docs:
        residue = (ids != CLS) & (ids != EOS)
        pick = residue & (rng.random(len(ids)) < 0.15)
        labels = np.where(pick, ids, -100)
        masked.append((np.where(pick, MASK, ids), labels))
    return masked


def pack_rows(docs, batch: int, seq_len: int, window: int = 4096):
    """First-fit packing of whole documents into (batch, seq_len) rows, looking ahead over
    `window` documents; returns the batch, the documents it holds and those left over."""
    ids = torch.full((batch, seq_len), PAD)
    labels = torch.full((batch, seq_len), -100)
    doc_ids = torch.full((batch, seq_len), -1)
    used, n_docs = [0] * batch, [0] * batch
    placed, rest = [], []
    for i, (x, y) in enumerate(docs):
        row = next((r for r in range(batch) if used[r] + len(x) <= seq_len), None)
        if row is None or i >= window:
            rest.append((x, y))
            continue
        col = used[row]
        placed.append((x, y))
        ids[row, col:col + len(x)] = torch.from_numpy(x)
        labels[row, col:col + len(x)] = torch.from_numpy(y)
        doc_ids[row, col:col + len(x)] = n_docs[row]
        used[row], n_docs[row] = col + len(x), n_docs[row] + 1
    return dict(input_ids=ids, labels=labels, doc_ids=doc_ids), placed, rest


def pad_batches(docs, batch: int):
    """How HF users feed EsmForMaskedLM: batches of `batch` sequences padded to the longest."""
    out = []
    for i in range(0, len(docs), batch):
        chunk = docs[i:i + batch]
        L = max(len(x) for x, _ in chunk)
        ids = torch.full((len(chunk), L), PAD)
        labels = torch.full((len(chunk), L), -100)
        for r, (x, y) in enumerate(chunk):
            ids[r, :len(x)], labels[r, :len(x)] = torch.from_numpy(x), torch.from_numpy(y)
        out.append(dict(input_ids=ids, attention_mask=(ids != PAD).long(), labels=labels))
    return out


def residues(batch) -> int:
    ids = batch["input_ids"]
    return int(((ids != PAD) & (ids != CLS) & (ids != EOS)).sum())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default="esm2_8m")
    p.add_argument("--attn", default="sdpa", choices=ATTN_IMPLS)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--batch", type=int, default=8, help="packed rows per step (ours)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--hf-batch", type=int, default=8, help="sequences per padded HF batch")
    p.add_argument("--hf-sort", action="store_true", help="sort HF batches by length (less padding)")
    p.add_argument("--no-hf", action="store_true", help="time ours only")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    device = torch.device(args.device)
    cfg = get_config(args.preset, attn_impl=args.attn)
    with_hf = not args.no_hf and cfg.arch == "esm2"
    torch.manual_seed(args.seed)
    docs = with_masks(read_documents(args.seq_len, 20000), np.random.default_rng(args.seed))
    docs = [docs[i] for i in np.random.default_rng(args.seed).permutation(len(docs))]

    # One packed batch per step; HF gets exactly the documents that batch used.
    steps = []
    for _ in range(args.warmup + args.reps):
        packed, chunk, docs = pack_rows(docs, args.batch, args.seq_len)
        if args.hf_sort:
            chunk = sorted(chunk, key=lambda d: len(d[0]))
        steps.append((packed, pad_batches(chunk, args.hf_batch)))

    ours = build_model(cfg).to(device)
    models = {"ours (packed)": ours}
    if with_hf:
        from transformers import EsmForMaskedLM

        from model.hf import hf_config

        hf = EsmForMaskedLM(hf_config(cfg, attn_implementation="sdpa")).to(device)
        models["HF EsmForMaskedLM (padded)"] = hf
    n_params = param_counts(ours)["total"]
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    run = {k: (torch.compile(m) if args.compile else m) for k, m in models.items()}
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if args.dtype == "bf16" else contextlib.nullcontext()
    )

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(name, batches):
        for b in batches:
            b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
            with autocast:
                if name.startswith("ours"):
                    _, loss = run[name](b["input_ids"], b["doc_ids"], b["labels"])
                    loss = loss / (b["labels"] != -100).sum().clamp_min(1)
                else:
                    loss = run[name](**b).loss
            loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)

    # wall seconds, CPU seconds (less sensitive to other load on a shared box), residues,
    # positions computed, padding positions
    totals = {k: [0.0, 0.0, 0, 0, 0] for k in models}
    load_before = os.getloadavg()[0]
    teff = []
    for i, (packed, padded) in enumerate(steps):
        for name in models:
            batches = [packed] if name.startswith("ours") else padded
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            step(name, batches)
            sync()
            if i >= args.warmup:
                t = totals[name]
                t[0] += time.perf_counter() - t0
                t[1] += time.process_time() - c0
                t[2] += sum(residues(b) for b in batches)
                t[3] += sum(b["input_ids"].numel() for b in batches)
                t[4] += sum(int((b["input_ids"] == PAD).sum()) for b in batches)
        if i >= args.warmup:
            teff.append(t_eff(packed["doc_ids"]))

    print(f"# {args.preset} ({n_params:,} params), device {args.device}, dtype {args.dtype}, "
          f"attn {args.attn}, compile {args.compile}, threads {torch.get_num_threads()}, "
          f"{args.reps} timed steps after {args.warmup} warm-up, "
          f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"# ours: {args.batch} x {args.seq_len} packed rows per step; HF: the same sequences in "
          f"padded batches of {args.hf_batch}{' sorted by length' if args.hf_sort else ''}")
    print("| model | wall s | CPU s | real residues | positions computed | padding "
          "| residues/s (wall) | residues per CPU-s |")
    print("|---|---|---|---|---|---|---|---|")
    rate = {}
    for name, (sec, cpu, res, pos, pad) in totals.items():
        rate[name] = (res / sec, res / cpu)
        print(f"| {name} | {sec:.1f} | {cpu:.1f} | {res:,} | {pos:,} | {pad / pos:.1%} "
              f"| {res / sec:,.0f} | {res / cpu:,.0f} |")
    if with_hf:
        a, b = rate.values()
        print(f"ratio ours / HF: {a[0] / b[0]:.2f}x (wall), {a[1] / b[1]:.2f}x (CPU time)")
    if device.type == "cuda":
        sec = totals["ours (packed)"][0]  # wall time: GPU work is not CPU time
        tokens = sum(int((s[0]["doc_ids"] >= 0).sum()) for s in steps[args.warmup:])
        tps = tokens / sec
        fpt = flops_per_token(cfg, float(np.mean(teff)))
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        mfu = f"{100 * fpt * tps / peak:.1f}% of {peak / 1e12:.0f} TF" if peak else "n/a (unknown peak)"
        print(f"{name}: {tps:,.0f} tokens/s (non-pad), T_eff {np.mean(teff):.0f}, "
              f"{fpt / 1e9:.3f} GF/token, MFU {mfu}")


if __name__ == "__main__":
    main()
