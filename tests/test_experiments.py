"""leaderboard.py experiments: every run log of a folder in one table (submissions/experiments.py),
from real logs of tiny train.py runs and edited copies of them; hostile values stay text in the
Markdown and the HTML; the HTML page sorts by a clicked column in a real browser (headless
Chromium; skipped without one, except under CI, where it fails)."""

import html
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import pytest
from train_support import ROOT, run_train, write_tiny_shards

from submissions.experiments import COLUMNS, collect, md_cell, write
from submissions.logparse import parse_text

RUN = ("--num_steps", "4", "--log_every", "1")
HOSTILE = '<script>alert(1)</script>|[x](javascript:a())`c` *e* <img onerror="b()">&amp;'  # < 80 chars
HOSTILE_NAME = "<img src=x onerror=alert(4)>|[y](javascript:z)"


def edit_config(text: str, **values) -> str:
    """The log's config block with keys set (replaced in place, or added at its end)."""
    head, sep, rest = text.partition("\nconfig\n" + "=" * 100 + "\n")
    block, bar, tail = rest.partition("\n" + "=" * 100 + "\nrun\n")
    for key, value in values.items():
        line = f"{key}: {value}"
        block, n = re.subn(rf"^{key}:.*(?:\n .*)*", lambda _, line=line: line, block, count=1, flags=re.M)
        if not n:
            block += "\n" + line
    return head + sep + block + bar + tail


def summary_time(text: str, seconds: str) -> str:
    return re.sub(r"^train_time:.*$", f"train_time:{seconds}s", text, count=1, flags=re.M)


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    """Two real runs (one straight, one with --crop split stopped half-way, kept so as `half`, then
    resumed to the end), and copies of the straight one edited into a masked-diffusion run, a
    hostile one, and two files that are no run logs."""
    tmp = tmp_path_factory.mktemp("experiments")
    data = write_tiny_shards(tmp / "data")
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(run_train, tmp, data, "base", *RUN),
                pool.submit(run_train, tmp, data, "part", *RUN, "--steps_this_run", "2", "--crop", "split")]
        for job in jobs:
            job.result()
    d = tmp / "logs"
    shutil.copy(d / "part.txt", d / "half.txt")  # stopped at step 2 of 4
    run_train(tmp, data, "part", *RUN, "--crop", "split", "--resume", "auto")  # and finished
    base = (d / "base.txt").read_bytes().decode()
    (d / "diffusion.txt").write_text(summary_time(edit_config(
        base, masked_diffusion="true", mask_rate_steps=2, attn_window=32, seed=7), "10.5"))
    hostile = edit_config(base, data=json.dumps(HOSTILE), model_args=json.dumps({"n_layers": 2, "k<b>": HOSTILE}))
    (d / f"{HOSTILE_NAME}.txt").write_text(summary_time(hostile, "9.5"))
    (d / "notes.txt").write_text("just some notes\n")
    (d / "binary.txt").write_bytes(b"\0\1\2")
    return d


def by_name(rows):
    return {r.path.stem: r for r in rows}


def test_every_log_gets_a_row(logs):
    rows = collect(logs)
    assert [r.path.stem for r in rows[-2:]] == ["binary", "notes"]  # the unreadable ones last
    assert rows[-1].text["note"] == "notes.txt is not a run log: its line 1 comes before any header block"
    assert rows[-2].text["note"] == "binary.txt holds binary data (NUL bytes), not a run log"
    assert all(r.unreadable for r in rows[-2:]) and not any(r.unreadable for r in rows[:-2])
    r = by_name(rows)
    base, log = r["base"], parse_text(logs / "base.txt")
    t = base.text
    assert t["date"] == str(log.environment["date"])[:16] and t["hardware"].startswith("1x CPU (")
    assert t["steps"] == "4" and t["batch"] == "512" and t["data"] == str(log.config["data"])
    assert t["params"] == f"{int(log.segments[0].notes['params']):,}"
    assert t["model"] == "sample d_ff=128 d_model=64 n_heads=2 n_layers=2"
    assert t["objective"] == "MLM all_mask 0.2" and t["note"] == ""
    assert t["val_loss"] == f"{float(log.summary['val_loss']):.4f}"
    assert t["test_loss"] == f"{float(log.summary['test_loss']):.4f}"
    assert base.value["time"] == float(log.summary["train_time"].rstrip("s"))
    assert "optim.warmup_steps=2" in t["switches"] and "crop=random" in t["switches"]  # crop differs between runs

    half = r["half"].text
    assert half["steps"] == "2 of 4" and half["note"] == "unfinished: no summary"
    assert half["test_loss"] == "n/a" and "crop=split" in half["switches"]
    part, log = r["part"], parse_text(logs / "part.txt")
    assert part.text["steps"] == "4" and part.text["note"] == "resumed 1x"
    assert part.value["test_loss"] == float(log.summary["test_loss"]) and part.value["steps"] == 4

    diff = r["diffusion"].text
    assert diff["objective"] == ("masked diffusion (a rate per sequence, loss / rate) after 2 steps of "
                                 "MLM all_mask 0.2")
    assert "attn_window=32" in diff["switches"] and diff["seed"] == "7" and diff["time"] == "10.5 s"
    assert "attn_window=0" in t["switches"]  # a key that differs between runs is listed for all of them
    assert "seed" not in t["switches"] and "masked_diffusion" not in diff["switches"]  # columns of their own


def test_the_command_writes_both_pages(logs, tmp_path):
    proc = subprocess.run([sys.executable, "leaderboard.py", "experiments", str(logs), "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (f"wrote {tmp_path / 'experiments.md'} and {tmp_path / 'experiments.html'}: "
                                   "5 runs, 2 unreadable files")
    md = (tmp_path / "experiments.md").read_text().splitlines()
    table = [ln for ln in md if ln.startswith("| ")]
    assert table[0] == "| " + " | ".join(t for _, t, _ in COLUMNS) + " |"
    assert len(table) == 1 + 7
    rel = Path(os.path.relpath(logs / "base.txt", tmp_path)).as_posix()
    assert any(ln.startswith(f"| [base]({quote(rel)}) | ") for ln in table) and rel.startswith("../")
    missing = subprocess.run([sys.executable, "leaderboard.py", "experiments", str(tmp_path / "nope")],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "nope is not a directory" in missing.stderr


class Elements(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.cells, self._cell = [], [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += attrs
        if tag == "td":
            self._cell = ""

    def handle_endtag(self, tag):
        if tag == "td":
            self.cells.append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def test_hostile_values_stay_text(logs, tmp_path):
    md_path, page, rows = write(logs, tmp_path)
    hostile = by_name(rows)[HOSTILE_NAME]
    assert hostile.text["data"] == " ".join(HOSTILE.split()) and "k<b>=" in hostile.text["model"]

    parsed = Elements()
    parsed.feed(page.read_text())
    assert set(parsed.tags) == {"html", "head", "meta", "title", "style", "body", "h1", "p", "code", "table",
                                "thead", "tr", "th", "tbody", "td", "a", "script"}
    assert parsed.tags.count("script") == 1 and parsed.tags.count("a") == 7  # ours, and a link per log
    assert not [k for k, _ in parsed.attrs if k.startswith("on")]
    assert all(v.startswith(("./", "../")) for k, v in parsed.attrs if k == "href")
    assert " ".join(HOSTILE.split()) in parsed.cells and HOSTILE_NAME in parsed.cells  # shown as text

    md = md_path.read_text()
    line = next(ln for ln in md.splitlines() if "alert(1)" in ln)
    assert "<" not in line and ">" not in line and "`" not in line.replace("\\`", "")
    assert line.count("|") == len(COLUMNS) + 1  # no cell broken
    # one link, the log's own: every other bracket is escaped
    assert len(re.findall(r"(?<!\\)\[", line)) == 1 and len(re.findall(r"(?<!\\)\]\(", line)) == 1
    assert html.unescape(md_cell("a|b<c>&d")) == "a|b<c>&d"


def test_values_that_break_the_parser_get_a_row(logs, tmp_path):
    base = (logs / "base.txt").read_text()
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "deep.txt").write_text(edit_config(base, data="[" * 20000 + "]" * 20000))
    (tmp_path / "logs" / "long.txt").write_text(edit_config(base, seed="9" * 5000))  # past int's str limit
    shutil.copy(logs / "base.txt", tmp_path / "logs")
    _, page, rows = write(tmp_path / "logs", tmp_path)
    assert [(r.path.stem, r.unreadable) for r in rows] == [("base", False), ("deep", True), ("long", True)]
    assert rows[1].text["note"].startswith("deep.txt ") and "long.txt" in page.read_text()


def chromium() -> str | None:
    found = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs chromium for the HTML test (apt-get install -y chromium; .ci/run does it as root)")
        pytest.skip("no chromium to load the page in (apt-get install -y chromium)")
    return found


# Clicks headers in the page as a user would, and writes the row order after each click into
# the DOM, which chromium --dump-dom prints.
CLICKS = """<script>
function order() { return Array.from(document.querySelectorAll("tbody tr")).map(function (tr) {
  return tr.cells[0].textContent; }); }
function click(key) { document.querySelector('th[data-key="' + key + '"]').click(); return order(); }
var out = {start: order(), time: click("time"), time_again: click("time"), log: click("log"),
           sorted: document.querySelector('th[data-key="log"]').getAttribute("aria-sort")};
var pre = document.createElement("pre"); pre.id = "result"; pre.textContent = JSON.stringify(out);
document.body.appendChild(pre);
</script></body>"""


def test_the_page_sorts_in_a_browser(logs, tmp_path):
    browser = chromium()
    _, page, rows = write(logs, tmp_path)
    clicked = tmp_path / "clicked.html"
    clicked.write_text(page.read_text().replace("</body>", CLICKS))
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'p'}",
                           "--dump-dom", clicked.as_uri()], capture_output=True, text=True, timeout=180)
    m = re.search(r'<pre id="result">(.*?)</pre>', proc.stdout)
    assert m, proc.stderr[-2000:]
    out = json.loads(html.unescape(m[1]))
    names = [r.path.stem for r in rows]
    assert out["start"] == names
    times = {r.path.stem: r.value.get("time") for r in rows}
    timed = sorted((n for n in names if times[n] is not None), key=lambda n: times[n])
    assert times["diffusion"] == 10.5 and times[HOSTILE_NAME] == 9.5  # numbers, not text: 9.5 < 10.5
    assert timed[-2:] == [HOSTILE_NAME, "diffusion"] and len(timed) == 5
    blanks = [n for n in names if times[n] is None]
    assert out["time"] == timed + blanks  # ascending, the files without a time last
    assert out["time_again"] == sorted(timed, key=lambda n: -times[n]) + blanks  # descending, blanks still last
    assert out["log"] == sorted(names) and out["sorted"] == "ascending"
