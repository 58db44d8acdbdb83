"""Find a dataset's shards by name: the shipped sample, a downloaded set, or a directory.

    resolve_dataset("sample")       prepared from data/sample/ into <cache>/sample on first use
    resolve_dataset("omg_prot50")   <cache>/omg_prot50, filled by `python -m data.download`
    resolve_dataset("/some/dir")    any directory of *_{train,valid,test}_NNNNNN.bin shards

<cache> is $ESM_SPEEDRUN_CACHE, else <repo>/cache, unless a cache_dir is passed.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_FASTA = REPO_ROOT / "data" / "sample" / "uniprot_sample_20k.fasta.gz"
SAMPLE_SPLITS = {"valid": 1000, "test": 1000, "seed": 0}  # train gets the other 18,000

# Downloadable packed datasets: name -> (Hugging Face dataset repo, file prefixes it has used).
DOWNLOADS = {
    "omg_prot50": ("Synthyra/omg_prot50_packed", ("omg_prot50", "omgprot50")),
    "og_prot90": ("Synthyra/og_prot90_packed", ("og_prot90", "ogprot90")),
    "uniref50": ("Synthyra/uniref50_packed", ("uniref50",)),
}
SHARD_NAME = re.compile(r"^(?P<prefix>.+)_(?P<split>train|valid|val|test)_(?P<index>\d{6})\.bin$")


@dataclass
class DatasetFiles:
    train: list[Path] = field(default_factory=list)
    valid: list[Path] = field(default_factory=list)
    test: list[Path] = field(default_factory=list)
    name: str = ""


def default_cache_dir() -> Path:
    return Path(os.environ.get("ESM_SPEEDRUN_CACHE") or REPO_ROOT / "cache")


def parse_shard_name(name: str) -> tuple[str, str, int] | None:
    """(prefix, split, index) of a shard file name; 'val' is read as 'valid'."""
    m = SHARD_NAME.match(name)
    if not m:
        return None
    split = "valid" if m["split"] == "val" else m["split"]
    return m["prefix"], split, int(m["index"])


def find_shards(directory, name: str = "") -> DatasetFiles:
    """The shards directly inside `directory`, each split sorted by index."""
    found = {"train": [], "valid": [], "test": []}
    prefixes = set()
    directory = Path(directory)
    for path in directory.glob("*.bin") if directory.is_dir() else ():
        parsed = parse_shard_name(path.name)
        if parsed:
            prefixes.add(parsed[0])
            found[parsed[1]].append((parsed[2], path))
    if len(prefixes) > 1:
        raise ValueError(
            f"{directory} holds shards of several datasets ({', '.join(sorted(prefixes))}); "
            "keep one set per directory"
        )
    files = {k: [p for _, p in sorted(v)] for k, v in found.items()}
    return DatasetFiles(**files, name=name or directory.name)


def _prepare_sample(target: Path) -> None:
    """Prepare the shipped sample into `target`. Every caller (e.g. each rank) builds its own
    staging copy and renames it into place; the first rename wins, so readers never see a
    partial directory and no lock is needed."""
    from data.prepare import prepare

    stage = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        prepare([SAMPLE_FASTA], stage, "sample", quiet=True, **SAMPLE_SPLITS)
        try:
            os.rename(stage, target)
            print(f"data: prepared the shipped sample into {target}", file=sys.stderr)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def dataset_shards(spec: str, cache_dir: str | os.PathLike | None = None) -> DatasetFiles:
    """--data's shards for tools that read what is there: a directory as it is (an
    evaluation-only dataset, without the train shards resolve_dataset requires, works), a name
    through resolve_dataset. ValueError for a directory holding several datasets."""
    if spec == "sample" or spec in DOWNLOADS or not Path(spec).is_dir():
        return resolve_dataset(spec, cache_dir)
    return find_shards(spec)


def resolve_dataset(spec: str, cache_dir: str | os.PathLike | None = None) -> DatasetFiles:
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if spec == "sample":
        target = cache / "sample"
        if not target.is_dir():
            cache.mkdir(parents=True, exist_ok=True)
            _prepare_sample(target)
        return find_shards(target, "sample")
    if spec in DOWNLOADS:
        files = find_shards(cache / spec, spec)
        if not files.train:
            out = "" if cache_dir is None else f" --out {cache / spec}"
            raise FileNotFoundError(
                f"dataset {spec!r} has no shards in {cache / spec}; download them with "
                f"`python -m data.download --dataset {spec} --num_chunks N{out}`"
            )
        return files
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(
            f"dataset {spec!r} is neither 'sample', a downloadable name "
            f"({', '.join(DOWNLOADS)}) nor a directory; prepare shards with "
            "`python -m data.prepare INPUT --out DIR --name NAME` and pass DIR"
        )
    files = find_shards(path)
    if not files.train:
        raise FileNotFoundError(
            f"{path} holds no *_train_NNNNNN.bin shards; prepare them with "
            f"`python -m data.prepare INPUT --out {path} --name NAME`"
        )
    return files
