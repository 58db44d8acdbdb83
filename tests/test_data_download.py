import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from huggingface_hub import constants as hub_constants

from data import download as dl
from data.datasets import resolve_dataset
from data.download import DownloadError, download
from data.shards import join_documents, write_shard
from data.tokenizer import encode
from runtime.devices import get_backend
from training import data_setup

REPO = "Synthyra/omg_prot50_packed"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A local directory laid out like the Hub repo, served by fakes of the two Hub calls."""
    root = tmp_path / "hub"
    (root / "old").mkdir(parents=True)
    names = ["omgprot50_val_000000.bin", "omgprot50_test_000000.bin"] + [
        f"omgprot50_train_{i:06d}.bin" for i in (1, 2, 3)
    ]
    for i, name in enumerate(names):
        write_shard(root / "old" / name, join_documents([encode("MKV" * (i + 1))]))
    (root / "README.md").write_text("readme")
    calls = {"list": [], "get": []}

    class FakeApi:
        def __init__(self, endpoint=None):
            self.endpoint = endpoint

        def list_repo_files(self, repo_id, repo_type=None):
            assert repo_type == "dataset"
            calls["list"].append((repo_id, self.endpoint))
            return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    def fake_download(repo_id, filename, *, repo_type=None, local_dir=None, endpoint=None):
        assert repo_type == "dataset" and repo_id == REPO
        calls["get"].append(filename)
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / filename, target)
        return str(target)

    monkeypatch.setattr(dl, "HfApi", FakeApi)
    monkeypatch.setattr(dl, "hf_hub_download", fake_download)
    return root, calls


def test_download_valid_test_and_first_chunks(hub, tmp_path, monkeypatch):
    root, calls = hub
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.invalid")
    out = tmp_path / "out"
    paths = download("omg_prot50", 2, out)
    assert [p.name for p in paths] == [
        "omgprot50_val_000000.bin",
        "omgprot50_test_000000.bin",
        "omgprot50_train_000001.bin",
        "omgprot50_train_000002.bin",
    ]
    assert all(p.parent == out for p in paths) and calls["list"] == [
        (REPO, "http://mirror.invalid")
    ]
    files = resolve_dataset(str(out))
    assert len(files.train) == 2 and len(files.valid) == 1 and len(files.test) == 1
    calls["get"].clear()
    (out / "omgprot50_train_000002.bin").write_bytes(b"\x00" * 5)  # a broken local copy
    download("omg_prot50", 2, out)
    assert calls["get"] == [
        "old/omgprot50_train_000002.bin"
    ]  # only the broken one is fetched again


def test_new_naming_is_preferred_when_both_exist(hub, tmp_path):
    root, calls = hub
    write_shard(root / "omg_prot50_train_000000.bin", join_documents([encode("MK")]))
    paths = download("omg_prot50", 5, tmp_path / "out")
    assert [p.name for p in paths] == ["omg_prot50_train_000000.bin"]


def test_corrupt_download_is_refused_and_removed(hub, tmp_path):
    root, _ = hub
    (root / "old" / "omgprot50_test_000000.bin").write_bytes(b"garbage")
    with pytest.raises(
        DownloadError, match="omgprot50_test_000000.bin from .* failed verification"
    ):
        download("omg_prot50", 1, tmp_path / "out")
    assert not (tmp_path / "out" / "omgprot50_test_000000.bin").exists()


def test_unreachable_hub_is_one_sentence_with_the_local_alternative(tmp_path, monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # real Hub code, no network
    with pytest.raises(DownloadError) as err:
        download("omg_prot50", 1, tmp_path)
    msg = str(err.value)
    assert msg.startswith("cannot reach the Hugging Face Hub") and "python -m data.prepare" in msg
    assert msg.count(". ") == 0 and "\n" not in msg


def test_network_error_message_never_shows_the_token(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")

    class DownApi:
        def __init__(self, endpoint=None):
            pass

        def list_repo_files(self, repo_id, repo_type=None):
            raise ConnectionError("refused while sending Bearer hf_secret_value")

    monkeypatch.setattr(dl, "HfApi", DownApi)
    with pytest.raises(DownloadError, match="cannot reach") as err:
        download("omg_prot50", 1, tmp_path)
    assert "hf_secret_value" not in str(err.value)


def test_cli_reports_unreachable_hub(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_not_printed"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "data.download",
            "--dataset",
            "omg_prot50",
            "--num_chunks",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 1
    assert run.stderr.startswith("error: cannot reach the Hugging Face Hub")
    assert "hf_not_printed" not in run.stdout + run.stderr


# ---------------------------------------------------------------------------- train.py's first use


def _setup_worker(rank, tmp, outcome):
    """One of 2 gloo ranks (local ranks 0 and 1 of one machine) in training.data_setup.resolve_data,
    with a stand-in for the download that outlasts the process group's timeout, then succeeds or
    fails as `outcome` says. Writes what the rank got to rank<r>.json."""
    tmp = Path(tmp)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    timeout = datetime.timedelta(seconds=2)  # any wait in a collective fails after 2 s
    dist.init_process_group("gloo", init_method=f"file://{tmp / 'init'}", rank=rank, world_size=2,
                            timeout=timeout)
    calls = []

    def slow_download(argv):
        calls.append(argv)
        time.sleep(3 * timeout.total_seconds())
        if outcome == "unreachable":
            print("error: cannot reach the Hugging Face Hub")
            return 1
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True)
        for i, split in enumerate(("train", "valid", "test")):
            write_shard(out / f"omg_prot50_{split}_000000.bin", join_documents([encode("MKV" * (i + 1))]))
        return 0

    dl.main = slow_download
    data_setup.POLL_SECONDS = 0.05
    tempfile.tempdir = str(tmp / "markers")  # the machine's temporary folder, for this test alone
    backend = get_backend("cpu", None)
    backend.init_distributed()
    cfg = SimpleNamespace(data="omg_prot50", data_cache=str(tmp / "cache"), num_chunks=1)
    try:
        files = data_setup.resolve_data(cfg, backend)
        got = {"train": [p.name for p in files.train], "error": None}
    except Exception as e:  # noqa: BLE001  (what each rank would print)
        got = {"error": f"{type(e).__name__}: {e}"}
    got["downloads"] = len(calls)
    (tmp / f"rank{rank}.json").write_text(json.dumps(got))
    dist.destroy_process_group()


@pytest.mark.parametrize("outcome", ["downloaded", "unreachable"])
def test_the_other_ranks_wait_for_a_slow_first_download_and_share_its_error(tmp_path, outcome):
    """Local rank 0 downloads for longer than any collective may wait; local rank 1 waits for its
    marker, not in a collective, and gets the shards, or the same one-sentence error."""
    (tmp_path / "markers").mkdir()
    mp.spawn(_setup_worker, args=(str(tmp_path), outcome), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["downloads"] for r in ranks] == [1, 0]
    markers = [p.suffix for p in (tmp_path / "markers").iterdir()]
    if outcome == "downloaded":
        assert ranks[0]["error"] is ranks[1]["error"] is None
        assert ranks[0]["train"] == ranks[1]["train"] == ["omg_prot50_train_000000.bin"]
        assert markers == []  # the done marker is removed once every rank has seen it
    else:
        assert ranks[0]["error"] == ranks[1]["error"]
        assert ranks[0]["error"].startswith("ConfigError: the omg_prot50 shards could not be downloaded")
        assert markers == [".error"]
