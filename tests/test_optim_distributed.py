"""Distributed Muon over 2 gloo processes gives the same parameters as one process, with
replicated parameters (DDP) and with row-sharded ones (FSDP2 DTensors)."""

import datetime

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import optim.muon
from optim import Muon

# 3 + 2 matrices of two shapes (odd counts: padded buckets), a 3-D tensor, and a lone shape.
SHAPES = [(8, 16), (16, 8), (8, 16), (16, 8), (8, 16), (4, 3, 5), (12, 12)]
# Sharded over 2 ranks by rows: 5 rows split 3 + 2, one row 1 + 0 (an empty shard), a 3-D one.
SHARDED = [(5, 7), (5, 7), (5, 7), (7, 5), (1, 4), (4, 3, 5)]
STEPS = 3


def make_params(shapes=SHAPES, mesh=None):
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(s, generator=g) for s in shapes]
    return [torch.nn.Parameter(distribute_tensor(t, mesh, [Shard(0)]) if mesh else t) for t in full]


def run_steps(params, opt, mesh=None):
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 + step)
        for p in params:
            grad = torch.randn(p.shape, generator=g)
            p.grad = distribute_tensor(grad, mesh, [Shard(0)]) if mesh else grad
        for group in opt.param_groups:
            group["momentum"] = 0.85 + 0.05 * step  # as the momentum warm-up changes it
        opt.step()


def worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        local = make_params()
        run_steps(local, Muon(local, lr=0.02, weight_decay=0.1))

        spread = make_params()
        opt = Muon(spread, lr=0.02, weight_decay=0.1, distributed=True)
        calls = []
        original = optim.muon.zeropower_via_newtonschulz5
        optim.muon.zeropower_via_newtonschulz5 = lambda g, steps, dtype: (
            calls.append(g.shape) or original(g, steps, dtype)
        )
        run_steps(spread, opt)
        ns_calls = len(calls)

        mesh = init_device_mesh("cpu", (2,))
        local_sharded = make_params(SHARDED)
        run_steps(local_sharded, Muon(local_sharded, lr=0.02, weight_decay=0.1))
        sharded = make_params(SHARDED, mesh)
        calls.clear()
        run_steps(sharded, Muon(sharded, lr=0.02, weight_decay=0.1, distributed=True), mesh)
        optim.muon.zeropower_via_newtonschulz5 = original
        torch.save(
            {
                "local": [p.detach() for p in local],
                "spread": [p.detach() for p in spread],
                "ns_calls": ns_calls,
                "buffers": [opt.state[p]["momentum_buffer"] for p in spread],
                "local_sharded": [p.detach() for p in local_sharded],
                "sharded": [p.detach().full_tensor() for p in sharded],
                "sharded_ns_calls": len(calls),
            },
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_process(tmp_path):
    # fork, after this process has paid torch's optimizer imports once: a spawned child
    # re-imports torch and torch._dynamo (which torch.optim pulls in), ~10 s on a busy 2-core box.
    Muon(make_params()[:1])
    mp.start_processes(
        worker,
        args=(str(tmp_path / "init"), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="fork",
    )
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # Every rank orthogonalises one matrix per chunk, its own or zeros: the same work on every rank.
    assert (r0["ns_calls"], r1["ns_calls"]) == (5 * STEPS, 5 * STEPS)
    for i, shape in enumerate(SHAPES):
        assert r0["spread"][i].shape == shape
        assert not torch.equal(r0["spread"][i], make_params()[i]), f"param {i} never moved"
        torch.testing.assert_close(r0["spread"][i], r0["local"][i], atol=1e-6, rtol=0)
        assert torch.equal(r0["spread"][i], r1["spread"][i]), f"ranks disagree on param {i}"
        assert torch.equal(r0["buffers"][i], r1["buffers"][i])
    # Sharded: each matrix is orthogonalised once, by its owner (rank 0: 2 of the three (5, 7),
    # and each lone shape; rank 1: the other (5, 7)), and every rank ends with the same values.
    assert (r0["sharded_ns_calls"], r1["sharded_ns_calls"]) == (5 * STEPS, 1 * STEPS)
    for i, shape in enumerate(SHARDED):
        assert r0["sharded"][i].shape == shape
        assert not torch.equal(r0["sharded"][i], make_params(SHARDED)[i]), f"sharded param {i} never moved"
        torch.testing.assert_close(r0["sharded"][i], r0["local_sharded"][i], atol=1e-6, rtol=0)
        assert torch.equal(r0["sharded"][i], r1["sharded"][i])
