"""The run log (DESIGN, "The run log"): logs/<name>.txt and logs/<name>.jsonl, main rank only.

The text file is a self-contained record: the source of every project file the run imported
with its sha256, the environment, the resolved config, then `key:value` lines per logged
step and evaluation, then a summary. A resumed run appends a new header and goes on.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "CREDENTIAL")
# Environment variables worth recording: they change what the run does or how fast it goes.
ENV_PREFIXES = ("CUDA_VISIBLE_DEVICES", "NCCL_", "OMP_NUM_THREADS", "PJRT_", "XLA_", "NEURON_",
                "WANDB_MODE", "TORCH_", "HF_HUB_OFFLINE", "FI_")
BAR = "=" * 100


def secret_values() -> list[str]:
    """Values of environment variables that look like credentials (never written anywhere)."""
    return [v for k, v in os.environ.items()
            if any(w in k.upper() for w in SECRET_WORDS) and len(v) >= 6]


def scrub(text: str, secrets: list[str] | None = None) -> str:
    for s in secrets if secrets is not None else secret_values():
        text = text.replace(s, "***")
    return text


def source_files(extra: list[str] = ()) -> list[Path]:
    """Project files this process has imported (plus `extra`, e.g. the config), sorted."""
    files = set()
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if f and f.endswith(".py") and os.path.isabs(f):  # relative names are not project files
            p = Path(f).resolve()
            if p.is_relative_to(ROOT) and not any(part.startswith(".venv") for part in p.relative_to(ROOT).parts):
                files.add(p)
    files.update(Path(e).resolve() for e in extra if e and Path(e).is_file())
    main = Path(sys.argv[0]).resolve()
    return sorted(files, key=lambda p: (p != main, str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)))


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def format_value(key: str, v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v) and key == "mfu"):
        return "n/a"
    if isinstance(v, bool) or isinstance(v, int) or isinstance(v, str):
        return str(v)
    if key in ("lr",):
        return f"{v:.3e}"
    if key in ("train_time", "warmup_time"):
        return f"{v:.1f}s"
    if key in ("step_avg",):
        return f"{v:.1f}ms"
    if key in ("mem", "mem_reserved"):
        return f"{v:.2f}GiB"
    if key.startswith("tok/s"):
        return f"{v:.0f}"
    return f"{v:.4f}"


def format_line(fields: dict) -> str:
    return " ".join(f"{k}:{format_value(k, v)}" for k, v in fields.items())


class RunLog:
    """Writes on the main rank only; every other rank gets a RunLog that does nothing."""

    def __init__(self, path_stem: str | Path, enabled: bool = True, total_steps: int = 0):
        self.enabled = enabled
        self.total_steps = total_steps  # step:S/T in the text (the JSON keeps S and T apart)
        self.txt = Path(f"{path_stem}.txt")
        self.jsonl = Path(f"{path_stem}.jsonl")
        self._secrets = secret_values()
        if enabled:
            self.txt.parent.mkdir(parents=True, exist_ok=True)

    def _write(self, path: Path, text: str) -> None:
        if self.enabled:
            with open(path, "a") as f:
                f.write(scrub(text, self._secrets))

    def header(self, config: dict, environment: dict, extra_sources: list[str] = (), notes: dict = ()) -> None:
        parts = []
        for p in source_files(extra_sources):
            data = p.read_bytes()
            # a file from outside the project (--config /elsewhere/x.yaml) by its name alone: a log
            # names no absolute path, which the leaderboard refuses in an untrusted log
            name = p.relative_to(ROOT).as_posix() if p.is_relative_to(ROOT) else f"external/{p.name}"
            text = data.decode("utf-8", "replace")
            # exactly the file's text (blank last lines too), ended by one newline if it has none:
            # what the leaderboard re-hashes (submissions/logcheck.py check_sources)
            parts.append(f"{BAR}\nsource: {name} sha256:{hashlib.sha256(data).hexdigest()}\n{BAR}\n"
                         + text + ("" if text.endswith("\n") else "\n"))
        env = "\n".join(f"{k}: {v}" for k, v in environment.items())
        cfg = yaml.safe_dump(config, sort_keys=False).rstrip("\n")
        note = "".join(f"{k}: {v}\n" for k, v in dict(notes).items())
        self._write(self.txt, "".join(parts) + f"{BAR}\nenvironment\n{BAR}\n{env}\n"
                    f"{BAR}\nconfig\n{BAR}\n{cfg}\n{BAR}\nrun\n{BAR}\n{note}")
        self._json({"kind": "header", "config": config, "environment": environment, **dict(notes)})

    def line(self, kind: str, fields: dict, echo=print) -> str:
        shown = dict(fields)
        if "step" in shown and self.total_steps:
            shown["step"] = f"{fields['step']}/{self.total_steps}"
        text = format_line(shown)
        self._write(self.txt, text + "\n")
        self._json({"kind": kind, **fields, "num_steps": self.total_steps})
        if self.enabled and echo:
            echo(text)
        return text

    def message(self, text: str, echo=print) -> None:
        self._write(self.txt, text + "\n")
        if self.enabled and echo:
            echo(text)

    def summary(self, fields: dict, echo=print) -> None:
        self._write(self.txt, f"{BAR}\nsummary\n{BAR}\n" + "".join(f"{k}:{format_value(k, v)}\n" for k, v in fields.items()))
        self._json({"kind": "summary", **fields})
        if self.enabled and echo:
            echo("summary: " + format_line(fields))

    def _json(self, record: dict) -> None:
        self._write(self.jsonl, json.dumps(record, default=str) + "\n")


def environment(backend) -> dict:
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)}
    env = {k: ("***" if any(w in k.upper() for w in SECRET_WORDS) else v) for k, v in env.items()}
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": backend.describe(),
        "world_size": backend.world_size,
        "git_commit": git_commit(),
        "command": " ".join(sys.argv),
        "env": " ".join(f"{k}={v}" for k, v in env.items()) or "-",
    }
