"""The XLA lane, end to end through train.py on torch-xla's CPU runtime (PJRT_DEVICE=CPU).

One tiny run on --device xla (training, evaluations and checkpoints) is shared by the tests:
its log must carry a compile count that stops growing after warm-up, its metrics must show no
CPU fallback, its loss curve must match --device cpu, and its checkpoint must resume on the
CPU backend; the same run in neuron_parallel_compile's graph-extraction mode must finish and
trace the same graphs. The CPU runs use this same torch, so the comparison isolates the backend.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch_xla")
pytestmark = pytest.mark.xla

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
# A tiny model and batch; evaluation every 6 and checkpoints every 8 steps, so the run passes
# each kind of event twice and the second time must compile nothing.
TINY = ["--config", "config/sample.yaml", "--model_args.n_layers", "2", "--model_args.d_model", "64",
        "--model_args.n_heads", "2", "--model_args.d_ff", "128", "--batch_size", "512",
        "--max_length", "128", "--num_steps", str(STEPS), "--log_every", "1", "--eval_every", "6",
        "--eval_batch_size", "2048", "--eval_max_batches", "2", "--save_every", "8",
        "--optim.warmup_steps", "2", "--precision", "fp32", "--seed", "3", "--track", ""]
# CPU-runtime compiles take tens of seconds at XLA's default optimisation level; the graph
# count does not depend on it.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """Random protein-like shards: 400 training documents, 8 validation and 8 test ones."""
    from data.shards import write_shard

    out = tmp_path_factory.mktemp("tiny_shards")
    rng = np.random.default_rng(0)
    for split, n in (("train", 400), ("valid", 8), ("test", 8)):
        tokens = []
        for _ in range(n):
            tokens += [0, *rng.integers(4, 24, int(rng.integers(20, 90))), 2]  # <cls> residues <eos>
        write_shard(out / f"tiny_{split}_000000.bin", np.array(tokens, dtype=np.uint8))
    return out


def train(tmp: Path, data: Path, name: str, *extra: str, env: dict | None = None) -> list[dict]:
    """Runs train.py in a fresh process and returns its JSON-lines records."""
    cmd = [sys.executable, "train.py", *TINY, "--data", str(data), "--log_dir", str(tmp / "logs"),
           "--checkpoint_dir", str(tmp / "ckpt"), "--log_name", name, *extra]
    full_env = {**os.environ, "PJRT_DEVICE": "CPU", "XLA_FLAGS": FAST_COMPILE, **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"train.py {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return [json.loads(line) for line in (tmp / "logs" / f"{name}.jsonl").read_text().splitlines()]


def curve(records: list[dict], key: str = "loss", kind: str = "step") -> dict[int, float]:
    return {r["step"]: r[key] for r in records if r.get("kind") == kind and key in r}


@pytest.fixture(scope="module")
def xla_run(tmp_path_factory, tiny_data):
    tmp = tmp_path_factory.mktemp("xla_run")
    metrics = tmp / "metrics.txt"
    records = train(tmp, tiny_data, "xla", "--device", "xla", env={"XLA_METRICS_FILE": str(metrics)})
    return tmp, records, metrics


def test_every_step_line_carries_a_compile_count_that_stops_growing(xla_run):
    _, records, _ = xla_run
    steps = [r for r in records if r.get("kind") == "step"]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert all(isinstance(r.get("compiles"), int) for r in steps), "a step line lacks compiles:N"
    counts = {r["step"]: r["compiles"] for r in steps}
    # Warm-up: the first steps, the first evaluation (step 6) and the first checkpoint (step 8).
    # Everything after (evaluations at 12 and 18, the checkpoint at 16, the final evaluation
    # of valid and test) reuses those graphs.
    assert counts[9] > 0
    assert counts[STEPS] == counts[9], f"graphs compiled after warm-up: {counts}"
    # The final evaluations and checkpoint run after the last step line.
    evals = [r for r in records if r.get("kind") == "eval"]
    assert evals and all(isinstance(r.get("compiles"), int) for r in evals), "an eval line lacks compiles:N"
    final = [r for r in records if r.get("kind") == "summary"]
    assert final and final[-1]["compiles"] == counts[9], f"graphs compiled at the end: {final[-1:]}"


def test_no_cpu_fallback_or_host_read_inside_the_graphs(xla_run):
    _, _, metrics = xla_run
    reports = metrics.read_text().split("[MetricsData;")
    last = reports[-1]
    assert "UncachedCompile" in last
    fallbacks = sorted(set(re.findall(r"Counter: (aten::\S+)", last)))
    # nonzero = boolean indexing / data-dependent shapes; _local_scalar_dense = .item() in the step.
    assert "aten::nonzero" not in fallbacks and "aten::_local_scalar_dense" not in fallbacks, fallbacks
    assert fallbacks == [], f"ops that fell back to the CPU: {fallbacks}"


def test_xla_and_cpu_give_the_same_loss_curve(xla_run, tiny_data, tmp_path):
    _, xla_records, _ = xla_run
    cpu_records = train(tmp_path, tiny_data, "cpu", "--device", "cpu")
    xla, cpu = curve(xla_records), curve(cpu_records)
    assert sorted(xla) == sorted(cpu) == list(range(1, STEPS + 1))
    # Step 1 is fp32 forward/backward before any update: the same numbers.
    assert xla[1] == pytest.approx(cpu[1], rel=1e-5)
    # Muon orthogonalises in bf16, which the XLA compiler fuses and rounds differently from
    # eager CPU kernels, so later steps agree to bf16 precision, not bit for bit.
    worst = max(abs(xla[s] - cpu[s]) / cpu[s] for s in xla)
    assert worst < 2e-2, f"loss curves differ by {worst:.2%}: xla {xla} cpu {cpu}"
    xla_val, cpu_val = curve(xla_records, "val_loss", "eval"), curve(cpu_records, "val_loss", "eval")
    assert sorted(xla_val) == sorted(cpu_val) and xla_val
    assert all(abs(xla_val[s] - cpu_val[s]) / cpu_val[s] < 2e-2 for s in xla_val), (xla_val, cpu_val)


ADAMW = ["--optim.name", "adamw", "--optim.grad_clip", "1.0", "--eval_every", "0", "--save_every", "0",
         "--num_steps", "10"]


@pytest.fixture(scope="module")
def cpu_adamw_curve(tmp_path_factory, tiny_data) -> dict[int, float]:
    return curve(train(tmp_path_factory.mktemp("cpu_adamw"), tiny_data, "cpu_adamw", "--device", "cpu", *ADAMW))


# Neuron runs with XLA_DISABLE_FUNCTIONALIZATION=1, where torch-xla can misplace the data of a
# split along the last dim (pytorch/xla#8640): the curve must hold there too.
@pytest.mark.parametrize("functionalization", ["on", "off"])
def test_xla_and_cpu_agree_to_fp32_precision_with_adamw(tiny_data, tmp_path, cpu_adamw_curve, functionalization):
    """Without Muon's bf16 step the whole path (loss scaling, clipping, AdamW) is fp32."""
    env = {"XLA_DISABLE_FUNCTIONALIZATION": "1"} if functionalization == "off" else {}
    xla = curve(train(tmp_path, tiny_data, "xla_adamw", "--device", "xla", *ADAMW, env=env))
    cpu = cpu_adamw_curve
    assert sorted(xla) == sorted(cpu) == list(range(1, 11))
    for s in xla:
        assert xla[s] == pytest.approx(cpu[s], rel=1e-4), f"step {s}: xla {xla[s]} vs cpu {cpu[s]}"


def test_an_xla_checkpoint_resumes_on_the_cpu_backend(xla_run, tiny_data):
    tmp, xla_records, _ = xla_run
    ckpt = tmp / "ckpt" / "xla" / "step_000016"
    assert (ckpt / "common.pt").is_file()
    resumed = curve(train(tmp, tiny_data, "resumed_on_cpu", "--device", "cpu", "--resume", str(ckpt)))
    xla = curve(xla_records)
    assert sorted(resumed) == list(range(17, STEPS + 1))
    # Same weights, optimizer state and loader position: the curve goes on where it stopped.
    for s in resumed:
        assert abs(resumed[s] - xla[s]) / xla[s] < 2e-2, f"step {s}: resumed {resumed[s]} vs xla {xla[s]}"


def test_graph_extraction_finishes_and_traces_the_graphs_of_a_real_run(xla_run, tiny_data, tmp_path):
    """neuron_parallel_compile (./run.sh trn1-compile) runs train.py with
    NEURON_EXTRACT_GRAPHS_ONLY=1: Neuron only records each graph and every value read back is 0,
    which the backend reproduces on the CPU runtime. The run must finish, and trace the graphs
    of a real run (else the real run recompiles); none of them may scatter into integers,
    which neuronx-cc rejects (NCC_EVRF016)."""
    from test_xla_graphs import FLOAT_TYPES, scatter_types

    hlo = tmp_path / "graphs.hlo"
    records = train(tmp_path, tiny_data, "extract", "--device", "xla", "--steps_this_run", "9",
                    env={"NEURON_EXTRACT_GRAPHS_ONLY": "1", "XLA_SAVE_TENSORS_FILE": str(hlo),
                         "XLA_SAVE_TENSORS_FMT": "hlo"})
    steps = {r["step"]: r for r in records if r.get("kind") == "step"}
    assert sorted(steps) == list(range(1, 10))
    assert all(r["loss"] == 0 and r["tokens"] == 0 for r in steps.values()), "host reads were not zeros"
    evals = [r for r in records if r.get("kind") == "eval"]
    assert [r["step"] for r in evals] == [6] and "val_loss" not in evals[0], evals
    # The same graphs as the real run of tests above (evaluation at 6, checkpoint at 8).
    real = {r["step"]: r["compiles"] for r in xla_run[1] if r.get("kind") == "step"}
    assert {s: r["compiles"] for s, r in steps.items()} == {s: real[s] for s in steps}
    text = "".join(p.read_text() for p in tmp_path.glob("graphs.hlo*"))
    assert text.count("HloModule") >= len(steps), "the graphs were not saved"
    types = scatter_types(text)
    assert types and set(types) <= FLOAT_TYPES, f"a graph scatters into {sorted(set(types) - FLOAT_TYPES)}"
