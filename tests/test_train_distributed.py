"""Two processes over gloo train exactly like one process with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_support import ROOT, losses, run_train, write_tiny_shards

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
WORKER = str(Path(__file__).with_name("train_ddp_worker.py"))


def worker(tmp, world, accum, optimizer):
    out = tmp / f"w{world}a{accum}{optimizer}.pt"
    cmd = [*TORCHRUN, f"--nproc_per_node={world}", WORKER, str(out), str(accum), optimizer]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_two_ranks_match_one_rank(tmp_path, optimizer):
    two = worker(tmp_path, 2, 1, optimizer)  # 2 ranks x 4 rows
    accum = worker(tmp_path, 1, 2, optimizer)  # 1 rank, 2 micro-batches of the same 4 + 4 rows
    one = worker(tmp_path, 1, 1, optimizer)  # 1 rank, all 8 rows in one micro-batch
    # Same rows per backward pass: the same sums in the same order, so fp32 tolerance holds
    # (bitwise equality in practice).
    assert two["losses"] == pytest.approx(accum["losses"], rel=1e-6, abs=1e-7)
    for k, w in accum["weights"].items():
        torch.testing.assert_close(two["weights"][k], w, rtol=1e-6, atol=1e-7, msg=k)
    # One micro-batch of 8 rows sums in another order; the loss curve still agrees, which a
    # per-rank or per-micro-batch mean (rows hold 1 to ~38 targets) would break. Weights are
    # not compared here: Adam/Muon turn round-off of near-zero gradients into visible updates.
    # Muon orthogonalises in bf16, which turns that round-off into ~1e-4 by step 4.
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5 if optimizer == "adamw" else 3e-4)
    assert len(set(one["losses"])) == len(one["losses"])  # the model moved at every step


def test_train_py_under_torchrun_scores_every_sequence_once(tmp_path):
    data = write_tiny_shards(tmp_path / "data")
    _, single = run_train(tmp_path, data, "one", "--num_steps", "4")
    _, double = run_train(tmp_path, data, "two", "--num_steps", "4", launcher=[*TORCHRUN, "--nproc_per_node=2"])
    s1 = [r for r in single if r["kind"] == "summary"][0]
    s2 = [r for r in double if r["kind"] == "summary"][0]
    assert s2["val_tokens"] == s1["val_tokens"] and s2["test_tokens"] == s1["test_tokens"]
    assert sorted(losses(double)) == [1, 2, 3, 4]
    header = [r for r in double if r["kind"] == "header"][0]
    assert header["environment"]["world_size"] == 2
    assert s2["tokens_all"] == s1["tokens_all"] == 4 * 512  # the global batch, counted once
