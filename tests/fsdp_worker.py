"""Worker of test_cuda_path: FSDP2 over 2 gloo ranks, one accumulated step, what it leaves.

    torchrun --nproc_per_node=2 tests/fsdp_worker.py OUT [compile]

Records, after the first of two micro-batches, whether every gradient is already a shard
(FSDP2 reduce-scatters per micro-batch instead of holding an unsharded gradient), and, with
`compile`, which modules were compiled and how many graphs dynamo built.
"""

import faulthandler
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import build_model, get_config  # noqa: E402
from runtime.backend import CPUBackend, leave  # noqa: E402


def main(out: str, compile: bool) -> None:
    faulthandler.dump_traceback_later(240, exit=True)
    backend = CPUBackend(SimpleNamespace(fsdp=True, compile="true" if compile else "false"))
    backend.init_distributed()
    torch.manual_seed(0)
    model = backend.prepare_model(build_model(get_config("sample", n_layers=2, d_model=64, n_heads=2, d_ff=128)))
    g = torch.Generator().manual_seed(backend.rank)
    shards = []
    for micro in range(2):
        ids = torch.randint(4, 24, (2, 32), generator=g)
        with backend.no_sync(model, last_micro=micro == 1):
            model(ids, torch.zeros_like(ids), ids)[1].backward()
        if micro == 0:
            grads = [p.grad for p in model.parameters()]
            shards = [isinstance(x, DTensor) and x.to_local().numel() < x.numel() or x.numel() < 2 * backend.world_size
                      for x in grads if x is not None]
            shards.append(len(shards) == len(grads))  # every parameter has its gradient already
    from torch._dynamo.utils import counters

    from runtime.backend import _blocks

    plain = backend.unwrap(model)
    result = {"sharded_after_first_micro": shards,
              "blocks_compiled": [getattr(b, "_compiled_call_impl", None) is not None for b in _blocks(plain)],
              "root_compiled": type(model).__name__ == "OptimizedModule",
              "graphs": counters["stats"]["unique_graphs"]}
    if backend.is_main:
        Path(out).write_text(json.dumps(result))
    backend.shutdown()
    faulthandler.cancel_dump_traceback_later()
    leave(0)  # as train.py leaves: without interpreter finalization after a gloo group


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] == ["compile"])
