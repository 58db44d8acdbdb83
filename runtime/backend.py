"""Backends: the only code that knows which device the run is on.

The training loop talks to one small interface (docs/INTERFACES.md, runtime/): process group,
device placement and wrapping, autocast, gradient accumulation, the optimizer step, host reads
and timing syncs. The base class and CPUBackend live here; CUDABackend in runtime/cuda.py and
NeuronBackend in runtime/neuron.py (what they share in runtime/accelerator.py), XLABackend in
runtime/xla.py, and runtime/devices.py picks one by name.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import resource
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_map_only

from optim.autoclip import AutoClip
from runtime import hardware
from runtime.errors import ConfigError

_gloo_left = False  # this process left a gloo process group (see leave)


def leave(code: int) -> None:
    """Ends the process with exit status `code`. After a gloo process group, without interpreter
    finalization: there, gloo's C++ threads occasionally abort a rank that finished its run
    ("terminate called without an active exception"; seen in CI on FSDP2 over 2 CPU ranks; the
    cause and an unmerged fix: pytorch/pytorch#179291), and torchrun then reports the whole run
    as failed. Everything the run writes is closed by then; the standard streams are flushed here."""
    if _gloo_left:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


class Backend:
    """CPU-like defaults; subclasses override what differs. `cfg` is the TrainConfig (or None)."""

    name = "cpu"
    dist_backend = "gloo"
    # AdamW(fused=True): one kernel, and it honours found_inf, which skips a non-finite step on
    # the device (the CPU has the kernel too, so the CPU runs the CUDA path's optimizer step)
    fused_adamw = True
    static_shapes = False  # True where every new input shape compiles a new graph (XLA)
    # Muon's Newton-Schulz dtype: fp32 on the CPU. bf16 measured 18-22x slower on a CPU without
    # bf16 units (an AMD EPYC of 2026-11-22), and for the sample model's small matrices 1.2x slower
    # with AMX and 0.9x with AVX512_BF16 (an EPYC of Zen 4), 0.4-0.5x for the speedrun preset's
    # (python -m speed.newton_schulz); accelerators override with bf16.
    muon_dtype = torch.float32
    compile_default = False  # torch.compile when compile is "auto" (on for CUDA)
    flex_backward = False  # flex attention can be trained here (only CUDA has its backward)
    graphs_only = False  # XLA under neuron_parallel_compile: every value read back is 0
    host_batches = False  # the model reads its batches on the host (the CPU): varlen attention
    profiled_by: tuple[str, ...] = ("cpu",)  # torch.profiler activities (profiler_activities)

    def __init__(self, cfg=None):
        self.cfg = cfg
        self.rank, self.world_size, self.local_rank = 0, 1, 0
        self.device = torch.device("cpu")
        self.dtype = None  # autocast dtype, None = fp32
        choice = self._option("compile", "auto")
        self.compile = choice == "true" or (choice == "auto" and self.compile_default)
        self.fsdp = bool(self._option("fsdp", False))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _option(self, key, default):
        return getattr(self.cfg, key, default) if self.cfg is not None else default

    # -- process group -------------------------------------------------------------------
    def init_distributed(self) -> None:
        """Joins the torchrun process group when launched with WORLD_SIZE > 1."""
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self._set_device()
        if self.world_size > 1 and not dist.is_initialized():
            kwargs = {"device_id": self.device} if self.device.type == "cuda" else {}
            dist.init_process_group(self.dist_backend, timeout=datetime.timedelta(minutes=30), **kwargs)

    def _set_device(self) -> None:
        pass

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def shutdown(self, failed: bool = False) -> None:
        """Leaves the process group. After a clean run the ranks meet first: a rank destroying
        its group while another still has collectives (or DDP's reducer) in flight can hang at
        exit over gloo. After a failure there is no meeting (the healthy ranks wait in another
        collective; a barrier would hang until the 30-minute timeout): the group is torn down at
        once, the process exits non-zero, and torchrun ends the others."""
        global _gloo_left
        if dist.is_initialized():
            if not failed:
                dist.barrier()
            _gloo_left = self.dist_backend == "gloo"
            dist.destroy_process_group()

    # -- model ------------------------------------------------------------------------
    def model_defaults(self) -> dict:
        """ModelConfig fields this device prefers (the user's model_args still win)."""
        return {}

    def profiler_activities(self) -> tuple[str, ...]:
        """What torch.profiler records of this device's work (--profile_steps,
        training/profiling.py): `profiled_by`. A device whose work it cannot see (XLA, Neuron:
        `profiled_by = ()`) refuses in one sentence naming Neuron's own tool."""
        if not self.profiled_by:
            raise ConfigError(f"--profile_steps uses torch.profiler, which does not see the work of --device "
                              f"{self.name}; profile Trainium runs with Neuron Explorer instead "
                              "(docs/trainium.md, \"Profiling\").")
        return self.profiled_by

    def check_trainable(self, mcfg) -> None:
        """Refuses, in one sentence, a model configuration this device cannot train."""
        if mcfg.attn_impl == "flex" and not self.flex_backward:
            raise ConfigError(f"attn_impl 'flex' cannot be trained on {self.name} (flex attention's backward "
                              "runs only on CUDA); use --model_args.attn_impl sdpa.")
        if mcfg.attn_impl == "varlen" and not self.host_batches:
            raise ConfigError(f"attn_impl 'varlen' cuts every batch into its documents on the host, new shapes "
                              f"each batch, which {self.name}, whose batches live on the device, cannot take; "
                              "use --model_args.attn_impl sdpa.")

    def prepare_model(self, model: nn.Module, cfg=None) -> nn.Module:
        """To the device; FSDP2 (when fsdp and several processes) or DDP; torch.compile when on.
        The same code runs on the CPU over gloo, which is how CI tests the CUDA path's logic."""
        model = model.to(self.device)
        if self.sharded:
            from torch.distributed.fsdp import fully_shard

            # fp32 parameters, as under DDP, with the same autocast around the forward: bf16
            # parameter gathering (MixedPrecisionPolicy) would also make the residual stream
            # bf16, which DDP + autocast keeps in fp32, so the two would train different numerics.
            for block in _blocks(model):  # shard block by block so all-gathers overlap compute
                fully_shard(block)
            fully_shard(model)
            if self.compile:
                # FSDP2's hooks break the graph at every block, so compiling the root would leave
                # the blocks eager: compile each sharded block in place instead.
                for block in _blocks(model):
                    block.compile(**self.compile_options())
        elif self.compile:
            model = torch.compile(model, **self.compile_options())
        if self.world_size > 1 and not self.sharded:
            model = nn.parallel.DistributedDataParallel(model, **self.ddp_options())
        return model

    @property
    def sharded(self) -> bool:
        """FSDP2 is in use: asked for, and more than one process to shard over (on one process
        there is nothing to shard, and the plain model is the same computation)."""
        return self.fsdp and self.world_size > 1

    def compile_options(self) -> dict:
        """Keyword arguments of torch.compile here (Neuron: its own compiler backend)."""
        return {}

    def ddp_options(self) -> dict:
        return {}

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        """The plain model under DDP / torch.compile wrappers (for saving and evaluation)."""
        while True:
            # `is None`, not `or`: a compiled module inside DDP has no truth value (its __len__ raises).
            inner = getattr(model, "module", None)
            if inner is None:
                inner = getattr(model, "_orig_mod", None)
            if inner is None:
                return model
            model = inner

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The model evaluation calls: without DDP (no gradients to sync), still compiled."""
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    def broadcast_object(self, obj):
        """Rank 0's value of a small picklable object, on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def no_sync(self, model: nn.Module, last_micro: bool):
        """Gradient accumulation: reduce gradients across ranks only on the last micro-batch."""
        if self.sharded:
            # FSDP2 reduce-scatters after every micro-batch (overlapped with the backward):
            # skipping it would keep a whole unsharded fp32 gradient per rank until the last one.
            return contextlib.nullcontext()
        if last_micro or not hasattr(model, "no_sync"):
            return contextlib.nullcontext()
        return model.no_sync()

    # -- data and values ----------------------------------------------------------------
    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device)
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def step_closure(self, fn, *args) -> None:
        """Runs fn on host values of `args` once they are computed (at once here; XLA defers)."""
        fn(*(_host(a) for a in args))

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A blocking device-to-host copy, for use outside the training step (eval results)."""
        return t.detach().cpu()

    def sync(self) -> None:
        """Waits for queued device work; called at timing-window edges only."""

    # -- the optimizer step ----------------------------------------------------------------
    def optimizer_step(self, model: nn.Module, optimizer, grad_clip: float | AutoClip | None,
                       scale: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Scales the gradients by `scale` (train.py: world_size / global target count), clips
        them to grad_clip (None = no clipping; an AutoClip: its threshold, on the device) and
        steps, unless their norm is not finite: then
        the update is skipped on the device (found_inf, as fused AdamW and Muon honour it), so
        the host never waits here. Returns (pre-clip global gradient norm, step taken): device
        tensors the caller reads only when it logs."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = scale_and_clip(grads, grad_clip, scale)
        norm = _full(norm)
        stepped = torch.isfinite(norm)
        optimizer.found_inf = (~stepped).float()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm, stepped

    # -- checkpoints ---------------------------------------------------------------------
    @property
    def replicated_optimizer_state(self) -> bool:
        """Every rank holds the same optimizer state (DDP: AdamW's and Muon's momenta are
        updated alike everywhere), so a checkpoint writes it once; under FSDP2 each rank's
        shards are its own."""
        return not self.sharded

    def model_state_dict(self, model: nn.Module) -> dict:
        """The full model state on the CPU for rank 0, which writes it ({} elsewhere). Every rank
        calls it: under FSDP2 it is a gather."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            return get_model_state_dict(self.unwrap(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:  # the same weights as rank 0's: no host copy
            return {}
        return {k: v.detach().cpu() for k, v in self.unwrap(model).state_dict().items()}

    def load_model_state(self, model: nn.Module, state: dict) -> None:
        from model.io import check_state_dict, load_state_dict_checked

        if self.sharded:  # every rank holds the full state (common.pt); each keeps its shards
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
            )

            state = check_state_dict(self.unwrap(model), state)
            set_model_state_dict(self.unwrap(model), state, options=StateDictOptions(full_state_dict=True))
            return
        load_state_dict_checked(self.unwrap(model), state)

    def optimizer_state_dict(self, model: nn.Module, optimizer) -> dict:
        """This rank's optimizer state (saved per rank: distributed Muon keeps its own part, and
        under FSDP2 each rank its shards, saved as plain local tensors)."""
        return _local_tensors(optimizer.state_dict())

    def load_optimizer_state(self, model: nn.Module, optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)
        _restore_sharded_state(optimizer)

    def rng_state(self) -> dict:
        return {"cpu": torch.get_rng_state()}

    def set_rng_state(self, state: dict) -> None:
        torch.set_rng_state(state["cpu"])

    # -- steps that leave no trace (training/precompile.py) -------------------------------
    def host_copy(self, tree):
        """`tree` (nested dicts and lists) with every tensor copied to the host, this rank's
        shard of a DTensor."""
        return tree_map_only(torch.Tensor, lambda t: _local_tensors(t).detach().to("cpu", copy=True), tree)

    def snapshot_training(self, model: nn.Module, optimizer) -> dict:
        """Host copies of all an optimizer step changes on this rank: the parameters and buffers
        (this rank's shards under FSDP2), the optimizer state and the random number generators."""
        return {"tensors": self.host_copy([*model.parameters(), *model.buffers()]),
                "optimizer": self.host_copy(self.optimizer_state_dict(model, optimizer)),
                "rng": self.host_copy(self.rng_state())}

    @torch.no_grad()
    def restore_training(self, model: nn.Module, optimizer, snapshot: dict) -> None:
        """Puts back what snapshot_training copied, exactly."""
        for t, saved in zip([*model.parameters(), *model.buffers()], snapshot["tensors"], strict=True):
            t = _local_tensors(t)
            t.copy_(saved.to(t.device))
        self.load_optimizer_state(model, optimizer, snapshot["optimizer"])
        self.set_rng_state(snapshot["rng"])

    # -- numbers for the log ------------------------------------------------------------
    def memory_stats(self) -> dict:
        """Peak memory in GiB: resident set size of this process on the CPU."""
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"mem": kib / 2**20 if sys.platform != "darwin" else kib / 2**30}

    def reset_peak_memory(self) -> None:
        """Restarts the peak that memory_stats() reports, so it covers only what follows
        (bench.py: each configuration's own peak). On Linux: freed heap pages go back to the
        system (glibc malloc_trim), then the process's peak RSS restarts from what is left
        (/proc/self/clear_refs); where either is refused, the peak stays since start."""
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def peak_flops(self) -> float | None:
        return None  # no meaningful CPU peak: MFU is logged as n/a

    def compile_count(self) -> int | None:
        return None

    def log_fields(self) -> dict:
        """Extra backend fields merged into every log line (XLA: compiles)."""
        n = self.compile_count()
        return {} if n is None else {"compiles": n}

    def describe(self) -> str:
        return f"{self.name} x{self.world_size}"

    def notes(self) -> list[str]:
        """Advice for the run log about this device and the run's settings."""
        return []


CPU_FP32_ATTENTION_HEAD_DIM = 24  # ESM2 8M (16) and 35M (24); not 150M (32) or the speedrun's 64


class CPUBackend(Backend):
    """fp32 (or bf16 autocast when asked), gloo DDP when world_size > 1."""

    host_batches = True

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.dtype = torch.bfloat16 if self._option("precision", "auto") == "bf16" else None

    def model_defaults(self) -> dict:
        # Eager: attention document by document, unmasked (BENCHMARKS.md, "Attention that costs
        # what the documents cost"); compiled, the dense masked SDPA keeps one graph (varlen as
        # an eager island between graphs measured level with eager varlen: "bf16 on the CPU").
        # Under bf16, attention in fp32 up to head_dim 24: there the CPU's fp32 flash attention
        # took 0.56-0.85x (16) and 0.63-1.08x (24) the bf16 one's time for documents of 340 and
        # 1,024 tokens, 1.15-2.04x from 32 up at 1,024 (`python -m speed.attention_dtype`,
        # BENCHMARKS.md, "Attention in fp32 under bf16").
        fp32_attention = {"attn_fp32_max_head_dim": CPU_FP32_ATTENTION_HEAD_DIM} if self.dtype is not None else {}
        return {**({} if self.compile else {"attn_impl": "varlen"}), **fp32_attention}

    def describe(self) -> str:
        return f"{self.name} x{self.world_size} ({hardware.cpu_detail()})"

    def notes(self) -> list[str]:
        if self.dtype is None or hardware.cpu_bf16_units():
            return []
        return ["note: precision bf16 on a CPU without bf16 units (AMX or AVX512_BF16): bf16 matmuls run slower "
                "than fp32 here (BENCHMARKS.md, \"bf16 on the CPU\"); --precision fp32 is faster."]


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks: the children of the model's largest ModuleList."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def scale_and_clip(grads: list[torch.Tensor], grad_clip: float | AutoClip | None, scale, foreach: bool = True):
    """Multiplies the gradients by `scale`, then clips them to norm grad_clip (None: no clip;
    an AutoClip records the norm and gives the threshold, a device tensor), in one pass over
    them (none at all when there is nothing to do). Returns the norm of the scaled gradients,
    before clipping, as a device tensor (FSDP2: a replicated DTensor)."""
    total = nn.utils.get_total_norm(grads, foreach=foreach)
    scale = _like(total, scale)
    norm = total * scale
    limit = _like(total, grad_clip.clip(_full(norm))) if isinstance(grad_clip, AutoClip) else grad_clip or None
    factor = scale if limit is None else scale * (limit / (norm + 1e-6)).clamp(max=1.0)
    if not (isinstance(factor, float) and factor == 1.0):
        if foreach:
            torch._foreach_mul_(grads, factor)
        else:
            for g in grads:
                g.mul_(factor)
    return norm


def _like(ref, value):
    """`value` (a tensor or a number) in the form of `ref`: under FSDP2 the norm is a replicated
    DTensor, and the sharded gradients can only be multiplied by one of those."""
    if isinstance(ref, DTensor) and isinstance(value, torch.Tensor) and not isinstance(value, DTensor):
        return DTensor.from_local(value, ref.device_mesh, ref.placements, run_check=False)
    return value


def _full(t):
    """A DTensor (FSDP2) as the whole tensor on every rank; anything else unchanged."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _local_tensors(state):
    """A (nested) optimizer state dict with every DTensor replaced by this rank's shard, so the
    per-rank checkpoint file holds plain tensors (loading it needs no device mesh)."""
    if isinstance(state, DTensor):
        return state.to_local()
    if isinstance(state, dict):
        return {k: _local_tensors(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_local_tensors(v) for v in state]
    return state


def _restore_sharded_state(optimizer) -> None:
    """After load_state_dict under FSDP2: the shards loaded as plain tensors become DTensors
    laid out like their parameters again (scalars such as Adam's step stay as they are)."""
    for p, slots in optimizer.state.items():
        if not isinstance(p, DTensor):
            continue
        for key, value in slots.items():
            if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.shape == p.to_local().shape and value.ndim:
                slots[key] = DTensor.from_local(value, p.device_mesh, p.placements, run_check=False,
                                                shape=p.shape, stride=p.stride())


def _host(value):
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 else value
    return value
