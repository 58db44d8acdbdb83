import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants as hub_constants

from data import download as dl
from data.datasets import resolve_dataset
from data.download import DownloadError, download
from data.shards import join_documents, write_shard
from data.tokenizer import encode

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
