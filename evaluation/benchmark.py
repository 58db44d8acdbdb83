"""The benchmark (DESIGN, "The benchmark"), shared by train.py, evaluate.py and the leaderboard.

Default: every validation/test sequence once, 15% of its residues masked at positions fixed by
its index (data.benchmark.EvalLoader), cut to 1024 tokens; loss = sum of cross-entropy over all
masked positions / their count over the whole set, reduced across ranks with SUM;
ppl = exp(loss); accuracy, support-weighted precision/recall/F1 and MCC from a confusion
matrix reduced across ranks with SUM.

The `splm` cousin of this definition is in evaluation/splm.py, the unigram baseline in
evaluation/unigram.py; neither is part of the official benchmark code.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from data.tokenizer import VOCAB_SIZE

BENCH_LENGTH = 1024  # sequences are cut to this many tokens (DESIGN)
# The official benchmark code: a submitted run log must embed exactly these sources in a
# version the leaderboard accepts (leaderboard.py verify).
BENCHMARK_FILES = ("data/benchmark.py", "data/packing.py", "data/shards.py", "data/tokenizer.py",
                   "evaluation/benchmark.py")
V = VOCAB_SIZE


def accumulate(model, batch, cm, backend):
    """Adds one batch's masked-position predictions to the int64 confusion matrix `cm` (fixed
    shapes only: V*V+1 bins, the last collecting unmasked positions). Returns the batch's
    summed cross-entropy.

    The batch is counted by a float32 scatter-add, because neuronx-cc rejects scatter-reduce
    on integer data (NCC_EVRF016). Every bin that is read counts masked positions, far fewer
    than 2^24 per batch, so its float32 count is exact; it joins the int64 total by a plain add.
    """
    with backend.autocast():
        logits, loss = model(batch["input_ids"], batch["doc_ids"], batch["labels"])
    labels = batch["labels"].reshape(-1)
    pred = logits.reshape(-1, logits.shape[-1])[:, :V].argmax(-1)
    idx = torch.where(labels != -100, labels.clamp(min=0) * V + pred, torch.full_like(labels, V * V))
    counts = torch.zeros(V * V + 1, dtype=torch.float32, device=idx.device)
    cm += counts.scatter_add_(0, idx, torch.ones_like(idx, dtype=torch.float32)).long()
    return loss.float()


@torch.no_grad()
def evaluate(model: nn.Module, loader, backend, max_batches: int = 0) -> dict:
    """The benchmark over `loader` (an EvalLoader; every rank yields the same number of batches)."""
    model = backend.eval_model(model)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float32, device=backend.device)
    cm = torch.zeros(V * V + 1, dtype=torch.long, device=backend.device)
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        loss_sum = loss_sum + accumulate(model, backend.to_device(batch), cm, backend)
    model.train(was_training)
    loss_sum = backend.all_reduce_sum(loss_sum)
    cm = backend.all_reduce_sum(cm)
    loss_sum, cm = float(backend.to_host(loss_sum)), backend.to_host(cm)
    if getattr(backend, "graphs_only", False):
        return {}  # neuron_parallel_compile's trial run: graphs are traced, every value reads 0
    return metrics(loss_sum, cm[: V * V].view(V, V))


def metrics(loss_sum: float, cm: torch.Tensor) -> dict:
    """Benchmark numbers from the summed loss and the (true, predicted) confusion matrix."""
    cm = cm.double()
    n = float(cm.sum())
    if n == 0:
        raise ValueError("the evaluation set has no masked position; check the validation shards.")
    true, pred, hit = cm.sum(1), cm.sum(0), cm.diag()
    safe = lambda a, b: torch.where(b > 0, a / b.clamp(min=1e-300), torch.zeros_like(a))
    precision_k, recall_k = safe(hit, pred), safe(hit, true)
    f1_k = safe(2 * precision_k * recall_k, precision_k + recall_k)
    weight = true / n  # support-weighted averages, as sklearn's average="weighted"
    cov = float(hit.sum()) * n - float((pred * true).sum())  # multi-class MCC (Gorodkin 2004)
    den = math.sqrt((n * n - float((pred * pred).sum())) * (n * n - float((true * true).sum())))
    loss = loss_sum / n
    return {
        "loss": loss, "ppl": math.exp(loss), "acc": float(hit.sum()) / n,
        "precision": float((weight * precision_k).sum()), "recall": float((weight * recall_k).sum()),
        "f1": float((weight * f1_k).sum()), "mcc": cov / den if den > 0 else 0.0, "tokens": int(n),
    }
