"""The CUDA launch's logic that a CPU can run (issue 13): flex attention only when compiled,
FSDP2 that keeps gradients sharded and compiles its blocks, FSDP2 numerics equal to DDP's, a
failing rank that ends the job, and replicated optimizer state written once."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from train_support import ROOT, TINY, TORCHRUN, TWO_RANKS, losses, run_train, write_tiny_shards

from model import build_model, get_config
from model.io import save_weights
from runtime.cuda import CUDABackend

HERE = Path(__file__).parent


@pytest.mark.parametrize("compile,flex", [("false", False), ("true", True), ("auto", True)])
def test_cuda_picks_flex_attention_only_when_compiled(compile, flex):
    backend = CUDABackend(SimpleNamespace(compile=compile, precision="auto", fsdp=False))
    assert (backend.model_defaults().get("attn_impl") == "flex") is flex


def test_evaluate_runs_a_flex_trained_checkpoint_with_the_devices_attention(tmp_path, capsys):
    import evaluate as evaluate_py

    data = write_tiny_shards(tmp_path / "data", n_train=10)
    printed = {}
    for impl in ("flex", "sdpa"):
        torch.manual_seed(0)
        cfg = get_config("sample", n_layers=1, d_model=32, n_heads=2, d_ff=64, attn_impl=impl)
        save_weights(tmp_path / f"{impl}.pt", build_model(cfg), cfg)
        assert evaluate_py.main(["--checkpoint", str(tmp_path / f"{impl}.pt"), "--data", str(data),
                                 "--device", "cpu"]) == 0
        printed[impl] = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed["flex"] == printed["sdpa"] and "valid_loss:" in printed["flex"]


def fsdp_worker(tmp_path, *extra):
    out = tmp_path / "fsdp.json"
    proc = subprocess.run([*TORCHRUN, "--nproc_per_node=2", str(HERE / "fsdp_worker.py"), str(out), *extra],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_fsdp2_gradients_are_sharded_after_every_micro_batch(tmp_path):
    """No unsharded gradient waits for the last micro-batch: after the first one, every
    gradient is already this rank's shard (measured over 2 gloo ranks)."""
    result = fsdp_worker(tmp_path)
    assert result["sharded_after_first_micro"] and all(result["sharded_after_first_micro"])


def test_fsdp2_with_compile_compiles_each_block_not_the_root(tmp_path):
    result = fsdp_worker(tmp_path, "compile")
    assert result["blocks_compiled"] == [True, True] and not result["root_compiled"]
    assert result["graphs"] >= 1  # dynamo built the blocks' graphs (forward)


def test_fsdp2_trains_the_numerics_of_ddp_under_bf16(tmp_path):
    """bf16 autocast with fp32 parameters under both: the curves agree up to reduction order
    (bf16 parameter gathering would make FSDP2's residual stream bf16 and its curve drift)."""
    data = write_tiny_shards(tmp_path / "data")
    args = ("--num_steps", "6", "--precision", "bf16")
    _, ddp = run_train(tmp_path, data, "ddp", *args, launcher=TWO_RANKS)
    _, fsdp = run_train(tmp_path, data, "fsdp", *args, "--fsdp", "true", launcher=TWO_RANKS)
    assert losses(fsdp) == pytest.approx(losses(ddp), rel=1e-4)


def test_a_failing_rank_ends_the_job_at_once(tmp_path):
    """Rank 1 raises in its third step while rank 0 waits in a collective: both processes end
    (no barrier after a failure, which would wait out the 30-minute timeout)."""
    data = write_tiny_shards(tmp_path / "data")
    cmd = [*TWO_RANKS, str(HERE / "fault_worker.py"), *TINY, "--data", str(data), "--num_steps", "8",
           "--log_dir", str(tmp_path / "logs"), "--checkpoint_dir", str(tmp_path / "ckpt"), "--log_name", "fault"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=240)  # a hang fails here, long before any collective timeout
    assert proc.returncode != 0 and "injected fault on rank 1" in proc.stderr


def test_replicated_optimizer_state_is_written_once_and_resumes_exactly(tmp_path):
    data = write_tiny_shards(tmp_path / "data")
    args = ("--num_steps", "6", "--save_every", "3")
    _, straight = run_train(tmp_path, data, "straight", *args, launcher=TWO_RANKS)
    step = tmp_path / "ckpt" / "straight" / "step_000003"
    common = torch.load(step / "common.pt", weights_only=True)
    ranks = [torch.load(step / f"rank_{r}.pt", weights_only=True) for r in (0, 1)]
    assert "optimizer" in common and all("optimizer" not in r and "loader" in r for r in ranks)
    run_train(tmp_path, data, "paused", *args, "--steps_this_run", "3", launcher=TWO_RANKS)
    _, resumed = run_train(tmp_path, data, "paused", *args, "--resume", "auto", launcher=TWO_RANKS)
    assert losses(resumed) == losses(straight)  # exact, every step
