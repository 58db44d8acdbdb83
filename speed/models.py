"""Ours next to Hugging Face ESM2: the measurements behind `python bench.py` (speed, memory, cost).

Workload: real sequences of the shipped sample, cut to L tokens (`<cls>` and `<eos>` kept),
15% of residues masked (ESM2's 80/10/10). A batch of size B at length L is, for ours, B rows of
L tokens packed with whole sequences (first fit, data/packing.py); Hugging Face
`EsmForMaskedLM` (SDPA) gets exactly the same sequences and masks in batches of B sequences
padded to the longest, as its users feed it. Modes, each timed after warm-up with a device
sync at both edges, median over repeats:
  train     forward + backward + AdamW step (HF accumulates over its batches of the same sequences)
  infer     forward only, logits copied back to the host, per call
  realtime  one sequence per call (batch 1, no padding): the latency a single request sees
An out-of-memory configuration becomes a row with status "oom" and the run goes on.
"""

from __future__ import annotations

import csv
import datetime
import functools
import gc
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from data.datasets import SAMPLE_FASTA
from data.masking import mask_tokens
from data.packing import WINDOW, empty_rows, take_row, write_row
from data.prepare import iter_sequences
from data.tokenizer import CLS, EOS, PAD, encode
from model import build_model, flops_per_token, get_config, param_counts
from runtime import hardware
from runtime.devices import get_backend
from speed.report import COLUMNS, fmt, markdown

MASK_RATE = 0.15
MODES = ("train", "infer", "realtime")
ESM2_FAMILY = "esm2_8m,esm2_35m,esm2_150m,esm2_650m,esm2_3b"
# (presets, batch sizes, lengths) per command. "host": no accelerator peak is known (a CPU, or
# torch-xla's CPU runtime), so shapes stay small enough to finish in minutes on a laptop.
DEFAULTS = {
    ("run", "host"): ("esm2_8m,speedrun", "4", "512"),
    ("run", "accelerator"): (f"{ESM2_FAMILY},speedrun", "8,32,64", "1024"),
    ("sweep", "host"): ("esm2_8m,esm2_35m", "1,2,4,8", "128,256,512"),
    ("sweep", "accelerator"): (f"{ESM2_FAMILY},speedrun", "1,2,4,8,16,32,64,128",
                               "128,256,512,1024,2048"),
}


# ---------------------------------------------------------------------------- the workload


@functools.lru_cache(maxsize=2)
def sample_sequences(seed: int) -> tuple[np.ndarray, ...]:
    """Residue ids of the shipped sample's sequences, in a seeded random order."""
    seqs = [encode(s) for s in iter_sequences([SAMPLE_FASTA]) if s]
    return tuple(seqs[i] for i in np.random.default_rng(seed).permutation(len(seqs)))


@dataclass
class Step:
    """One timed unit: the calls fed to the model and the T_eff of the sequences they hold."""

    calls: list[dict]
    t_eff: float


class Workload:
    """An endless stream of the sample's sequences cut to seq_len tokens. With the same seed,
    every implementation gets the same sequences and the same masks."""

    def __init__(self, seq_len: int, seed: int = 0):
        if seq_len < 8:
            raise SystemExit(f"bench: --lengths {seq_len} is too short; use 8 tokens or more.")
        self.L, self.seqs, self.next, self.pending = seq_len, sample_sequences(seed), 0, []
        self.gen = torch.Generator().manual_seed(seed)

    def __getitem__(self, i: int) -> np.ndarray:  # write_row's sources: stream index -> residues
        return self.seqs[i % len(self.seqs)][: self.L - 2]

    def _piece(self) -> tuple[int, int, int]:
        self.next += 1
        return (self.next - 1, 0, len(self[self.next - 1]))

    def packed(self, batch: int) -> tuple[dict, list]:
        """(B, L) rows packed first-fit, and the same masked documents in stream order."""
        tokens, docs = empty_rows(batch, self.L)
        placed = []
        for r in range(batch):
            while len(self.pending) < WINDOW:
                self.pending.append(self._piece())
            row, _ = take_row(self.pending, self.L)
            placed += [(i, r, o, n) for o, (i, _, n) in zip(write_row(tokens, docs, r, row, self), row)]
        ids, labels = mask_tokens(torch.from_numpy(tokens).long(), MASK_RATE, "esm2", generator=self.gen)
        rows = dict(input_ids=ids, doc_ids=torch.from_numpy(docs), labels=labels)
        seqs = [(ids[r, o - 1:o + n + 1], labels[r, o - 1:o + n + 1]) for _, r, o, n in sorted(placed)]
        return rows, seqs

    def single(self) -> torch.Tensor:
        """The next sequence alone, `<cls> residues <eos>`."""
        return torch.from_numpy(np.concatenate([[CLS], self[self._piece()[0]], [EOS]]).astype(np.int64))


def t_eff_of(lengths) -> float:
    lengths = np.asarray(lengths, dtype=np.float64)
    return float((lengths**2).sum() / lengths.sum())


def padded(seqs: list, batch: int, length: int | None = None) -> list[dict]:
    """How HF users batch: `batch` sequences per call padded to the longest; with `length`
    (devices that compile per shape) every call is (batch, length), short calls filled with
    empty `<cls><eos>` sequences so no row is all padding."""
    out = []
    for i in range(0, len(seqs), batch):
        chunk = seqs[i:i + batch]
        rows, L = (batch, length) if length else (len(chunk), max(len(x) for x, _ in chunk))
        ids, labels = torch.full((rows, L), PAD), torch.full((rows, L), -100)
        ids[len(chunk):, :2] = torch.tensor([CLS, EOS])
        for r, (x, y) in enumerate(chunk):
            ids[r, :len(x)], labels[r, :len(x)] = x, y
        out.append(dict(input_ids=ids, attention_mask=(ids != PAD).long(), labels=labels))
    return out


def counts(ids: torch.Tensor) -> dict:
    """Residues, non-padding tokens, positions and sequences of one call's input ids."""
    real = (ids != CLS) & (ids != EOS) & (ids != PAD)
    ends = (ids[:, 1:] == EOS) & (ids[:, :-1] != CLS)  # an empty <cls><eos> filler is no sequence
    return dict(residues=int(real.sum()), tokens=int((ids != PAD).sum()), positions=ids.numel(),
                seqs=int(ends.sum()))


# ---------------------------------------------------------------------------- the two implementations


class Ours:
    name = "ours"

    @staticmethod
    def build(cfg):
        return build_model(cfg)

    @staticmethod
    def params(model) -> int:
        return param_counts(model)["total"]

    @staticmethod
    def steps(wl: Workload, batch: int, static: bool) -> Step:
        rows, seqs = wl.packed(batch)
        return Step([rows], t_eff_of([len(x) for x, _ in seqs]))

    @staticmethod
    def single(ids: torch.Tensor, L: int, static: bool) -> dict:
        n = L if static else len(ids)
        row = torch.full((1, n), PAD)
        row[0, :len(ids)] = ids
        doc_ids = torch.where(row != PAD, 0, -1)
        return dict(input_ids=row, doc_ids=doc_ids)

    @staticmethod
    def loss(model, b: dict) -> torch.Tensor:
        _, loss_sum = model(b["input_ids"], b["doc_ids"], b["labels"])
        return loss_sum / (b["labels"] != -100).sum().clamp_min(1)  # on the device: no host sync

    @staticmethod
    def logits(model, b: dict) -> torch.Tensor:
        return model(b["input_ids"], b["doc_ids"])[0]


class HF:
    name = "hf"

    @staticmethod
    def build(cfg):
        from transformers import EsmForMaskedLM

        from model.hf import hf_config

        return EsmForMaskedLM(hf_config(cfg, attn_implementation="sdpa"))

    @staticmethod
    def params(model) -> int:
        return sum(p.numel() for p in model.parameters())

    @staticmethod
    def steps(wl: Workload, batch: int, static: bool) -> Step:
        _, seqs = wl.packed(batch)
        return Step(padded(seqs, batch, wl.L if static else None), t_eff_of([len(x) for x, _ in seqs]))

    @staticmethod
    def single(ids: torch.Tensor, L: int, static: bool) -> dict:
        b = padded([(ids, torch.full_like(ids, -100))], 1, L if static else None)[0]
        del b["labels"]
        return b

    @staticmethod
    def loss(model, b: dict) -> torch.Tensor:
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss

    @staticmethod
    def logits(model, b: dict) -> torch.Tensor:
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


class HFGrouped(HF):
    """HF as its careful users run it: length-grouped batches (Trainer's group_by_length, or
    token-budget batching). A step is a megabatch of MEGABATCH x B sequences of the same stream,
    sorted longest first and cut into calls of B padded to their longest, with one optimizer
    step over them (Trainer would take one per call: one more AdamW step each, which we spare
    HF). Batch 1 has no padding to save, so realtime rows are HF's own."""

    name = "hf_grouped"
    MEGABATCH = 16

    @staticmethod
    def steps(wl: Workload, batch: int, static: bool) -> Step:
        seqs = []
        while len(seqs) < HFGrouped.MEGABATCH * batch:
            seqs += wl.packed(batch)[1]
        seqs.sort(key=lambda s: -len(s[0]))
        return Step(padded(seqs, batch, wl.L if static else None), t_eff_of([len(x) for x, _ in seqs]))


# ---------------------------------------------------------------------------- timing


def train_step(backend, impl, model, optimizer, step: Step) -> None:
    """One optimizer step over the step's calls (HF: gradients accumulated over its batches)."""
    for b in step.calls:
        b = backend.to_device(b)
        with backend.autocast():
            loss = impl.loss(model, b)
        loss.backward()
    backend.optimizer_step(model, optimizer, None)


def infer_calls(backend, impl, model, step: Step) -> list[float]:
    """Forward of each call, logits back on the host; seconds per call."""
    seconds = []
    with torch.no_grad():
        for b in step.calls:
            t = time.perf_counter()
            b = backend.to_device(b)
            with backend.autocast():
                logits = impl.logits(model, b)
            backend.to_host(logits)
            backend.sync()
            seconds.append(time.perf_counter() - t)
    return seconds


def timed_step(backend, impl, model, optimizer, step: Step) -> tuple[float, float, list[float]]:
    """Wall and CPU seconds of one step (device synced at both edges) and its latencies: the
    optimizer step in train, each forward call otherwise."""
    backend.sync()
    t0, c0 = time.perf_counter(), time.process_time()
    if optimizer is not None:
        train_step(backend, impl, model, optimizer, step)
        backend.sync()
        calls = [time.perf_counter() - t0]
    else:
        calls = infer_calls(backend, impl, model, step)
    return time.perf_counter() - t0, time.process_time() - c0, calls


class CompiledCalls:
    """What torch.compile did while entered. Dynamo reports every guard check of a compiled
    frame: a hit runs a compiled graph; a miss either compiles a new graph or, once the frame
    has passed dynamo's recompile limit (or dynamo gave up on it), runs eagerly. Inert for a
    model that is not compiled (graphs stays None)."""

    def __init__(self, model):
        self.asked = hasattr(model, "_orig_mod")
        self.hits = self.misses = 0
        self.graphs = None  # graphs dynamo compiled meanwhile

    def _hook(self, hit: bool) -> bool:
        hit = self._previous(hit) if self._previous else hit
        if hit:
            self.hits += 1
        else:
            self.misses += 1
        return hit

    def __enter__(self):
        if self.asked:
            from torch._C._dynamo.eval_frame import set_guard_complete_hook
            from torch._dynamo.utils import counters

            self._set_hook, self._stats = set_guard_complete_hook, counters["stats"]
            self._graphs0 = self._stats["unique_graphs"]
            self._previous = self._set_hook(self._hook)
        return self

    def __exit__(self, *exc):
        if self.asked:
            self._set_hook(self._previous)
            self.graphs = self._stats["unique_graphs"] - self._graphs0

    @property
    def ran_compiled(self) -> bool:
        """Every call ran a compiled graph: something hit or compiled, and every miss compiled."""
        return self.asked and self.hits + self.graphs > 0 and self.misses <= self.graphs


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def measure(backend, impl, model, cfg, mode: str, batch: int, seq_len: int, args) -> dict:
    """The numbers of one configuration (raises on OOM; the caller records it)."""
    wl = Workload(seq_len, args.seed)
    static = backend.static_shapes
    n = args.warmup + (args.realtime_calls if mode == "realtime" else args.reps)
    if mode == "realtime":
        steps = []
        for _ in range(n):
            ids = wl.single()
            steps.append(Step([impl.single(ids, seq_len, static)], float(len(ids))))
    else:
        steps = [impl.steps(wl, batch, static) for _ in range(n)]
    if mode != "train":
        for s in steps:
            for b in s.calls:
                b.pop("labels", None)
    optimizer = None
    if mode == "train":
        model.train()
        fused = True if backend.fused_adamw else None
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    else:
        model.eval()
    gc.collect()
    backend.reset_peak_memory()
    timed = steps[args.warmup:]
    for step in steps[:args.warmup]:
        timed_step(backend, impl, model, optimizer, step)
    compiles0 = backend.compile_count()
    with CompiledCalls(model) as dynamo:
        walls, cpus, latencies = [], [], []
        for step in timed:
            wall, cpu, calls = timed_step(backend, impl, model, optimizer, step)
            walls.append(wall)
            cpus.append(cpu)
            latencies += calls
    per_step = [_sum_counts(s) for s in timed]

    def rate(key, seconds):
        return statistics.median(c[key] / t for c, t in zip(per_step, seconds))

    tokens_per_s = rate("tokens", walls)
    total = {k: sum(c[k] for c in per_step) for k in per_step[0]}
    peak = backend.peak_flops()
    row = dict(
        compiled=dynamo.ran_compiled,
        residues_per_s=rate("residues", walls), tokens_per_s=tokens_per_s,
        positions_per_s=rate("positions", walls), seqs_per_s=rate("seqs", walls),
        residues_per_cpu_s=rate("residues", cpus) if min(cpus) > 0 else None,
        padding=1 - total["tokens"] / total["positions"],
        seqs_per_call=total["seqs"] / sum(len(s.calls) for s in timed),
        mem_gib=backend.memory_stats()["mem"],
        ms_p50=1e3 * percentile(latencies, 50), ms_p99=1e3 * percentile(latencies, 99),
        compiles=dynamo.graphs if compiles0 is None else backend.compile_count() - compiles0,
    )
    if mode == "train":
        t_eff = float(np.mean([s.t_eff for s in timed]))
        row["mfu"] = flops_per_token(cfg, t_eff) * tokens_per_s / peak if peak else "n/a"
    del optimizer
    return row


def _sum_counts(step: Step) -> dict:
    out = dict(residues=0, tokens=0, positions=0, seqs=0)
    for b in step.calls:
        for k, v in counts(b["input_ids"]).items():
            out[k] += v
    return out


def is_oom(e: BaseException) -> bool:
    text = str(e)
    return (isinstance(e, torch.OutOfMemoryError) or "out of memory" in text.lower()
            or "RESOURCE_EXHAUSTED" in text)


def failure(e: BaseException) -> str:
    if is_oom(e):
        return "oom"
    first = (str(e).strip().splitlines() or [""])[0]
    return f"error: {type(e).__name__}: {first}"[:200]


# ---------------------------------------------------------------------------- prices


def price(backend, args) -> dict:
    """instance, $/h of one accelerator and the price's date: --usd_per_hour, else --instance,
    else the price table's row for this accelerator, else none (costs are "n/a")."""
    if args.instance and args.instance not in hardware.INSTANCES:
        raise SystemExit(f"bench: --instance {args.instance!r} is not in the price table; use one of "
                         f"{', '.join(hardware.INSTANCES)} or give --usd_per_hour.")
    p = hardware.INSTANCES.get(args.instance)
    if args.usd_per_hour is not None:
        return dict(instance=p.instance if p else "given", usd_per_hour=args.usd_per_hour, price_date="given")
    p = p or hardware.price(accelerator(backend))
    if p is None:
        return dict(instance="", usd_per_hour=None, price_date="")
    return dict(instance=p.instance, usd_per_hour=p.usd_per_accelerator_hour, price_date=p.date)


def accelerator(backend) -> str:
    return hardware.accelerator(backend.describe())[1]


def price_line(pr: dict, acc: str) -> str:
    if pr["usd_per_hour"] is None:
        return (f"price: none in runtime/hardware.py for {acc}, so costs are n/a "
                "(give --instance or --usd_per_hour)")
    return (f"price: {pr['instance']}, ${pr['usd_per_hour']:.4g}/h per accelerator (date "
            f"{pr['price_date']}; table of {hardware.PRICE_TABLE_DATE}); cost = 1e6 / rate x $/h / 3600")


def add_costs(row: dict, mode: str, usd_per_hour: float | None) -> None:
    if row["status"] != "ok":
        return
    key, rate = (("usd_per_1m_tokens", row["tokens_per_s"]) if mode == "train"
                 else ("usd_per_1m_inferences", row["seqs_per_s"]))
    row[key] = "n/a" if usd_per_hour is None else hardware.usd_per_million(rate, usd_per_hour)


# ---------------------------------------------------------------------------- run and sweep


def model_args(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"bench: --model_args {item!r} is not KEY=VALUE (e.g. n_layers=2).")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
        out[key] = value
    return out


def ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise SystemExit(f"bench: {flag} {text!r} must be a comma list of positive integers.")
    return values


def benchmark(args) -> tuple[list[dict], str]:
    """Every row of the run: presets x implementations x modes x lengths x batch sizes."""
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = get_backend(args.device, SimpleNamespace(precision=args.dtype, compile=args.compile, fsdp=False))
    backend.init_distributed()
    scale = "host" if backend.peak_flops() is None else "accelerator"
    presets, batches, lengths = DEFAULTS[(args.command, scale)]
    presets = [p for p in (args.presets or presets).split(",") if p]
    batches = ints(args.batches or batches, "--batches")
    lengths = ints(args.lengths or lengths, "--lengths")
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - set(MODES):
        raise SystemExit(f"bench: --modes {args.modes!r}: use a comma list of {', '.join(MODES)}.")
    if args.warmup is None:
        args.warmup = 2 if backend.static_shapes else 1  # XLA: the first step's graph differs
    overrides = model_args(args.model_args)
    defaults = backend.model_defaults()
    attn = args.attn or defaults.get("attn_impl", "sdpa")
    try:  # every preset checked before the first measurement, so a typo fails at once
        cfgs = {p: get_config(p, **{**defaults, "attn_impl": attn, **overrides}) for p in presets}
    except ValueError as e:
        raise SystemExit(f"bench: {e}") from None
    pr = price(backend, args)
    acc = accelerator(backend)
    common = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
                  machine=args.machine, device=backend.describe(), accelerator=acc,
                  torch=torch.__version__, dtype=dtype_name(backend), **pr)
    fp32_upto = defaults.get("attn_fp32_max_head_dim", 0)
    head = header(args, backend, pr, acc, attn + (f" (fp32 up to head_dim {fp32_upto})" if fp32_upto else ""))
    print(head, flush=True)
    plan = [(mode, L, B) for mode in modes for L in lengths
            for B in ([1] if mode == "realtime" else batches)]
    rows = []
    for preset, cfg in cfgs.items():
        label = preset + "".join(f" {k}={v}" for k, v in overrides.items())
        for impl in [Ours] + ([HF, HFGrouped] if cfg.arch == "esm2" and not args.no_hf else []):
            common.update(preset=label, impl=impl.name, attn=attn if impl is Ours else "sdpa")
            grouped = [p for p in plan if p[0] != "realtime"] if impl is HFGrouped else plan
            rows += model_rows(backend, impl, cfg, grouped, common, args)
    return rows, head


def model_rows(backend, impl, cfg, plan, common: dict, args) -> list[dict]:
    """The rows of one model: one per (mode, L, B) of the plan; failures are rows too."""
    model, params, status = None, "", "ok"
    if backend.compile:
        # Dynamo's compiled code is kept per code object, not per model, and a code object that
        # passes its recompile limit (8) runs eagerly from then on: each model starts afresh.
        torch._dynamo.reset()
    try:
        model = impl.build(cfg)
        params = impl.params(model)
        model = backend.prepare_model(model, cfg)
    except Exception as e:  # noqa: BLE001  (a model too large for the device is a row)
        model, status = None, failure(e)
    rows, asked = [], hasattr(model, "_orig_mod")
    for mode, L, B in plan:
        row = dict(common, params=params, compiled=asked, mode=mode, batch=B,
                   seq_len=L, reps=args.realtime_calls if mode == "realtime" else args.reps,
                   status=status)
        if model is not None:
            try:
                row.update(measure(backend, impl, model, cfg, mode, B, L, args))
                if row["compiled"] != asked:
                    print(f"  warning: {common['preset']} {impl.name} {mode} B={B} L={L} ran eagerly although "
                          "compiled (the row says compiled=False); TORCH_LOGS=recompiles says why",
                          flush=True)
            except Exception as e:  # noqa: BLE001  (recorded, the run goes on)
                row["status"] = failure(e)
                e.__traceback__ = None  # frames hold the failed step's tensors
                model.zero_grad(set_to_none=True)
            gc.collect()
            backend.reset_peak_memory()
        add_costs(row, mode, common["usd_per_hour"])
        row["load_avg"] = os.getloadavg()[0]
        rows.append(csv_row(row))
        print(progress(rows[-1]), flush=True)
    del model
    gc.collect()
    backend.reset_peak_memory()
    return rows


def dtype_name(backend) -> str:
    return {None: "fp32", torch.bfloat16: "bf16"}.get(backend.dtype, str(backend.dtype))


def header(args, backend, pr, acc, attn) -> str:
    try:
        import transformers

        hf = f", transformers {transformers.__version__}"
    except ImportError:
        hf = ""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f", machine {args.machine!r}" if args.machine else ""
    return "\n".join([
        f"# bench.py {args.command}: {when}, {backend.describe()}{machine}",
        f"# torch {torch.__version__}{hf}, dtype {dtype_name(backend)}, attn {attn}, compile "
        f"{args.compile}, {torch.get_num_threads()} threads, {args.reps} timed repeats after "
        f"{args.warmup} warm-up, load average {os.getloadavg()[0]:.2f}",
        f"# {price_line(pr, acc)}",
        "# command: python bench.py " + shlex.join(sys.argv[1:]),
    ])


def csv_row(row: dict) -> dict:
    def cell(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.6g}"
        return str(v)

    return {k: cell(row.get(k)) for k in COLUMNS}


def progress(r: dict) -> str:
    if r["status"] != "ok":
        return f"  {r['preset']} {r['impl']} {r['mode']} B={r['batch']} L={r['seq_len']}: {r['status']}"
    return (f"  {r['preset']} {r['impl']} {r['mode']} B={r['batch']} L={r['seq_len']}: "
            f"{fmt(r['residues_per_s'])} residues/s, {fmt(r['seqs_per_s'], 1)} seq/s, "
            f"p50 {fmt(r['ms_p50'], 1)} ms, {fmt(r['mem_gib'], 2)} GiB")


def write_csv(path: Path, rows: list[dict], append: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not (append and path.exists() and path.stat().st_size > 0)
    with open(path, "w" if new else "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        if new:
            w.writeheader()
        w.writerows(rows)


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-") or "device"


def run(args) -> Path:
    rows, head = benchmark(args)
    acc = rows[0]["accelerator"] if rows else "device"
    out = Path(args.out)
    csv_path = out / f"{args.command}-{slug(acc.split(' (')[0])}.csv"  # CPU (processor...) -> run-cpu.csv
    write_csv(csv_path, rows, append=args.command == "sweep")
    tables = markdown(rows)
    csv_path.with_suffix(".md").write_text(f"```\n{head}\n```\n\n{tables}\n")
    print("\n" + tables)
    print(f"\nwrote {csv_path} ({'appended' if args.command == 'sweep' else 'new'}) and "
          f"{csv_path.with_suffix('.md')}")
    return csv_path
