"""The leaderboard: verify a submitted run log, rebuild LEADERBOARD.md and its plots, plot runs.

    python leaderboard.py verify logs/NAME.txt [--track esm2-8m]
    python leaderboard.py render [--logs logs_to_keep] [--out LEADERBOARD.md] [--plots DIR]
    python leaderboard.py plot logs/a.txt logs/b.txt [--out curves.png]
    python leaderboard.py experiments LOG_DIR [--out DIR]

verify exits 0 for a verified log (that reaches its claimed track's target, if it claims one),
1 when it is rejected or misses its target (every problem on its own line), 2 when the file is
not a run log. The rules (tracks, what is fixed, what a record needs, how to submit) are in
logs_to_keep/README.md; the checks in submissions/logcheck.py; the table and plots in
submissions/board.py. Plots need matplotlib, which is imported only to plot. experiments lists
every run log of a folder, verified or not, in DIR/experiments.md and a sortable
DIR/experiments.html (submissions/experiments.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from submissions.board import plot_runs, render
from submissions.experiments import write as write_experiments
from submissions.logcheck import Rejected, verify
from submissions.logparse import NotARunLog
from submissions.tracks import TRACKS


def cmd_verify(args) -> int:
    try:
        verdict = verify(args.log, track=args.track)
    except NotARunLog as e:
        print(f"leaderboard.py verify: {e}; pass the .txt run log that train.py wrote under logs/.", file=sys.stderr)
        return 2
    except Rejected as e:
        print(f"{args.log}: rejected.", file=sys.stderr)
        print("\n".join(e.problems), file=sys.stderr)
        return 1
    print(verdict.describe())
    return 0 if verdict.reached or verdict.track is None else 1


def cmd_render(args) -> int:
    logs, out = Path(args.logs), Path(args.out)
    if not logs.is_dir():
        print(f"leaderboard.py render: {logs} is not a directory of run logs; pass --logs DIR.", file=sys.stderr)
        return 2
    verdicts, rejected = render(logs, out, Path(args.plots) if args.plots else logs / "plots")
    for path, reason in rejected:
        print(f"rejected {path}: {reason}", file=sys.stderr)
    print(f"wrote {out}: {sum(v.reached for v in verdicts)} record runs, "
          f"{sum(not v.reached for v in verdicts)} without a record, {len(rejected)} rejected")
    return 0


def cmd_plot(args) -> int:
    try:
        out = plot_runs([Path(p) for p in args.logs], Path(args.out))
    except (NotARunLog, OSError) as e:
        print(f"leaderboard.py plot: {e}; pass .txt run logs written by train.py.", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def cmd_experiments(args) -> int:
    logs, out = Path(args.log_dir), Path(args.out or args.log_dir)
    if not logs.is_dir():
        print(f"leaderboard.py experiments: {logs} is not a directory; pass the folder holding the .txt run logs.",
              file=sys.stderr)
        return 2
    if out.exists() and not out.is_dir():
        print(f"leaderboard.py experiments: --out {out} is a file; pass a directory for the two pages.", file=sys.stderr)
        return 2
    md, page, rows = write_experiments(logs, out)
    unread = sum(r.unreadable for r in rows)
    print(f"wrote {md} and {page}: {len(rows) - unread} runs" + (f", {unread} unreadable files" if unread else ""))
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("verify", help="check one run log and print its verdict")
    p.add_argument("log", help="the .txt run log (a .jsonl beside it is checked against it)")
    p.add_argument("--track", choices=list(TRACKS), help="check the log against this track (default: its config's)")
    p.set_defaults(run=cmd_verify)
    p = sub.add_parser("render", help="verify the kept logs and write LEADERBOARD.md and plots")
    p.add_argument("--logs", default="logs_to_keep")
    p.add_argument("--out", default="LEADERBOARD.md")
    p.add_argument("--plots", default="", help="where the PNGs go (default: LOGS/plots)")
    p.set_defaults(run=cmd_render)
    p = sub.add_parser("plot", help="plot loss and throughput curves of any runs")
    p.add_argument("logs", nargs="+")
    p.add_argument("--out", default="curves.png")
    p.set_defaults(run=cmd_plot)
    p = sub.add_parser("experiments", help="every run log of a folder in one table (Markdown and sortable HTML)")
    p.add_argument("log_dir", help="folder of .txt run logs (train.py writes them to logs/)")
    p.add_argument("--out", default="", help="where experiments.md and experiments.html go (default: LOG_DIR)")
    p.set_defaults(run=cmd_experiments)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
