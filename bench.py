"""The speed benchmark (speed/): speed, memory and cost of the models on one device, ours next to Hugging Face ESM2.

    python bench.py [run]     # measure; CSV + Markdown in --out (default bench_results/)
    python bench.py sweep     # a grid presets x batch sizes x lengths, appended to --out/sweep-<device>.csv
    python bench.py report    # CSVs -> Markdown tables (BENCHMARKS.md marked section) + PNG plots

Measurement: speed/models.py (the workload, the modes, what each row holds); tables and plots:
speed/report.py.
"""

from __future__ import annotations

import argparse

from model.config import ATTN_IMPLS
from runtime import hardware
from runtime.devices import DEVICES
from speed.models import MODES, run
from speed.report import COLUMNS, report


def parse_args(argv=None):
    columns = "\n".join(f"  {k:<22} {v}" for k, v in COLUMNS.items())
    p = argparse.ArgumentParser(prog="python bench.py", description=__doc__,
                                epilog=f"CSV columns (one row per model x impl x mode x B x L):\n{columns}",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="run", choices=("run", "sweep", "report"))
    m = p.add_argument_group("run and sweep")
    m.add_argument("--device", default="auto", choices=DEVICES)
    m.add_argument("--presets", help="comma list of model presets (default: see DEFAULTS in speed/models.py)")
    m.add_argument("--batches", help="comma list of batch sizes B")
    m.add_argument("--lengths", help="comma list of lengths L")
    m.add_argument("--modes", default=",".join(MODES), help="comma list of train, infer, realtime")
    m.add_argument("--reps", type=int, default=5, help="timed steps per configuration")
    m.add_argument("--warmup", type=int, help="untimed steps first (default 1; 2 where shapes compile)")
    m.add_argument("--realtime_calls", type=int, default=20, help="timed single-sequence calls")
    m.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto: the device's default (CPU fp32, CUDA, Neuron and XLA bf16 autocast)")
    m.add_argument("--compile", default="auto", choices=("auto", "true", "false"),
                   help="torch.compile: auto = on CUDA only; true compiles on the CPU too")
    m.add_argument("--attn", choices=ATTN_IMPLS, help="our attention (default: the device's choice)")
    m.add_argument("--no_hf", "--no-hf", dest="no_hf", action="store_true", help="ours only")
    m.add_argument("--model_args", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides of every preset's model config, e.g. n_layers=2 d_model=64")
    m.add_argument("--machine", default="", help="a label for the machine, kept in the CSV")
    m.add_argument("--instance", help=f"priced instance: {', '.join(hardware.INSTANCES)}")
    m.add_argument("--usd_per_hour", type=float, help="$ per hour of the measured device (overrides)")
    m.add_argument("--threads", type=int, help="host threads (torch.set_num_threads; default torch's)")
    m.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_results", help="folder of the CSV and Markdown files")
    r = p.add_argument_group("report")
    r.add_argument("--inputs", nargs="*", help="CSV files or folders (default: --out)")
    r.add_argument("--plots", default="docs/bench", help="folder of the PNG plots ('' = none)")
    r.add_argument("--benchmarks", default="BENCHMARKS.md",
                   help="Markdown file whose bench:report section is rewritten ('' = none)")
    args = p.parse_args(argv)
    if args.reps < 1 or args.realtime_calls < 1 or (args.warmup is not None and args.warmup < 0):
        p.error("--reps and --realtime_calls must be at least 1 and --warmup at least 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    return report(args) if args.command == "report" else run(args)


if __name__ == "__main__":
    main()
