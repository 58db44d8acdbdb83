"""Tables and plots of bench.py's CSVs: the CSV columns, Markdown tables (ours next to Hugging
Face with the ratio), PNG plots of throughput and peak memory against batch size and length,
and the rewrite of the marked section of BENCHMARKS.md. `python bench.py report` drives it.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

# The CSV schema, shared by the writer (bench.py) and the reader (load_rows).
COLUMNS = {
    "date": "UTC date of the measurement",
    "machine": "--machine label",
    "device": "the backend's description (cuda x1 (NVIDIA H100 80GB HBM3), cpu x1, ...)",
    "accelerator": "runtime/hardware.py name of the device (H100-SXM, trn1-NeuronCore, CPU)",
    "torch": "torch version",
    "preset": "model preset (with --model_args overrides, if any)",
    "impl": "ours (packed rows) | hf (EsmForMaskedLM, padded batches) | hf_grouped (the same, "
            "length-grouped batches: Trainer's group_by_length)",
    "params": "parameters",
    "dtype": "fp32 | bf16 (autocast)",
    "attn": "our attention implementation (HF: sdpa)",
    "compiled": "the timed repeats ran torch.compile's graphs (False: not compiled, or ran eagerly although compiled)",
    "mode": "train | infer | realtime",
    "batch": "B: rows of L tokens (ours) or sequences per call (hf); 1 in realtime",
    "seq_len": "L: row length (ours) and the cut of every sequence",
    "reps": "timed repeats (steps; realtime: calls)",
    "status": "ok | oom | error: text",
    "residues_per_s": "real residues per second (median over repeats)",
    "tokens_per_s": "non-padding tokens (residues, <cls>, <eos>) per second: train.py's tok/s",
    "positions_per_s": "positions computed per second, padding included",
    "seqs_per_s": "sequences (inferences) per second",
    "residues_per_cpu_s": "real residues per CPU-second of this process (steadier on a shared host)",
    "padding": "share of computed positions that are padding",
    "seqs_per_call": "sequences per forward call",
    "mfu": "train: flops_per_token(6N + 12 L d T_eff) x tokens/s / the device's peak (n/a: peak unknown)",
    "mem_gib": "peak memory of the configuration, GiB (CUDA: max allocated; CPU: peak RSS of the process)",
    "ms_p50": "median latency, ms: per optimizer step (train), per forward call (infer, realtime)",
    "ms_p99": "99th percentile of the same latencies",
    "compiles": "graphs compiled during the timed repeats, XLA's or torch.compile's (0 = warm-up covered compilation)",
    "instance": "priced instance",
    "usd_per_hour": "$ per hour of one accelerator of that instance",
    "price_date": "date of that price",
    "usd_per_1m_tokens": "train: $ per 1M training tokens (n/a: no price)",
    "usd_per_1m_inferences": "infer, realtime: $ per 1M sequences (n/a: no price)",
    "load_avg": "1-minute load average of the host after the configuration",
}
MARK_START, MARK_END = "<!-- bench:report:start -->", "<!-- bench:report:end -->"


# ---------------------------------------------------------------------------- tables


def number(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def fmt(v, digits: int = 0) -> str:
    x = number(v)
    if x is None:
        return str(v) if v not in (None, "") else "—"
    return f"{x:,.{digits}f}"


def _money(v) -> str:
    x = number(v)
    return (str(v) or "—") if x is None else f"${x:.3g}" if x < 1 else f"${x:,.2f}"


def _bad(r: dict) -> str | None:
    return None if r["status"] == "ok" else ("OOM" if r["status"] == "oom" else "error")


def _key(r: dict, *extra) -> tuple:
    return (r["machine"], r["device"], r["preset"], r["dtype"], r["mode"], *extra)


def markdown(rows: list[dict]) -> str:
    """Markdown tables of rows (CSV rows: strings), grouped by machine and device."""
    out = []
    groups: dict[tuple, list] = {}
    for r in sort_rows(rows):
        groups.setdefault((r["machine"], r["device"]), []).append(r)
    for (machine, device), rs in groups.items():
        dates = sorted({r["date"] for r in rs})
        loads = [x for x in (number(r["load_avg"]) for r in rs) if x is not None]
        first = rs[0]
        cost = (f"{first['instance']} at ${number(first['usd_per_hour']):.4g}/h per accelerator "
                f"(price date {first['price_date']})" if number(first["usd_per_hour"]) else "no price: costs n/a")
        out.append(f"### {device}{' — ' + machine if machine else ''}\n\n"
                   f"Date {', '.join(dates)}; torch {first['torch']}, {first['dtype']}; {cost}; "
                   f"load average {min(loads, default=0):.1f}–{max(loads, default=0):.1f}.")
        out += [t for t in (_train_table(rs), _realtime_table(rs), _infer_table(rs)) if t]
    return "\n\n".join(out)


def _hf_of(rs: list[dict], impl: str = "hf") -> dict:
    return {_key(r, r["batch"], r["seq_len"]): r for r in rs if r["impl"] == impl and r["status"] == "ok"}


def _ratio(r: dict, hf: dict, field: str, also: str | None = None) -> str:
    other = hf.get(_key(r, r["batch"], r["seq_len"]))
    if r["impl"] != "ours" or other is None or r["status"] != "ok":
        return ""
    a, b = number(r[field]), number(other[field])
    text = f"{a / b:.2f}x" if a and b else ""
    if also and number(r[also]) and number(other[also]):
        text += f" ({number(r[also]) / number(other[also]):.2f}x CPU)"
    return text


def _train_table(rs: list[dict]) -> str:
    rs = [r for r in rs if r["mode"] == "train"]
    if not rs:
        return ""
    hf, grouped = _hf_of(rs), _hf_of(rs, "hf_grouped")
    lines = ["Training (forward + backward + AdamW step):", "",
             "| model | impl | params | B x L | residues/s | residues/CPU-s | tokens/s | padding | MFU "
             "| peak GiB | step ms p50 / p99 | $ / 1M tokens | ours / HF | ours / HF grouped |",
             "|---|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rs:
        bad = _bad(r)
        name = f"| {r['preset']} | {r['impl']} | {_params(r)} | {r['batch']} x {r['seq_len']} |"
        if bad:
            lines.append(f"{name} {bad} |" + " |" * 9 + (f" {r['status']} |" if bad == "error" else " |"))
            continue
        mfu = number(r["mfu"])
        lines.append(
            f"{name} {fmt(r['residues_per_s'])} | {fmt(r['residues_per_cpu_s'])} | {fmt(r['tokens_per_s'])} "
            f"| {number(r['padding']):.1%} | {f'{mfu:.1%}' if mfu is not None else r['mfu']} "
            f"| {fmt(r['mem_gib'], 2)} | {fmt(r['ms_p50'])} / {fmt(r['ms_p99'])} "
            f"| {_money(r['usd_per_1m_tokens'])} | {_ratio(r, hf, 'residues_per_s', 'residues_per_cpu_s')} "
            f"| {_ratio(r, grouped, 'residues_per_s', 'residues_per_cpu_s')} |")
    return "\n".join(lines)


def _realtime_table(rs: list[dict]) -> str:
    """Real time (batch 1, one sequence per call) next to the best batch of infer."""
    rt = [r for r in rs if r["mode"] == "realtime"]
    inf = [r for r in rs if r["mode"] == "infer" and r["status"] == "ok"]
    if not rt and not inf:
        return ""
    best: dict[tuple, dict] = {}
    for r in inf:
        k = (r["preset"], r["impl"], r["dtype"], r["seq_len"])
        if k not in best or number(r["seqs_per_s"]) > number(best[k]["seqs_per_s"]):
            best[k] = r
    realtime = {(r["preset"], r["impl"], r["dtype"], r["seq_len"]): r for r in rt}
    order = {p: i for i, p in enumerate(dict.fromkeys(r["preset"] for r in sort_rows(rs)))}
    keys = sorted({*realtime, *best}, key=lambda k: (order[k[0]], int(k[3]), k[1] != "ours", k[2]))
    lines = ["Inference (forward only): real time = one sequence per call; batch = the batch size "
             "with the most sequences/s:", "",
             "| model | impl | L | real time ms p50 / p99 | real time seq/s | best batch B "
             "| batch seq/s | batch residues/s | batch call ms p50 / p99 | peak GiB "
             "| $ / 1M inferences (batch) | ours / HF |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for k in keys:
        a, b = realtime.get(k), best.get(k)
        rt_cells = (f"{fmt(a['ms_p50'], 1)} / {fmt(a['ms_p99'], 1)} | {fmt(a['seqs_per_s'], 1)}"
                    if a and a["status"] == "ok" else f"{_bad(a) if a else '—'} | —")
        b_cells = (f"{b['batch']} | {fmt(b['seqs_per_s'], 1)} | {fmt(b['residues_per_s'])} "
                   f"| {fmt(b['ms_p50'])} / {fmt(b['ms_p99'])} | {fmt(b['mem_gib'], 2)} "
                   f"| {_money(b['usd_per_1m_inferences'])}" if b else "— | — | — | — | — | —")
        ratio = ""
        if k[1] == "ours":
            ha, hb = realtime.get((k[0], "hf", *k[2:])), best.get((k[0], "hf", *k[2:]))
            parts = []
            if a and ha and a["status"] == ha["status"] == "ok":
                parts.append(f"real time {number(ha['ms_p50']) / number(a['ms_p50']):.2f}x")
            if b and hb:
                parts.append(f"batch {number(b['seqs_per_s']) / number(hb['seqs_per_s']):.2f}x")
            ratio = ", ".join(parts)
        lines.append(f"| {k[0]} | {k[1]} | {k[3]} | {rt_cells} | {b_cells} | {ratio} |")
    return "\n".join(lines)


def _infer_table(rs: list[dict]) -> str:
    rs = [r for r in rs if r["mode"] == "infer"]
    if not rs:
        return ""
    hf, grouped = _hf_of(rs), _hf_of(rs, "hf_grouped")
    lines = ["Inference, every batch size (ours: B packed rows per call; HF: B padded sequences per call):", "",
             "| model | impl | B x L | seq/s | residues/s | residues/CPU-s | padding | seq per call "
             "| call ms p50 / p99 | peak GiB | $ / 1M inferences | ours / HF | ours / HF grouped |",
             "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rs:
        name = f"| {r['preset']} | {r['impl']} | {r['batch']} x {r['seq_len']} |"
        bad = _bad(r)
        if bad:
            lines.append(f"{name} {bad} |" + " |" * 9)
            continue
        lines.append(
            f"{name} {fmt(r['seqs_per_s'], 1)} | {fmt(r['residues_per_s'])} | {fmt(r['residues_per_cpu_s'])} "
            f"| {number(r['padding']):.1%} | {fmt(r['seqs_per_call'], 1)} | {fmt(r['ms_p50'], 1)} / "
            f"{fmt(r['ms_p99'], 1)} | {fmt(r['mem_gib'], 2)} | {_money(r['usd_per_1m_inferences'])} "
            f"| {_ratio(r, hf, 'seqs_per_s', 'residues_per_cpu_s')} "
            f"| {_ratio(r, grouped, 'seqs_per_s', 'residues_per_cpu_s')} |")
    return "\n".join(lines)


def _params(r: dict) -> str:
    n = number(r["params"])
    return "—" if n is None else f"{n / 1e6:,.1f}M"


def sort_rows(rows: list[dict]) -> list[dict]:
    """By model size, then length, batch size and implementation (ours next to its HF row)."""
    size: dict[str, float] = {}
    for r in rows:
        n = number(r["params"])
        if n is not None:
            size[r["preset"]] = min(size.get(r["preset"], n), n)
    order = {"ours": 0, "hf": 1, "hf_grouped": 2}
    return sorted(rows, key=lambda r: (size.get(r["preset"], float("inf")), r["preset"],
                                       int(r["seq_len"]), int(r["batch"]), order.get(r["impl"], 2)))


# ---------------------------------------------------------------------------- report


def load_rows(paths) -> tuple[list[dict], list[Path]]:
    """Rows of every CSV in `paths` (files or folders); of a configuration measured more than
    once, the row of the most recently written file (and the later row in a file) wins."""
    files = []
    for p in map(Path, paths):
        files += p.glob("*.csv") if p.is_dir() else [p] if p.is_file() else []
    files.sort(key=lambda f: f.stat().st_mtime)
    if not files:
        raise SystemExit(f"bench report: no CSV file in {', '.join(map(str, paths))}; run "
                         "`python bench.py` or `python bench.py sweep` first, or give --inputs.")
    latest = {}
    for f in files:
        with open(f, newline="") as fh:
            for r in csv.DictReader(fh):
                r = {k: r.get(k) or "" for k in COLUMNS}
                latest[tuple(r[k] for k in ("machine", "device", "preset", "impl", "dtype", "attn",
                                            "compiled", "mode", "batch", "seq_len"))] = r
    return list(latest.values()), files


def plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """PNGs of throughput and peak memory against batch size and against length: one panel per
    value of the other axis, one line per model, implementation and device; x marks an OOM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker
    from matplotlib.transforms import blended_transform_factory

    out_dir.mkdir(parents=True, exist_ok=True)
    colors: dict[str, str] = {}
    written = []
    for mode in ("train", "infer"):
        for x_key, panel_key in (("batch", "seq_len"), ("seq_len", "batch")):
            panels: dict[int, dict] = {}
            for r in rows:
                if r["mode"] == mode:
                    device = r["accelerator"] + (f" ({r['machine']})" if r["machine"] else "")
                    line = panels.setdefault(int(r[panel_key]), {}).setdefault(
                        (r["preset"], device, r["impl"]), [])
                    line.append((int(r[x_key]), r))
            shown = [p for p in sorted(panels) if any(len(v) > 1 for v in panels[p].values())][-5:]
            if not shown:
                continue
            n_lines = len({k for p in shown for k in panels[p]})
            fig, axes = plt.subplots(2, len(shown), figsize=(max(4.2 * len(shown), 7), 6 + 0.2 * n_lines),
                                     squeeze=False)
            for j, p in enumerate(shown):
                for (preset, device, impl), points in sorted(panels[p].items()):
                    color = colors.setdefault(f"{preset} {device}", f"C{len(colors) % 10}")
                    points.sort(key=lambda t: t[0])
                    ok = [(x, r) for x, r in points if r["status"] == "ok"]
                    oom = [x for x, r in points if r["status"] == "oom"]
                    style = dict(color=color, ls="-" if impl == "ours" else "--", marker="o", ms=3)
                    for i, field in enumerate(("residues_per_s", "mem_gib")):
                        ax = axes[i][j]
                        ax.plot([x for x, _ in ok], [number(r[field]) for _, r in ok],
                                label=f"{preset} {impl} · {device}", **style)
                        if oom:
                            mark = blended_transform_factory(ax.transData, ax.transAxes)
                            ax.plot(oom, [0.03] * len(oom), "x", color=color, ms=8, transform=mark)
                axes[0][j].set_title(f"{mode}, {'L' if panel_key == 'seq_len' else 'B'} = {p}", fontsize=9)
                xs = sorted({x for line in panels[p].values() for x, _ in line})
                for i, ylabel in enumerate(("real residues/s", "peak memory (GiB)")):
                    ax = axes[i][j]
                    ax.set_xscale("log", base=2)
                    ax.set_xticks(xs, [str(x) for x in xs])
                    ax.xaxis.set_minor_locator(ticker.NullLocator())
                    ax.set_yscale("log")
                    ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
                    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.4g}"))
                    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
                    ax.grid(True, which="major", alpha=0.3)
                    ax.set_xlabel("batch size B" if x_key == "batch" else "sequence length L", fontsize=8)
                    if j == 0:
                        ax.set_ylabel(ylabel, fontsize=8)
                    ax.tick_params(labelsize=7)
            handles, labels = [], []
            for ax in axes[0]:
                for h, lab in zip(*ax.get_legend_handles_labels()):
                    if lab not in labels:
                        handles.append(h)
                        labels.append(lab)
            fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7, frameon=False)
            fig.suptitle(f"{mode}: throughput and peak memory against "
                         f"{'batch size' if x_key == 'batch' else 'sequence length'} "
                         "(solid ours, dashed HF, x out of memory)", fontsize=9)
            fig.tight_layout(rect=(0, 0.04 + 0.025 * ((len(labels) + 1) // 2), 1, 0.96))
            path = out_dir / f"{mode}_vs_{x_key}.png"
            fig.savefig(path, dpi=72)
            plt.close(fig)
            written.append(path)
    return written


def write_section(path: Path, text: str) -> None:
    """Replaces what lies between the report markers of `path` (appends them if absent)."""
    old = path.read_text() if path.exists() else ""
    block = f"{MARK_START}\n{text}\n{MARK_END}"
    if MARK_START in old and MARK_END in old:
        new = old[:old.index(MARK_START)] + block + old[old.index(MARK_END) + len(MARK_END):]
    else:
        new = (old.rstrip("\n") + "\n\n" if old else "") + block + "\n"
    path.write_text(new)


def report(args) -> str:
    rows, files = load_rows(args.inputs or [args.out])
    rows = sort_rows(rows)
    pngs = plots(rows, Path(args.plots)) if args.plots else []
    text = markdown(rows)
    if args.benchmarks:
        bm = Path(args.benchmarks)
        links = " ".join(f"![{p.stem.replace('_', ' ')}]({os.path.relpath(p, bm.parent)})" for p in pngs)
        parts = [f"Generated by `python bench.py report` from {', '.join(f.name for f in files)}; "
                 "edit outside the bench:report markers only.", text]
        if links:
            parts.append("Plots (one line per model, implementation and device; solid ours, dashed "
                         "Hugging Face, x = out of memory):\n\n" + links)
        write_section(bm, "\n\n".join(parts))
    print(text)
    for p in pngs:
        print(f"wrote {p}")
    if args.benchmarks:
        print(f"rewrote the bench:report section of {args.benchmarks}")
    return text
