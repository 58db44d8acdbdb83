"""LEADERBOARD.md and its plots from the kept run logs, and loss curves of any runs.

Driven by `python leaderboard.py render|plot`; the checks of one log are in submissions/logcheck.py.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

from runtime.hardware import PRICE_TABLE_DATE, PRICES
from submissions.logcheck import Rejected, Verdict, verify
from submissions.logparse import NotARunLog, RunLogFile, parse_jsonl, parse_text, timeline
from submissions.tracks import TRACKS, Track

SEEDS_FOR_RECORD = 3  # logs_to_keep/README.md, "What a record needs"
# Config keys that name or place a run rather than make its recipe: runs that differ only in
# these (and the seed) are repeats of one submission.
RUN_KEYS = ("seed", "log_name", "log_dir", "checkpoint_dir", "resume", "steps_this_run", "wandb",
            "wandb_project", "data_cache", "config_file")


# ---------------------------------------------------------------------------------- render

def collect(logs: Path) -> tuple[list[Verdict], list[tuple[Path, str]]]:
    """Verifies every logs/*.txt: (verdicts, [(path, reason) of the rejected])."""
    verdicts, rejected = [], []
    for path in sorted(logs.glob("*.txt")):
        try:
            verdicts.append(verify(path))
        except NotARunLog as e:
            rejected.append((path, f"not a run log ({e})"))
        except Rejected as e:
            more = f" (and {len(e.problems) - 1} more problems)" if len(e.problems) > 1 else ""
            rejected.append((path, e.problems[0].removeprefix(f"{path.name} ").removeprefix(f"{path.name}: ") + more))
    return verdicts, rejected


def same_submission(a: Verdict, b: Verdict) -> bool:
    """Runs are repeats of one submission when track, hardware and recipe (the config apart
    from seed and output paths) are equal and every source both embed has the same sha256. A
    file only one of them embeds does not count: which modules a run imports can depend on the
    machine's state (the shipped sample is prepared, importing data/prepare.py, on first use)."""
    def recipe(v):
        return {k: x for k, x in v.log.config.items() if k not in RUN_KEYS}

    def code(v):
        return {s.path: s.sha256 for seg in v.log.segments for s in seg.sources}

    ca, cb = code(a), code(b)
    return ((a.track.name, a.hardware) == (b.track.name, b.hardware) and recipe(a) == recipe(b)
            and all(ca[p] == cb[p] for p in ca.keys() & cb.keys()))


def statuses(runs: list[Verdict]) -> tuple[dict[int, str], list[str]]:
    """Per run (by id) its record status, and the record lines of the track (the rules in
    logs_to_keep/README.md): a submission is confirmed when SEEDS_FOR_RECORD runs of it with
    distinct seeds all reach the target, its time being their mean; in the order they were run,
    a confirmed submission takes the record of its hardware when its mean beats the record's by
    more than the larger of the two spreads (slowest run - fastest run)."""
    groups: list[list[Verdict]] = []
    for v in runs:
        group = next((g for g in groups if same_submission(g[0], v)), None)
        if group is None:
            groups.append(group := [])
        group.append(v)
    status, confirmed = {}, []
    for group in groups:
        reached = [v for v in group if v.reached]
        seeds = {v.log.config.get("seed") for v in reached}
        missed = len(group) - len(reached)
        if len(seeds) >= SEEDS_FOR_RECORD and not missed:
            times = [v.score for v in reached]
            mean, spread = statistics.mean(times), max(times) - min(times)
            confirmed.append((max(str(v.log.environment.get("date")) for v in group), mean, spread, group))
            text = f"confirmed: mean {mean:.1f} s over {len(seeds)} seeds"
        else:
            text = f"unconfirmed: {len(seeds)} of {SEEDS_FOR_RECORD} seeds" + (
                f", {missed} run(s) missed the target" if missed else "")
        for v in group:
            status[id(v)] = text
    record = {}
    for date, mean, spread, group in sorted(confirmed, key=lambda c: c[0]):
        held = record.get(group[0].hardware)
        if held is None or mean < held[1] - max(spread, held[2]):
            record[group[0].hardware] = (date, mean, spread, group)
    lines = [f"Record on {hw}: **{mean:.1f} s**, mean of {len(g)} runs (spread {spread:.1f} s: "
             f"{', '.join(v.path.stem for v in g)})." for hw, (_, mean, spread, g) in sorted(record.items())]
    return status, lines


def _seconds(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.1f} s"


def _link(path: Path, out: Path) -> str:
    return f"[{path.stem}]({_rel(path, out)})"


def render(logs: Path, out: Path, plots: Path) -> tuple[list[Verdict], list]:
    """Verifies logs/*.txt and writes `out` (LEADERBOARD.md) and one plot per track into `plots`."""
    verdicts, rejected = collect(logs)
    md = ["# Leaderboard", "",
          f"Rebuilt by `python leaderboard.py render` from the verified run logs in `{logs.as_posix()}/` "
          "(do not edit by hand). The rules, the tracks and how to submit a run: "
          f"[{logs.as_posix()}/README.md]({_rel(logs / 'README.md', out)}). A score is the training time "
          "to the track's target validation loss on the named hardware (how it is measured: below).", ""]
    for track in sorted(TRACKS.values(), key=lambda t: t.data != "omg_prot50"):  # OMGprot50 first
        runs = [v for v in verdicts if v.track is not None and v.track.name == track.name]
        md += track_section(track, runs, out, plots)
    others = [v for v in verdicts if not v.reached]
    md += ["## Runs without a record", ""]
    md += _table(["log", "track", "why", "hardware", "train time", "warm-up", "tokens", "val loss", "test loss",
                  "date"],
                 [[_link(v.path, out), v.track.name if v.track else "-", v.why, v.hardware, _seconds(v.train_time),
                   _seconds(v.warmup_time), _count(v.tokens), f"{v.val_loss:.4f}", f"{v.test_loss:.4f}", v.date]
                  for v in others])
    md += ["", "## Rejected logs", ""]
    md += _table(["log", "reason"], [[_link(p, out), reason] for p, reason in rejected])
    md += ["", *FOOTER, ""]
    md += _table(["accelerator", "priced from", "$ per accelerator-hour", "terms", "date", "source"],
                 [[p.accelerator, p.instance, f"{p.usd_per_accelerator_hour:.4f}", p.terms, p.date, p.source]
                  for p in PRICES.values()])
    out.write_text("\n".join(md) + "\n")
    return verdicts, rejected


def track_section(track: Track, runs: list[Verdict], out: Path, plots: Path) -> list[str]:
    """A track's heading, record line, table of the runs that reached it (ranked) and plot."""
    dev = track.data != "omg_prot50"
    data = {"omg_prot50": "OMGprot50", "sample": "the shipped sample"}.get(track.data, f"`{track.data}`")
    md = [f"## {track.name}{' (development track)' if dev else ''}: validation loss ≤ {track.target} on {data}", "",
          f"> A development track on data `{track.data}`, for trying the pipeline on a CPU: its losses and "
          "times are not comparable with the OMGprot50 tracks." if dev else f"Target: {track.about}."]
    status, records = statuses(runs)
    if runs:
        md += ["", *(records or [f"No confirmed record yet (a record needs {SEEDS_FOR_RECORD} seeds)."])]
    md.append("")
    ranked = sorted((v for v in runs if v.reached), key=lambda v: v.score)
    if not ranked:
        md.append("_No verified run has reached this target yet._")
    md += _table(["#", "time to target", "warm-up", "hardware", "accelerator-hours", "est. cost", "parameters",
                  "tokens", "val loss", "test loss", "status", "date", "log"],
                 [[str(rank), _seconds(v.score), _seconds(v.warmup_time), v.hardware, f"{v.accelerator_hours:.4f}",
                   "n/a" if v.cost is None else f"${v.cost:,.2f}", _count(v.params), _count(v.score_tokens),
                   f"{v.score_val_loss:.4f}", f"{v.test_loss:.4f}", status[id(v)], v.date, _link(v.path, out)]
                  for rank, v in enumerate(ranked, start=1)], empty=None)
    if runs:
        picture = plot_track(track, runs, plots)
        md += ["", f"![{track.name}: validation loss against training time and tokens]({_rel(picture, out)})"]
    return md + [""]


def _table(header: list[str], rows: list[list[str]], empty: str | None = "_None._") -> list[str]:
    if not rows:
        return [empty] if empty else []
    cells = lambda row: "| " + " | ".join(str(c).replace("|", "/") for c in row) + " |"
    return [cells(header), "|" + "---|" * len(header), *(cells(r) for r in rows)]


FOOTER = [
    "## How the numbers are measured",
    "",
    "- **time to target** (the score): `train_time` of the run log at the first *full* validation "
    "(the whole validation split, `val_tokens` equal to the final evaluation's) whose loss is at or "
    "below the target. `train_time` counts the optimizer steps only: evaluation, checkpointing and "
    "the warm-up step of every process (compilation, caches; reported as **warm-up**) are left out.",
    "- **tokens**: real (non-padding) tokens trained on up to that step; **val loss**: that "
    "evaluation's; **test loss**: the final test evaluation's; **parameters**: all, embeddings included.",
    "- **hardware**: world size x accelerator, from the log's `device:` line (`runtime/hardware.py`); "
    "**accelerator-hours** = accelerators x time to target; **est. cost** = accelerator-hours x the "
    f"on-demand rate below (price table of {PRICE_TABLE_DATE} in `runtime/hardware.py`; `n/a` where "
    "the accelerator has no price).",
    "- **status**: a record needs 3 runs of one submission with distinct seeds, each reaching the target; "
    "its time is their mean. A single run is listed and ranked by its own time, unconfirmed.",
    "- Check any log yourself: `python leaderboard.py verify logs_to_keep/NAME.txt`; rebuild this page "
    "with `python leaderboard.py render`.",
]


def _count(n) -> str:
    return "n/a" if n is None else f"{n:,}"


def _rel(path: Path, out: Path) -> str:
    return Path(os.path.relpath(path.resolve(), out.resolve().parent)).as_posix()


# ---------------------------------------------------------------------------------- plots

def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("leaderboard.py: plotting needs matplotlib; pip install -r requirements.txt.") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_run(path: Path) -> RunLogFile:
    """The run's records for plotting: the .jsonl beside the text when there is one (unrounded
    numbers), else the text."""
    path = Path(path)
    jsonl = path.with_suffix(".jsonl")
    return parse_jsonl(jsonl) if jsonl.is_file() else parse_text(path)


def curves(path: Path) -> dict[str, list[tuple]]:
    """step: (step, tokens, train_time, loss, tok/s, warm-up?); val: (step, tokens, train_time, val_loss)."""
    lines = timeline(read_run(path))
    steps = {ln.step: ln for ln in lines if ln.kind == "step"}
    out = {"step": [(s, ln.num("tokens"), ln.num("train_time"), ln.num("loss"), ln.num("tok/s"), ln.warmup)
                    for s, ln in steps.items()], "val": []}
    for ln in lines:
        if ln.kind == "val" and ln.step in steps:
            at = steps[ln.step]
            out["val"].append((ln.step, at.num("tokens"), at.num("train_time"), ln.num("val_loss")))
    return out


def plot_track(track: Track, runs: list[Verdict], plots: Path) -> Path:
    """plots/<track>.png: validation loss against training time and tokens, a line per run."""
    plt = _pyplot()
    rows = (len(runs) + 2) // 2  # the legend, two columns under the panels (runs + the target)
    legend_in = 0.17 * rows + 0.15
    fig, (by_time, by_tokens) = plt.subplots(1, 2, figsize=(12, 4.5 + legend_in))
    colors = plt.get_cmap("tab20" if len(runs) > 10 else "tab10").colors
    for i, v in enumerate(runs):
        val = curves(v.path)["val"]
        style = dict(marker="o", color=colors[i % len(colors)], label=f"{v.path.stem} ({v.hardware})")
        by_time.plot([x[2] for x in val], [x[3] for x in val], **style)
        by_tokens.plot([x[1] for x in val], [x[3] for x in val], **style)
    for ax, xlabel in ((by_time, "training time (s, warm-up excluded)"), (by_tokens, "tokens")):
        ax.axhline(track.target, color="black", linestyle="--", linewidth=1, label=f"target {track.target}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
    fig.legend(*by_time.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"{track.name}: validation loss (partial evaluations included)")
    fig.tight_layout(rect=(0, legend_in / (4.5 + legend_in), 1, 1))
    plots.mkdir(parents=True, exist_ok=True)
    out = plots / f"{track.name}.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_runs(paths: list[Path], out: Path) -> Path:
    """Training and validation loss against tokens, and tok/s against step, a line per run."""
    plt = _pyplot()
    fig, (loss, val, speed) = plt.subplots(1, 3, figsize=(16, 4.5))
    for path in paths:
        c = curves(path)
        name = Path(path).stem
        loss.plot([x[1] for x in c["step"]], [x[3] for x in c["step"]], label=name)
        val.plot([x[1] for x in c["val"]], [x[3] for x in c["val"]], marker="o", label=name)
        timed = [x for x in c["step"] if not x[5]]  # warm-up steps measure compilation, not speed
        speed.plot([x[0] for x in timed], [x[4] for x in timed], label=name)
    for ax, xlabel, ylabel in ((loss, "tokens", "training loss"), (val, "tokens", "validation loss"),
                               (speed, "step", "tokens/s (real tokens)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    loss.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
