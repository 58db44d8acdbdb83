"""Finding (and on first use preparing or downloading) the shards of a run, once per machine."""

from __future__ import annotations

import hashlib
from pathlib import Path

from runtime.errors import ConfigError


def resolve_data(cfg, backend):
    """DatasetFiles for cfg.data. Local rank 0 prepares the sample or downloads missing
    OMGprot50 shards while the other ranks wait, so no two processes write the same files."""
    from data.datasets import DOWNLOADS, resolve_dataset

    cache = cfg.data_cache or None
    try:
        if backend.local_rank == 0:
            try:
                resolve_dataset(cfg.data, cache)
            except FileNotFoundError:
                if cfg.data not in DOWNLOADS:
                    raise
                _download(cfg, cache)
        backend.barrier()
        files = resolve_dataset(cfg.data, cache)
    except ValueError as e:  # e.g. shards of two datasets in one directory
        raise ConfigError(f"--data {cfg.data!r}: {e}") from None
    from data.shards import read_header

    for split in ("train", "valid", "test"):
        if not getattr(files, split):
            raise ConfigError(f"dataset {cfg.data!r} has no {split} shards; prepare it with valid/test "
                              "splits (python -m data.prepare ... --valid N --test N).")
        for path in getattr(files, split):
            read_header(path)  # a bad header or size fails now, before the run log is started
    return files


def split_digest(paths) -> str:
    """sha256 over the bytes of a split's shard files in order: the run log records it for the
    validation and test splits, so a leaderboard track can pin the exact data it is scored on."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def _download(cfg, cache) -> None:
    from data import download

    # --out is the shard folder itself, where resolve_dataset looks: <cache>/<dataset>.
    out = ["--out", str(Path(cache) / cfg.data)] if cache else []
    argv = ["--dataset", cfg.data, "--num_chunks", str(cfg.num_chunks)] + out
    print(f"train.py: {cfg.data} shards are missing; downloading them (python -m data.download {' '.join(argv)})")
    if download.main(argv) != 0:
        raise ConfigError(f"the {cfg.data} shards could not be downloaded (see the message above); "
                          f"run python -m data.download {' '.join(argv)} where the Hub is reachable, "
                          "or pass --data DIR with shards prepared by python -m data.prepare.")
