"""Resuming is bit-identical on the CPU: 40 steps straight = 20 + stop + --resume auto to 40."""

import os
import signal
import subprocess
import sys
import time

import pytest
from train_support import ROOT, TINY, losses, read_records, run_train, write_tiny_shards

STEPS = "40"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    data = write_tiny_shards(tmp / "data")
    _, straight = run_train(tmp, data, "straight", "--num_steps", STEPS)
    return tmp, data, losses(straight)


def test_pause_and_resume_is_identical(setup):
    tmp, data, straight = setup
    _, first = run_train(tmp, data, "paused", "--num_steps", STEPS, "--steps_this_run", "20")
    assert max(losses(first)) == 20 and (tmp / "ckpt" / "paused" / "step_000020").is_dir()
    _, both = run_train(tmp, data, "paused", "--num_steps", STEPS, "--resume", "auto")
    resumed = losses(both)
    assert sorted(resumed) == list(range(1, 41))
    assert resumed == straight  # exact float equality, every step
    finals = [r for r in both if r["kind"] == "summary"]
    assert len(finals) == 1


def test_sigterm_saves_and_resume_is_identical(setup):
    tmp, data, straight = setup
    cmd = [sys.executable, "train.py", *TINY, "--data", str(data), "--log_dir", str(tmp / "logs"),
           "--checkpoint_dir", str(tmp / "ckpt"), "--log_name", "killed", "--num_steps", STEPS]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = tmp / "logs" / "killed.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not any(r["kind"] == "step" and r["step"] >= 3 for r in read_records(log)):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    stopped_at = max(losses(read_records(log)))
    assert stopped_at < int(STEPS), "the run ended before the signal arrived"
    assert (tmp / "ckpt" / "killed" / f"step_{stopped_at:06d}").is_dir()
    assert "stopped by a signal" in (tmp / "logs" / "killed.txt").read_text()
    _, records = run_train(tmp, data, "killed", "--num_steps", STEPS, "--resume", "auto")
    assert losses(records) == straight


def test_resume_refuses_another_model(setup):
    tmp, data, _ = setup
    proc, _ = run_train(tmp, data, "paused", "--num_steps", STEPS, "--resume", "auto",
                        "--model_args.n_layers", "3", rc=None)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "n_layers=2 there vs 3 here" in proc.stderr, proc.stderr


def test_resume_refuses_another_batch(setup):
    tmp, data, _ = setup
    proc, _ = run_train(tmp, data, "paused", "--num_steps", STEPS, "--resume", "auto",
                        "--batch_size", "1024", rc=None)
    assert proc.returncode == 2 and "batch_size=512 there vs 1024 here" in proc.stderr, proc.stderr


def test_fresh_run_does_not_overwrite_an_existing_log(setup):
    tmp, data, _ = setup
    before = (tmp / "logs" / "straight.txt").read_text()
    proc, _ = run_train(tmp, data, "straight", "--num_steps", STEPS, rc=None)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert (tmp / "logs" / "straight.txt").read_text() == before
