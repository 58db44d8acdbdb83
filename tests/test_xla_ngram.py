"""Context n-gram embeddings on XLA: the hash and the lookup give the CPU's keys and outputs."""

from __future__ import annotations

import pytest
import torch

from model.ngram import context_keys
from tests.test_model_architectures import document, randomized, tiny

pytest.importorskip("torch_xla")
pytestmark = pytest.mark.xla


def test_keys_and_model_outputs_match_the_cpu():
    import torch_xla.core.xla_model as xm

    dev = xm.xla_device()
    model = randomized(tiny("speedrun", ngram_buckets=1009, ngram_orders=(1, 3, 8)))
    ids = torch.stack([torch.cat([document(9, 2, seed=1), document(15, 3, seed=2)]), document(24, 4, seed=3)])
    doc_ids = torch.tensor([[0] * 9 + [1] * 15, [0] * 24])
    keys_cpu = context_keys(ids, doc_ids, (1, 3, 8))
    keys_xla = context_keys(ids.to(dev), doc_ids.to(dev), (1, 3, 8))
    assert all(torch.equal(a, b.cpu()) for a, b in zip(keys_cpu, keys_xla))
    with torch.no_grad():
        ref, _ = model(ids, doc_ids)
        out, _ = model.to(dev)(ids.to(dev), doc_ids.to(dev))
    assert torch.allclose(out.cpu(), ref, atol=1e-4)
