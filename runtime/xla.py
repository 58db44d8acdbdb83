"""The XLA backend: torch-xla on Trainium (trn1, through torch-neuronx) or on the CPU runtime.

Everything that makes the shared training loop work on a lazy-tensor device lives here, so
train.py never asks which device it runs on:

* A fixed set of graphs, cut where MpDeviceLoader would cut them. Tensor ops are only traced
  until `torch_xla.sync()`. `to_device` syncs before each batch is moved, so every micro-batch
  (and every evaluation batch) is a graph of its own, and the sync that ends
  `optimizer_step` closes the step: the last micro-batch's forward and backward, the
  gradient all-reduce, clipping and the update are one graph, launched at once so the device
  works while the host prepares the next step. With grad_accum=1 that is one graph per
  optimizer step (plus a scalar graph: train.py's target count, traced before the first
  `to_device`). Cutting per micro-batch rather than per step is deliberate: a graph that
  unrolled grad_accum forward/backward passes would multiply neuronx-cc compile time and
  memory by grad_accum, and would change whenever grad_accum does (the Neuron BERT recipe
  cuts per micro-batch for the same reason). MpDeviceLoader itself is not used: our loader
  already prefetches fixed-shape CPU batches in its own thread and PJRT copies host data to
  the device asynchronously, so a transfer per batch here costs the same.
* No host sync inside the step: no `.item()`, no data-dependent shapes. Logging runs in step
  closures (after the graph executes); a non-finite step is skipped on the device with
  `torch.where` instead of an `if` on the host.
* Gradients: all-reduce SUM scaled by 1/world (the `xla` process group rejects AVG), then
  clipping on the reduced gradients (`grad_clip: auto` too: its history of norms and the
  percentile are device tensors in the step's graph, optim/autoclip.py), then a plain
  (non-fused) optimizer step.
* Precision (config `precision`; an explicit choice after the Neuron mixed-precision guide):
    fp32         fp32 weights and math;
    bf16 (auto)  fp32 weights and optimizer, `torch.autocast('xla', bf16)` around forward +
                 loss, compiler `--auto-cast=none` so neuronx-cc casts nothing else. The
                 numerics of the CUDA path, so loss curves compare across devices;
    bf16_sr      bf16 weights, gradients and optimizer state with hardware stochastic
                 rounding (NEURON_RT_STOCHASTIC_ROUNDING_EN=1): the Neuron BERT recipe, less
                 memory and faster, numerics differ from CUDA. Needs the training/config.py
                 choice "bf16_sr".
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_map_only

from optim.autoclip import AutoClip
from runtime.backend import Backend, scale_and_clip
from runtime.backend import _host as _base_host
from runtime.errors import ConfigError

# "bf16" is what the shared config calls bf16_autocast; "bf16_sr" is XLA-only.
PRECISIONS = ("auto", "fp32", "bf16", "bf16_sr")

# Peak dense bf16 FLOP/s of one NeuronCore-v2 (Trainium1: 190 TFLOPS per 2-core chip), the
# figure the Neuron BERT sample uses for MFU; fp32 is a quarter of it (47.5 TFLOPS per chip).
NC_V2_PEAK_BF16 = 95e12
NC_V2_PEAK_FP32 = 23.75e12

# Gradients are all-reduced in buckets of this many bytes (see _all_reduce_bucketed).
ALLREDUCE_BUCKET_BYTES = 50 * 2**20


def extracting_graphs() -> bool:
    """neuron_parallel_compile's trial run (NEURON_EXTRACT_GRAPHS_ONLY): Neuron saves every
    graph for compilation and runs an empty stub in its place, so every value read back is 0.
    The CPU runtime returns the same zeros in this mode (_host), so CI can run it too."""
    return os.environ.get("NEURON_EXTRACT_GRAPHS_ONLY", "") not in ("", "0")


def runtime_env(precision: str, cc_flags: str = "") -> dict[str, str]:
    """Environment the XLA runtime and the Neuron compiler read at start-up, for `precision`.

    Set before the first tensor touches the device; `run.sh` sets the same values explicitly.
    """
    extra = []
    if "--model-type" not in cc_flags:
        extra.append("--model-type=transformer")
    if "--auto-cast" not in cc_flags:
        # The compiler's default cast is documented both ways; say it: autocast or bf16
        # weights already choose the matmul dtype, so the compiler must cast nothing more.
        extra.append("--auto-cast=none")
    env = {
        # torch-xla bakes Python scalars equal to 0 or +-1 into the graph (an lr of exactly 0 at
        # the start of a warm-up or the end of a decay: a graph of its own); with this set,
        # every Python scalar is device data, an ordinary input.
        "XLA_NO_SPECIAL_SCALARS": "1",
        "NEURON_CC_FLAGS": " ".join([cc_flags, *extra]).strip(),
    }
    if precision == "bf16_sr":
        env["NEURON_RT_STOCHASTIC_ROUNDING_EN"] = "1"
    return env


class XLABackend(Backend):
    """torch-xla: Trainium through torch-neuronx, or the CPU runtime (PJRT_DEVICE=CPU) in CI."""

    name = "xla"
    dist_backend = "xla"
    static_shapes = True
    fused_adamw = False  # no fused AdamW kernel here; a non-finite step is undone with torch.where
    muon_dtype = torch.bfloat16  # Trainium's matmul units are bf16
    profiled_by = ()  # torch.profiler does not see the XLA graphs' work (Backend.profiler_activities)

    def __init__(self, cfg=None):
        super().__init__(cfg)
        precision = self._option("precision", "auto")
        if self.fsdp:
            raise ConfigError("fsdp is not supported on xla (FSDP2 shards over torch.distributed, not the XLA runtime); "
                              "remove --fsdp, or train the large presets on CUDA.")
        if precision not in PRECISIONS:
            raise ConfigError(f"precision {precision!r} is not supported on xla; use one of {', '.join(PRECISIONS)}.")
        self.precision = "bf16" if precision == "auto" else precision
        for key, value in runtime_env(self.precision, os.environ.get("NEURON_CC_FLAGS", "")).items():
            if key == "NEURON_CC_FLAGS":
                os.environ[key] = value  # only appends what the user did not give
            else:
                os.environ.setdefault(key, value)
        try:
            import torch_xla
            import torch_xla.core.xla_model as xm
            import torch_xla.debug.metrics as met
            import torch_xla.runtime as xr
        except ImportError as e:
            raise ConfigError(
                f"--device xla needs torch_xla ({e}); install requirements-xla.txt (CPU runtime) "
                "or requirements-neuron.txt (Trainium), or pick another --device.") from None
        self._xla, self._xm, self._met, self._xr = torch_xla, xm, met, xr
        self.dtype = torch.bfloat16 if self.precision == "bf16" else None  # autocast dtype
        self.device = torch.device("xla")  # the default device until init_distributed
        self._pg = False
        self._host_group = None  # gloo, for host objects (init_distributed)
        self._waited = False  # sync() was called since the last step or batch: a timing edge
        # Host code that cannot work on all-zero values skips itself (evaluation's metrics).
        self.graphs_only = extracting_graphs()

    # ------------------------------------------------------------------ setup

    def init_distributed(self) -> None:
        """Under torchrun: the `xla` process group for device tensors, a gloo group over the
        same ranks for host objects, rank and world size from the PJRT runtime."""
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        no_store = os.environ.get("XLA_USE_DUMMY_STORE") == "1" and os.environ.get("TORCH_DIST_INIT_BARRIER") == "0"
        if launched > 1 and no_store:  # torch-xla's rendezvous then makes a DummyStore
            raise ConfigError("XLA_USE_DUMMY_STORE=1 with TORCH_DIST_INIT_BARRIER=0 leaves the process group without "
                              "the store that its host (gloo) group needs; unset XLA_USE_DUMMY_STORE.")
        if launched > 1 and not dist.is_initialized():
            import torch_xla.distributed.xla_backend  # noqa: F401  registers the 'xla' backend

            dist.init_process_group("xla", init_method="xla://")
            self._pg = True
        self.rank = self._xr.global_ordinal()
        self.world_size = self._xr.world_size()
        self.local_rank = self._xr.local_ordinal()
        if launched != self.world_size:
            # The CPU runtime cannot join processes into one group: each would act as rank 0.
            raise ConfigError(
                f"torchrun started {launched} processes but the XLA runtime sees {self.world_size} "
                f"(PJRT_DEVICE={os.environ.get('PJRT_DEVICE', 'unset')}); on the CPU runtime run one "
                "process, or use --device cpu for multi-process runs.")
        if self._pg:
            self._host_group = host_group()
        self.device = self._xla.device()

    def model_defaults(self) -> dict:
        return {"attn_impl": "sdpa"}  # flex attention is CUDA-only

    def prepare_model(self, model: nn.Module, cfg=None) -> nn.Module:
        """Moves the model to the device. No DDP wrapper: `optimizer_step` reduces gradients.
        Build the optimizer after this: moving to XLA makes new Parameter objects."""
        ties = _shared_parameters(model)
        model.to(self.device)
        # .to(xla) makes a new Parameter per module, which unties shared weights: re-tie.
        for (first, first_name), *rest in ties:
            for mod, name in rest:
                setattr(mod, name, getattr(first, first_name))
        if self.precision == "bf16_sr":
            # Parameters only: buffers such as rotary frequencies stay fp32 for accuracy.
            for p in model.parameters():
                p.data = p.data.to(torch.bfloat16)
        return model

    def no_sync(self, model: nn.Module, last_micro: bool):
        return contextlib.nullcontext()  # no DDP: nothing is reduced during backward

    # ------------------------------------------------------------------ the step

    def to_device(self, batch: dict) -> dict:
        # Cut what is pending first (the previous micro-batch or evaluation batch), so each
        # batch's work is one graph of a fixed shape; see the module docstring.
        self._xla.sync()
        self._waited = False
        return self._xm.send_cpu_data_to_device(batch, self.device)

    def optimizer_step(self, model: nn.Module, optimizer, grad_clip: float | AutoClip | None,
                       scale: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """All-reduce SUM x 1/world, scale and clip, step; a non-finite step is undone on the
        device (and stays out of an AutoClip's history). Ends the step's graph. Returns
        (pre-clip global gradient norm, step taken)."""
        params = [p for p in model.parameters() if p.grad is not None]
        if self.world_size > 1:
            # SUM then scale: the xla process group rejects AVG.
            _all_reduce_bucketed(self._xm, [p.grad for p in params], self.world_size)
        # foreach=False: torch-xla's clipping refuses the foreach kernels
        norm = scale_and_clip([p.grad for p in params], grad_clip, scale, foreach=False)
        ok = torch.isfinite(norm)
        before = _snapshot(optimizer, params)
        optimizer.step()
        _restore_unless(ok, optimizer, params, before)
        optimizer.zero_grad(set_to_none=True)
        self._xla.sync()
        self._waited = False
        return norm, ok

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device)
        if self.world_size > 1:
            if t.is_floating_point():
                self._xm.all_reduce(self._xm.REDUCE_SUM, [t])
            else:  # counts: neuronx-cc may refuse an integer all-reduce (NCC_EVRF061)
                t = _all_reduce_counts(self._xm, t)
        return t

    # ------------------------------------------------------------------ host side

    def broadcast_object(self, obj):
        """Rank 0's value of a small picklable object, on every rank, over the host group."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._host_group)
        return box[0]

    def step_closure(self, fn, *args) -> None:
        """Runs fn(*host values) once `args` are computed, without a host sync inside the step.

        Inside the step (e.g. each step's grad-norm check) fn is queued and runs right after
        the next graph executes. At a timing edge (after `sync()`, where the host has waited
        for the device anyway) the pending values are computed now and fn runs at once, so
        host state it reads (the timing window, the step counter) is still current.
        """
        call = lambda *values: fn(*(_host(v) for v in values))
        if not self._waited:
            self._xm.add_step_closure(call, args=args)
            return
        self._xla.sync()  # runs earlier closures first, in order
        call(*args)

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        self._xla.sync()  # everything pending in one graph, not a new graph per read
        if self.graphs_only:
            return torch.zeros(t.shape, dtype=t.dtype)
        return t.detach().cpu()

    def sync(self) -> None:
        """Waits for everything launched so far (timing-window edges only)."""
        self._xm.wait_device_ops()
        self._waited = True

    def flush(self) -> None:
        """Executes what is pending and runs the queued step closures (e.g. the last log line)."""
        self._xla.sync()
        self._xm.wait_device_ops()

    def barrier(self) -> None:
        """Every rank meets, over the host group (no device work: see host_group)."""
        if self.world_size > 1:
            dist.barrier(group=self._host_group)

    def shutdown(self, failed: bool = False) -> None:
        """Flush, meet every rank (avoids exit hangs), close the process group. After a failure,
        neither: the other ranks may wait in a collective (see Backend.shutdown)."""
        if not failed:
            self.flush()
            self.barrier()
        if self._pg and dist.is_initialized():
            dist.destroy_process_group()
            self._pg = False

    # ------------------------------------------------------------------ checkpoints

    def _cpu(self, obj):
        """`obj` with every XLA tensor copied to the CPU, so it loads into any backend."""
        # Materialise everything pending as one graph first; the copy would otherwise trace
        # a new, smaller graph of only the saved tensors.
        self._xla.sync()
        self._xm.wait_device_ops()
        return self._xm._maybe_convert_to_cpu(obj)

    def host_copy(self, tree):
        # cloned: on the CPU runtime the transfer can alias the device buffer, which the next
        # step's graph donates to its outputs and overwrites
        return tree_map_only(torch.Tensor, torch.clone, self._cpu(tree))

    def model_state_dict(self, model: nn.Module) -> dict:
        return self._cpu({k: v.detach() for k, v in self.unwrap(model).state_dict().items()})

    def optimizer_state_dict(self, model: nn.Module, optimizer) -> dict:
        return self._cpu(optimizer.state_dict())

    def rng_state(self) -> dict:
        return {**super().rng_state(), "xla": self._xm.get_rng_state(self.device)}

    def set_rng_state(self, state: dict) -> None:
        super().set_rng_state(state)
        if "xla" in state:
            self._xm.set_rng_state(state["xla"], self.device)

    # ------------------------------------------------------------------ numbers for the log

    def compile_count(self) -> int:
        """Graphs compiled so far by this process (torch_xla.debug.metrics UncachedCompile)."""
        return int(self._met.counter_value("UncachedCompile") or 0)

    def memory_stats(self) -> dict:
        try:
            info = self._xm.get_memory_info(self.device)
        except Exception:  # the CPU runtime reports no device memory: the host's is the device's
            return super().memory_stats()
        peak = info.get("peak_bytes_used", info.get("bytes_used"))
        return super().memory_stats() if peak is None else {"mem": peak / 2**30}

    def peak_flops(self) -> float | None:
        """Per-process peak for MFU: one NeuronCore-v2; None on the CPU runtime."""
        if self._xm.xla_device_hw(self.device) != "NEURON":
            return None
        return NC_V2_PEAK_FP32 if self.precision == "fp32" else NC_V2_PEAK_BF16

    def describe(self) -> str:
        hw = self._xm.xla_device_hw(self.device)
        return f"xla x{self.world_size} ({hw}, precision {self.precision})"


# ---------------------------------------------------------------------- helpers


def host_group():
    """A gloo group over the ranks of the xla one, for host objects (the run name, barriers).

    xm.rendezvous would move them as device tensors: it runs graphs, which read back zeros
    in neuron_parallel_compile's trial run (so the payloads arrive empty), and a rank waiting
    there, e.g. for another node's download, waits inside a device execution, which the Neuron
    runtime times out (NEURON_RT_EXEC_TIMEOUT). Over gloo a wait is a host wait, with the same
    30-minute limit as the other backends.
    """
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=30))


def _host(value):
    """A device value on the host, as runtime.backend._host gives it, but zeros while only
    extracting graphs, as Neuron returns them then. step_closure reads its values with this."""
    if isinstance(value, torch.Tensor) and extracting_graphs():
        value = torch.zeros(value.shape, dtype=value.dtype)
    return _base_host(value)


def _all_reduce_counts(xm, t: torch.Tensor) -> torch.Tensor:
    """SUM of non-negative integer tensors over the ranks, exactly, in float32: each value is
    sent as its high and low 16 bits, whose sums stay below float32's 2**24 exact integers for
    up to 256 ranks and values below 2**40."""
    hi = torch.div(t, 2**16, rounding_mode="floor")
    parts = torch.stack([hi, t - hi * 2**16]).float()
    xm.all_reduce(xm.REDUCE_SUM, [parts])
    return parts[0].to(t.dtype) * 2**16 + parts[1].to(t.dtype)


def _all_reduce_bucketed(xm, grads: list[torch.Tensor], world_size: int,
                         bucket_bytes: int = ALLREDUCE_BUCKET_BYTES) -> None:
    """All-reduce SUM x 1/world of `grads`, in place, one all-reduce per bucket of at most
    `bucket_bytes` (a larger gradient goes alone), last parameters first as backward makes
    them: what xm.reduce_gradients does with ALLREDUCE_GRADIENTS_BUCKET_SIZE_MB. One
    all-reduce of every gradient is a single ~0.5 GB collective for the 133M model in fp32,
    which can start only when backward has made the last gradient; a bucket can start as soon
    as its own gradients exist, while backward goes on."""
    bucket, size = [], 0
    for g in reversed(grads):
        nbytes = g.numel() * g.element_size()
        if bucket and size + nbytes > bucket_bytes:
            xm.all_reduce(xm.REDUCE_SUM, bucket, scale=1.0 / world_size)
            bucket, size = [], 0
        bucket.append(g)
        size += nbytes
    if bucket:
        xm.all_reduce(xm.REDUCE_SUM, bucket, scale=1.0 / world_size)


def _shared_parameters(model: torch.nn.Module) -> list[list[tuple[torch.nn.Module, str]]]:
    """(module, attribute) owners of every Parameter that more than one module holds."""
    owners: dict[int, list] = {}
    for mod in model.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((mod, name))
    return [o for o in owners.values() if len(o) > 1]


def _state_tensors(optimizer, params):
    for p in params:
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor) and value.device.type == "xla":
                yield p, key, value


def _snapshot(optimizer, params):
    """References to the values before the step; lazy tensors, so no copy is materialised."""
    return ([p.detach().clone() for p in params],
            {(id(p), k): v.clone() for p, k, v in _state_tensors(optimizer, params)})


def _restore_unless(ok, optimizer, params, before) -> None:
    """Where `ok` is false, put parameters and optimizer state back as they were.

    State created by this very step (the first) goes back to zeros, its initial value in
    AdamW and Muon. CPU state (AdamW's step counter) is left alone.
    """
    old_params, old_state = before
    with torch.no_grad():
        for p, old in zip(params, old_params):
            p.copy_(torch.where(ok, p, old))
        for p, key, value in list(_state_tensors(optimizer, params)):
            old = old_state.get((id(p), key))
            value.copy_(torch.where(ok, value, old if old is not None else torch.zeros_like(value)))
