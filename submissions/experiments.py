"""The experiments table: every run log of a folder in one table, as Markdown and as a
self-contained HTML page with sortable columns (`python leaderboard.py experiments LOG_DIR`).

Unlike LEADERBOARD.md it verifies nothing and ranks nothing: it lists what each run was
(date, hardware, steps, batch, data, model and switches, objective) and what it got (final
validation and test loss, training time), so that ablations can be compared side by side.
Logs are untrusted input: they are read through submissions/logparse.py (bounded, never
executed) and every value is escaped on the way out; a file that cannot be read gets a row
saying why.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from runtime.hardware import hardware_label
from submissions.board import RUN_KEYS, _count, _seconds, _table
from submissions.logparse import NotARunLog, RunLogFile, number, parse_text, timeline

# Config keys with a column of their own, and keys that change how a run is logged, evaluated
# or saved but not what it trains: neither is listed among a run's switches.
IN_COLUMNS = ("model", "model_args", "optim", "data", "seed", "batch_size", "num_steps", "mask_rule", "mask_rate",
              "mask_rate_start", "mask_rate_steps", "masked_diffusion", "diffusion_rate_per")
NOT_RECIPE = ("device", "track", "log_every", "eval_every", "eval_batch_size", "eval_max_batches",
              "save_every", "keep_checkpoints", "max_skipped_steps", "num_chunks")
# Training switches listed whenever a run sets them (other keys only where the runs differ).
FEATURES = ("attn_window", "attn_window_start", "attn_window_steps", "align_docs")
MAX_VALUE_CHARS = 80  # one switch's value in the table; a longer one is cut with "..."

# (key, title, numeric): the columns, in order
COLUMNS = (("log", "log", False), ("date", "date", False), ("hardware", "hardware", False),
           ("params", "parameters", True), ("steps", "steps", True), ("batch", "batch (tokens)", True),
           ("data", "data", False), ("seed", "seed", True), ("model", "model", False), ("switches", "switches", False),
           ("objective", "objective", False), ("val_loss", "val loss", True),
           ("test_loss", "test loss", True), ("time", "train time", True), ("note", "note", False))


@dataclass
class Row:
    path: Path
    text: dict = field(default_factory=dict)  # column key -> what the cell shows
    value: dict = field(default_factory=dict)  # column key -> number it sorts by (numeric columns)
    config: dict = field(default_factory=dict)
    unreadable: bool = False  # not a run log, or one whose values cannot be tabulated


def collect(logs: Path) -> list[Row]:
    """A row per logs/*.txt, by date; the ones that are not run logs last, saying why."""
    rows, bad = [], []
    for path in sorted(logs.glob("*.txt")):
        try:
            rows.append(row(path, parse_text(path)))
        except NotARunLog as e:  # its message names the file and the fault
            bad.append(Row(path, {"log": path.stem, "note": str(e).replace(str(path), path.name)}, unreadable=True))
        except (TypeError, ValueError, ArithmeticError, AttributeError, RecursionError) as e:  # odd values
            why = f"{path.name} has values that cannot be tabulated ({type(e).__name__}: {e})"
            bad.append(Row(path, {"log": path.stem, "note": why}, unreadable=True))
    varying = _varying_keys([r.config for r in rows])
    for r in rows:
        r.text["switches"] = ", ".join(switches(r.config, varying))
    rows.sort(key=lambda r: (r.text["date"], r.path.name))
    return rows + bad


def row(path: Path, log: RunLogFile) -> Row:
    cfg, env = log.config, log.environment
    lines = timeline(log)
    steps = [ln for ln in lines if ln.kind == "step" and ln.step is not None]
    summary = log.summary or {}
    last_step = steps[-1].step if steps else None
    total = _int(cfg.get("num_steps"))
    val = _value(summary.get("val_loss")) if log.summary else _last(lines, "val", "val_loss")
    test = _value(summary.get("test_loss")) if log.summary else _last(lines, "test", "test_loss")
    time = _value(summary.get("train_time")) if log.summary else _last(lines, "step", "train_time")
    params = _int(log.segments[0].notes.get("params"))
    try:
        hardware = hardware_label(str(env.get("device", "")))
    except ValueError:
        hardware = str(env.get("device", "?"))
    note = "" if log.summary else "unfinished: no summary"
    if len(log.segments) > 1:
        note = ", ".join(filter(None, [note, f"resumed {len(log.segments) - 1}x"]))
    r = Row(path, config=cfg)
    r.text = {
        "log": path.stem, "date": str(env.get("date", "?"))[:16], "hardware": hardware,
        "params": _count(params), "data": _fmt(cfg.get("data", "?")), "seed": _fmt(cfg.get("seed", "?")),
        "steps": "n/a" if last_step is None else f"{last_step} of {total}" if total and last_step != total
        else str(last_step),
        "batch": _count(_int(cfg.get("batch_size"))),
        "model": " ".join([_fmt(cfg.get("model", "?")), *(f"{k}={_fmt(v)}" for k, v in _items(cfg.get("model_args")))]),
        "objective": objective(cfg),
        "val_loss": _loss(val), "test_loss": _loss(test), "time": _seconds(time), "note": note,
    }
    r.value = {"params": params, "steps": last_step, "batch": _int(cfg.get("batch_size")), "seed": _int(cfg.get("seed")),
               "val_loss": val, "test_loss": test, "time": time}
    return r


def objective(cfg: dict) -> str:
    """The training objective in words, from the masking keys of the config."""
    rate, start, steps = cfg.get("mask_rate"), cfg.get("mask_rate_start") or 0, cfg.get("mask_rate_steps") or 0
    mlm = f"MLM {_fmt(cfg.get('mask_rule', '?'))} {_fmt(rate)}"
    if start and steps:
        mlm += f" (from {_fmt(start)} over {_fmt(steps)} steps)"
    if not cfg.get("masked_diffusion"):
        return mlm
    text = f"masked diffusion (a rate per {_fmt(cfg.get('diffusion_rate_per', 'sequence'))}, loss / rate)"
    return f"{text} after {_fmt(steps)} steps of {mlm}" if steps else text


def switches(cfg: dict, varying: set[str]) -> list[str]:
    """The run's training switches: optim overrides, the feature keys it sets, and every other
    recipe key whose value differs between the runs of the table."""
    out = [f"optim.{k}={_fmt(v)}" for k, v in _items(cfg.get("optim"))]
    for key, value in cfg.items():
        if key in varying or (key in FEATURES and value not in (None, False, 0, "")):
            out.append(f"{key}={_fmt(value)}")
    return out


def _varying_keys(configs: list[dict]) -> set:
    keys = {k for c in configs for k in c} - set(IN_COLUMNS) - set(NOT_RECIPE) - set(RUN_KEYS)
    # a key missing from some logs (written before it existed) varies only if the logs that
    # hold it disagree: the older runs ran at its default, which the newer ones name
    return {k for k in keys if len({_canonical(c[k]) for c in configs if k in c}) > 1}


def _canonical(v) -> str:
    try:
        return json.dumps(v, sort_keys=True, default=str)
    except (TypeError, ValueError):  # keys of mixed types cannot be sorted
        return repr(v)[: 4 * MAX_VALUE_CHARS]


def _items(d) -> list[tuple]:
    return sorted(d.items(), key=lambda kv: str(kv[0])) if isinstance(d, dict) else []


def _fmt(v) -> str:
    """A config value, compact and bounded: YAML scalars as written, anything else as JSON."""
    try:
        text = (str(v).lower() if isinstance(v, bool) else f"{v:g}" if isinstance(v, float)
                else str(v) if isinstance(v, (int, str)) else _canonical(v))
    except (ValueError, RecursionError):  # an integer too long to print, a structure too deep
        return "(unprintable)"
    text = " ".join(text.split())
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 3] + "..."


def _value(raw) -> float | None:
    try:
        return number(raw)
    except ValueError:
        return None


def _int(raw) -> int | None:
    v = _value(raw) if not isinstance(raw, bool) else None
    return int(v) if v is not None and v == v and abs(v) < 2**63 and v == int(v) else None


def _last(lines, kind: str, key: str) -> float | None:
    found = [ln for ln in lines if ln.kind == kind]
    return _value(found[-1].fields.get(key)) if found else None


def _loss(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


# ---------------------------------------------------------------------------------- output

def write(logs: Path, out: Path) -> tuple[Path, Path, list[Row]]:
    """experiments.md and experiments.html of every run log in `logs`, into `out`."""
    rows = collect(logs)
    out.mkdir(parents=True, exist_ok=True)
    md, page = out / "experiments.md", out / "experiments.html"
    md.write_text(markdown(rows, logs, md))
    page.write_text(html_page(rows, logs, page))
    return md, page, rows


def _title(logs: Path) -> str:
    return f"Experiments in {logs.as_posix()}/"


def _href(path: Path, out: Path) -> str:
    """The log's address relative to the page, percent-encoded and starting with ./ (so a file
    named like `javascript:...` stays a relative link)."""
    rel = Path(os.path.relpath(path.resolve(), out.resolve().parent)).as_posix()
    return quote(rel if rel.startswith("../") else f"./{rel}")


def md_cell(text: str) -> str:
    """Text that Markdown shows as it is: no HTML, links, code or emphasis, no cell breaks."""
    text = " ".join(str(text).split())
    for ch in "\\`*[]~":
        text = text.replace(ch, "\\" + ch)
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "&#124;")


def markdown(rows: list[Row], logs: Path, out: Path) -> str:
    cells = []
    for r in rows:
        line = [md_cell(r.text.get(k, "")) for k, _, _ in COLUMNS]
        line[0] = f"[{line[0]}]({_href(r.path, out)})"
        cells.append(line)
    head = [f"# {md_cell(_title(logs))}", "",
            f"Rebuilt by `python leaderboard.py experiments` from {len(rows)} log file(s); nothing here is "
            "verified (`python leaderboard.py verify LOG` checks one). Sortable: "
            f"[{quote(out.with_suffix('.html').name)}](./{quote(out.with_suffix('.html').name)}).", ""]
    return "\n".join([*head, *_table([t for _, t, _ in COLUMNS], cells), ""])


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
th { background: #f3f3f3; cursor: pointer; user-select: none; white-space: nowrap; position: sticky; top: 0; }
th[aria-sort=ascending]::after { content: " \\25B2"; }
th[aria-sort=descending]::after { content: " \\25BC"; }
tbody tr:nth-child(even) { background: #fafafa; }
td.switches, td.model, td.objective { max-width: 28em; }
td.objective { min-width: 14em; }
td.note { min-width: 16em; }
td.log, td.date, td.hardware { white-space: nowrap; }
"""

# Click a header: sort by it (numbers as numbers, blanks last), again: reverse.
SCRIPT = """
document.querySelectorAll("th").forEach(function (th, col) {
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0];
    var down = th.getAttribute("aria-sort") === "ascending";
    document.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", down ? "descending" : "ascending");
    var numeric = th.dataset.numeric === "1";
    var rows = Array.from(body.rows);
    function key(tr) { var v = tr.cells[col].dataset.v; return numeric ? parseFloat(v) : v; }
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      var bx = numeric ? isNaN(x) : x === "", by = numeric ? isNaN(y) : y === "";
      if (bx || by) return bx - by;
      var c = numeric ? x - y : x.localeCompare(y);
      return down ? -c : c;
    });
    rows.forEach(function (tr) { body.appendChild(tr); });
  });
});
"""


def html_page(rows: list[Row], logs: Path, out: Path) -> str:
    e = html.escape
    head = "".join(f'<th data-key="{k}" data-numeric="{int(num)}">{e(t)}</th>' for k, t, num in COLUMNS)
    body = []
    for r in rows:
        tds = []
        for k, _, num in COLUMNS:
            text = r.text.get(k, "")
            v = r.value.get(k) if num else text
            sort = "" if v is None else repr(float(v)) if num else v
            cell = f'<a href="{e(_href(r.path, out))}">{e(text)}</a>' if k == "log" else e(text)
            tds.append(f'<td class="{k}{" num" if num else ""}" data-v="{e(sort)}">{cell}</td>')
        body.append("<tr>" + "".join(tds) + "</tr>")
    title = e(_title(logs))
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">",
        f"<title>{title}</title><style>{STYLE}</style></head><body>",
        f"<h1>{title}</h1>",
        f"<p>{len(rows)} log file(s), rebuilt by <code>python leaderboard.py experiments</code>; nothing here is "
        "verified (<code>python leaderboard.py verify LOG</code> checks one). Click a column to sort by it, "
        "again to reverse.</p>",
        f"<table><thead><tr>{head}</tr></thead><tbody>", *body, "</tbody></table>",
        f"<script>{SCRIPT}</script></body></html>", ""])
