"""A submitted run log is untrusted input: `leaderboard.py verify` and `render` refuse a huge
one-line file, binary junk, a link, YAML aliases and embedded source names that point outside
the project, each in one sentence, in bounded memory, opening no file outside the checkout and
the log itself."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import pytest
from train_support import ROOT

from submissions.logcheck import verify
from submissions.logparse import (
    BAR,
    MAX_LINE_CHARS,
    MAX_LOG_BYTES,
    NotARunLog,
    parse_jsonl,
    parse_text,
)

KEPT = ROOT / "logs_to_keep" / "sample-cpu-2core-s0.txt"
AUDITED = textwrap.dedent("""\
    import json, os, runpy, sys
    opened = []
    def hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(args[0]))
    sys.addaudithook(hook)
    sys.argv = ["leaderboard.py", *sys.argv[1:]]
    code = 0
    try:
        runpy.run_path("leaderboard.py", run_name="__main__")
    except SystemExit as e:
        code = e.code
    print("OPENED " + json.dumps(opened))
    sys.exit(code)
""")


def leaderboard(*argv: str, env: dict | None = None, timeout: int = 60):
    """Runs leaderboard.py in a fresh process that records every file it opens."""
    proc = subprocess.run([sys.executable, "-c", AUDITED, *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    opened = json.loads(proc.stdout.rsplit("OPENED ", 1)[1])
    return proc, [Path(os.path.abspath(os.path.join(ROOT, p))) for p in opened]


def outside(opened: list[Path], *allowed: Path) -> list[Path]:
    """Opened files that are neither in the checkout, nor the given logs, nor Python's own."""
    roots = [ROOT, *{Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}]
    return [p for p in opened if p not in allowed and not any(p.is_relative_to(r) for r in roots)]


def one_sentence(proc) -> str:
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr and len(err.splitlines()) == 1, proc.stderr[-2000:]
    return err


def with_source_named(tmp_path: Path, name: str) -> Path:
    """The kept log with the title of its first embedded source renamed (its hash still holds)."""
    text = KEPT.read_text()
    first = re.search(r"^source: (\S+) sha256:", text, re.M)
    out = tmp_path / "renamed.txt"
    out.write_text(text.replace(f"source: {first[1]} sha256:", f"source: {name} sha256:", 1))
    return out


def test_the_kept_log_verifies_and_opens_nothing_outside(tmp_path):
    """The control: a genuine log passes under the same audit, so the refusals below are the
    checks' doing."""
    log = tmp_path / KEPT.name
    shutil.copy(KEPT, log)
    shutil.copy(KEPT.with_suffix(".jsonl"), log.with_suffix(".jsonl"))
    proc, opened = leaderboard("verify", str(log))
    assert proc.returncode == 0 and "verified" in proc.stdout, proc.stderr
    assert log in opened and log.with_suffix(".jsonl") in opened
    assert outside(opened, log, log.with_suffix(".jsonl")) == []


def test_a_100_mb_line_is_refused_before_it_is_read(tmp_path):
    log = tmp_path / "huge.txt"
    with open(log, "wb") as f:
        for _ in range(100):
            f.write(b"x" * 2**20)
    tracemalloc.start()
    with pytest.raises(NotARunLog, match="100 MiB, more than a run log may be"):
        verify(log)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2**20, f"verify held {peak:,} bytes for a file it should not read"
    proc, opened = leaderboard("verify", str(log))
    assert proc.returncode == 2 and "huge.txt is 100 MiB" in one_sentence(proc)
    assert outside(opened, log) == []


def test_an_overlong_line_under_the_size_limit_is_refused(tmp_path):
    text = KEPT.read_text()
    log = tmp_path / "long.txt"
    log.write_text(text.replace("\nstep:10/640 ", "\nstep:10/640 " + "a" * MAX_LINE_CHARS + " ", 1))
    assert log.stat().st_size < MAX_LOG_BYTES
    with pytest.raises(NotARunLog, match=r"long.txt line \d+ is longer than any line of a run log"):
        parse_text(log)


@pytest.mark.parametrize("junk", [os.urandom(1 << 16) + b"\0", bytes(range(1, 256)) * 64],
                         ids=["with-nul", "no-nul"])
def test_binary_junk_is_refused_in_one_sentence(tmp_path, junk):
    log = tmp_path / "junk.txt"
    log.write_bytes(junk)
    proc, opened = leaderboard("verify", str(log))
    assert proc.returncode == 2 and "junk.txt" in one_sentence(proc)
    assert outside(opened, log) == []


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/hostname", "data/../../outside.py",
                                  "~/.ssh/id_rsa", "C:/Windows/x.py", "a\\..\\b.py"])
def test_embedded_names_outside_the_project_are_refused(tmp_path, name):
    log = with_source_named(tmp_path, name)
    with pytest.raises(NotARunLog, match="is not a path inside the project"):
        parse_text(log)
    proc, opened = leaderboard("verify", str(log))
    assert proc.returncode == 2 and "not a path inside the project" in one_sentence(proc)
    assert outside(opened, log) == []


def test_render_rejects_every_hostile_log_and_opens_nothing_outside(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    shutil.copy(KEPT, logs / KEPT.name)
    shutil.copy(with_source_named(tmp_path, "/etc/hostname"), logs / "abs.txt")
    (logs / "junk.txt").write_bytes(b"\0" * 100)
    (logs / "link.txt").symlink_to(KEPT)
    out = tmp_path / "BOARD.md"
    mpl = tmp_path / "matplotlib"  # matplotlib's own font cache, kept out of the home folder
    proc, opened = leaderboard("render", "--logs", str(logs), "--out", str(out), "--plots",
                               str(tmp_path / "plots"), env={"MPLCONFIGDIR": str(mpl)})
    assert proc.returncode == 0, proc.stderr
    rejected = sorted(re.findall(r"^rejected \S+/(\S+):", proc.stderr, re.M))
    assert rejected == ["abs.txt", "junk.txt", "link.txt"]
    assert "symbolic link" in proc.stderr and KEPT.stem in out.read_text()
    made = [*logs.iterdir(), out, *(tmp_path / "plots").glob("*")]
    # matplotlib reads the system's fonts and keeps its cache (and a lock beside it) in mpl
    plotting = [p for p in opened if p.is_relative_to(mpl) or p.suffix.lower() in (".ttf", ".otf", ".ttc", ".afm")]
    assert outside(opened, *made, *plotting) == []
    assert KEPT not in opened  # the link's target is not followed


def test_yaml_aliases_in_the_config_are_refused(tmp_path):
    """A few lines of anchors and aliases can stand for an exponentially large structure."""
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi"))
    text = KEPT.read_text()
    start = text.index(f"{BAR}\nconfig\n{BAR}\n") + len(f"{BAR}\nconfig\n{BAR}\n")
    log = tmp_path / "bomb.txt"
    log.write_text(text[:start] + bomb + text[start:])
    with pytest.raises(NotARunLog, match="the config block is not a YAML mapping"):
        parse_text(log)


@pytest.mark.parametrize("value", ["9" * 5000, "[" * 5000 + "]" * 5000], ids=["huge-int", "deep-nesting"])
def test_a_config_value_that_breaks_the_yaml_parser_is_refused(tmp_path, value):
    """An integer past Python's digit limit raises ValueError, deep nesting RecursionError,
    inside the YAML parser: both are "not a mapping", never a traceback."""
    text = KEPT.read_text()
    start = text.index(f"{BAR}\nconfig\n{BAR}\n") + len(f"{BAR}\nconfig\n{BAR}\n")
    log = tmp_path / "hostile.txt"
    log.write_text(text[:start] + f"zz: {value}\n" + text[start:])
    with pytest.raises(NotARunLog, match="the config block is not a YAML mapping"):
        parse_text(log)


def test_a_jsonl_line_that_is_not_an_object_is_refused(tmp_path):
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text(KEPT.with_suffix(".jsonl").read_text() + "[1, 2]\n")
    with pytest.raises(NotARunLog, match="is not a JSON object"):
        parse_jsonl(jsonl)
