"""Muon: momentum SGD whose update is orthogonalised by a Newton-Schulz iteration.

After Keller Jordan's Muon (modded-nanogpt) as used by SpeedrunningPLMs. Plain PyTorch with no
compile decorator (the runtime decides compilation), no device-specific code, and static shapes
only, so the same step traces to one graph on XLA.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

# Quintic coefficients tuned to push every singular value into a band around 1 in few steps.
NS_COEFFS = (3.4445, -4.7750, 2.0315)

# Newer torch renames all_gather_into_tensor (and warns on the old name); torch 2.9 (the XLA
# line) only has the old one. Same signature either way.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def zeropower_via_newtonschulz5(G: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximately U V^T for G = U S V^T (G is (..., rows, cols)), computed in `dtype`:
    bf16 on GPUs and Trainium; fp32 where bf16 matmuls are slow (CPUs without bf16 units,
    where bf16 measured 18-22x slower than fp32 for the sample model's matrices: speed/newton_schulz.py).

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

    Row-sharded parameters (FSDP2 DTensors) keep their momentum sharded; each matrix is still
    orthogonalised whole, once, by the rank that owns it, and two all-to-alls move the rows
    (_step_row_sharded). Any other DTensor layout falls back to every rank gathering every
    gradient and orthogonalising it.
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
        self._rank_indices: dict = {}  # device -> this rank as a device tensor (_rank_index)
        self._ok = None  # this step's found_inf == 0 (step)
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
        # found_inf (set by the trainer, as for torch's fused optimizers): 1.0 skips this step on
        # the device: momentum and weights keep their values, with no host read to decide it.
        found_inf = getattr(self, "found_inf", None)
        self._ok = None if found_inf is None else found_inf == 0
        for group in self.param_groups:
            self._step_group(group, rank, world)
        return loss

    def _nesterov(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """The gradient Muon orthogonalises (momentum already advanced); a DTensor if p is one."""
        buf = self.state[p]["momentum_buffer"]
        return p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf

    def _update(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """The orthogonalised update of one parameter, a flat ns_dtype vector. A sharded
        parameter (DTensor) is orthogonalised whole: its gradient is gathered first."""
        g = self._nesterov(p, group)
        if isinstance(g, DTensor):
            g = g.full_tensor()
        return zeropower_via_newtonschulz5(_as_matrix(g), steps=group["ns_steps"], dtype=self.ns_dtype).flatten()

    def _apply(self, p: torch.Tensor, update: torch.Tensor, group: dict) -> None:
        """Applies p's whole update; a sharded p keeps its own rows of it."""
        if isinstance(p, DTensor):
            mesh = p.device_mesh
            update = DTensor.from_local(update.view(p.shape), mesh, [Replicate()] * mesh.ndim, run_check=False)
            update = update.redistribute(mesh, p.placements).to_local()
        self._apply_rows(p, update, group)

    def _apply_rows(self, p: torch.Tensor, update: torch.Tensor, group: dict) -> None:
        """Applies `update`: this rank's part of p's update (all of it unless p is sharded)."""
        rows, cols = _as_matrix(p).shape  # the whole matrix's shape sets the scale
        scale = max(1.0, rows / cols) ** 0.5
        target = p.to_local() if isinstance(p, DTensor) else p  # a view: updates p in place
        update = update.view_as(target).to(target.dtype)
        if self._ok is None:
            if group["weight_decay"]:
                target.mul_(1 - group["lr"] * group["weight_decay"])
            target.add_(update, alpha=-group["lr"] * scale)
            return
        # A skipped step: no decay and no update. The update is finite even then (the gradient
        # was replaced by the momentum, _step_group), so a 0/1 factor can gate it in the add.
        ok = self._ok.to(target.dtype)
        if group["weight_decay"]:
            target.mul_(1 - group["lr"] * group["weight_decay"] * ok)
        target.addcmul_(update, ok, value=-group["lr"] * scale)

    def _step_group(self, group: dict, rank: int, world: int) -> None:
        # Under DDP every rank sees the same set of gradients, so this list agrees across ranks.
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            buf, grad = _local(state["momentum_buffer"]), _local(p.grad)  # elementwise: local is whole
            if self._ok is not None:
                # a skipped step's gradient (maybe NaN) becomes the momentum itself: the lerp
                # below then leaves the momentum as it was, and every value stays finite
                grad.copy_(torch.where(self._ok, grad, buf))
            buf.lerp_(grad, 1 - group["momentum"])

        sharded = [p for p in params if isinstance(p, DTensor)]
        if world > 1 and sharded and all(_row_sharded(p, world) for p in params):
            for chunk in _chunks(params, world):
                self._step_row_sharded(chunk, group, rank, world)
            return
        if world == 1 or sharded:  # one process, or a layout the exchange below does not handle:
            for p in params:  # every rank orthogonalises every (gathered) matrix
                self._apply(p, self._update(p, group), group)
            return

        # Each chunk holds up to `world` matrices of one shape: rank r owns the r-th, a rank
        # with no matrix orthogonalises zeros, and one all-gather carries one update per rank.
        pending = None
        for chunk in _chunks(params, world):
            local = self._owned_update(chunk, group, rank, world)
            gathered = torch.empty(world * local.numel(), dtype=self.ns_dtype, device=local.device)
            work = _all_gather_flat(gathered, local, async_op=True)
            # Apply the previous chunk while this one is in flight.
            if pending is not None:
                self._finish(*pending, group)
            pending = (work, gathered, chunk)
        if pending is not None:
            self._finish(*pending, group)

    def _owned_update(self, chunk: list[torch.Tensor], group: dict, rank: int, world: int) -> torch.Tensor:
        """This rank's matrix of `chunk` orthogonalised (zeros past the chunk's end), flat.

        Every rank runs the same operations on the same shapes, whatever it owns: the chunk,
        padded with zero matrices to `world`, is stacked and this rank's matrix picked by an
        index that is data, not code. On XLA that makes one graph for all ranks, which
        Neuron requires of data-parallel workers."""
        mats = [_as_matrix(self._nesterov(p, group)).to(self.ns_dtype) for p in chunk]
        mats += [torch.zeros_like(mats[0])] * (world - len(chunk))
        mine = torch.stack(mats).index_select(0, self._rank_index(rank, mats[0].device))[0]
        return zeropower_via_newtonschulz5(mine, steps=group["ns_steps"], dtype=self.ns_dtype).flatten()

    def _rank_index(self, rank: int, device: torch.device) -> torch.Tensor:
        """This rank as a one-element device tensor, made once: an input of the graph, not a
        constant baked into it."""
        if device not in self._rank_indices:
            self._rank_indices[device] = torch.tensor([rank], device=device)
        return self._rank_indices[device]

    def _step_row_sharded(self, chunk: list[torch.Tensor], group: dict, rank: int, world: int) -> None:
        """FSDP2 parameters (rows split over the ranks, torch.chunk's layout): rank j owns the
        j-th matrix of the chunk. One all-to-all brings each owner every rank's rows of its
        gradient; the owner orthogonalises the whole matrix; a second all-to-all hands every
        rank its rows of each update. Each matrix is orthogonalised once, and each rank sends
        and receives about one matrix per chunk (gathering every gradient would be `world`)."""
        n, width = chunk[0].shape[0], chunk[0].numel() // chunk[0].shape[0]
        rows = _row_counts(n, world)
        for p in chunk:
            if p.to_local().shape[0] != rows[rank]:
                raise RuntimeError(f"Muon: a sharded parameter of shape {tuple(p.shape)} holds "
                                   f"{p.to_local().shape[0]} rows on rank {rank}, not torch.chunk's {rows[rank]}")
        owner = rank < len(chunk)
        device = chunk[0].to_local().device
        mine = [rows[rank] * width if j < len(chunk) else 0 for j in range(world)]  # my rows of each matrix
        theirs = [rows[k] * width if owner else 0 for k in range(world)]  # every rank's rows of mine
        # ns_dtype on the wire: Newton-Schulz casts to it first, so the result is the same.
        send = torch.cat([self._nesterov(p, group).to_local().reshape(-1).to(self.ns_dtype) for p in chunk])
        whole = torch.empty(sum(theirs), dtype=self.ns_dtype, device=device)
        dist.all_to_all_single(whole, send, output_split_sizes=theirs, input_split_sizes=mine)
        if owner:
            update = zeropower_via_newtonschulz5(whole.view(n, width), steps=group["ns_steps"], dtype=self.ns_dtype)
            send = update.reshape(-1)
        else:
            send = torch.empty(0, dtype=self.ns_dtype, device=device)
        back = torch.empty(sum(mine), dtype=self.ns_dtype, device=device)
        dist.all_to_all_single(back, send, output_split_sizes=mine, input_split_sizes=theirs)
        for piece, p in zip(back.view(len(chunk), rows[rank] * width), chunk):  # 0 rows: empty pieces
            self._apply_rows(p, piece, group)

    def _finish(self, work, gathered: torch.Tensor, chunk: list[torch.Tensor], group: dict) -> None:
        work.wait()
        for update, p in zip(gathered.view(-1, chunk[0].numel()), chunk):
            self._apply(p, update, group)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (a view that updates it in place); a tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def _chunks(params: list[torch.Tensor], world: int) -> list[list[torch.Tensor]]:
    """Same-shape matrices in chunks of up to `world`, in an order every rank agrees on."""
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        buckets.setdefault((tuple(_as_matrix(p).shape), p.device), []).append(p)
    return [bucket[i : i + world] for bucket in buckets.values() for i in range(0, len(bucket), world)]


def _row_counts(n: int, world: int) -> list[int]:
    """Rows of each rank when n rows are split as torch.chunk does (FSDP2's Shard(0) layout)."""
    size = -(-n // world)
    return [max(0, min(size, n - k * size)) for k in range(world)]


def _row_sharded(p: torch.Tensor, world: int) -> bool:
    """p is a DTensor whose rows are split over all `world` ranks (Shard(0): torch.chunk's
    layout). Decided from metadata that every rank shares, so every rank decides alike."""
    mesh = getattr(p, "device_mesh", None)
    return (isinstance(p, DTensor) and mesh.ndim == 1 and mesh.size() == world
            and tuple(p.placements) == (Shard(0),))
