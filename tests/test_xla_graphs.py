"""What neuronx-cc must accept, read from the HLO that torch-xla's CPU runtime builds.

neuronx-cc rejects scatter-reduce on integer data (NCC_EVRF016), so no graph of a training
step or of an evaluation may scatter into an integer tensor. (The graphs of a whole train.py
run are checked too: tests/test_xla_train.py, in neuron_parallel_compile's mode.)
"""

from __future__ import annotations

import contextlib
import os
import re
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
pytest.importorskip("torch_xla")
pytestmark = pytest.mark.xla

FLOAT_TYPES = {"f16", "bf16", "f32", "f64"}


def scatter_types(hlo: str) -> list[str]:
    """The element types of every scatter in HLO text (a variadic scatter has several)."""
    return [t for shape in re.findall(r"= (.+?) scatter\(", hlo) for t in re.findall(r"([a-z]+\d*)\[", shape)]


def test_scatter_types_reads_plain_and_variadic_scatters():
    hlo = ("  %s = s64[2,17]{1,0} scatter(s64[2,17]{1,0} %a, ...)\n"
           "  %t = (f32[4]{0}, pred[4]{0}) scatter(f32[4]{0} %b, ...)\n  %u = f32[3]{0} add(...)\n")
    assert scatter_types(hlo) == ["s64", "f32", "pred"]


@pytest.mark.parametrize("preset", ["sample", "esm2_8m"])  # the speedrun block and ESM2
def test_a_training_step_and_an_evaluation_batch_scatter_no_integers(preset):
    import torch_xla

    from evaluation.benchmark import V, accumulate
    from model import build_model, get_config
    from optim import build_optimizer, default_optim_config

    device = torch_xla.device()
    torch.manual_seed(0)
    model = build_model(get_config(preset, n_layers=2, d_model=32, n_heads=2, d_ff=64, attn_impl="sdpa")).to(device)
    opt = build_optimizer(model, default_optim_config("sample"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 24, (2, 24), generator=g)
    labels = torch.where(torch.rand(2, 24, generator=g) < 0.3, ids, -100)
    doc_ids = torch.tensor([0] * 9 + [1] * 11 + [-1] * 4).expand(2, 24)  # two documents and padding
    batch = {k: v.to(device) for k, v in {"input_ids": ids, "labels": labels, "doc_ids": doc_ids}.items()}

    _, loss = model(batch["input_ids"], batch["doc_ids"], batch["labels"])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
    opt.step()
    step = torch_xla._XLAC._get_xla_tensors_hlo([*model.parameters(), *(
        v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.device.type == "xla")])
    torch_xla.sync()

    cm = torch.zeros(V * V + 1, dtype=torch.long, device=device)
    with torch.no_grad():
        loss = accumulate(model, batch, cm, SimpleNamespace(autocast=contextlib.nullcontext))
    evaluation = torch_xla._XLAC._get_xla_tensors_hlo([cm, loss])
    torch_xla.sync()

    for name, hlo in (("step", step), ("evaluation", evaluation)):
        types = scatter_types(hlo)
        assert types, f"the {name} graph has no scatter at all: the parser missed them"
        assert set(types) <= FLOAT_TYPES, f"the {name} graph scatters into {sorted(set(types) - FLOAT_TYPES)}"
    assert int(cm[: V * V].sum().cpu()) == int((labels != -100).sum())  # the count is still exact
