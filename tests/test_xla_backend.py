"""XLABackend pieces in one process on torch-xla's CPU runtime (PJRT_DEVICE=CPU)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

# Before the runtime starts: fast CPU compiles (the graph count does not depend on them).
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
pytest.importorskip("torch_xla")
pytestmark = pytest.mark.xla


def backend(precision="fp32"):
    from runtime.xla import XLABackend

    b = XLABackend(SimpleNamespace(precision=precision))
    b.init_distributed()
    return b


def tiny_model():
    """The speedrun architecture; 2 layers so that it has a value embedding and a U-Net skip."""
    from model import build_model, get_config

    torch.manual_seed(0)
    return build_model(get_config("sample", n_layers=2, d_model=32, n_heads=2, d_ff=64, attn_impl="sdpa"))


def tiny_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 24, (2, 32), generator=g)
    labels = torch.where(torch.rand(2, 32, generator=g) < 0.3, ids, -100)
    return {"input_ids": torch.where(labels != -100, 32, ids), "labels": labels,
            "doc_ids": (torch.arange(32) // 16).expand(2, 32).clone()}


def test_runtime_env_states_the_compiler_cast_and_keeps_user_flags():
    from runtime.xla import runtime_env

    env = runtime_env("bf16", "--cache_dir=/c --auto-cast=matmult")
    assert env["NEURON_CC_FLAGS"] == "--cache_dir=/c --auto-cast=matmult --model-type=transformer"
    assert "NEURON_RT_STOCHASTIC_ROUNDING_EN" not in env
    env = runtime_env("bf16_sr", "")
    assert env["NEURON_CC_FLAGS"] == "--model-type=transformer --auto-cast=none"
    assert env["NEURON_RT_STOCHASTIC_ROUNDING_EN"] == "1"


def test_unknown_precision_is_refused_with_the_choices():
    from runtime.errors import ConfigError
    from runtime.xla import XLABackend

    with pytest.raises(ConfigError, match="bf16_sr"):
        XLABackend(SimpleNamespace(precision="fp8"))


def test_prepare_model_keeps_tied_weights_tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(5, 4)
            self.head = nn.Linear(4, 5, bias=False)
            self.head.weight = self.embed.weight

    m = backend().prepare_model(Tied())
    assert m.head.weight is m.embed.weight
    assert m.embed.weight.device.type == "xla"
    assert len(list(m.parameters())) == 1


def test_bf16_sr_makes_parameters_bf16_and_keeps_buffers_fp32():
    b = backend("bf16_sr")
    m = b.prepare_model(tiny_model())
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert {t.dtype for t in m.buffers() if t.is_floating_point()} == {torch.float32}
    batch = b.to_device(tiny_batch())
    _, loss = m(batch["input_ids"], batch["doc_ids"], batch["labels"])
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(b.to_host(loss))


def test_bf16_autocasts_matmuls():
    b = backend("bf16")
    lin = b.prepare_model(nn.Linear(4, 4))
    with b.autocast():
        y = lin(torch.ones(2, 4, device=b.device))
    assert y.dtype == torch.bfloat16 and lin.weight.dtype == torch.float32


def test_a_non_finite_step_is_undone_on_the_device_without_a_new_graph():
    from optim import build_optimizer, default_optim_config

    b = backend()
    model = b.prepare_model(tiny_model())
    opt = build_optimizer(model, default_optim_config("sample"))  # Muon + AdamW

    def step(scale: float):
        batch = b.to_device(tiny_batch())
        s = torch.tensor(scale, device=b.device)  # as train.py: the gradient scale is a device tensor
        _, loss = model(batch["input_ids"], batch["doc_ids"], batch["labels"])
        loss.backward()
        norm, stepped = b.optimizer_step(model, opt, 1.0, scale=s)
        assert bool(b.to_host(stepped)) == bool(torch.isfinite(b.to_host(norm)))
        return norm

    def snapshot():
        params = [b.to_host(p).clone() for p in model.parameters()]
        state = [b.to_host(v).clone() for s in opt.state.values() for v in s.values()
                 if isinstance(v, torch.Tensor) and v.device.type == "xla"]
        return params, state

    for _ in range(2):  # warm-up: the first step creates the optimizer state
        step(1e-3)
    before = snapshot()
    compiles = b.compile_count()
    norm = step(float("nan"))
    assert not torch.isfinite(b.to_host(norm))
    after = snapshot()
    for x, y in zip(before[0] + before[1], after[0] + after[1]):
        assert torch.equal(x, y), "a non-finite step changed the weights or optimizer state"
    assert torch.isfinite(b.to_host(step(1e-3)))
    changed = snapshot()
    assert any(not torch.equal(x, y) for x, y in zip(after[0], changed[0])), "a finite step changed nothing"
    assert b.compile_count() == compiles, "skipping a step compiled a new graph"


def test_step_closures_wait_for_the_graph_inside_a_step_and_run_at_once_at_a_timing_edge():
    b = backend()
    seen = []
    x = torch.ones(3, device=b.device)
    b.to_device({})  # a step begins
    b.step_closure(seen.append, (x * 2).sum())
    assert seen == [], "a closure inside the step ran before the graph executed"
    b.flush()
    assert seen == [6.0]
    b.sync()  # a timing edge: the host has waited for the device
    b.step_closure(seen.append, (x * 3).sum())
    assert seen == [6.0, 9.0]


def test_checkpoint_state_is_on_the_cpu():
    from optim import build_optimizer, default_optim_config

    b = backend()
    model = b.prepare_model(tiny_model())
    opt = build_optimizer(model, default_optim_config("sample"))
    batch = b.to_device(tiny_batch())
    model(batch["input_ids"], batch["doc_ids"], batch["labels"])[1].backward()
    b.optimizer_step(model, opt, None)
    tensors = list(b.model_state_dict(model).values())
    for part in b.optimizer_state_dict(model, opt).values():
        tensors += [v for s in part["state"].values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert tensors and {t.device.type for t in tensors} == {"cpu"}
    assert isinstance(b.compile_count(), int) and b.log_fields() == {"compiles": b.compile_count()}


def test_bf16_autocast_runs_the_speedrun_model():
    b = backend("bf16")
    m = b.prepare_model(tiny_model())
    assert len(m.value_embeds) == 1  # fp32 value embeddings mixed into the bf16 attention values
    batch = b.to_device(tiny_batch())
    with b.autocast():
        _, loss = m(batch["input_ids"], batch["doc_ids"], batch["labels"])
    loss.backward()
    assert torch.isfinite(b.to_host(loss))


def test_while_extracting_graphs_every_host_read_is_zero_and_evaluation_skips_its_metrics(monkeypatch):
    """neuron_parallel_compile's trial run (NEURON_EXTRACT_GRAPHS_ONLY) runs empty stubs that
    return zeros; the backend gives the same zeros on the CPU runtime, so CI runs that mode."""
    from evaluation.benchmark import evaluate

    b = backend()
    model = b.prepare_model(tiny_model())
    assert evaluate(model, [tiny_batch()], b)["tokens"] > 0
    monkeypatch.setenv("NEURON_EXTRACT_GRAPHS_ONLY", "1")
    b = backend()
    assert b.graphs_only
    x = torch.full((3,), 7.0, device=b.device)
    assert torch.equal(b.to_host(x), torch.zeros(3))
    seen = []
    b.sync()  # a timing edge: the closure runs at once
    b.step_closure(lambda *v: seen.extend(v), x.sum(), torch.full((), 5, dtype=torch.long, device=b.device))
    assert seen == [0.0, 0] and isinstance(seen[1], int)
    # The metrics would divide by the zero count of masked positions: evaluation skips them,
    # after running (and so tracing) every graph of a real evaluation.
    compiles = b.compile_count()
    assert evaluate(model, [tiny_batch()], b) == {}
    assert b.compile_count() == compiles, "the evaluation's graphs differ from a real evaluation's"


def _host_group_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from runtime.xla import XLABackend, host_group

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        b = XLABackend(SimpleNamespace(precision="fp32"))  # no device: host objects only
        b.rank, b.world_size, b._host_group = rank, 2, host_group()

        def no_device(*args, **kwargs):
            raise AssertionError("a host object went through the device")

        b._xm.rendezvous = b._xm.xla_rendezvous = no_device
        got = b.broadcast_object({"log_name": f"run-of-rank-{rank}"})
        b.barrier()
        torch.save({"got": got, "backend": dist.get_backend(b._host_group)}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_host_objects_travel_over_a_gloo_group_to_every_rank(tmp_path):
    # Two XLA ranks cannot form on the CPU runtime (docs/trainium.md), so two CPU processes
    # stand in for them: the default group is gloo here, xla on Trainium; the host group is
    # gloo on both, made by the same helper.
    import torch.multiprocessing as mp

    mp.start_processes(_host_group_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    for rank in (0, 1):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert out == {"got": {"log_name": "run-of-rank-0"}, "backend": "gloo"}


def test_the_host_group_forms_beside_the_xla_process_group(tmp_path):
    """On the xla group's own store (init_method xla://), as on Trainium; one process here."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    script = (
        "import torch.distributed as dist, torch_xla.distributed.xla_backend\n"
        "from runtime.xla import host_group\n"
        "dist.init_process_group('xla', init_method='xla://')\n"
        "group = host_group()\n"
        "box = ['from rank 0']\n"
        "dist.broadcast_object_list(box, src=0, group=group)\n"
        "dist.barrier(group=group)\n"
        "print(dist.get_backend(), dist.get_backend(group), box[0])\n"
        "dist.destroy_process_group()\n")
    env = {**os.environ, "PJRT_DEVICE": "CPU", "MASTER_ADDR": "localhost", "MASTER_PORT": str(port)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "xla gloo from rank 0"


def test_gradients_are_all_reduced_in_buckets(monkeypatch):
    import re

    import torch_xla
    import torch_xla.core.xla_model as xm

    from runtime.xla import _all_reduce_bucketed

    # Bucketing, on a stand-in that records each all-reduce: last gradients first, a bucket
    # closes before it would pass the limit, and a gradient larger than the limit goes alone.
    calls = []
    fake = SimpleNamespace(REDUCE_SUM="sum", all_reduce=lambda op, ts, scale: calls.append(([t.numel() for t in ts], scale)))
    grads = [torch.zeros(n) for n in (10, 30, 30, 5, 100)]  # 40, 120, 120, 20 and 400 bytes
    _all_reduce_bucketed(fake, grads, world_size=4, bucket_bytes=200)
    assert calls == [([100], 0.25), ([5, 30], 0.25), ([30, 10], 0.25)]
    # The real thing on the device: one all-reduce per bucket in the graph, SUM x 1/world in
    # place (one replica here, so each gradient is halved for a world of 2).
    monkeypatch.setenv("XLA_ALWAYS_ALLREDUCE", "1")  # xm.all_reduce skips a world of 1 otherwise
    device = torch_xla.device()
    values = [torch.randn(t.shape) for t in grads]
    grads = [v.to(device) for v in values]
    _all_reduce_bucketed(xm, grads, world_size=2, bucket_bytes=200)
    assert len(re.findall(r" all-reduce\(", torch_xla._XLAC._get_xla_tensors_hlo(grads))) == 3
    for g, v in zip(grads, values):
        torch.testing.assert_close(g.cpu(), v / 2)


def test_the_splm_protocol_is_refused_on_xla():
    from evaluation.splm import evaluate_splm
    from runtime.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--protocol splm cannot run on --device xla.*--protocol benchmark"):
        evaluate_splm(tiny_model(), [], backend())


def test_a_process_group_without_a_store_is_refused(monkeypatch):
    """Neuron's advice for many nodes (a dummy store) would leave the host group without one."""
    from runtime.errors import ConfigError
    from runtime.xla import XLABackend

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("XLA_USE_DUMMY_STORE", "1")
    monkeypatch.setenv("TORCH_DIST_INIT_BARRIER", "0")
    with pytest.raises(ConfigError, match="unset XLA_USE_DUMMY_STORE"):
        XLABackend(SimpleNamespace(precision="fp32")).init_distributed()


def test_profiling_is_refused_with_neurons_own_tool_named():
    from runtime.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--device xla.*Neuron Explorer"):
        backend().profiler_activities()
