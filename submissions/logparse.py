"""Reading the run log (training/runlog.py writes it) back: the text file a run submits and the
JSON-lines file beside it, into one structure that leaderboard.py checks, ranks and plots.

The text file is a sequence of blocks, each opened by a title between two bars of 100 '=':
`source: PATH sha256:HEX` (the file's text), `environment`, `config` (YAML), `run` (notes,
then the `key:value` step/eval lines and messages), `summary`. A resumed run appends another
header (sources, environment, config, run) and goes on, so a log has one or more *segments*,
one per process that wrote it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

BAR = "=" * 100
SOURCE_TITLE = re.compile(r"^source: (?P<path>\S+) sha256:(?P<sha>[0-9a-f]{64})$")
TITLES = ("environment", "config", "run", "summary")
NOTE = re.compile(r"^(?P<key>[A-Za-z_][\w]*): (?P<value>.*)$")  # `params: 123` (a field is `key:value`)
NUMBER = re.compile(r"^(?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE](?P<exp>[-+]?\d+))?)(?:ms|s|GiB)?$")


# A log is untrusted input: these bound the time and memory spent on one before it is refused.
# A 500k-step run logging every 10 steps writes about 13 MB; raise --log_every past the limit.
MAX_LOG_BYTES = 64 * 2**20
MAX_LINE_CHARS = 64 * 2**10  # the longest line train.py writes (a .jsonl header) is ~2 KB


class NotARunLog(ValueError):
    """The file is missing or is not a run log at all (leaderboard.py exits 2)."""


def number(raw) -> float | None:
    """A field's value as a float: `0.4s`, `35.1ms`, `0.34GiB`, `5.000e-02`, `12/12` (the step),
    a JSON number; None for `n/a`/null. Raises ValueError for anything else."""
    if raw is None or raw == "n/a":
        return None
    if isinstance(raw, bool):
        raise ValueError(f"{raw!r} is not a number")
    if isinstance(raw, (int, float)):
        return float(raw)
    text = str(raw).split("/")[0]
    if text in ("nan", "inf", "-inf"):
        return float(text)
    m = NUMBER.match(text)
    if not m:
        raise ValueError(f"{raw!r} is not a number")
    return float(m["num"])


def half_unit(raw) -> float:
    """Half a unit in the last printed digit (`2.6451` -> 5e-5, `0.4s` -> 0.05, `7910` -> 0.5,
    `5.000e-02` -> 5e-6): how far a printed value may be from the number it rounds. 0 for JSON."""
    if not isinstance(raw, str):
        return 0.0
    m = NUMBER.match(raw.split("/")[0])
    if not m:
        return 0.0
    mantissa = m["num"].split("e")[0].split("E")[0]
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    return 0.5 * 10.0 ** (int(m["exp"] or 0) - decimals)


def agree(a, b) -> bool:
    """Two values of one quantity (printed strings or JSON numbers) agree within printing precision."""
    x, y = number(a), number(b)
    if x is None or y is None:
        return x is None and y is None
    if math.isnan(x) or math.isnan(y):
        return math.isnan(x) and math.isnan(y)
    return abs(x - y) <= half_unit(a) + half_unit(b) + 1e-9 * max(1.0, abs(x), abs(y))


@dataclass
class Source:
    path: str
    sha256: str
    text: str  # as embedded: the file's text with its trailing newlines cut to exactly one
    lineno: int


@dataclass
class Line:
    """A step line, a validation (`val`) or test evaluation line, or a message."""

    kind: str  # "step" | "val" | "test" | "message"
    fields: dict  # key -> value as printed (text) or as recorded (JSON)
    lineno: int  # line of the .txt, or record number of the .jsonl (1-based)
    segment: int
    text: str = ""

    @property
    def step(self) -> int | None:
        v = self.fields.get("step")
        try:
            return None if v is None else int(number(v))
        except ValueError:
            return None

    def num(self, key: str) -> float | None:
        return number(self.fields.get(key))

    @property
    def warmup(self) -> bool:
        return self.kind == "step" and self.fields.get("warmup_time") is not None


@dataclass
class Segment:
    """One process's part of the log: its header and the lines it wrote."""

    index: int
    lineno: int  # where its header starts
    sources: list[Source] = field(default_factory=list)
    environment: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)
    lines: list[Line] = field(default_factory=list)

    def resumed_from(self) -> int | None:
        """The checkpoint step this segment resumed from (`resumed_from: .../step_000120`)."""
        m = re.search(r"step_(\d+)/?$", str(self.notes.get("resumed_from", "-")))
        return int(m[1]) if m else None

    def step_lines(self) -> list[Line]:
        return [ln for ln in self.lines if ln.kind == "step"]


@dataclass
class RunLogFile:
    path: Path
    segments: list[Segment]
    summaries: list[tuple[int, dict]]  # (line, key -> value); one for a finished run
    stray: list[tuple[int, str]] = field(default_factory=list)  # summary lines that are not key:value

    @property
    def summary(self) -> dict | None:
        return self.summaries[-1][1] if self.summaries else None

    @property
    def config(self) -> dict:
        return self.segments[-1].config

    @property
    def environment(self) -> dict:
        return self.segments[0].environment

    def lines(self) -> list[Line]:
        return [ln for seg in self.segments for ln in seg.lines]


def parse_line(text: str, lineno: int, segment: int) -> Line:
    """A `key:value ...` line, or a message (`checkpoint:PATH`, `step:12 skipped: ...`, ...)."""
    fields = {}
    for token in text.split(" "):
        key, sep, value = token.partition(":")
        if not sep or not key or key in fields:
            fields = {}
            break
        fields[key] = value
    kind = ("step" if "loss" in fields else "val" if "val_loss" in fields
            else "test" if "test_loss" in fields else "message")
    if kind == "message":  # a message about a step keeps the step, so a resume can drop it
        m = re.match(r"step:(\d+)\b", text)
        fields = {"step": m[1]} if m else {}
    return Line(kind, fields, lineno, segment, text)


def _blocks(text: str, path: Path) -> list[tuple[str, int, list[str]]]:
    """(title, line of the title, body lines) of every block; a block opens with BAR, a known
    title, BAR (a source file holding such three lines would confuse this; none does)."""
    rows = text.split("\n")
    if rows and rows[-1] == "":
        rows.pop()
    blocks, i = [], 0
    while i < len(rows):
        if i + 2 < len(rows) and rows[i] == BAR and rows[i + 2] == BAR and \
                (rows[i + 1] in TITLES or SOURCE_TITLE.match(rows[i + 1])):
            blocks.append((rows[i + 1], i + 2, []))
            i += 3
            continue
        if not blocks:
            raise NotARunLog(f"{path} is not a run log: its line {i + 1} comes before any header block")
        blocks[-1][2].append(rows[i])
        i += 1
    return blocks


def read_bounded(path: Path) -> bytes:
    """The bytes of a log file, refused in one sentence (NotARunLog) before anything is parsed
    when it is missing, a link, larger than MAX_LOG_BYTES, binary, or has an overlong line."""
    if path.is_symlink():
        raise NotARunLog(f"{path} is a symbolic link; pass the log file itself")
    if not path.is_file():
        raise NotARunLog(f"{path} does not exist")
    limit = f"{MAX_LOG_BYTES // 2**20} MiB"
    if path.stat().st_size > MAX_LOG_BYTES:
        raise NotARunLog(f"{path} is {path.stat().st_size / 2**20:,.0f} MiB, more than a run log may be "
                         f"({limit}); a longer run must log less often (--log_every)")
    with open(path, "rb") as f:
        raw = f.read(MAX_LOG_BYTES + 1)  # the file may have grown since stat
    if len(raw) > MAX_LOG_BYTES:
        raise NotARunLog(f"{path} is more than a run log may be ({limit})")
    if b"\0" in raw:
        raise NotARunLog(f"{path} holds binary data (NUL bytes), not a run log")
    long = re.search(rb"[^\n]{%d}" % (MAX_LINE_CHARS + 1), raw)
    if long:
        line = raw.count(b"\n", 0, long.start()) + 1
        raise NotARunLog(f"{path} line {line} is longer than any line of a run log "
                         f"({MAX_LINE_CHARS:,} characters)")
    return raw


def _source_name(name: str, path: Path, lineno: int) -> str:
    """An embedded source's name, which must be a path inside the project."""
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "~")) or "\\" in name or ".." in parts or ":" in parts[0]:
        raise NotARunLog(f"{path} line {lineno}: the embedded source {name[:80]!r} is not a path inside "
                         "the project (absolute, or with '..'); train.py writes no such log")
    return name


def parse_text(path: str | Path) -> RunLogFile:
    """The .txt run log; NotARunLog when it is missing or has no run log structure."""
    path = Path(path)
    raw = read_bounded(path)
    # surrogateescape keeps every byte, so an embedded source re-encodes to exactly what was written
    text = raw.decode("utf-8", "surrogateescape")
    blocks = _blocks(text, path)
    if not any(t == "environment" for t, _, _ in blocks):
        raise NotARunLog(f"{path} has no `environment` header block")
    log = RunLogFile(path, [], [])
    sources: list[Source] = []
    expect = "source"  # what may come next: source|environment, then config, then run
    for title, lineno, body in blocks:
        m = SOURCE_TITLE.match(title)
        if m:
            if expect not in ("source", "run-or-next", "summary-or-next"):
                raise NotARunLog(f"{path} line {lineno}: a source block inside a header")
            expect = "source"  # a resumed run's header starts after the run block or the summary
            sources.append(Source(_source_name(m["path"], path, lineno), m["sha"], "\n".join(body) + "\n", lineno))
        elif title == "environment":
            if expect != "source":
                raise NotARunLog(f"{path} line {lineno}: an environment block out of place")
            seg = Segment(len(log.segments), lineno, sources)
            seg.environment = _notes(body)
            log.segments.append(seg)
            sources, expect = [], "config"
        elif title == "config":
            if expect != "config":
                raise NotARunLog(f"{path} line {lineno}: a config block out of place")
            try:
                config = yaml.load("\n".join(body), Loader=_PlainYAML) or {}
            # hostile YAML: an integer past Python's digit limit (ValueError) or nesting deep
            # enough to exhaust the parser's recursion is no config, not a crash
            except (yaml.YAMLError, ValueError, RecursionError):
                config = None
            if not isinstance(config, dict):
                raise NotARunLog(f"{path} line {lineno}: the config block is not a YAML mapping")
            log.segments[-1].config = config
            expect = "run"
        elif title == "run":
            if expect != "run":
                raise NotARunLog(f"{path} line {lineno}: a run block out of place")
            seg = log.segments[-1]
            n = 0
            while n < len(body) and NOTE.match(body[n]):
                n += 1
            seg.notes = _notes(body[:n])
            seg.lines = [parse_line(t, lineno + 1 + n + k, seg.index)
                         for k, t in enumerate(body[n:], start=1) if t.strip()]
            expect = "run-or-next"
        elif title == "summary":
            if expect != "run-or-next":
                raise NotARunLog(f"{path} line {lineno}: a summary block out of place")
            fields = {}
            for k, t in enumerate(body, start=2):
                m = re.match(r"^([\w/]+):(\S*)$", t)
                if m and m[1] not in fields:
                    fields[m[1]] = m[2]
                else:
                    log.stray.append((lineno + k, t))
            log.summaries.append((lineno, fields))
            expect = "summary-or-next"
    if expect not in ("run-or-next", "summary-or-next"):
        raise NotARunLog(f"{path} ends inside a header (no `run` block)")
    return log


class _PlainYAML(yaml.SafeLoader):
    """safe_load without anchors and aliases, which train.py never writes and which let a small
    text stand for a huge structure."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError("aliases are not allowed in a run log's config")
        return super().compose_node(parent, index)


def _notes(body: list[str]) -> dict:
    out = {}
    for t in body:
        key, sep, value = t.partition(": ")
        if sep:
            out[key] = value
    return out


def parse_jsonl(path: str | Path) -> RunLogFile:
    """The .jsonl beside a run log, in the same structure (no sources, no messages; numbers
    unrounded; `lineno` is the record's line)."""
    path = Path(path)
    log = RunLogFile(path, [], [])
    text = read_bounded(path).decode("utf-8", "replace")
    for lineno, row in enumerate(text.split("\n"), start=1):
        if not row.strip():
            continue
        try:
            rec = json.loads(row)
        except json.JSONDecodeError:
            raise NotARunLog(f"{path} line {lineno} is not JSON") from None
        if not isinstance(rec, dict):
            raise NotARunLog(f"{path} line {lineno} is not a JSON object")
        kind = rec.pop("kind", None)
        if kind == "header":
            seg = Segment(len(log.segments), lineno, [], rec.pop("environment", {}), rec.pop("config", {}))
            seg.notes = rec
            log.segments.append(seg)
        elif kind in ("step", "eval") and log.segments:
            rec.pop("num_steps", None)
            sort = "step" if kind == "step" else "val" if "val_loss" in rec else "test"
            log.segments[-1].lines.append(Line(sort, rec, lineno, len(log.segments) - 1))
        elif kind == "summary":
            log.summaries.append((lineno, rec))
        else:
            raise NotARunLog(f"{path} line {lineno}: a record of kind {kind!r} out of place")
    if not log.segments:
        raise NotARunLog(f"{path} has no header record")
    return log


def resume_step(seg: Segment) -> int | None:
    """The step a segment after the first continues from: its checkpoint's step (from the
    `resumed_from` note), else the step before its first step line."""
    r = seg.resumed_from()
    if r is None and seg.step_lines():
        r = seg.step_lines()[0].step - 1
    return r


def timeline(log: RunLogFile) -> list[Line]:
    """The lines of the run as it counts: a resumed segment continues from its checkpoint, so
    what an earlier segment wrote after that step (a killed process's last steps) is dropped,
    and so are the final evaluations when the run resumes from its last step to redo them."""
    out: list[Line] = []
    num_steps = log.config.get("num_steps")
    for seg in log.segments:
        if seg.index:
            r = resume_step(seg)
            if r is not None:
                out = [ln for ln in out if ln.step is None or ln.step < r
                       or (ln.step == r and not (ln.kind in ("val", "test") and r == num_steps))]
        out += seg.lines
    return out
