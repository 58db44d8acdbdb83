"""The leaderboard's checks of a submitted run log (the rules: logs_to_keep/README.md).

verify(path) reads the .txt (and the .jsonl beside it, when there is one) and returns a
Verdict, or raises Rejected with every problem found, each one sentence naming the log, the
line and the field, or NotARunLog for a file that is missing or is not a run log at all.
The checks, in order:
  sources    every embedded source hashes to its recorded sha256;
  benchmark  every header embeds the official benchmark code (BENCHMARK_FILES) in an
             accepted version: this checkout's, or one listed in logs_to_keep/benchmark_code.sha256;
  headers    a resumed run keeps its data, batch, steps, track and hardware, and resumes from
             a checkpoint whose step is in the log;
  lines      steps increase, tokens <= step x batch_size, train_time never goes back, tok/s and
             step_avg fit the tokens and times, evaluations where the config puts them;
  summary    the summary repeats the last lines;
  jsonl      the .jsonl holds the same numbers as the text;
  track      the claimed track's data, and a full validation at or below its target: the
             score is train_time at the first one.
"""

from __future__ import annotations

import ast
import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path

from data.buckets import bucket_lengths, bucket_shapes
from runtime.hardware import accelerator, cost_usd
from submissions.logparse import (
    Line,
    NotARunLog,
    RunLogFile,
    agree,
    half_unit,
    number,
    parse_jsonl,
    parse_text,
    resume_step,
    timeline,
)
from submissions.tracks import TRACKS, Track

ROOT = Path(__file__).resolve().parent.parent
ACCEPTED_VERSIONS = ROOT / "logs_to_keep" / "benchmark_code.sha256"
MAX_PROBLEMS = 12  # past this many, the rest are usually consequences of the first ones
SAME_ACROSS_RESUMES = ("data", "batch_size", "num_steps", "track")
# "step:N skipped: non-finite gradient norm (nan)" for one step (logs before 2026-11-29), or
# "... in K step(s) since the last logged step" for K (the counters are read when a step logs)
SKIPPED = re.compile(r"^step:(\d+) skipped:(?: non-finite gradient norm in (\d+) step)?")
# Official benchmark files that moved: current path -> the paths earlier logs embed it under.
# The versions accepted under an old path are listed under the current one in ACCEPTED_VERSIONS.
EARLIER_PATHS = {"evaluation/benchmark.py": ("runtime/evaluation.py",)}

class Rejected(Exception):
    """The log fails verification; `problems` are one sentence each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def benchmark_files() -> tuple[str, ...]:
    """BENCHMARK_FILES of evaluation/benchmark.py, read without importing it (and torch), so
    that verifying a log takes a fraction of a second."""
    tree = ast.parse((ROOT / "evaluation" / "benchmark.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "BENCHMARK_FILES" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise RuntimeError("evaluation/benchmark.py no longer defines BENCHMARK_FILES")


def accepted_versions(listed: Path = ACCEPTED_VERSIONS) -> dict[str, set[str]]:
    """path -> accepted sha256s: the file in this checkout, plus the reviewed earlier versions
    listed in logs_to_keep/benchmark_code.sha256 (`<sha256>  <path>` lines, # comments)."""
    out = {}
    for f in benchmark_files():
        lf = (ROOT / f).read_bytes().replace(b"\r\n", b"\n") if (ROOT / f).is_file() else None
        # the same version checked out with CRLF line ends (git autocrlf on Windows) is accepted too
        variants = () if lf is None else (lf, lf.replace(b"\n", b"\r\n"))
        out[f] = {hashlib.sha256(d).hexdigest() for d in variants}
    if listed.is_file():
        for row in listed.read_text().splitlines():
            parts = row.split("#")[0].split()
            if len(parts) == 2 and parts[1] in out:
                out[parts[1]].add(parts[0].lower())
    return out


@dataclass
class Verdict:
    path: Path
    log: RunLogFile
    track: Track | None
    reached: bool
    why: str  # why the run holds no record ("" when it reached its target)
    score: float | None  # train_time (s) at the first full validation at or below the target
    score_step: int | None
    score_tokens: int | None
    score_val_loss: float | None
    best_val_loss: float  # lowest full validation loss of the run
    val_loss: float  # the final evaluation's
    test_loss: float
    train_time: float
    warmup_time: float
    tokens: int
    count: int  # accelerators (world size)
    accelerator: str

    @property
    def hardware(self) -> str:
        return f"{self.count}x {self.accelerator}"

    @property
    def accelerator_hours(self) -> float | None:
        return None if self.score is None else self.count * self.score / 3600

    @property
    def cost(self) -> float | None:
        return None if self.score is None else cost_usd(self.score, self.count, self.accelerator)

    @property
    def params(self) -> int | None:
        v = self.log.segments[0].notes.get("params")
        return int(v) if v and str(v).isdigit() else None

    @property
    def date(self) -> str:
        return str(self.log.environment.get("date", "?"))[:10]

    def describe(self) -> str:
        """The one-paragraph verdict `leaderboard.py verify` prints."""
        n = self.path
        losses = f"final val loss {self.val_loss:.4f}, test loss {self.test_loss:.4f}"
        hw = f"on {self.hardware}"
        if not self.reached:
            return (f"{n}: verified (sources, benchmark code, steps/tokens/times and summary agree); "
                    f"no record: {self.why}. Trained {self.train_time:.1f} s {hw} "
                    f"(+{self.warmup_time:.1f} s warm-up), {self.tokens:,} tokens; {losses}.")
        cost = "n/a (unpriced accelerator)" if self.cost is None else f"${self.cost:,.2f}"
        return (f"{n}: verified. Track {self.track.name} (val loss <= {self.track.target} on "
                f"{self.track.data}) reached at step {self.score_step} with val loss "
                f"{self.score_val_loss:.4f}: score {self.score:.1f} s of training {hw} "
                f"(warm-up {self.warmup_time:.1f} s, not counted), {self.score_tokens:,} tokens, "
                f"{self.accelerator_hours:.4f} accelerator-hours, est. cost {cost}; {losses}.")


class _Problems:
    def __init__(self, path: Path):
        self.name, self.items = path.name, []

    def __call__(self, lineno: int | None, text: str) -> None:
        where = f"{self.name} line {lineno}" if lineno else self.name
        self.items.append(f"{where}: {text}")


def verify(path: str | Path, track: str | None = None, tracks: dict[str, Track] = TRACKS,
           accepted: dict[str, set[str]] | None = None) -> Verdict:
    """Checks the log at `path`; `track` checks a claim the log's config does not make."""
    path = Path(path)
    log = parse_text(path)
    fail = _Problems(path)
    check_sources(log, fail)
    check_benchmark(log, accepted if accepted is not None else accepted_versions(), fail)
    cfg = check_headers(log, fail)
    if cfg is None:  # without these config keys nothing else can be checked
        raise Rejected(fail.items)
    lines = timeline(log)
    run = check_lines(log, lines, cfg, fail)
    if run is not None:
        check_summary(log, cfg, run, fail)
    jsonl = path.with_suffix(".jsonl")
    if jsonl.is_file():
        check_jsonl(log, jsonl, fail)
    name = track or log.config.get("track") or ""
    claimed = tracks.get(name) if name else None
    if name and claimed is None:
        fail(None, f"it claims track {name!r}, which is not a leaderboard track ({', '.join(tracks)}).")
    elif claimed and log.config.get("data") != claimed.data:
        fail(None, f"it claims track {claimed.name}, scored on data {claimed.data!r}, but trained and "
                   f"evaluated on data {log.config.get('data')!r}.")
    if claimed and any(seg.config.get("profile_steps") for seg in log.segments):
        fail(None, "it was profiled (--profile_steps), which slows the profiled steps; a submission runs unprofiled.")
    if claimed and run is not None:
        check_splits(claimed, log, run, fail)
    if fail.items:
        raise Rejected(fail.items[:MAX_PROBLEMS] + ([f"... and {len(fail.items) - MAX_PROBLEMS} more"]
                                                     if len(fail.items) > MAX_PROBLEMS else []))
    return _verdict(path, log, lines, claimed, run)


def check_sources(log: RunLogFile, fail) -> None:
    for seg in log.segments:
        for src in seg.sources:
            data = src.text.encode("utf-8", "surrogateescape")
            # the log cuts a file's trailing newlines to one: a file with none hashes without it
            if src.sha256 not in (hashlib.sha256(data).hexdigest(), hashlib.sha256(data[:-1]).hexdigest()):
                fail(src.lineno, f"the embedded source {src.path} does not hash to its recorded sha256 "
                                 f"{src.sha256[:12]}...: its text was changed after the run.")


def check_benchmark(log: RunLogFile, accepted: dict[str, set[str]], fail) -> None:
    for seg in log.segments:
        embedded = {s.path: s for s in seg.sources}
        for f, shas in accepted.items():
            src = next((embedded[p] for p in (f, *EARLIER_PATHS.get(f, ())) if p in embedded), None)
            if src is None:
                fail(seg.lineno, f"header {seg.index + 1} does not embed the official benchmark file {f}: "
                                 "the run did not use this project's evaluation and data code.")
            elif src.sha256 not in shas:
                fail(src.lineno, f"the embedded {src.path} (sha256 {src.sha256[:12]}...) is not an official version "
                                 "of the benchmark code: it differs from this checkout's and from every "
                                 "version listed in logs_to_keep/benchmark_code.sha256.")


def check_headers(log: RunLogFile, fail) -> dict | None:
    """Checks what a resumed run must keep; returns the config values the lines are checked
    against (num_steps T, batch_size B), or None when the config lacks them."""
    first = log.segments[0]
    cfg = {key: log.config.get(key) for key in ("num_steps", "batch_size")}
    valid = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in cfg.values())
    if not valid:
        fail(log.segments[-1].lineno, f"the config has no valid num_steps and batch_size ({cfg}).")
    if first.notes.get("resumed_from", "-") != "-":
        fail(first.lineno, f"the run starts from checkpoint {first.notes['resumed_from']}, whose earlier "
                           "steps are not in this log.")
    dates = []
    for seg in log.segments:
        device = str(seg.environment.get("device", ""))
        try:
            count, _ = accelerator(device)
            if str(seg.environment.get("world_size", count)) != str(count):
                fail(seg.lineno, f"world_size {seg.environment.get('world_size')} disagrees with device {device!r}.")
        except ValueError:
            fail(seg.lineno, f"header {seg.index + 1} has no readable device line ({device!r}).")
        try:
            dates.append((seg, time.strptime(str(seg.environment.get("date", ""))[:19], "%Y-%m-%d %H:%M:%S")))
        except ValueError:
            fail(seg.lineno, f"header {seg.index + 1} has no readable date ({seg.environment.get('date')!r}).")
        if not seg.index:
            continue
        if seg.notes.get("resumed_from", "-") == "-":
            fail(seg.lineno, f"header {seg.index + 1} continues the log without resuming from a checkpoint.")
        for key in SAME_ACROSS_RESUMES:
            if seg.config.get(key) != first.config.get(key):
                fail(seg.lineno, f"header {seg.index + 1} changes config {key} from {first.config.get(key)!r} "
                                 f"to {seg.config.get(key)!r}; a resumed run must keep it.")
        if seg.environment.get("device") != first.environment.get("device"):
            fail(seg.lineno, f"header {seg.index + 1} ran on {seg.environment.get('device')!r} and header 1 "
                             f"on {first.environment.get('device')!r}; a run is scored on one hardware.")
    for (a, ta), (b, tb) in zip(dates, dates[1:]):
        if tb < ta:
            fail(b.lineno, f"header {b.index + 1} is dated {b.environment['date']}, before header "
                           f"{a.index + 1} ({a.environment['date']}): time goes backwards.")
    if valid:
        cfg["slots_min"] = fewest_step_slots(first.config, first.environment.get("world_size", 1))
    return cfg if valid else None


def fewest_step_slots(config: dict, world) -> int:
    """The fewest token slots an optimizer step can hold (tok/s_all counts slots): batch_size,
    or less with length_buckets n > 1, whose micro-batches are floor(rows x L / L_k) rows of
    L_k tokens (data/buckets.py), up to L_k slots short of rows x L; a step mixes them."""
    B, n, L = config["batch_size"], config.get("length_buckets") or 1, config.get("max_length")
    accum, world = config.get("grad_accum") or 1, world if isinstance(world, int) and world > 0 else 1
    if not (isinstance(n, int) and n > 1 and isinstance(L, int) and B % (world * accum * L) == 0):
        return B
    rows = B // (world * accum * L)  # per rank and micro-batch
    return world * accum * min(r * length for r, length in bucket_shapes(rows, L, bucket_lengths(L, n)))


@dataclass
class _Run:
    last: Line  # the last step line
    warmup: Line | None  # the last warm-up line
    vals: dict  # step -> validation line
    final: Line | None
    test: Line | None
    skipped: int


def check_lines(log: RunLogFile, lines: list[Line], cfg: dict, fail) -> _Run | None:
    T, B = cfg["num_steps"], cfg["batch_size"]
    prev = warm = test = previous_line = None
    vals, started, skipped, warmups = {}, set(), 0, 0
    for ln in lines:
        if ln.kind == "message":
            m = SKIPPED.match(ln.text)
            skipped += int(m[2] or 1) if m else 0
            continue
        s, seg = ln.step, log.segments[ln.segment]
        try:
            _numbers(ln)
        except ValueError as e:
            fail(ln.lineno, f"{e}.")
            continue
        if s is None:
            fail(ln.lineno, "the line has no step field.")
        elif ln.kind == "step":
            warmups += ln.warmup
            _check_step(ln, prev, warm, warmups, seg, T, (cfg["slots_min"], B), ln.segment not in started, fail)
            started.add(ln.segment)
            warm = ln if ln.warmup else warm
            prev = ln
        elif ln.kind == "val":
            every = seg.config.get("eval_every") or 0
            if not (s == T or (every and s % every == 0)):
                fail(ln.lineno, f"a validation line at step {s}, which is neither a multiple of "
                                f"eval_every={every} nor num_steps={T}.")
            if prev is None or prev.step != s:
                fail(ln.lineno, f"the validation line at step {s} does not follow that step's step line.")
            if s in vals:
                fail(ln.lineno, f"a second validation line at step {s}.")
            vals[s] = ln
        elif ln.kind == "test":
            if s != T or previous_line is None or (previous_line.kind, previous_line.step) != ("val", T):
                fail(ln.lineno, f"the test line at step {s} does not follow the final validation at "
                                f"num_steps={T}.")
            if test is not None:
                fail(ln.lineno, "a second test line.")
            test = ln
        previous_line = ln
    if prev is None:
        fail(None, "the log has no step lines.")
        return None
    if prev.step != T:
        fail(prev.lineno, f"the last step line is step {prev.step}, not num_steps={T}: the run did not finish.")
    steps = [ln for ln in lines if ln.kind == "step" and ln.step is not None]
    for a, b in zip([None, *steps], steps):
        every = log.segments[b.segment].config.get("log_every") or 1
        due = ((a.step if a else 0) // every + 1) * every  # the first step after `a` that logs
        if due < b.step:
            fail(b.lineno, f"there is no step line at step {due}, a multiple of log_every={every}, "
                           f"before step {b.step}.")
    for ln in lines:
        every = log.segments[ln.segment].config.get("eval_every") or 0
        if ln.kind == "step" and every and ln.step % every == 0 and ln.step < T and ln.step not in vals:
            fail(ln.lineno, f"step {ln.step} is a multiple of eval_every={every} but has no validation "
                            "line after it.")
    final = vals.get(T)
    if final is None:
        fail(prev.lineno, f"there is no final validation line at num_steps={T}.")
    if test is None:
        fail(prev.lineno, "there is no test line.")
    if final is not None:
        full = final.num("val_tokens")
        for s, v in vals.items():
            partial_ok = log.segments[v.segment].config.get("eval_max_batches", 0)
            n = v.num("val_tokens")
            if n > full or (not partial_ok and n != full):
                fail(v.lineno, f"val_tokens:{v.fields.get('val_tokens')} at step {s} does not fit the final, full "
                               f"validation's {final.fields.get('val_tokens')} (eval_max_batches={partial_ok}).")
    return _Run(prev, warm, vals, final, test, skipped)


def _numbers(ln: Line) -> None:
    for key in ("step", "tokens", "train_time", "tok/s", "tok/s_all", "warmup_time", "val_loss",
                "val_tokens", "test_loss", "step_avg"):
        if key in ln.fields:
            try:
                number(ln.fields[key])
            except ValueError:
                raise ValueError(f"{key}:{ln.fields[key]} is not a number") from None
    need = {"step": ("tokens", "train_time", "tok/s", "tok/s_all"), "val": ("val_loss", "val_tokens"),
            "test": ("test_loss",)}[ln.kind]
    missing = [k for k in need if ln.num(k) is None]
    if missing:
        raise ValueError(f"the {ln.kind} line lacks {', '.join(missing)}")


def _check_step(ln: Line, prev: Line | None, warm: Line | None, warmups: int, seg, T: int, slots: tuple[int, int],
                first: bool, fail) -> None:
    """One step line against the one before it in the run (`prev`; the last warm-up line
    `warm`; `warmups` warm-up steps so far, this one included)."""
    s, total = ln.step, str(ln.fields["step"]).partition("/")[2]
    if total and total != str(T):
        fail(ln.lineno, f"step:{ln.fields['step']} counts to {total}, not num_steps={T}.")
    if not 1 <= s <= T:
        fail(ln.lineno, f"step {s} is outside 1..num_steps={T}.")
    if first:
        start = 1 if not seg.index else (resume_step(seg) or 0) + 1
        if s != start:
            fail(ln.lineno, f"header {seg.index + 1} should go on at step {start}; its first step line "
                            f"is step {s}.")
        if seg.index and (prev is None or prev.step != start - 1):
            fail(ln.lineno, f"header {seg.index + 1} resumes from step {start - 1}, which has no step line "
                            "in the log before it.")
        if not ln.warmup:
            fail(ln.lineno, f"step {s}, the first step of a process, is not logged as its warm-up step "
                            "(warmup_time:).")
    elif ln.warmup:
        fail(ln.lineno, f"step {s} carries warmup_time but is not the first step of a process.")
    B_lo, B = slots  # token slots per step: batch_size, fewer with length buckets
    tokens, tt = ln.num("tokens"), ln.num("train_time")
    if tokens > s * B:
        fail(ln.lineno, f"tokens:{ln.fields['tokens']} at step {s} exceeds step x batch_size = {s * B}.")
    if prev is None and tt > half_unit(ln.fields["train_time"]):
        fail(ln.lineno, f"train_time:{ln.fields['train_time']} at the first step, which is warm-up and "
                        "not train time.")
    prev_step, prev_tokens = (prev.step, prev.num("tokens")) if prev else (0, 0)
    prev_tt, prev_tt_raw = (prev.num("train_time"), prev.fields["train_time"]) if prev else (0.0, "0.0s")
    if s <= prev_step:
        fail(ln.lineno, f"step {s} comes after step {prev_step}: step numbers must increase.")
        return
    if tokens < prev_tokens:
        fail(ln.lineno, f"tokens:{ln.fields['tokens']} is less than tokens:{prev_tokens:.0f} at step {prev_step}.")
    elif tokens - prev_tokens > (s - prev_step) * B:
        fail(ln.lineno, f"tokens grew by {tokens - prev_tokens:.0f} since step {prev_step}, more than "
                        f"{s - prev_step} step(s) x batch_size = {(s - prev_step) * B}.")
    if tt < prev_tt:
        fail(ln.lineno, f"train_time:{ln.fields['train_time']} goes backwards from {prev_tt_raw} at "
                        f"step {prev_step}.")
        return
    # The window since the previous step line: tok/s = its real tokens / its seconds, and
    # tok/s_all = its steps x batch_size / its seconds, the seconds being the train_time added
    # (or, for a warm-up step, the warmup_time added). Printed times are rounded: allow for it.
    if ln.warmup:
        if not agree(ln.fields["train_time"], prev_tt_raw):
            fail(ln.lineno, f"train_time moves from {prev_tt_raw} to {ln.fields['train_time']} at the warm-up "
                            f"step {s}, whose time must not count.")
        w0, w0_raw = (warm.num("warmup_time"), warm.fields["warmup_time"]) if warm else (0.0, "0.0s")
        seconds = ln.num("warmup_time") - w0
        slack = half_unit(ln.fields["warmup_time"]) + half_unit(w0_raw)
        what = "warmup_time"
    else:
        seconds, what = tt - prev_tt, "train_time"
        slack = half_unit(ln.fields["train_time"]) + half_unit(prev_tt_raw)
    steps = s - prev_step
    for key, least, most in (("tok/s", tokens - prev_tokens, tokens - prev_tokens),
                             ("tok/s_all", steps * B_lo, steps * B)):
        rate = ln.num(key)
        shortest, longest = (least / rate, most / rate) if rate > 0 else (float("inf"), float("inf"))
        tolerance = slack + 0.05 * longest + longest * half_unit(ln.fields[key]) / max(rate, 1e-9)
        if not shortest - tolerance <= seconds <= longest + tolerance:
            amount = f"{most:.0f}" if least == most else f"{least:.0f}-{most:.0f}"
            took = f"{longest:.2f}" if least == most else f"{shortest:.2f}-{longest:.2f}"
            fail(ln.lineno, f"{key}:{ln.fields[key]} does not fit the window since step {prev_step}: "
                            f"{amount} tokens at that rate take {took} s, but {what} grew "
                            f"by {seconds:.2f} s.")
    avg, timed = ln.num("step_avg"), s - warmups  # step_avg = train_time / steps that are not warm-up
    if not ln.warmup and avg is not None and timed > 0:
        expected = 1000 * tt / timed
        slack = 1000 * half_unit(ln.fields["train_time"]) / timed + half_unit(ln.fields["step_avg"])
        if abs(avg - expected) > slack + 0.01 * expected:
            fail(ln.lineno, f"step_avg:{ln.fields['step_avg']} is not train_time / timed steps = {expected:.1f}ms.")


def check_summary(log: RunLogFile, cfg: dict, run: _Run, fail) -> None:
    if not log.summaries:
        fail(None, "the log has no summary: the run did not finish.")
        return
    if len(log.summaries) > 1:
        fail(log.summaries[1][0], f"the log has {len(log.summaries)} summaries: a finished run was continued.")
    for lineno, text in log.stray:
        fail(lineno, f"{text!r} in the summary is not a key:value line, or repeats a key.")
    at, summary = log.summaries[-1]
    T, B = cfg["num_steps"], cfg["batch_size"]
    where = {k: at + 2 + i for i, k in enumerate(summary)}

    def same(key: str, expected, what: str, exact: bool = False) -> None:
        if key not in summary:
            fail(at, f"the summary has no {key}.")
        elif expected is None or not (str(summary[key]) == str(expected) if exact else _same_value(summary[key], expected)):
            fail(where[key], f"summary {key}:{summary[key]} disagrees with {what} ({expected}).")

    same("step", str(T), "num_steps")
    if cfg["slots_min"] == B:
        same("tokens_all", str(T * B), "num_steps x batch_size")
    elif not T * cfg["slots_min"] <= _number_or_nan(summary.get("tokens_all")) <= T * B:
        fail(where.get("tokens_all", at), f"summary tokens_all:{summary.get('tokens_all')} is not between "
                                          f"{T * cfg['slots_min']} and {T * B}, the token slots of "
                                          f"num_steps steps of length-bucketed micro-batches.")
    same("tokens", run.last.fields["tokens"], f"the last step line (line {run.last.lineno})")
    same("train_time", run.last.fields["train_time"], f"the last step line (line {run.last.lineno})")
    if run.warmup is not None:
        same("warmup_time", run.warmup.fields["warmup_time"], f"the last warm-up line (line {run.warmup.lineno})")
    same("skipped_steps", str(run.skipped), "the skipped-step messages", exact=True)  # a count: no rounding
    for prefix, line in (("val_", run.final), ("test_", run.test)):
        if line is None:
            continue
        keys = {k for k in summary if k.startswith(prefix)} | {k for k in line.fields if k.startswith(prefix)}
        for key in sorted(keys):
            what = "final validation" if prefix == "val_" else "test"
            same(key, line.fields.get(key), f"the {what} line (line {line.lineno})")


def check_jsonl(log: RunLogFile, path: Path, fail) -> None:
    """The .jsonl beside the text holds the same headers, lines and summary, unrounded."""
    try:
        j = parse_jsonl(path)
    except NotARunLog as e:
        fail(None, f"the .jsonl beside it is unreadable ({e}).")
        return
    if len(j.segments) != len(log.segments):
        fail(None, f"the .jsonl has {len(j.segments)} headers and the text {len(log.segments)}.")
        return
    for ts, js in zip(log.segments, j.segments):
        if ts.config != js.config:
            keys = sorted(k for k in set(ts.config) | set(js.config) if ts.config.get(k) != js.config.get(k))
            fail(ts.lineno, f"the config of header {ts.index + 1} differs from the .jsonl's in {', '.join(keys)}.")
        for what, text, values in (("environment", ts.environment, js.environment), ("run note", ts.notes, js.notes)):
            for key, v in values.items():
                if str(text.get(key)) != str(v):
                    fail(ts.lineno, f"{what} {key} of header {ts.index + 1} is {text.get(key)!r} here and {v!r} "
                                    "in the .jsonl.")
        tl = [ln for ln in ts.lines if ln.kind != "message"]
        if [ln.kind for ln in tl] != [ln.kind for ln in js.lines]:
            fail(ts.lineno, f"the step and evaluation lines of header {ts.index + 1} are not those of the .jsonl "
                            f"({len(tl)} lines here, {len(js.lines)} records there).")
            continue
        for a, b in zip(tl, js.lines):
            for key, v in b.fields.items():
                if not _same_value(a.fields.get(key), v):
                    fail(a.lineno, f"{key}:{a.fields.get(key)} disagrees with the .jsonl (line {b.lineno}: {v}).")
    if log.summary is not None and j.summary is not None:
        for key, v in j.summary.items():
            if not _same_value(log.summary.get(key), v):
                fail(log.summaries[-1][0], f"summary {key}:{log.summary.get(key)} disagrees with the .jsonl ({v}).")
    elif (log.summary is None) != (j.summary is None):
        fail(None, "one of the text and the .jsonl has a summary and the other has not.")


def _number_or_nan(raw) -> float:
    try:
        value = number(raw)
    except ValueError:
        return float("nan")
    return float("nan") if value is None else value


def _same_value(text, value) -> bool:
    try:
        return agree(text, value)
    except ValueError:
        return str(text) == str(value)


def check_splits(track: Track, log: RunLogFile, run: _Run, fail) -> None:
    """The final evaluations scored the track's own validation and test splits: their masked
    token counts are the splits' fingerprints, and where the track pins the shards' sha256,
    every process of the run must have recorded those (submissions/tracks.py)."""
    for key in ("valid_sha256", "test_sha256"):
        expected = getattr(track, key)
        for seg in log.segments if expected else ():
            if seg.notes.get(key) != expected:
                fail(None, f"its {key} is {seg.notes.get(key)!r}, not the {track.name} split's {expected[:12]}...: "
                           "it was not scored on the track's data (or was run before logs recorded it).")
    for split, line, expected in (("val", run.final, track.val_tokens), ("test", run.test, track.test_tokens)):
        got = line.num(f"{split}_tokens") if line is not None else None
        if expected is not None and got is not None and got != expected:
            fail(line.lineno, f"the final {split} evaluation scored {int(got):,} masked tokens, but the "
                              f"{track.name} {split} split has {expected:,}: it was not the track's data.")


def _verdict(path: Path, log: RunLogFile, lines: list[Line], track: Track | None, run: _Run) -> Verdict:
    steps = {ln.step: ln for ln in lines if ln.kind == "step"}
    full = run.final.num("val_tokens")
    evals = [ln for ln in lines if ln.kind == "val" and ln.num("val_tokens") == full]
    hit = next((v for v in evals if track and v.num("val_loss") <= track.target), None)
    best = min(v.num("val_loss") for v in evals)
    why = ("it claims no track" if track is None else "" if hit else
           f"its best full validation loss {best:.4f} is above the {track.name} target {track.target}")
    count, acc = accelerator(str(log.environment.get("device")))
    at = steps[hit.step] if hit else None
    return Verdict(path, log, track, hit is not None, why,
                   at.num("train_time") if at else None, hit.step if hit else None,
                   int(at.num("tokens")) if at else None, hit.num("val_loss") if hit else None, best,
                   run.final.num("val_loss"), run.test.num("test_loss"), run.last.num("train_time"),
                   run.warmup.num("warmup_time") if run.warmup else 0.0, int(run.last.num("tokens")), count, acc)
