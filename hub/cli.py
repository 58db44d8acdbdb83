"""The command line of hub/: to and from the Hugging Face Hub.

    python -m hub import HF_DIR CHECKPOINT     # EsmForMaskedLM dir -> our weights file
    python -m hub export CHECKPOINT OUT_DIR    # ours -> transformers.EsmForMaskedLM dir
    python -m hub push CHECKPOINT OWNER/NAME   # export + model card -> the Hub (HF_TOKEN)

CHECKPOINT: a weights file, a train.py step directory, or a run directory (its newest step).
"""

from __future__ import annotations

import argparse
import sys

from hub.files import export_hf, import_hf
from hub.push import TOKEN_VAR, PushError, push_hf


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hub", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="Hugging Face EsmForMaskedLM directory -> our weights file")
    imp.add_argument("hf_dir")
    imp.add_argument("checkpoint")
    exp = sub.add_parser("export", help="our weights file or checkpoint -> Hugging Face directory")
    exp.add_argument("checkpoint")
    exp.add_argument("out_dir")
    pus = sub.add_parser("push", help="export with a model card and upload to the Hugging Face Hub "
                         f"(token from ${TOKEN_VAR})")
    pus.add_argument("checkpoint", help="weights file, step directory or run directory (newest step)")
    pus.add_argument("repo_id", help="OWNER/NAME on the Hub; created if missing")
    pus.add_argument("--private", action="store_true", help="create the repo private")
    pus.add_argument("--log", help="the run log (.jsonl or .txt); default: the checkpoint's own "
                     "<log_dir>/<log_name>.jsonl when it exists")
    pus.add_argument("--license", help="license id for the card (e.g. mit, apache-2.0, "
                     "cc-by-4.0); default: none stated")
    pus.add_argument("--dry-run", metavar="OUT_DIR", help="build the folder in OUT_DIR, list "
                     "what would be uploaded, send nothing (no token needed)")
    pus.add_argument("--revision", help="branch to push to (created if missing); default main")
    pus.add_argument("--commit-message")
    args = p.parse_args(argv)
    try:
        if args.cmd == "import":
            cfg = import_hf(args.hf_dir, args.checkpoint)
            print(f"imported {args.hf_dir} ({cfg.n_layers} layers, d_model {cfg.d_model}) -> {args.checkpoint}")
        elif args.cmd == "export":
            export_hf(args.checkpoint, args.out_dir)
            print(f"exported {args.checkpoint} -> {args.out_dir}")
        else:
            folder, files, url = push_hf(
                args.checkpoint, args.repo_id, private=args.private, log=args.log,
                dry_run=args.dry_run, revision=args.revision,
                commit_message=args.commit_message, license=args.license)
            if url:
                print(f"pushed {args.checkpoint} -> {url}")
            else:
                print(f"dry run: nothing uploaded; would push to {args.repo_id} "
                      f"({'private' if args.private else 'public'}) the files in {folder}:")
                for f in files:
                    print(f"  {f} ({(folder / f).stat().st_size:,} bytes)")
    except (ValueError, OSError, PushError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
