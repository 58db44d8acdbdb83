"""`grad_clip: auto` (optim/autoclip.py): clipping to the p-th percentile of the recent
pre-clip gradient norms, kept on the device, out of skipped steps, through checkpoints and
across ranks; on XLA inside the step's graph."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_host_reads import ACCELERATOR_ATTENTION, counted  # noqa: F401  (a fixture: every host read of a step, counted)
from train_support import ROOT, TINY, TWO_RANKS, losses, run_train, write_tiny_shards

from optim.autoclip import MIN_HISTORY, AutoClip, percentile
from optim.config import OptimConfig
from runtime.backend import CPUBackend, scale_and_clip
from training.config import ConfigError, load_config, optim_config


def norms_of(n, seed=0):
    """Log-normal norms with repeated values (ties must interpolate as numpy does)."""
    rng = np.random.default_rng(seed)
    values = rng.lognormal(size=n).astype(np.float32)
    values[::4] = values[1]
    return values


def clip_values(records):
    return {r["step"]: r["clip"] for r in records if r["kind"] == "step"}


# -- the threshold ---------------------------------------------------------------------------


@pytest.mark.parametrize("q", [10, 0.5, 50, 97.5, 100])
@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_percentile_is_numpys_linear_percentile(q, n):
    values = torch.from_numpy(norms_of(64, seed=n))  # slots from n on hold other values: ignored
    got = percentile(values, torch.tensor(n), q)
    want = np.percentile(values[:n].double().numpy(), q)
    assert float(got) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("q", [10, 50])
def test_the_threshold_is_the_percentile_of_the_newest_norms_current_included(q):
    """A history of 16: nothing before MIN_HISTORY norms, then np.percentile of the newest 16
    norms, the one just recorded among them; the ring buffer wraps twice and stays bounded."""
    history = 16
    auto = AutoClip(q, history)
    seen = norms_of(40, seed=q)
    for i, value in enumerate(seen, start=1):
        threshold = float(auto.clip(torch.tensor(value)))
        if i < MIN_HISTORY:
            assert threshold == math.inf, f"clipping before {MIN_HISTORY} norms (norm {i})"
        else:
            want = np.percentile(seen[max(0, i - history):i].astype(np.float64), q)
            assert threshold == pytest.approx(want, rel=1e-6), f"after norm {i}"
    assert auto.norms.shape == (history,) and int(auto.count) == len(seen)
    assert sorted(auto.norms.tolist()) == sorted(seen[-history:].tolist())


def test_non_finite_norms_never_enter_the_history():
    auto, clean = AutoClip(10, 16), AutoClip(10, 16)
    for i, value in enumerate(norms_of(20)):
        if i % 3 == 1:  # a skipped step between two good ones: the threshold of the history so far
            bad = auto.clip(torch.tensor([math.nan, math.inf, -math.inf][i % 9 // 3]))
            assert float(bad) == float(clean.threshold)
        assert float(auto.clip(torch.tensor(value))) == float(clean.clip(torch.tensor(value)))
    assert int(auto.count) == int(clean.count) == 20
    assert torch.equal(auto.norms, clean.norms)


# -- clipping in the optimizer step ----------------------------------------------------------


def test_gradients_above_the_threshold_are_clipped_to_it_and_those_below_are_only_scaled():
    auto = AutoClip(10, 100)
    primed = [4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0]  # MIN_HISTORY - 1 norms
    for value in primed:
        auto.clip(torch.tensor(value))
    grads = [torch.full((3,), 2.0), torch.full((4,), -1.0)]
    raw = float(torch.linalg.vector_norm(torch.cat(grads)))  # 4.0: scaled by 5, 20
    norm = scale_and_clip(grads, auto, torch.tensor(5.0))
    want = np.percentile([*primed, 5 * raw], 10)  # the current norm is in the history
    assert float(norm) == pytest.approx(5 * raw)  # the pre-clip norm of the scaled gradients
    assert float(auto.threshold) == pytest.approx(want, rel=1e-6) and want < 5 * raw
    assert float(torch.linalg.vector_norm(torch.cat(grads))) == pytest.approx(want, rel=1e-5)
    factor = want / raw  # the scale and the clip in one factor: 5 * want / (5 * raw)
    assert torch.allclose(grads[0], torch.full((3,), 2.0 * factor)) and torch.allclose(grads[1], torch.full((4,), -factor))

    small = [torch.full((4,), 0.5)]  # norm 1.0, scaled to 2.0: below the threshold, so not clipped
    norm = scale_and_clip(small, auto, torch.tensor(2.0))
    assert float(norm) == pytest.approx(2.0)
    want = np.percentile([*primed, 5 * raw, 2.0], 10)
    assert float(auto.threshold) == pytest.approx(want, rel=1e-6) and want > 2.0
    assert torch.allclose(small[0], torch.full((4,), 1.0))


def tiny_model():
    from model import build_model, get_config

    torch.manual_seed(0)
    return build_model(get_config("sample", n_layers=2, d_model=32, n_heads=2, d_ff=64))


def backward(model, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 24, (2, 16), generator=g)
    labels = torch.where(torch.rand(2, 16, generator=g) < 0.3, ids, -100)
    model(ids, torch.zeros_like(ids), labels)[1].backward()


def test_a_skipped_step_of_the_backend_stays_out_of_the_history():
    from optim import build_optimizer, default_optim_config

    model = tiny_model()
    opt = build_optimizer(model, default_optim_config("sample"), fused=True)
    backend, auto = CPUBackend(), AutoClip(10, 100)
    norms = []
    for seed in range(12):
        backward(model, seed)
        if seed == 5:
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = math.nan
        norm, stepped = backend.optimizer_step(model, opt, auto)
        assert bool(stepped) == (seed != 5)
        if seed != 5:
            norms.append(float(norm))
    assert int(auto.count) == 11
    assert auto.norms[:11].tolist() == pytest.approx(norms)
    assert float(auto.threshold) == pytest.approx(np.percentile(norms, 10), rel=1e-6)


# -- configuration -----------------------------------------------------------------------------


def test_auto_is_read_from_the_command_line_with_its_settings():
    cfg = load_config(["--config", "config/sample.yaml", "--optim.grad_clip", "auto",
                       "--optim.grad_clip_percentile", "25", "--optim.grad_clip_history", "500"])
    ocfg = optim_config(cfg)
    assert (ocfg.grad_clip, ocfg.grad_clip_percentile, ocfg.grad_clip_history) == ("auto", 25, 500)
    auto = AutoClip.from_config(ocfg)
    assert isinstance(auto, AutoClip) and auto.percentile == 25 and auto.norms.numel() == 500
    assert AutoClip.from_config(OptimConfig(grad_clip=1.5)) == 1.5
    assert AutoClip.from_config(OptimConfig()) is None


@pytest.mark.parametrize("key, value, words", [
    ("grad_clip", "automatic", "positive number, auto"),
    ("grad_clip", "-1", "positive number, auto"),
    ("grad_clip_percentile", "0", "(0, 100]"),
    ("grad_clip_percentile", "150", "(0, 100]"),
    ("grad_clip_history", "5", f"[{MIN_HISTORY}, "),
    ("grad_clip_history", "100000", "16384]"),
    ("grad_clip_history", "1e3", "whole number"),
])
def test_bad_settings_are_refused_in_one_sentence_naming_the_key(key, value, words):
    with pytest.raises(ConfigError) as e:
        optim_config(load_config(["--config", "config/sample.yaml", "--optim.grad_clip", "auto", f"--optim.{key}", value]))
    assert f"{key}=" in str(e.value) and words in str(e.value)


# -- train.py -----------------------------------------------------------------------------------

AUTO = ("--optim.grad_clip", "auto", "--optim.grad_clip_history", "10")  # wraps after 10 steps


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_shards(tmp_path_factory.mktemp("autoclip_data"))


def test_the_step_line_logs_the_threshold_and_resume_restores_the_history(tmp_path, data):
    _, straight = run_train(tmp_path, data, "straight", "--num_steps", "24", *AUTO)
    clips = clip_values(straight)
    assert [s for s, c in clips.items() if c is None] == list(range(1, MIN_HISTORY))  # clip:n/a
    assert all(clips[s] > 0 for s in range(MIN_HISTORY, 25))
    assert len({clips[s] for s in range(MIN_HISTORY, 25)}) > 5  # it follows the norms

    run_train(tmp_path, data, "paused", "--num_steps", "24", "--steps_this_run", "15", *AUTO)
    saved = torch.load(tmp_path / "ckpt" / "paused" / "step_000015" / "common.pt", weights_only=True)
    assert int(saved["auto_clip"]["count"]) == 15 and saved["auto_clip"]["norms"].shape == (10,)
    _, both = run_train(tmp_path, data, "paused", "--num_steps", "24", "--resume", "auto", *AUTO)
    assert losses(both) == losses(straight)  # exact: the same thresholds after the resume
    assert clip_values(both) == clips


def test_steps_that_do_not_log_read_nothing_from_the_device_with_auto_clipping(tmp_path, counted):  # noqa: F811
    train, seen = counted
    data = write_tiny_shards(tmp_path / "data", n_train=80)
    rc = train.main([*TINY, *ACCELERATOR_ATTENTION, "--data", str(data), "--log_dir", str(tmp_path / "logs"),
                     "--checkpoint_dir", str(tmp_path / "ckpt"), "--log_name", "reads",
                     "--num_steps", "14", "--log_every", "7", "--optim.grad_clip", "auto"])
    assert rc == 0
    quiet = [(step, what, where) for step, what, where in seen if step not in (1, 7, 14)]
    assert not quiet, "host reads in steps that do not log:\n" + "\n".join(
        f"step {s}: {w}\n{where}" for s, w, where in quiet[:3])
    assert {step for step, _, _ in seen} >= {7, 14}  # the counting works


def test_fsdp2_clips_with_the_same_thresholds_as_ddp(tmp_path, data):
    """Every rank clips with the global norm: under FSDP2 it is a DTensor, and the threshold
    (a plain device tensor) must enter the sharded gradients' arithmetic as one."""
    args = ("--num_steps", "12", "--grad_accum", "2", "--optim.grad_clip", "auto")
    _, ddp = run_train(tmp_path, data, "ddp", *args, launcher=TWO_RANKS)
    _, fsdp = run_train(tmp_path, data, "fsdp", *args, "--fsdp", "true", launcher=TWO_RANKS)
    clips = {s: c for s, c in clip_values(ddp).items() if c is not None}
    assert sorted(clips) == list(range(MIN_HISTORY, 13))
    # reduce-scatter rounds the gradients apart from DDP's all-reduce (measured 5e-6 on these
    # norms); a rank's own norm, or a threshold summed over the ranks, is off by far more
    assert {s: c for s, c in clip_values(fsdp).items() if c is not None} == pytest.approx(clips, rel=1e-4)
    assert losses(fsdp) == pytest.approx(losses(ddp), rel=1e-6)


# -- XLA ------------------------------------------------------------------------------------------

XLA_ENV = {"PJRT_DEVICE": "CPU", "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"}


@pytest.mark.xla
def test_on_xla_the_threshold_is_one_graph_without_host_reads_or_scatters():
    pytest.importorskip("torch_xla")
    import torch_xla
    import torch_xla.debug.metrics as met

    device = torch_xla.device()
    auto = AutoClip(10, 16, device)
    torch_xla.sync()
    met.clear_all()
    seen = norms_of(30)
    for i, value in enumerate(seen, start=1):
        auto.clip(torch.tensor(value).to(device))
        if i == 3:
            hlo = torch_xla._XLAC._get_xla_tensors_hlo([auto.threshold, auto.norms, auto.count])
        torch_xla.sync()
    assert float(auto.threshold.cpu()) == pytest.approx(np.percentile(seen[-16:].astype(np.float64), 10), rel=1e-6)
    assert " sort(" in hlo and "scatter" not in hlo  # neuronx-cc rejects integer scatters
    assert met.counter_value("UncachedCompile") == 1, "the threshold compiled more than one graph"
    fallbacks = [n for n in met.counter_names() if n.startswith("aten::")]
    assert fallbacks == [], f"ops that fell back to the CPU (host reads): {fallbacks}"


@pytest.mark.xla
def test_train_py_on_xla_clips_as_the_cpu_does_and_compiles_nothing_more_after_warm_up(tmp_path, data):
    pytest.importorskip("torch_xla")
    args = ("--num_steps", "14", "--optim.name", "adamw", "--precision", "fp32", *AUTO)
    env = {**os.environ, **XLA_ENV}
    records = {}
    for device in ("xla", "cpu"):
        cmd = [sys.executable, "train.py", *TINY, "--data", str(data), "--log_dir", str(tmp_path / "logs"),
               "--checkpoint_dir", str(tmp_path / "ckpt"), "--log_name", device, "--device", device, *args]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{device}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        records[device] = [json.loads(line) for line in (tmp_path / "logs" / f"{device}.jsonl").read_text().splitlines()]
    steps = [r for r in records["xla"] if r["kind"] == "step"]
    compiles = {r["step"]: r["compiles"] for r in steps}
    # the threshold starts at step 10 and the history wraps at 11: neither compiles a graph
    assert compiles[14] == compiles[3], f"graphs compiled after warm-up: {compiles}"
    xla, cpu = clip_values(records["xla"]), clip_values(records["cpu"])
    assert [s for s, c in xla.items() if c is None] == list(range(1, MIN_HISTORY))
    assert {s: c for s, c in xla.items() if c is not None} == pytest.approx(
        {s: c for s, c in cpu.items() if c is not None}, rel=1e-4)
