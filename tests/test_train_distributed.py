"""Two processes over gloo train exactly like one process with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_support import ROOT, TORCHRUN, TWO_RANKS, losses, run_train, write_tiny_shards

WORKER = str(Path(__file__).with_name("train_ddp_worker.py"))


def worker(tmp, world, accum, optimizer, fsdp=False):
    out = tmp / f"w{world}a{accum}{optimizer}{'fsdp' if fsdp else ''}.pt"
    cmd = [*TORCHRUN, f"--nproc_per_node={world}", WORKER, str(out), str(accum), optimizer, *(["fsdp"] if fsdp else [])]
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
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert len(set(one["losses"])) == len(one["losses"])  # the model moved at every step


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_fsdp2_matches_one_rank(tmp_path, optimizer):
    """FSDP2, the sharding of the large CUDA presets, run over gloo: sharded parameters,
    gradients reduce-scattered only on the last micro-batch, Muon gathering each sharded
    gradient, clipping on a DTensor norm, the full state gathered for the checkpoint."""
    fsdp = worker(tmp_path, 2, 2, optimizer, fsdp=True)  # 2 ranks x 2 micro-batches of 2 rows
    accum = worker(tmp_path, 1, 4, optimizer)  # 1 rank, the same 2-row micro-batches
    assert fsdp["losses"] == pytest.approx(accum["losses"], rel=1e-6)
    assert len(set(accum["losses"])) == len(accum["losses"])
    assert fsdp["weights"].keys() == accum["weights"].keys()
    # Reduce-scatter rounds differently from one process's sum; Muon's update hardly feels
    # that (measured 7e-5), while Adam turns round-off of near-zero gradient entries into
    # lr-sized steps (measured 2e-3). A wrong shard or a missed reduction moves weights by far more.
    atol = 1e-3 if optimizer == "muon" else 1e-2
    for k, w in accum["weights"].items():
        torch.testing.assert_close(fsdp["weights"][k], w, rtol=0, atol=atol, msg=k)


def test_train_py_under_torchrun_scores_every_sequence_once(tmp_path):
    data = write_tiny_shards(tmp_path / "data")
    _, single = run_train(tmp_path, data, "one", "--num_steps", "4")
    _, double = run_train(tmp_path, data, "two", "--num_steps", "4", launcher=TWO_RANKS)
    s1 = [r for r in single if r["kind"] == "summary"][0]
    s2 = [r for r in double if r["kind"] == "summary"][0]
    assert s2["val_tokens"] == s1["val_tokens"] and s2["test_tokens"] == s1["test_tokens"]
    assert sorted(losses(double)) == [1, 2, 3, 4]
    header = [r for r in double if r["kind"] == "header"][0]
    assert header["environment"]["world_size"] == 2
    assert s2["tokens_all"] == s1["tokens_all"] == 4 * 512  # the global batch, counted once


def test_train_py_with_fsdp2_follows_ddp_and_resumes_identically(tmp_path):
    """train.py --fsdp true under torchrun: the loss curve of DDP, a checkpoint with the full
    weights, and pause + --resume auto continuing bit-identically (each rank's optimizer
    shards saved as plain tensors and laid out as DTensors again)."""
    data = write_tiny_shards(tmp_path / "data")
    args = ("--num_steps", "8", "--grad_accum", "2")
    _, ddp = run_train(tmp_path, data, "ddp", *args, launcher=TWO_RANKS)
    _, straight = run_train(tmp_path, data, "fsdp", *args, "--fsdp", "true", launcher=TWO_RANKS)
    assert losses(straight) == pytest.approx(losses(ddp), rel=1e-6)
    assert sorted(losses(straight)) == list(range(1, 9))
    weights = [torch.load(tmp_path / "ckpt" / name / "step_000008" / "common.pt")["model"] for name in ("ddp", "fsdp")]
    assert weights[0].keys() == weights[1].keys()
    for k, w in weights[0].items():
        assert not hasattr(weights[1][k], "device_mesh"), k  # gathered: plain tensors
        torch.testing.assert_close(weights[1][k], w, rtol=0, atol=1e-3, msg=k)
    run_train(tmp_path, data, "paused", *args, "--fsdp", "true", "--steps_this_run", "4", launcher=TWO_RANKS)
    _, resumed = run_train(tmp_path, data, "paused", *args, "--fsdp", "true", "--resume", "auto", launcher=TWO_RANKS)
    assert losses(resumed) == losses(straight)  # exact float equality, every step


def test_fsdp2_with_bf16_mixed_precision_stays_on_the_fp32_curve(tmp_path):
    """The CUDA presets' combination, bf16 autocast over FSDP2's fp32 parameters (the numerics
    of DDP + autocast), run on the CPU: close to the fp32 curve, not equal to it."""
    data = write_tiny_shards(tmp_path / "data")
    args = ("--num_steps", "6", "--fsdp", "true")
    _, fp32 = run_train(tmp_path, data, "fp32", *args, launcher=TWO_RANKS)
    _, bf16 = run_train(tmp_path, data, "bf16", *args, "--precision", "bf16", launcher=TWO_RANKS)
    assert losses(bf16) == pytest.approx(losses(fp32), rel=2e-2)
    assert losses(bf16) != losses(fp32)  # bf16 did take effect


def test_two_ranks_with_length_buckets_train_and_resume_identically(tmp_path):
    """Two gloo ranks train with buckets end to end, and a checkpoint carries the bucket pools:
    a paused and resumed run repeats the straight one. (That the ranks agree on every shape is
    the loader's test, tests/test_data_buckets.py: DDP's gradient all-reduce would not notice.)"""
    data = write_tiny_shards(tmp_path / "data")
    args = ["--num_steps", "6", "--length_buckets", "4", "--save_every", "3"]
    _, straight = run_train(tmp_path, data, "straight", *args, launcher=TWO_RANKS)
    header = [r for r in straight if r["kind"] == "header"][0]
    assert header["micro_batch"] == "8x32,4x64,2x96,2x128"
    run_train(tmp_path, data, "paused", *args, "--steps_this_run", "3", launcher=TWO_RANKS)
    _, resumed = run_train(tmp_path, data, "paused", *args, "--resume", "auto", launcher=TWO_RANKS)
    assert losses(straight) == losses(resumed) and sorted(losses(straight)) == [1, 2, 3, 4, 5, 6]
    summary = [r for r in straight if r["kind"] == "summary"][0]
    assert summary["tokens_all"] <= 6 * 512  # bucket rows keep at most the run's slots



def test_two_ranks_with_whole_rows_train_and_resume_identically(tmp_path):
    """Rows a cropped document fills alone run in mask-free micro-batches of their own (here
    about a fifth of the documents are longer than the rows); the pools resume exactly."""
    from data.datasets import resolve_dataset
    from data.loader import TrainLoader

    data = write_tiny_shards(tmp_path / "data")
    args = ["--num_steps", "12", "--whole_rows", "true", "--save_every", "6"]
    _, straight = run_train(tmp_path, data, "straight", *args, launcher=TWO_RANKS)
    run_train(tmp_path, data, "paused", *args, "--steps_this_run", "6", launcher=TWO_RANKS)
    _, resumed = run_train(tmp_path, data, "paused", *args, "--resume", "auto", launcher=TWO_RANKS)
    assert losses(straight) == losses(resumed) and sorted(losses(straight)) == list(range(1, 13))
    cfg = [r for r in straight if r["kind"] == "header"][0]["config"]
    loader = TrainLoader(resolve_dataset(str(data), None).train, cfg["batch_size"] // 2 // cfg["max_length"],
                         cfg["max_length"], seed=cfg["seed"], rank=0, world_size=2, whole_rows=True, prefetch=0)
    kinds = [bool(next(loader).get("whole_rows")) for _ in range(12)]
    assert any(kinds[6:]) and not all(kinds), f"the resumed half met no whole-row micro-batch: {kinds}"


LEAVE = """
import atexit, sys
import torch.distributed as dist
from runtime.backend import CPUBackend, leave
if sys.argv[1] == "gloo":
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
atexit.register(lambda: print("finalized"))
CPUBackend().shutdown()
print("result written", end="")  # buffered: leave must flush it
leave(3)
"""


@pytest.mark.parametrize("group", ["gloo", "none"])
def test_leave_skips_finalization_only_after_a_gloo_group(group):
    # After a gloo group, gloo's threads can abort a finished rank during interpreter
    # finalization; train.py leaves without it, with its exit status and its output intact.
    proc = subprocess.run([sys.executable, "-c", LEAVE, group], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert proc.stdout.startswith("result written")
    assert ("finalized" in proc.stdout) == (group == "none")
