"""Download packed shards from the Hugging Face Hub.

    python -m data.download --dataset omg_prot50 --num_chunks N [--out DIR] [--repo REPO]

Fetches the valid/test shards and the first N train shards (about 1e8 tokens each), into
<cache>/<dataset> by default (see data.datasets). Accepts both historical file namings
(omg_prot50_* and omgprot50_*). A shard already on disk that passes verification is kept; a
partial download resumes. Every file is verified after download. HF_TOKEN (for private or
gated repos) and HF_ENDPOINT (a mirror) are read from the environment by huggingface_hub.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
)

from data.datasets import DOWNLOADS, default_cache_dir, parse_shard_name
from data.shards import ShardError, read_shard

_NETWORK_MODULES = ("httpx", "httpx2", "requests", "urllib3", "socket", "ssl")


class DownloadError(RuntimeError):
    """One sentence: what failed and what to do."""


def _reason(e: BaseException) -> str:
    # First sentence only, so that the whole message stays one sentence.
    text = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0].rstrip(".")[:160]
    token = os.environ.get("HF_TOKEN")
    return text.replace(token, "***") if token else text


def _hub_error(e: BaseException, repo: str, endpoint: str | None) -> DownloadError | None:
    """Translate a Hub failure into one sentence; None for errors that are bugs, not the Hub."""
    if isinstance(e, (RepositoryNotFoundError, GatedRepoError)):
        return DownloadError(
            f"dataset repository {repo} was not found or is not accessible; check "
            "--repo, or export HF_TOKEN if it is private or gated"
        )
    if isinstance(e, RemoteEntryNotFoundError):
        return DownloadError(
            f"a file listed in {repo} is missing on the Hub ({_reason(e)}); try again later"
        )
    network = (
        isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled, OSError, HfHubHTTPError))
        or type(e).__module__.split(".")[0] in _NETWORK_MODULES
    )
    if not network:
        return None
    where = f" at {endpoint}" if endpoint else ""
    return DownloadError(
        f"cannot reach the Hugging Face Hub{where} ({_reason(e)}); to train "
        "without it, prepare shards from local files with `python -m data.prepare "
        "INPUT --out DIR --name NAME` and pass DIR as the dataset"
    )


@contextmanager
def _hub(repo: str, endpoint: str | None):
    try:
        yield
    except Exception as e:
        err = _hub_error(e, repo, endpoint)
        if err is None:
            raise
        raise err from None


def select_files(repo_files: list[str], dataset: str, num_chunks: int) -> list[str]:
    """The repo's valid/test shards and its first num_chunks train shards, one naming only."""
    _, prefixes = DOWNLOADS[dataset]
    by_prefix: dict[str, dict[str, list]] = {}
    for f in repo_files:
        parsed = parse_shard_name(f.rsplit("/", 1)[-1])
        if parsed and parsed[0] in prefixes:
            prefix, split, index = parsed
            by_prefix.setdefault(prefix, {"train": [], "valid": [], "test": []})[split].append(
                (index, f)
            )
    # A repo that has held both namings would give every shard twice: keep the newest naming.
    prefix = next((p for p in prefixes if p in by_prefix), None)
    if prefix is None:
        return []
    splits = {k: [f for _, f in sorted(v)] for k, v in by_prefix[prefix].items()}
    return splits["valid"] + splits["test"] + splits["train"][:num_chunks]


def _verified(path: Path) -> bool:
    try:
        read_shard(path)
        return True
    except ShardError:
        return False


def download(
    dataset: str = "omg_prot50",
    num_chunks: int = 1,
    out=None,
    repo: str | None = None,
    endpoint: str | None = None,
) -> list[Path]:
    """Fetch and verify the shards; return their local paths (flat inside `out`)."""
    if dataset not in DOWNLOADS:
        raise DownloadError(f"--dataset {dataset!r} is unknown; use one of {', '.join(DOWNLOADS)}")
    if num_chunks < 0:
        raise DownloadError(f"--num_chunks {num_chunks} must be >= 0")
    repo = repo or DOWNLOADS[dataset][0]
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
    out = Path(out) if out else default_cache_dir() / dataset
    out.mkdir(parents=True, exist_ok=True)
    with _hub(repo, endpoint):
        # No token argument: huggingface_hub reads HF_TOKEN itself, so it never passes through here.
        repo_files = HfApi(endpoint=endpoint).list_repo_files(repo, repo_type="dataset")
    wanted = select_files(repo_files, dataset, num_chunks)
    if not wanted:
        raise DownloadError(
            f"{repo} has no {dataset} shards (*_train_NNNNNN.bin); check --repo and --dataset"
        )
    n_train = sum(parse_shard_name(f.rsplit("/", 1)[-1])[1] == "train" for f in wanted)
    if n_train < num_chunks:
        print(
            f"note: {repo} has only {n_train} train shards, fetching all of them", file=sys.stderr
        )
    paths = []
    for name in wanted:
        path = out / name.rsplit("/", 1)[-1]
        if not (path.is_file() and _verified(path)):
            with _hub(repo, endpoint):
                got = Path(
                    hf_hub_download(
                        repo, name, repo_type="dataset", local_dir=out, endpoint=endpoint
                    )
                )
            if got.resolve() != path.resolve():
                os.replace(got, path)  # keep the directory flat, as data.datasets reads it
            try:
                read_shard(path)
            except ShardError as e:
                path.unlink()
                raise DownloadError(
                    f"downloaded {name} from {repo} failed verification ({e}); run "
                    "the command again to fetch it anew"
                ) from None
        print(f"ok {path}", file=sys.stderr)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data.download",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", default="omg_prot50", choices=sorted(DOWNLOADS))
    p.add_argument(
        "--num_chunks", type=int, required=True, help="train shards to fetch (~1e8 tokens each)"
    )
    p.add_argument("--out", default=None, help="directory (default <cache>/<dataset>)")
    p.add_argument(
        "--repo", default=None, help="Hub dataset repo (default Synthyra/<dataset>_packed)"
    )
    p.add_argument(
        "--endpoint", default=None, help="Hub endpoint (default $HF_ENDPOINT or the Hub)"
    )
    a = p.parse_args(argv)
    try:
        paths = download(a.dataset, a.num_chunks, a.out, a.repo, a.endpoint)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{len(paths)} shards ready in {paths[0].parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
