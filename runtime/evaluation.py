"""The benchmark (DESIGN, "The benchmark"), shared by train.py, evaluate.py and the leaderboard.

Default: every validation/test sequence once, 15% of its residues masked at positions fixed by
its index (data.benchmark.EvalLoader), cut to 1024 tokens; loss = sum of cross-entropy over all
masked positions / their count over the whole set, reduced across ranks with SUM;
ppl = exp(loss); accuracy, support-weighted precision/recall/F1 and MCC from a confusion
matrix reduced across ranks with SUM.

`splm`: the published cousin (SpeedrunningPLMs evaluation/benchmark_esm.py): sequences cut
to 1022 tokens including <cls>/<eos>, >= 1 mask per sequence, batches of 4 sorted by length
descending, loss = mean of per-batch mean losses. Same protocol, not the same random draws.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from data.tokenizer import CLS, EOS, FIRST_RESIDUE_ID, MASK, PAD, VOCAB_SIZE

BENCH_LENGTH = 1024  # sequences are cut to this many tokens (DESIGN)
# The official benchmark code: a submitted run log must embed exactly these sources in a
# version the leaderboard accepts (leaderboard.py verify).
BENCHMARK_FILES = ("data/benchmark.py", "data/packing.py", "data/shards.py", "data/tokenizer.py",
                   "runtime/evaluation.py")
V = VOCAB_SIZE


def _accumulate(model, batch, cm, backend):
    """Adds one batch's masked-position predictions to the confusion matrix (fixed shapes
    only: scatter_add into V*V+1 bins, the last bin collecting unmasked positions).
    Returns the batch's summed cross-entropy."""
    with backend.autocast():
        logits, loss = model(batch["input_ids"], batch["doc_ids"], batch["labels"])
    labels = batch["labels"].reshape(-1)
    pred = logits.reshape(-1, logits.shape[-1])[:, :V].argmax(-1)
    idx = torch.where(labels != -100, labels.clamp(min=0) * V + pred, torch.full_like(labels, V * V))
    cm.scatter_add_(0, idx, torch.ones_like(idx))
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
        loss_sum = loss_sum + _accumulate(model, backend.to_device(batch), cm, backend)
    model.train(was_training)
    loss_sum = backend.all_reduce_sum(loss_sum)
    cm = backend.all_reduce_sum(cm)
    return metrics(float(backend.to_host(loss_sum)), backend.to_host(cm)[: V * V].view(V, V))


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


# -- the splm protocol ------------------------------------------------------------------------

def documents(tokens: np.ndarray) -> list[np.ndarray]:
    """Residues of each `<cls> residues <eos>` document of a shard's token stream."""
    starts = np.flatnonzero(tokens == CLS)
    ends = np.append(starts[1:], len(tokens))
    docs = []
    for s, e in zip(starts, ends):
        doc = np.asarray(tokens[s + 1:e])
        docs.append(doc[doc >= FIRST_RESIDUE_ID] if (doc < FIRST_RESIDUE_ID).any() else doc)
    return docs


def splm_batches(files, *, max_tokens: int = 1022, batch_size: int = 4, rate: float = 0.15, seed: int = 42):
    """The SPLM benchmark batches, in order (CPU tensors of this batch's own length)."""
    from data.shards import read_shard

    seqs = [d[: max_tokens - 2] for f in files for d in documents(read_shard(f))]
    seqs.sort(key=len, reverse=True)  # stable: ties keep file order
    g = torch.Generator().manual_seed(seed)
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        width = len(chunk[0]) + 2
        ids = torch.full((len(chunk), width), PAD, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        doc_ids = torch.full_like(ids, -1)
        for r, res in enumerate(chunk):
            n = len(res)
            row = torch.from_numpy(np.concatenate([[CLS], res, [EOS]]).astype(np.int64))
            chosen = torch.rand(n, generator=g) < rate
            if not chosen.any():  # at least one masked residue per sequence
                chosen[torch.randint(n, (1,), generator=g)] = True
            pos = chosen.nonzero().view(-1) + 1
            labels[r, pos] = row[pos]
            row[pos] = MASK
            ids[r, : n + 2] = row
            doc_ids[r, : n + 2] = 0
        yield {"input_ids": ids, "labels": labels, "doc_ids": doc_ids}


@torch.no_grad()
def evaluate_splm(model: nn.Module, files, backend) -> dict:
    """Loss = mean over batches of each batch's mean loss; batches are dealt to ranks in turn."""
    model = backend.eval_model(model)
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)  # (sum of batch means, batches) on the host
    cm = torch.zeros(V * V + 1, dtype=torch.long, device=backend.device)
    for i, batch in enumerate(splm_batches(files)):
        if i % backend.world_size != backend.rank:
            continue
        count = int((batch["labels"] != -100).sum())
        loss = _accumulate(model, backend.to_device(batch), cm, backend)
        totals += torch.tensor([float(backend.to_host(loss)) / count, 1.0], dtype=torch.float64)
    totals = backend.to_host(backend.all_reduce_sum(totals.float())).double()
    cm = backend.to_host(backend.all_reduce_sum(cm))[: V * V].view(V, V)
    out = metrics(0.0, cm)
    out["loss"] = float(totals[0] / totals[1])
    out["ppl"] = math.exp(out["loss"])
    return out


# -- the unigram baseline ------------------------------------------------------------------

class Unigram(nn.Module):
    """Predicts the residue frequencies of a training set at every position (add-one
    smoothed over residue ids): the floor a model that learns only composition reaches."""

    def __init__(self, train_files):
        super().__init__()
        from data.shards import read_shard

        counts = np.zeros(V, dtype=np.float64)
        for f in train_files:
            counts += np.bincount(np.asarray(read_shard(f)), minlength=V)[:V]
        counts[:FIRST_RESIDUE_ID] = 0
        counts[MASK] = 0
        counts[FIRST_RESIDUE_ID:MASK] += 1
        logp = np.full(V, -1e4)
        logp[FIRST_RESIDUE_ID:MASK] = np.log(counts[FIRST_RESIDUE_ID:MASK] / counts.sum())
        self.register_buffer("logp", torch.tensor(logp, dtype=torch.float32))

    def forward(self, input_ids, doc_ids, labels=None):
        logits = self.logp.expand(*input_ids.shape, V)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100, reduction="sum")
        return logits, loss
