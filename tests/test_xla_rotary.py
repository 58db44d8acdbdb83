"""Rotary embeddings as Neuron needs them: positions without an integer scatter (NCC_EVRF016)
and a half split that stays right without functionalization (pytorch/xla#8640), with the
model's outputs unchanged."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import model.attention as attention
from model.attention import doc_positions, per_doc_gather

pytest.importorskip("torch_xla")
pytestmark = pytest.mark.xla

ROOT = Path(__file__).resolve().parents[1]


def positions_by_scatter_reduce(doc_ids: torch.Tensor) -> torch.Tensor:
    """The earlier definition: each token's index minus its document's smallest index."""
    B, L = doc_ids.shape
    idx = torch.arange(L).expand(B, L)
    start = torch.full((B, L + 1), L, dtype=idx.dtype).scatter_reduce(1, doc_ids + 1, idx, reduce="amin")
    return idx - per_doc_gather(start, doc_ids)


def rotary_by_chunk(x, cos, sin):
    """The earlier apply_rotary."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat((-x2, x1), dim=-1) * sin.to(x.dtype)


def loader_doc_ids(tmp_path) -> list[torch.Tensor]:
    """doc_ids of real training and evaluation batches: packed rows, random crops, padding."""
    from data.benchmark import EvalLoader
    from data.loader import TrainLoader
    from data.masking import MaskingConfig
    from data.shards import write_shard

    rng = np.random.default_rng(0)
    for split, n in (("train", 300), ("valid", 40)):
        tokens = []
        for _ in range(n):
            tokens += [0, *rng.integers(4, 24, int(rng.integers(5, 150))), 2]
        write_shard(tmp_path / f"t_{split}_000000.bin", np.array(tokens, dtype=np.uint8))
    train = TrainLoader([tmp_path / "t_train_000000.bin"], 8, 96, seed=1, masking=MaskingConfig(), prefetch=0)
    batches = [b["doc_ids"] for b, _ in zip(train, range(6))]
    batches += [b["doc_ids"] for b in EvalLoader([tmp_path / "t_valid_000000.bin"], 4, 128)]
    return batches


def test_positions_equal_the_scatter_reduce_definition_on_loader_batches(tmp_path):
    batches = loader_doc_ids(tmp_path)
    assert any((b < 0).any() for b in batches) and any((b > 0).any() for b in batches)
    for doc_ids in batches:
        assert torch.equal(doc_positions(doc_ids), positions_by_scatter_reduce(doc_ids))


@pytest.mark.parametrize("preset", ["sample", "esm2_8m"])
def test_model_outputs_are_unchanged_in_float64(tmp_path, monkeypatch, preset):
    from model import build_model, get_config

    torch.manual_seed(0)
    model = build_model(get_config(preset, n_layers=2, d_model=32, n_heads=2, d_ff=64, attn_impl="sdpa")).double()
    doc_ids = loader_doc_ids(tmp_path)[0]
    ids = torch.randint(4, 24, doc_ids.shape).masked_fill(doc_ids < 0, 1)
    with torch.no_grad():
        new, _ = model(ids, doc_ids)
        for module in (attention, sys.modules[type(model).__module__], sys.modules["model.layers"]):
            if hasattr(module, "doc_positions"):
                monkeypatch.setattr(module, "doc_positions", positions_by_scatter_reduce)
            if hasattr(module, "apply_rotary"):
                monkeypatch.setattr(module, "apply_rotary", rotary_by_chunk)
        old, _ = model(ids, doc_ids)
    assert torch.equal(new, old)  # computed in float64, returned as float32 logits


def test_rotary_is_right_on_xla_without_functionalization():
    """Neuron sets XLA_DISABLE_FUNCTIONALIZATION=1; the runtime reads it at start-up, hence a
    fresh process. The first check shows that this runtime has the bug the others avoid."""
    script = """
import torch, torch_xla
from model.attention import apply_rotary, doc_positions
def pending(shape):  # a view of a value not computed yet, as q and k are in the model
    n = torch.Size(shape).numel()
    return (torch.arange(n, dtype=torch.float32) * 0.5).view(shape), (torch.arange(n, dtype=torch.float32, device="xla") * 0.5).view(shape)
cpu, xla = pending((2, 6, 3, 8))
cpu, xla = cpu.transpose(1, 2), xla.transpose(1, 2)
print("split_with_sizes", all(torch.equal(a, b.cpu()) for a, b in zip(cpu.split([4, 4], -1), xla.split([4, 4], -1))))
cos, sin = torch.randn(2, 1, 6, 8), torch.randn(2, 1, 6, 8)
want, got = apply_rotary(cpu, cos, sin), apply_rotary(xla, cos.to("xla"), sin.to("xla")).cpu()
print("apply_rotary", torch.allclose(want, got, rtol=1e-6, atol=1e-4))  # rounding, not misplaced data
doc_ids = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
print("doc_positions", torch.equal(doc_positions(doc_ids), doc_positions(doc_ids.to("xla")).cpu()))
"""
    env = {**os.environ, "PJRT_DEVICE": "CPU", "XLA_DISABLE_FUNCTIONALIZATION": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = dict(line.split() for line in proc.stdout.strip().splitlines()[-3:])
    assert results == {"split_with_sizes": "False", "apply_rotary": "True", "doc_positions": "True"}, proc.stdout
