"""`python -m hub push`, offline: the folder and model card it would upload (--dry-run),
the upload itself against a recording stand-in for huggingface_hub.HfApi, and every refusal."""

import os
import subprocess
import sys

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")
from train_support import ROOT, assert_user_error, run_train, write_tiny_shards  # noqa: E402
from transformers import EsmForMaskedLM  # noqa: E402

from hub.card import RunInfo, _data, results  # noqa: E402
from hub.cli import main as hf_cli  # noqa: E402
from model import build_model, get_config  # noqa: E402
from model.io import load_state_dict_checked, load_weights, save_weights  # noqa: E402

TOKEN = "hf_TestTokenNeverShown0123456789"
HF_FILES = {"config.json", "model.safetensors", "tokenizer_config.json", "vocab.txt", "README.md"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny esm2 run of train.py: (run directory, its run log records)."""
    tmp = tmp_path_factory.mktemp("push")
    _, records = run_train(tmp, write_tiny_shards(tmp / "data"), "esm", "--model", "esm2_8m",
                           "--num_steps", "3")
    return tmp / "ckpt" / "esm", records


@pytest.fixture
def fake_hub(monkeypatch):
    """Replaces huggingface_hub.HfApi; records every call and the files of each upload."""
    calls = []

    class FakeApi:
        fail = None

        def __init__(self, token=None, **kw):
            calls.append(("init", {"token": token, **kw}))

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", {"repo_id": repo_id, **kw}))
            if FakeApi.fail:
                raise FakeApi.fail
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_branch(self, repo_id, **kw):
            calls.append(("create_branch", {"repo_id": repo_id, **kw}))

        def upload_folder(self, **kw):
            folder = kw["folder_path"]
            files = {os.path.relpath(os.path.join(d, f), folder)
                     for d, _, fs in os.walk(folder) for f in fs}
            card = open(os.path.join(folder, "README.md")).read()
            calls.append(("upload_folder", {**kw, "files": files, "card": card}))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    FakeApi.calls = calls
    return FakeApi


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_dry_run_builds_the_export_and_card(run, tmp_path, monkeypatch, capsys, fake_hub):
    run_dir, records = run
    monkeypatch.delenv("HF_TOKEN", raising=False)
    out = tmp_path / "out"
    assert hf_cli(["push", str(run_dir), "me/esm-tiny", "--dry-run", str(out)]) == 0
    printed = capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == HF_FILES
    assert all(f in printed for f in HF_FILES) and "nothing uploaded" in printed
    assert fake_hub.calls == []

    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and "license" not in meta
    assert {"protein", "esm2", "masked-language-modeling"} <= set(meta["tags"])
    summary = next(r for r in records if r["kind"] == "summary")
    assert "- steps: 3 of 3 planned" in card
    assert f"{summary['tokens']:,} real tokens" in card and f"{summary['tokens_all']:,} positions" in card
    assert f"{summary['val_loss']:.4f}" in card and f"{summary['test_loss']:.4f}" in card
    assert "hardware: cpu x1" in card and "layers | 2 |" in card
    assert 'EsmForMaskedLM.from_pretrained("me/esm-tiny")' in card

    cfg, sd = load_weights(run_dir / "step_000003" / "common.pt")
    ours = build_model(cfg).eval()
    load_state_dict_checked(ours, sd)
    ids = torch.tensor([[0, 20, 15, 32, 8, 9, 2]])
    with torch.no_grad():
        hf = EsmForMaskedLM.from_pretrained(out).eval()(input_ids=ids).logits
        got, _ = ours(ids, torch.zeros_like(ids))
    assert (got - hf).abs().max() < 1e-5


def test_a_weights_file_gets_numbers_only_from_an_explicit_log(run, tmp_path, capsys):
    run_dir, records = run
    cfg, sd = load_weights(run_dir / "step_000003" / "common.pt")
    model = build_model(cfg)
    load_state_dict_checked(model, sd)
    save_weights(tmp_path / "w.pt", model, cfg)

    assert hf_cli(["push", str(tmp_path / "w.pt"), "me/w", "--dry-run", str(tmp_path / "a")]) == 0
    card = (tmp_path / "a" / "README.md").read_text()
    assert "No benchmark numbers are reported: this weights file records no training run" in card
    assert "val_loss" not in card and "| validation |" not in card

    log_txt = run_dir.parent.parent / "logs" / "esm.txt"
    assert hf_cli(["push", str(tmp_path / "w.pt"), "me/w", "--dry-run", str(tmp_path / "b"),
                   "--log", str(log_txt), "--license", "mit"]) == 0
    card = (tmp_path / "b" / "README.md").read_text()
    assert front_matter(card)["license"] == "mit"
    summary = next(r for r in records if r["kind"] == "summary")
    assert f"{summary['val_loss']:.4f}" in card and "does not record its step" in card


def test_push_takes_the_token_from_hf_token_and_never_prints_it(run, monkeypatch, capsys, fake_hub):
    run_dir, _ = run
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert hf_cli(["push", str(run_dir), "me/esm-tiny", "--private", "--revision", "v1"]) == 0
    out, err = capsys.readouterr()
    assert TOKEN not in out + err
    assert "https://huggingface.co/me/esm-tiny/tree/v1" in out
    calls = dict(fake_hub.calls)
    assert [c for c, _ in fake_hub.calls] == ["init", "create_repo", "create_branch", "upload_folder"]
    assert calls["init"]["token"] == TOKEN
    assert calls["create_repo"] == {"repo_id": "me/esm-tiny", "private": True, "exist_ok": True,
                                    "repo_type": "model"}
    assert calls["create_branch"]["branch"] == "v1"
    up = calls["upload_folder"]
    assert up["repo_id"] == "me/esm-tiny" and up["revision"] == "v1" and up["files"] == HF_FILES
    assert up["commit_message"] == "esm-speedrun export of esm/step_000003"
    assert TOKEN not in up["card"] and "- steps: 3 of 3 planned" in up["card"]
    assert not os.path.exists(up["folder_path"])  # the temporary folder is cleaned up


def test_a_network_error_is_one_line_without_the_token(run, monkeypatch, capsys, fake_hub):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    fake_hub.fail = ConnectionError(f"cannot reach huggingface.co (Authorization: Bearer {TOKEN})")
    assert hf_cli(["push", str(run[0]), "me/esm-tiny"]) == 1
    out, err = capsys.readouterr()
    assert TOKEN not in out + err
    assert err.startswith("error: pushing to me/esm-tiny") and len(err.strip().splitlines()) == 1
    assert "ConnectionError" in err and "upload_folder" not in dict(fake_hub.calls)


def test_missing_hf_token_is_refused_before_any_work(run, monkeypatch, capsys, fake_hub):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert hf_cli(["push", str(run[0]), "me/esm-tiny"]) == 1
    err = capsys.readouterr().err
    assert "HF_TOKEN is not set" in err and "export HF_TOKEN=" in err
    assert fake_hub.calls == []


def test_missing_hf_token_from_the_command_line_is_one_line(run):
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    proc = subprocess.run([sys.executable, "-m", "hub", "push", str(run[0]), "me/x"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert_user_error(proc, "HF_TOKEN")


def test_a_speedrun_checkpoint_is_refused(tmp_path, monkeypatch, capsys, fake_hub):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    cfg = get_config("sample", n_layers=2, d_model=32, n_heads=4, d_ff=64)
    save_weights(tmp_path / "s.pt", build_model(cfg), cfg)
    assert hf_cli(["push", str(tmp_path / "s.pt"), "me/s"]) == 1
    assert "'speedrun' model has no Hugging Face equivalent" in capsys.readouterr().err
    assert "upload_folder" not in dict(fake_hub.calls)


@pytest.mark.parametrize("repo_id", ["esm-tiny", "me/esm/tiny", "me/-esm", "me/esm..tiny", "me/"])
def test_a_malformed_repo_id_is_refused(tmp_path, repo_id, capsys):
    assert hf_cli(["push", str(tmp_path / "missing.pt"), repo_id, "--dry-run", str(tmp_path / "o")]) == 1
    assert "OWNER/NAME" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_missing_checkpoint_and_log_are_refused(run, tmp_path, capsys):
    assert hf_cli(["push", str(tmp_path / "nope"), "me/x", "--dry-run", str(tmp_path / "o")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert hf_cli(["push", str(run[0]), "me/x", "--dry-run", str(tmp_path / "p"),
                   "--log", str(tmp_path / "none.txt")]) == 1
    assert "no run log" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    assert hf_cli(["push", str(tmp_path / "junk.pt"), "me/x", "--dry-run", str(tmp_path / "q")]) == 1
    assert "not an esm-speedrun weights file" in capsys.readouterr().err


def test_numbers_belong_to_the_checkpoint_step():
    records = [{"kind": "header", "config": {}},
               {"kind": "eval", "step": 2, "val_loss": 3.1, "val_tokens": 10},
               {"kind": "summary", "step": 3, "val_loss": 2.9, "test_loss": 2.95}]
    info = RunInfo(step=2, config={"eval_max_batches": 20}, records=records)
    res, source = results(info)
    assert res["val_loss"] == 3.1 and "step 2 on the first 20 validation batches" in source
    res, source = results(RunInfo(step=3, records=records))
    assert res["val_loss"] == 2.9 and "final evaluation" in source
    assert results(RunInfo(step=1, records=records))[0] is None


def test_a_named_dataset_is_listed_in_the_front_matter():
    text, ids = _data("omg_prot50")
    assert ids == ["Synthyra/omg_prot50_packed", "tattabio/OMG_prot50"] and "CC-BY-SA-4.0" in text
    assert _data("/some/where/omgprot50")[1][0] == "Synthyra/omg_prot50_packed"
    assert _data("sample")[1] == [] and "UniProt" in _data("sample")[0]
