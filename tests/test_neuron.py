"""The Neuron lane: what only a Trainium 2/3 chip shows (pytest -m neuron, by `./run.sh test-neuron`,
which first stops with one sentence where TorchNeuron sees no Trainium 2/3 device; skipped where
torch_neuronx is not installed, as in the CPU lane). The backend's logic is tested against a
stand-in TorchNeuron in test_neuron_backend.py; this lane checks the documentation's promises it
was written from (docs/trainium.md lists them): the device API, op coverage in eager mode, fused
AdamW's skip of a non-finite step, memory, train.py eager, bf16 and compiled, checkpoints and
resume, DDP and FSDP2 over the "neuron" process group, bench.py. None of it has run yet.

This process never touches the device: a process keeps every NeuronCore it started the Neuron
runtime on until it exits, which would leave none to the next test's train.py. Each check runs in
a child process (train.py, bench.py, or a script), and the lane sets TORCH_DEVICE_BACKEND_AUTOLOAD=0
so that `import torch` here does not load torch_neuronx either."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._pytree import tree_map_only
from train_support import ROOT, TWO_RANKS, losses, run_train, write_tiny_shards


def lane(test):
    """A test of the Neuron lane: marked neuron, skipped where torch_neuronx is not installed."""
    needs = pytest.mark.skipif(importlib.util.find_spec("torch_neuronx") is None,
                               reason="needs TorchNeuron on a Trainium 2/3 instance (./run.sh test-neuron on one)")
    return pytest.mark.neuron(needs(test))


NEURON = ("--device", "neuron")
# Each train.py rank picks its core before torch_neuronx loads, as ./run.sh trn2 has it.
CHILD_ENV = {"TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}


def on_device(code: str, timeout: int = 1800) -> str:
    """Runs `code` in a child Python with the project on its path; returns what it printed."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **CHILD_ENV, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_shards(tmp_path_factory.mktemp("neuron") / "data")


@lane
def test_the_device_has_the_api_the_backend_calls():
    """Every torch.neuron function runtime/neuron.py relies on exists, and the chip is known."""
    found = json.loads(on_device("""
        import json, torch
        from runtime import hardware, neuron
        neuron.load()
        wanted = ("is_available", "device_count", "synchronize", "get_device_properties", "get_rng_state",
                  "set_rng_state", "max_memory_allocated", "reset_peak_memory_stats", "get_amp_supported_dtype")
        name = str(torch.neuron.get_device_properties(torch.device("neuron", 0)).name)
        print(json.dumps({"missing": [f for f in wanted if not hasattr(torch.neuron, f)], "name": name,
                          "chip": hardware.neuron_chip(name),
                          "bf16": torch.bfloat16 in torch.neuron.get_amp_supported_dtype()}))
    """))
    assert found["missing"] == []
    assert found["chip"] in ("trn2", "trn3"), found["name"]
    assert found["bf16"]


@lane
def test_the_model_runs_on_the_device_as_on_the_cpu():
    """Forward and backward in fp32, eager, on packed rows with padding: every op the model uses
    (SDPA with the document mask, rotary positions, int64 ids cast inside ops) on the device."""
    on_device("""
        import torch
        from model import build_model, get_config
        from runtime import neuron
        neuron.load()
        torch.manual_seed(0)
        ids = torch.randint(4, 24, (2, 256))
        doc_ids = torch.zeros(2, 256, dtype=torch.long)
        doc_ids[0, 100:], doc_ids[1, 200:] = 1, -1
        labels = torch.where(torch.rand(2, 256) < 0.2, ids, torch.full_like(ids, -100))
        results = {}
        for device in ("cpu", "neuron"):
            torch.manual_seed(0)
            cfg = get_config("sample", n_layers=2, d_model=64, n_heads=4, d_ff=128, attn_impl="sdpa")
            model = build_model(cfg).to(device)
            logits, loss = model(ids.to(device), doc_ids.to(device), labels.to(device))
            loss.backward()
            assert logits.device.type == device and logits.dtype == torch.float32, (logits.device, logits.dtype)
            results[device] = (loss.detach().cpu(),
                               {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None})
        torch.testing.assert_close(results["neuron"][0], results["cpu"][0], rtol=1e-4, atol=1e-4)
        for name, grad in results["cpu"][1].items():
            torch.testing.assert_close(results["neuron"][1][name], grad, rtol=1e-3, atol=1e-4, msg=name)
    """)


@lane
def test_whole_rows_attend_without_a_mask_on_the_device_as_on_the_cpu():
    """--whole_rows micro-batches: rows of one document each, SDPA with no mask (the path the
    Neuron flash kernel takes), in fp32 and under bf16 autocast, against the CPU's masked graph."""
    on_device("""
        import torch
        from model import build_model, get_config
        from runtime import neuron
        neuron.load()
        torch.manual_seed(0)
        ids = torch.randint(4, 24, (2, 512))
        doc_ids = torch.zeros(2, 512, dtype=torch.long)
        labels = torch.where(torch.rand(2, 512) < 0.2, ids, torch.full_like(ids, -100))
        for dtype, tol in ((None, 1e-4), (torch.bfloat16, 3e-2)):
            losses = {}
            for device, whole in (("cpu", False), ("neuron", True)):
                torch.manual_seed(0)
                model = build_model(get_config("sample", n_layers=2, d_model=256, n_heads=2, d_ff=512,
                                               attn_impl="sdpa")).to(device)
                with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
                    _, loss = model(ids.to(device), doc_ids.to(device), labels.to(device), whole_rows=whole)
                loss.backward()
                losses[device] = loss.detach().float().cpu()
            torch.testing.assert_close(losses["neuron"], losses["cpu"], rtol=tol, atol=tol)
    """)


@lane
def test_fused_adamw_skips_a_non_finite_step_on_the_device():
    """optimizer_step with an inf gradient: found_inf makes fused AdamW and Muon leave every
    parameter as it was."""
    on_device("""
        import torch
        from model import build_model, get_config
        from optim import build_optimizer
        from optim.config import default_optim_config
        from runtime.neuron import NeuronBackend
        backend = NeuronBackend()
        backend.init_distributed()
        model = build_model(get_config("sample", n_layers=1, d_model=32, n_heads=2, d_ff=64)).to(backend.device)
        optimizer = build_optimizer(model, default_optim_config("sample"), fused=backend.fused_adamw,
                                    ns_dtype=backend.muon_dtype)
        before = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
        for p in model.parameters():
            p.grad = torch.full_like(p, float("inf"))
        _, stepped = backend.optimizer_step(model, optimizer, 1.0)
        assert not bool(stepped.cpu())
        for n, p in model.named_parameters():
            assert torch.equal(p.detach().cpu(), before[n]), n
    """)


@lane
def test_memory_is_counted_after_a_synchronize():
    mem = json.loads(on_device("""
        import json, torch
        from runtime.neuron import NeuronBackend
        backend = NeuronBackend()
        backend.init_distributed()
        backend.reset_peak_memory()
        block = torch.ones(2**28, device=backend.device)  # 1 GiB of fp32
        print(json.dumps(backend.memory_stats()))
    """))
    assert mem["mem"] >= 1.0


@lane
def test_train_py_on_one_core_learns_and_logs_mfu_and_memory(tmp_path, data):
    """The default Neuron composition (eager, bf16 autocast, SDPA, fused AdamW) learns, and its
    log carries MFU from the chip's peak and device memory."""
    _, records = run_train(tmp_path, data, "neuron", "--num_steps", "30", *NEURON, env=CHILD_ENV, timeout=3600)
    curve = losses(records)
    assert sorted(curve) == list(range(1, 31))
    assert sum(curve[s] for s in range(26, 31)) < sum(curve[s] for s in range(1, 6))
    header = next(r for r in records if r["kind"] == "header")
    assert header["environment"]["device"].startswith(("neuron x1 (trn2, lnc ", "neuron x1 (trn3, lnc "))
    last = [r for r in records if r["kind"] == "step"][-1]
    assert last["mem"] > 0 and 0 < last["mfu"] < 1
    summary = next(r for r in records if r["kind"] == "summary")
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]), rel=1e-9)


@lane
def test_bf16_autocast_stays_near_fp32_on_neuron(tmp_path, data):
    args = ("--num_steps", "8", *NEURON)
    _, fp32 = run_train(tmp_path, data, "fp32", *args, "--precision", "fp32", env=CHILD_ENV, timeout=3600)
    _, bf16 = run_train(tmp_path, data, "bf16", *args, "--precision", "bf16", env=CHILD_ENV, timeout=3600)
    assert losses(bf16) == pytest.approx(losses(fp32), rel=2e-2)


@lane
def test_compiled_training_follows_eager(tmp_path, data):
    """--compile true (torch.compile(backend="neuron"), static shapes) trains the same curve."""
    args = ("--num_steps", "8", "--precision", "fp32", *NEURON)
    _, eager = run_train(tmp_path, data, "eager", *args, env=CHILD_ENV, timeout=3600)
    _, compiled = run_train(tmp_path, data, "compiled", *args, "--compile", "true", env=CHILD_ENV, timeout=3600)
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-3)


@lane
def test_a_checkpoint_holds_cpu_tensors_and_resumes_the_same_run(tmp_path, data):
    args = ("--num_steps", "8", "--precision", "fp32", *NEURON)
    _, straight = run_train(tmp_path, data, "straight", *args, env=CHILD_ENV, timeout=3600)
    run_train(tmp_path, data, "paused", *args, "--steps_this_run", "4", env=CHILD_ENV, timeout=3600)
    files = sorted((tmp_path / "ckpt" / "paused").glob("step_*/*.pt"))
    assert files
    for path in files:  # loaded here, without map_location: a device tensor would need the device
        tensors = []
        tree_map_only(torch.Tensor, tensors.append, torch.load(path, weights_only=True))
        assert {t.device.type for t in tensors} == {"cpu"}, path.name
    _, resumed = run_train(tmp_path, data, "paused", *args, "--resume", "auto", env=CHILD_ENV, timeout=3600)
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-5)


@lane
def test_ddp_and_fsdp2_over_the_neuron_process_group_agree(tmp_path, data):
    cores = int(on_device("from runtime import neuron; print(neuron.load().device_count())"))
    if cores < 2:
        pytest.skip(f"needs 2 NeuronCores, this instance has {cores}")
    args = ("--num_steps", "8", "--grad_accum", "2", "--precision", "fp32", *NEURON)
    _, ddp = run_train(tmp_path, data, "ddp", *args, launcher=TWO_RANKS, env=CHILD_ENV, timeout=3600)
    _, fsdp = run_train(tmp_path, data, "fsdp", *args, "--fsdp", "true", launcher=TWO_RANKS, env=CHILD_ENV,
                        timeout=3600)
    assert losses(fsdp) == pytest.approx(losses(ddp), rel=1e-3)
    header = next(r for r in ddp if r["kind"] == "header")
    assert header["environment"]["device"].startswith("neuron x2 (")


@lane
def test_bench_py_on_neuron_reports_a_row_with_mfu(tmp_path):
    proc = subprocess.run([sys.executable, "bench.py", "--device", "neuron", "--presets", "esm2_8m", "--batches", "4",
                           "--lengths", "512", "--modes", "train", "--reps", "3", "--no_hf", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=3600, env={**os.environ, **CHILD_ENV})
    assert proc.returncode == 0, proc.stderr[-4000:]
    (path,) = tmp_path.glob("*.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["status"] == "ok" for r in rows)
    assert float(rows[0]["tokens_per_s"]) > 0 and 0 < float(rows[0]["mfu"]) < 1
    assert rows[0]["device"].startswith("neuron x1 (")
