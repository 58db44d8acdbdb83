"""Worker of test_train_distributed: a few train.py steps on fixed global batches.

    torchrun --nproc_per_node=W tests/train_ddp_worker.py OUT GRAD_ACCUM OPTIMIZER [fsdp] [weighted]

Every step has the same 8 global rows; rank r takes rows [r*8/W, (r+1)*8/W) and splits them
into GRAD_ACCUM micro-batches, so any (W, GRAD_ACCUM) sees exactly the same data. Rows carry
very different numbers of targets, so a wrong loss normalisation shows. `weighted`: the rows
are masked-diffusion batches (each target weighted 1/rate of its row, every residue counted).
"""

import faulthandler
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import build_model, get_config  # noqa: E402
from optim import OptimConfig, apply_schedule, build_optimizer  # noqa: E402
from runtime.backend import CPUBackend, leave  # noqa: E402
from train import train_step  # noqa: E402

ROWS, L, STEPS = 8, 64, 4


def global_batch(step: int) -> dict:
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(4, 24, (ROWS, L), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    doc_ids = torch.zeros(ROWS, L, dtype=torch.long)
    doc_ids[:, L // 2:] = 1  # two documents per row
    rates = torch.linspace(0.02, 0.6, ROWS).view(ROWS, 1)  # 1 to ~38 targets per row
    chosen = (torch.rand(ROWS, L, generator=g) < rates) & (ids >= 4)
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    batch = {"input_ids": torch.where(chosen, torch.full_like(ids, 32), ids), "labels": labels, "doc_ids": doc_ids}
    if WEIGHTED:
        batch["loss_weights"] = torch.where(chosen, 1 / rates, 0.0)
        batch["loss_counted"] = ids >= 4
    return batch


WEIGHTED = "weighted" in sys.argv[4:]


def main(out: str, grad_accum: int, optimizer_name: str, fsdp: bool = False) -> None:
    faulthandler.dump_traceback_later(120, exit=True)  # a hung collective fails with a traceback
    torch.use_deterministic_algorithms(True)
    backend = CPUBackend(SimpleNamespace(fsdp=fsdp))  # fsdp: FSDP2 over gloo, the CUDA presets' path
    backend.init_distributed()
    try:
        train(backend, out, grad_accum, optimizer_name)
    finally:
        # As train.py does: the group goes only after the model (and DDP's reducer) is freed.
        # Freeing them after destroy_process_group once hung a rank at exit in CI.
        backend.shutdown()
    faulthandler.cancel_dump_traceback_later()
    leave(0)  # as train.py leaves: without interpreter finalization after a gloo group


def train(backend, out: str, grad_accum: int, optimizer_name: str) -> None:
    torch.manual_seed(0)
    model = backend.prepare_model(build_model(get_config("sample", n_layers=2, d_model=64, n_heads=2, d_ff=128)))
    # eps 1e-8 (the ESM2 recipe): with the speedrun eps of 1e-10 Adam turns round-off-sized
    # gradients (~1e-12) into lr-sized updates, which no cross-process comparison survives.
    ocfg = OptimConfig(name=optimizer_name, warmup_steps=1, grad_clip=1.0, eps=1e-8)
    opt = build_optimizer(backend.unwrap(model), ocfg, distributed=backend.world_size > 1,
                          fused=backend.fused_adamw, ns_dtype=backend.muon_dtype)
    per_rank = ROWS // backend.world_size
    rows = per_rank // grad_accum
    losses = []
    for step in range(STEPS):
        mine = {k: v[backend.rank * per_rank:(backend.rank + 1) * per_rank] for k, v in global_batch(step).items()}
        micro = [{k: v[i * rows:(i + 1) * rows] for k, v in mine.items()} for i in range(grad_accum)]
        apply_schedule(opt, step, ocfg, STEPS)
        loss_sum, count, *_ = train_step(model, micro, opt, backend, ocfg.grad_clip)
        losses.append(float(backend.all_reduce_sum(loss_sum) / count))
    weights = backend.model_state_dict(model)  # collective under FSDP2: every rank calls it
    if backend.is_main:
        torch.save({"losses": losses, "weights": weights}, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], "fsdp" in sys.argv[4:])
