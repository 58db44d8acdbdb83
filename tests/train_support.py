"""Helpers of the trainer tests: tiny shards and tiny train.py runs in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
TWO_RANKS = [*TORCHRUN, "--nproc_per_node=2"]  # run_train(..., launcher=TWO_RANKS): 2 gloo processes
# A 2-layer, 64-wide model on rows of 128 tokens: a step takes milliseconds.
TINY = ["--config", "config/sample.yaml", "--device", "cpu", "--model_args.n_layers", "2",
        "--model_args.d_model", "64", "--model_args.n_heads", "2", "--model_args.d_ff", "128",
        "--batch_size", "512", "--max_length", "128", "--eval_batch_size", "2048",
        "--optim.warmup_steps", "2", "--log_every", "1", "--eval_every", "0", "--save_every", "0",
        "--track", ""]  # the tiny shards are not the cpu-sample track's data


def write_tiny_shards(out: Path, n_train: int = 300, n_eval: int = 12, seed: int = 0) -> Path:
    """Random residue documents with a learnable bias (some residues far more frequent)."""
    sys.path.insert(0, str(ROOT))
    from data.shards import write_shard

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(20, 0.5))
    for split, n in (("train", n_train), ("valid", n_eval), ("test", n_eval)):
        tokens = []
        for _ in range(n):
            tokens += [0, *(4 + rng.choice(20, int(rng.integers(20, 150)), p=p)), 2]
        write_shard(out / f"tiny_{split}_000000.bin", np.array(tokens, dtype=np.uint8))
    return out


def run_train(tmp: Path, data: Path, name: str, *extra: str, env: dict | None = None,
              rc: int | None = 0, timeout: int = 300, launcher: list[str] | None = None):
    """Runs train.py with the tiny settings; returns (process, JSON-lines records)."""
    cmd = [*(launcher or [sys.executable]), "train.py", *TINY, "--data", str(data),
           "--log_dir", str(tmp / "logs"), "--checkpoint_dir", str(tmp / "ckpt"),
           "--log_name", name, *extra]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if rc is not None:
        assert proc.returncode == rc, f"train.py {name}: rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc, read_records(tmp / "logs" / f"{name}.jsonl")


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if r["kind"] == "step"}


def assert_user_error(proc, *words: str) -> None:
    """A user mistake: non-zero exit, one line on stderr naming the input, no traceback."""
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)
