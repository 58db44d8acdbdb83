"""Training checkpoints: atomic, per rank, the last K kept, refused when they belong to another run.

Layout: <checkpoint_dir>/<log_name>/step_000120/{common.pt, rank_0.pt, rank_1.pt, ...}
common.pt holds what all ranks share (model weights, model config, run identity, step,
counters; readable by model.io.load_weights); rank_<r>.pt holds what each rank owns
(optimizer state, loader position, RNG states). The step directory is assembled under a
temporary name and renamed only when complete, so a killed save never looks like a checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path

import torch

from model.config import EXECUTION_FIELDS, ModelConfig
from model.io import UnsafeFileError, load_file
from runtime.errors import ConfigError

FORMAT = "esm-speedrun-checkpoint/1"
STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used for this run (printed as one sentence)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file, fsync, rename over the final name."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(run_dir: Path, step: int, common: dict, rank_state: dict, backend, keep: int) -> Path:
    """Collective: every rank calls it. Returns the final step directory."""
    run_dir = Path(run_dir)
    final = run_dir / f"step_{step:06d}"
    tmp = run_dir / f"step_{step:06d}.tmp"
    if backend.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    backend.barrier()
    atomic_save(rank_state, tmp / f"rank_{backend.rank}.pt")
    if backend.is_main:
        atomic_save({"format": FORMAT, "world_size": backend.world_size, **common}, tmp / "common.pt")
    backend.barrier()
    if backend.is_main:
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. SIGTERM right after save_every)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(run_dir)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    backend.barrier()
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete step directories of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / "common.pt").is_file()]
    return [p for _, p in sorted(found)]


def weights_file(spec: str) -> Path:
    """The file holding a model's weights: a weights file as it is; a step directory's
    common.pt; a run directory's newest step's common.pt (evaluate.py, python -m hub)."""
    path = Path(spec)
    if path.is_dir():
        steps = [path] if (path / "common.pt").is_file() else list_checkpoints(path)
        if not steps:
            raise CheckpointError(f"{spec} holds no checkpoint (no common.pt or step_*/common.pt); "
                                  "pass a step directory, a run directory or a weights file.")
        return steps[-1] / "common.pt"
    if not path.is_file():
        raise CheckpointError(f"{spec} does not exist; pass a weights file or a checkpoint directory.")
    return path


def resolve(spec: str, run_dir: Path) -> Path | None:
    """`--resume auto` -> newest checkpoint of this run (None: start fresh); a path -> that
    step directory, or the newest one inside a run directory."""
    if spec == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(spec)
    if (path / "common.pt").is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"--resume {spec!r} holds no complete checkpoint (no step_*/common.pt); point it at a step directory or use --resume auto.")
    return found[-1]


def load(path: Path, rank: int, world_size: int) -> tuple[dict, dict]:
    """(common, this rank's state) of a checkpoint directory, checked for format and world size."""
    path = Path(path)
    common = _load(path / "common.pt")
    if not isinstance(common, dict) or common.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an esm-speedrun training checkpoint; use evaluate.py for weight files, or another --resume path.")
    if common["world_size"] != world_size:
        raise CheckpointError(
            f"checkpoint {path} was written by {common['world_size']} processes but this run has {world_size}; "
            "resume with the same number of processes (optimizer and loader state are per rank).")
    rank_file = path / f"rank_{rank}.pt"
    if not rank_file.is_file():
        raise CheckpointError(f"checkpoint {path} lacks {rank_file.name}; it is incomplete, resume from an older step.")
    return common, _load(rank_file)


def _load(file: Path):
    """A checkpoint file, read without running code from it (model.io.load_file)."""
    try:
        return load_file(file)
    except UnsafeFileError as e:
        raise CheckpointError(str(e)) from None
    except ValueError as e:  # a truncated or foreign file: say which one
        raise CheckpointError(f"checkpoint {file} cannot be read ({e}); delete it or resume from an older step.") from None


def check_same_run(common: dict, model_config: dict, identity: dict, path: Path) -> None:
    """Refuses a checkpoint of another model or config, naming the first differences. A model
    field added after the checkpoint was written counts at its default (which keeps the model
    it describes unchanged), so older checkpoints of the same run still resume. How attention is
    computed (model.config.EXECUTION_FIELDS) is no part of the model (the weights do not depend
    on it): a run may resume with another device's choice."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    model_only = lambda c: {k: v for k, v in c.items() if k not in EXECUTION_FIELDS}
    for what, theirs, ours in (("model config", model_only({**defaults, **common["model_config"]}),
                                model_only(model_config)),
                               ("training config", common["identity"], identity)):
        diff = [k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
        if diff:
            shown = ", ".join(f"{k}={theirs.get(k)!r} there vs {ours.get(k)!r} here" for k in diff[:4])
            raise CheckpointError(
                f"checkpoint {path} belongs to another run: its {what} differs ({shown}); "
                "use the same settings, or a new --log_name to start afresh.")
