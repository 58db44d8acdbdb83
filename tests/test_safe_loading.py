"""Loading a checkpoint never runs code: every file the project writes loads with
torch.load(weights_only=True), and a crafted file whose unpickling would create a marker file is
refused by every entry point that takes a checkpoint, in one sentence, with the marker absent."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from train_support import ROOT, run_train, write_tiny_shards

from model import build_model, get_config
from model.io import UnsafeFileError, load_file, load_weights, save_weights


class _Plant:
    """Unpickling this calls open(marker, "w"): the marker file appears if code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted(path: Path, marker: Path, blob: dict | None = None) -> Path:
    torch.save({**(blob or {"model_config": {}, "model": {}}), "payload": _Plant(marker)}, path)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real 4-step run with a checkpoint at step 2 and 4."""
    tmp = tmp_path_factory.mktemp("safe")
    data = write_tiny_shards(tmp / "data", n_train=60)
    run_train(tmp, data, "r", "--num_steps", "4", "--save_every", "2")
    return tmp, data


def assert_refused(proc, *words):
    err = proc.stderr.strip()
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)


def test_the_crafted_file_would_run_code_under_the_full_unpickler(tmp_path):
    """The control: without weights_only the marker appears, so its absence below means
    the refusal, not a dud file."""
    marker = tmp_path / "marker"
    torch.load(crafted(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.exists()


def test_every_file_the_project_writes_loads_with_weights_only(run, tmp_path):
    tmp, _ = run
    step = tmp / "ckpt" / "r" / "step_000004"
    cfg = get_config("sample", n_layers=1, d_model=32, n_heads=2, d_ff=64)
    save_weights(tmp_path / "w.pt", build_model(cfg), cfg)
    for f in (step / "common.pt", step / "rank_0.pt", tmp_path / "w.pt"):
        blob = torch.load(f, map_location="cpu", weights_only=True)
        assert isinstance(blob, dict) and blob
    assert load_weights(step / "common.pt")[0].n_layers == 2


def test_no_code_path_unpickles_freely_but_the_explicit_conversion():
    """torch.load(..., weights_only=False) appears once in the project: model.io.convert,
    reached only with --trust-this-file."""
    found = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", ".venv", ".venv-xla") or rel.parts[0].startswith("."):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "load":
                kw = {k.arg: k.value for k in node.keywords}
                if "weights_only" in kw and not (isinstance(kw["weights_only"], ast.Constant)
                                                 and kw["weights_only"].value is True):
                    found.append(f"{rel}:{node.lineno}")
    assert [f.split(":")[0] for f in found] == ["model/io.py"], found


def test_evaluate_refuses_a_crafted_checkpoint(run, tmp_path):
    _, data = run
    marker = tmp_path / "marker"
    evil = crafted(tmp_path / "evil.pt", marker)
    proc = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(evil), "--data", str(data),
                           "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert_refused(proc, "evil.pt", "it asks for io.open", "could run code", "--trust-this-file")
    assert not marker.exists()
    assert proc.returncode == 2


@pytest.mark.parametrize("command", ["export", "push"])
def test_the_hub_commands_refuse_a_crafted_checkpoint(tmp_path, command):
    marker = tmp_path / "marker"
    evil = crafted(tmp_path / "evil.pt", marker)
    args = {"export": ["export", str(evil), str(tmp_path / "out")],
            "push": ["push", str(evil), "me/x", "--dry-run", str(tmp_path / "out")]}[command]
    proc = subprocess.run([sys.executable, "-m", "hub", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert_refused(proc, "evil.pt", "could run code")
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("part", ["common.pt", "rank_0.pt"])
def test_resume_refuses_a_crafted_checkpoint_file(run, tmp_path, part):
    tmp, data = run
    marker = tmp_path / "marker"
    copy = tmp_path / "ckpt" / "r"
    shutil.copytree(tmp / "ckpt" / "r", copy)
    step = copy / "step_000004"
    genuine = torch.load(step / part, weights_only=True)
    crafted(step / part, marker, genuine)  # the real content, plus the payload
    proc, _ = run_train(tmp_path, data, "r", "--num_steps", "6", "--resume", str(step), rc=None)
    assert_refused(proc, part, "could run code", "--trust-this-file")
    assert not marker.exists()


def test_convert_needs_the_flag_and_writes_a_safe_file(tmp_path):
    """An old-style file holding numpy values: refused by load_file, converted once when the
    user vouches for it, then loaded safely with the same numbers."""
    old = tmp_path / "old.pt"
    torch.save({"model": {"w": torch.ones(2)}, "rng": np.arange(3), "lr": np.float64(0.5),
                "nested": [np.int64(7), (np.zeros(2, np.float32),)]}, old)
    with pytest.raises(UnsafeFileError, match="python -m model.io convert"):
        load_file(old)
    cmd = [sys.executable, "-m", "model.io", "convert", str(old), str(tmp_path / "new.pt")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert_refused(proc, "--trust-this-file")
    assert not (tmp_path / "new.pt").exists()
    proc = subprocess.run([*cmd, "--trust-this-file"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    new = load_file(tmp_path / "new.pt")
    assert torch.equal(new["rng"], torch.arange(3)) and new["lr"] == 0.5 and new["nested"][0] == 7
    assert torch.equal(new["model"]["w"], torch.ones(2)) and new["nested"][1][0].dtype == torch.float32


def test_convert_refuses_what_has_no_safe_form(tmp_path):
    old = tmp_path / "old.pt"
    torch.save({"x": Fraction(1, 3)}, old)  # an object of a class: no plain-value form
    proc = subprocess.run([sys.executable, "-m", "model.io", "convert", str(old), str(tmp_path / "new.pt"),
                           "--trust-this-file"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert_refused(proc, "fractions.Fraction", "no safe form")
    assert not (tmp_path / "new.pt").exists()
