"""The CUDA lane: what only a GPU can show (pytest -m cuda, by `./run.sh test-cuda`, which stops
with one sentence where no GPU is visible instead of skipping; skipped in the CPU lane). The CPU
lane already covers the logic these paths share (FSDP2, compile inside DDP/FSDP2, flex's block
mask): test_train_*. It checks here what makes the lane and the GPU image usable: the gate of
`./run.sh test-cuda` and the Dockerfile's compiler."""

from __future__ import annotations

import csv
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_support import TORCHRUN, losses, run_train, write_tiny_shards

from model import build_model, get_config

ROOT = Path(__file__).resolve().parents[1]


def gpu(test):
    """A test of the CUDA lane: marked cuda, skipped where no GPU is visible."""
    needs = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (./run.sh test-cuda on one)")
    return pytest.mark.cuda(needs(test))


CUDA = ("--device", "cuda")


@gpu
def test_flex_attention_trains_like_sdpa_on_cuda():
    """Forward and backward of the compiled flex path against SDPA, in fp32, on packed rows."""
    torch.manual_seed(0)
    ids = torch.randint(4, 24, (2, 256), device="cuda")
    doc_ids = torch.zeros(2, 256, dtype=torch.long, device="cuda")
    doc_ids[0, 100:], doc_ids[1, 200:] = 1, -1
    labels = torch.where(torch.rand(2, 256, device="cuda") < 0.2, ids, torch.full_like(ids, -100))
    results = {}
    for impl in ("sdpa", "flex"):
        torch.manual_seed(0)
        model = build_model(get_config("sample", n_layers=2, d_model=64, n_heads=4, d_ff=128, attn_impl=impl)).cuda()
        _, loss = (torch.compile(model) if impl == "flex" else model)(ids, doc_ids, labels)
        loss.backward()
        results[impl] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(results["flex"][0], results["sdpa"][0], rtol=1e-4, atol=1e-4)
    for name, grad in results["sdpa"][1].items():
        torch.testing.assert_close(results["flex"][1][name], grad, rtol=1e-3, atol=1e-4, msg=name)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_shards(tmp_path_factory.mktemp("cuda") / "data")


@gpu
def test_train_py_on_one_gpu_logs_mfu_and_memory(tmp_path, data):
    """The default CUDA composition (bf16 autocast, compile, flex, fused AdamW) learns, and its
    log carries MFU (for a GPU of runtime/hardware.py's table) and GPU memory."""
    _, records = run_train(tmp_path, data, "gpu", "--num_steps", "30", *CUDA, timeout=900)
    curve = losses(records)
    assert sorted(curve) == list(range(1, 31))
    assert sum(curve[s] for s in range(26, 31)) < sum(curve[s] for s in range(1, 6))
    header = next(r for r in records if r["kind"] == "header")
    assert header["environment"]["device"].startswith("cuda x1")
    last = [r for r in records if r["kind"] == "step"][-1]
    assert last["mem"] > 0 and last["mem_reserved"] >= last["mem"]
    from runtime import hardware

    if hardware.peak_flops(torch.cuda.get_device_name()):
        assert 0 < last["mfu"] < 1
    summary = next(r for r in records if r["kind"] == "summary")
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]), rel=1e-9)


@gpu
def test_bf16_autocast_stays_near_fp32_on_cuda(tmp_path, data):
    eager = ("--num_steps", "8", "--compile", "false", "--model_args.attn_impl", "sdpa", *CUDA)
    _, fp32 = run_train(tmp_path, data, "fp32", *eager, "--precision", "fp32")
    _, bf16 = run_train(tmp_path, data, "bf16", *eager, "--precision", "bf16")
    assert losses(bf16) == pytest.approx(losses(fp32), rel=2e-2)


@gpu
def test_profile_steps_records_the_cuda_kernels(tmp_path, data):
    """--profile_steps on CUDA: the trace holds the GPU's kernels, the table sorts by device time."""
    import json

    run_train(tmp_path, data, "prof", "--num_steps", "5", "--profile_steps", "3:4", *CUDA, timeout=900)
    out = tmp_path / "logs" / "prof.profile"
    events = json.loads((out / "trace_rank0.json").read_text())["traceEvents"]
    assert any(e.get("cat") == "kernel" for e in events)
    assert "sorted by self_device_time_total" in (out / "ops_rank0.txt").read_text()


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_ddp_and_fsdp2_over_nccl_agree(tmp_path, data):
    two = [*TORCHRUN, "--nproc_per_node=2"]
    args = ("--num_steps", "8", "--grad_accum", "2", "--precision", "fp32", *CUDA)
    _, ddp = run_train(tmp_path, data, "ddp", *args, launcher=two, timeout=900)
    _, fsdp = run_train(tmp_path, data, "fsdp", *args, "--fsdp", "true", launcher=two, timeout=900)
    assert losses(fsdp) == pytest.approx(losses(ddp), rel=1e-3)  # TF32 matmuls, compiled kernels


@gpu
def test_bench_py_on_cuda_reports_a_row_with_mfu(tmp_path):
    import bench

    path = bench.main(["--device", "cuda", "--presets", "esm2_8m", "--batches", "4", "--lengths", "512",
                       "--modes", "train", "--reps", "3", "--out", str(tmp_path)])
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    ours = [r for r in rows if r["impl"] == "ours"]
    assert ours and all(r["status"] == "ok" for r in ours)
    assert float(ours[0]["tokens_per_s"]) > 0
    assert ours[0]["compiled"] == "True" and ours[0]["compiles"] == "0"  # ran warm-up's graphs


# ---------------------------------------------------------------------------- checked on the CPU


def test_the_cuda_lane_stops_with_one_sentence_where_no_gpu_is_visible(tmp_path):
    """`./run.sh test-cuda` with no GPU visible exits 1 with one sentence before pytest runs.
    It runs in a copy of run.sh whose .venv-cuda python is a stand-in: pip installs nothing, the
    rest runs on this interpreter."""
    (tmp_path / "tests").mkdir()
    shutil.copy(ROOT / "run.sh", tmp_path)
    shutil.copy(ROOT / "tests" / "require_gpu.py", tmp_path / "tests")
    python = tmp_path / ".venv-cuda" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\necho "$*" >> "{tmp_path}/calls"\n'
                      f'if [ "$1 $2" = "-m pip" ]; then exit 0; fi\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    run = subprocess.run(["./run.sh", "test-cuda"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert run.returncode == 1 and run.stdout == ""
    assert (tmp_path / "calls").read_text().splitlines() == [
        "-m pip install -q --disable-pip-version-check -r requirements-cuda.txt", "tests/require_gpu.py"]
    message = run.stderr.strip()
    assert message.startswith("run.sh test-cuda: ") and message.endswith(".") and "\n" not in message
    assert message.count("; ") == 1  # what is wrong; what to do
    assert ("a CPU build" if torch.version.cuda is None else "sees no GPU") in message


def test_the_gpu_image_has_what_triton_builds_its_launcher_with():
    """torch.compile on CUDA compiles Triton kernels, and Triton builds a C launcher against
    Python.h at the first one: the image installs a C compiler with the C library headers and
    the headers of the python3 its venv is made from."""
    lines = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text()).splitlines()
    runs = [line.split() for line in lines if line.startswith("RUN ")]
    installed = {word for words in runs if "apt-get" in words for word in words}
    assert {"build-essential", "python3-dev"} <= installed
    assert ["RUN", "python3", "-m", "venv", "/opt/venv"] in runs
