"""Muon: momentum SGD whose update is orthogonalised by a Newton-Schulz iteration.

After Keller Jordan's Muon (modded-nanogpt) as used by SpeedrunningPLMs. Plain PyTorch with no
compile decorator (the runtime decides compilation), no device-specific code, and static shapes
only, so the same step traces to one graph on XLA.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

# Quintic coefficients tuned to push every singular value into a band around 1 in few steps.
NS_COEFFS = (3.4445, -4.7750, 2.0315)

# Newer torch renames all_gather_into_tensor (and warns on the old name); torch 2.9 (the XLA
# line) only has the old one. Same signature either way.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def zeropower_via_newtonschulz5(G: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximately U V^T for G = U S V^T (G is (..., rows, cols)), computed in `dtype`:
    bf16 on GPUs and Trainium; fp32 where bf16 matmuls are slow (CPUs without bf16 units,
    where bf16 measured 18-22x slower than fp32 for the sample model's matrices: optim/bench.py).

    The result's singular values are not exactly 1 but lie in a band around it, which is
    what Muon needs and costs far fewer iterations than converging.
    """
    if G.ndim < 2:
        raise ValueError(f"Newton-Schulz needs a matrix, got a tensor of shape {tuple(G.shape)}")
    a, b, c = NS_COEFFS
    X = G.to(dtype)
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # iterate on the wide form so X X^T is the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if transposed else X


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    """Parameters with more than 2 dims are treated as (shape[0], everything else)."""
    return t.reshape(t.shape[0], -1) if t.ndim > 2 else t


class Muon(torch.optim.Optimizer):
    """Muon for 2-D (or flattened N-D) parameters.

    Per step and parameter: buf = lerp(buf, g, 1 - momentum); Nesterov g = lerp(g, buf, momentum);
    O = NS5(g); p -= lr * max(1, rows/cols)**0.5 * O, after an optional decoupled weight decay
    p *= 1 - lr * weight_decay.

    distributed=True, when torch.distributed is initialised with more than one rank: every rank
    keeps the momentum of every parameter (so every rank's state is the whole state, and a
    checkpoint from rank 0 is complete), but each rank orthogonalises only its share of the
    parameters; the updates (in ns_dtype) are all-gathered so every rank applies identical ones.
    Gradients must already be identical on all ranks (after DDP's reduction).

    Sharded parameters (FSDP2 DTensors) keep their momentum sharded; every rank gathers each
    gradient, orthogonalises it whole and applies its own shard of the update.
    """

    def __init__(
        self,
        params,
        lr: float = 0.05,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        distributed: bool = False,
        ns_dtype: torch.dtype = torch.bfloat16,
    ):
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            weight_decay=weight_decay,
        )
        super().__init__(params, defaults)
        self.distributed = distributed
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(
                        f"Muon got a parameter of shape {tuple(p.shape)}; it only takes matrices "
                        "(ndim >= 2), route vectors and scalars to AdamW"
                    )

    def _world(self) -> tuple[int, int]:
        if self.distributed and dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank, world = self._world()
        for group in self.param_groups:
            self._step_group(group, rank, world)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """The orthogonalised update of one parameter, a flat ns_dtype vector (momentum already advanced).
        A sharded parameter (FSDP2 DTensor) is orthogonalised whole: its gradient is gathered."""
        g = p.grad
        buf = self.state[p]["momentum_buffer"]
        if group["nesterov"]:
            g = g.lerp(buf, group["momentum"])
        else:
            g = buf
        if isinstance(g, DTensor):
            g = g.full_tensor()
        return zeropower_via_newtonschulz5(_as_matrix(g), steps=group["ns_steps"], dtype=self.ns_dtype).flatten()

    def _apply(self, p: torch.Tensor, update: torch.Tensor, group: dict) -> None:
        rows, cols = _as_matrix(p).shape
        scale = max(1.0, rows / cols) ** 0.5
        update = update.view(p.shape).to(p.dtype)
        if isinstance(p, DTensor):  # every rank has the whole update: keep this rank's shard
            mesh = p.device_mesh
            update = DTensor.from_local(update, mesh, [Replicate()] * mesh.ndim, run_check=False)
            update = update.redistribute(mesh, p.placements)
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update, alpha=-group["lr"] * scale)

    def _step_group(self, group: dict, rank: int, world: int) -> None:
        # Under DDP every rank sees the same set of gradients, so this list agrees across ranks.
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            state["momentum_buffer"].lerp_(p.grad, 1 - group["momentum"])

        # FSDP2 shards parameters: every rank gathers each gradient (a collective, in the same
        # order on every rank) and orthogonalises all of them, rather than a share of them.
        if world == 1 or any(isinstance(p, DTensor) for p in params):
            for p in params:
                self._apply(p, self._update(p, group), group)
            return

        # Buckets of one matrix shape, so one all-gather carries one update per rank. Each
        # bucket is padded to a multiple of the world size: rank r owns slots r, r + world, ...
        # and a rank with an empty slot sends zeros, so any number of parameters works.
        buckets: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            buckets.setdefault((tuple(_as_matrix(p).shape), p.device), []).append(p)
        pending = None
        for bucket in buckets.values():
            numel = bucket[0].numel()
            for base in range(0, len(bucket), world):
                mine = base + rank
                if mine < len(bucket):
                    local = self._update(bucket[mine], group)
                else:
                    local = torch.zeros(numel, dtype=self.ns_dtype, device=bucket[0].device)
                gathered = torch.empty(world * numel, dtype=self.ns_dtype, device=local.device)
                work = _all_gather_flat(gathered, local, async_op=True)
                # Apply the previous chunk while this one is in flight.
                if pending is not None:
                    self._finish(*pending, group)
                pending = (work, gathered, bucket[base : base + world])
        if pending is not None:
            self._finish(*pending, group)

    def _finish(self, work, gathered: torch.Tensor, chunk: list[torch.Tensor], group: dict) -> None:
        work.wait()
        for update, p in zip(gathered.view(-1, chunk[0].numel()), chunk):
            self._apply(p, update, group)
