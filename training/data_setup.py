"""Finding (and on first use preparing or downloading) the shards of a run, once per machine."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import uuid
from pathlib import Path

from runtime.errors import ConfigError

POLL_SECONDS = 1.0  # how often the other local ranks look for local rank 0's marker


def resolve_data(cfg, backend):
    """DatasetFiles for cfg.data. Local rank 0 prepares the sample or downloads missing
    OMGprot50 shards while the other ranks wait, so no two processes write the same files.

    They wait on a marker file, not in a collective: a download can take longer than any
    collective's timeout (30 minutes), and a failure reaches every rank as the same sentence."""
    cache = cfg.data_cache or None
    _once_per_machine(backend, lambda: _prepare(cfg, cache))
    files = _dataset(cfg, cache)
    from data.shards import read_header

    for split in ("train", "valid", "test"):
        if not getattr(files, split):
            raise ConfigError(f"dataset {cfg.data!r} has no {split} shards; prepare it with valid/test "
                              "splits (python -m data.prepare ... --valid N --test N).")
        for path in getattr(files, split):
            read_header(path)  # a bad header or size fails now, before the run log is started
    return files


def _once_per_machine(backend, work) -> None:
    """Local rank 0 runs work() and then leaves a marker (done, or its error) in the machine's
    temporary folder; the other local ranks poll for it, with no timeout: if local rank 0 dies
    without one, torchrun ends them. A token from rank 0 names the markers of this launch."""
    if backend.world_size == 1:
        work()
        return
    marker = Path(tempfile.gettempdir()) / f"esm-speedrun-data-{backend.broadcast_object(uuid.uuid4().hex)}"
    done, failed = marker.with_suffix(".done"), marker.with_suffix(".error")
    if backend.local_rank == 0:
        try:
            work()
        except BaseException as e:
            _write(failed, _sentence(e))
            raise
        _write(done, "")
    else:
        while not done.exists():
            if failed.exists():
                raise ConfigError(failed.read_text())
            time.sleep(POLL_SECONDS)
    # Every local rank has seen the marker. On several machines this also waits for the slowest
    # machine's download, within the collectives' timeout: a skew beyond it still fails there.
    backend.barrier()
    if backend.local_rank == 0:
        done.unlink()


def _sentence(e: BaseException) -> str:
    """What local rank 0 reports for e: the sentence train.py prints for a user's error, else
    the exception named."""
    from data.shards import ShardError

    if isinstance(e, (ConfigError, ShardError, FileNotFoundError)):
        return str(e)
    return f"local rank 0 stopped while setting up the data: {type(e).__name__}: {e}"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # readers never see half a message


def _prepare(cfg, cache) -> None:
    """The sample prepared, or missing shards of a downloadable dataset downloaded."""
    from data.datasets import DOWNLOADS

    try:
        _dataset(cfg, cache)
    except FileNotFoundError:
        if cfg.data not in DOWNLOADS:
            raise
        _download(cfg, cache)


def _dataset(cfg, cache):
    from data.datasets import resolve_dataset

    try:
        return resolve_dataset(cfg.data, cache)
    except ValueError as e:  # e.g. shards of two datasets in one directory
        raise ConfigError(f"--data {cfg.data!r}: {e}") from None


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
