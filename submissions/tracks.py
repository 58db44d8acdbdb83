"""Leaderboard tracks: a target validation loss on a named dataset; the score is the training
time to reach it (logs_to_keep/README.md has the rules, leaderboard.py checks them).

A run claims a track with `--track NAME` (recorded in its log's config). The OMGprot50 targets
are the validation losses of the ESM2 models on the SpeedrunningPLMs benchmark of OMGprot50
(../shared/reference/shard-format-and-data.md section 8.1).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Track:
    name: str
    target: float  # validation loss to reach (<=) on the full validation split
    data: str  # the dataset the run must train and evaluate on (config key `data`)
    about: str
    # Masked tokens of the full validation / test split under the benchmark: a fingerprint of
    # the splits (a run scored on other sequences shows other counts). None = not yet
    # measured; fill it from the first verified run on the dataset, in a reviewed PR.
    val_tokens: int | None = None
    test_tokens: int | None = None
    # sha256 of the validation / test shard bytes (runtime/data_setup.split_digest), which run
    # logs record as valid_sha256 / test_sha256 since 2026-11-22; None = not pinned yet.
    valid_sha256: str | None = None
    test_sha256: str | None = None


TRACKS = {t.name: t for t in (
    Track("esm2-8m", 2.618, "omg_prot50", "ESM2-8M's OMGprot50 validation loss"),
    Track("esm2-35m", 2.500, "omg_prot50", "ESM2-35M's OMGprot50 validation loss"),
    Track("esm2-150m", 2.390, "omg_prot50", "ESM2-150M's OMGprot50 validation loss"),
    Track("esm2-650m", 2.267, "omg_prot50", "ESM2-650M's OMGprot50 validation loss"),
    Track("cpu-sample", 2.85, "sample",
          "the shipped 20k UniProt sample on a CPU (development track; not comparable with OMGprot50)",
          val_tokens=61697, test_tokens=61130),
)}
