"""The Neuron backend: Trainium 2 and 3 through TorchNeuron, PyTorch's native `neuron` device.

TorchNeuron (torch-neuronx 2.13.3 for torch 2.13, Neuron SDK 2.33, public beta, Trn2 and Trn3
only) registers the PrivateUse1 device `neuron` and the process-group backend "neuron" and
behaves like CUDA for standard PyTorch, so this is the CUDA backend's shared part
(runtime/accelerator.py) plus what the Neuron documentation asks for. Written from the docs;
nothing here has run on a Trainium chip (docs/trainium.md lists the pages and the assumptions):

* One logical NeuronCore per rank: under torchrun NEURON_RT_VISIBLE_CORES is set to LOCAL_RANK
  (unless already set) before torch_neuronx is imported, so every rank's device is `neuron:0`;
  `./run.sh trn2` keeps `import torch` from loading torch_neuronx first
  (TORCH_DEVICE_BACKEND_AUTOLOAD=0). A rank that still sees several cores is refused.
* The "neuron" process group forms before the device is touched; the chip is read after it,
  and anything but Trainium 2 or 3 is refused (trn1 trains through --device xla).
* torch.compile only when asked (--compile true, unmeasured so far), with backend="neuron" and
  dynamic=False: Neuron refuses dynamic shapes, and every new shape compiles anew (minutes).
  Under compile Neuron shards only with SimpleFSDP, so FSDP2 runs eager.
* bf16 autocast with the dtype passed (torch.autocast("neuron") alone would be fp16).
* The allocator is asynchronous: memory is read (and its peak reset) after a synchronize.
* Checkpoints hold CPU tensors only (the optimizer state and the device RNG state too).
"""

from __future__ import annotations

import os

import torch
from torch.utils._pytree import tree_map_only

from runtime import hardware
from runtime.accelerator import AcceleratorBackend
from runtime.errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp32")  # bf16_sr (bf16 weights, stochastic rounding) is XLA's
VISIBLE_CORES = "NEURON_RT_VISIBLE_CORES"
LOGICAL_CORES = "NEURON_LOGICAL_NC_CONFIG"


def visible() -> bool:
    """A Neuron device for --device auto: torch.neuron is registered (PyTorch loads an installed
    torch-neuronx when torch is imported) and reports a device. Imports nothing itself."""
    module = getattr(torch, "neuron", None)
    return module is not None and bool(module.is_available())


def load():
    """torch.neuron, after importing torch_neuronx, which registers it; under torchrun this
    rank's core is chosen first. ConfigError (one sentence) where this Python cannot train on
    a Neuron device."""
    if "LOCAL_RANK" in os.environ:
        os.environ.setdefault(VISIBLE_CORES, os.environ["LOCAL_RANK"])
    try:
        import torch_neuronx  # registers the device `neuron` and the process-group backend "neuron"
    except ImportError as e:
        raise ConfigError(f"--device neuron needs torch_neuronx ({e}); install requirements-trn2.txt on a trn2 "
                          "or trn3 instance (docs/trainium.md), or pick another --device.") from None
    module = getattr(torch, "neuron", None)
    if module is None:
        version = getattr(torch_neuronx, "__version__", "of unknown version")
        raise ConfigError(f"--device neuron needs the native backend TorchNeuron, but this torch_neuronx "
                          f"({version}) is the XLA library, which registers no torch.neuron; on trn1 use "
                          "--device xla (./run.sh trn1), on trn2/trn3 install requirements-trn2.txt.")
    if not module.is_available():
        raise ConfigError("--device neuron found no Neuron device (torch.neuron.is_available() is False); run on "
                          "a trn2 or trn3 instance whose neuron-ls lists its devices, or pick another --device.")
    return module


def logical_core_config() -> int:
    """Physical NeuronCores per logical one (a rank): NEURON_LOGICAL_NC_CONFIG, 2 when unset."""
    value = os.environ.get(LOGICAL_CORES, "2")
    if value not in ("1", "2"):
        raise ConfigError(f"{LOGICAL_CORES}={value!r} is no logical NeuronCore configuration; set it to 1 or 2, "
                          "or unset it for the default, 2.")
    return int(value)


def _on_cpu(state):
    return tree_map_only(torch.Tensor, lambda t: t.detach().cpu(), state)


class NeuronBackend(AcceleratorBackend):
    """TorchNeuron on Trainium 2/3: the "neuron" process group, bf16 autocast, fused AdamW,
    DDP or eager FSDP2, torch.compile(backend="neuron") when asked."""

    name = "neuron"
    dist_backend = "neuron"
    # eager mode compiles each op once per shape and dtype, torch.compile each graph per shape
    static_shapes = True
    profiled_by = ()  # torch.profiler does not see the Neuron runtime's work (Backend.profiler_activities)

    def __init__(self, cfg=None):
        super().__init__(cfg)
        precision = self._option("precision", "auto")
        if precision not in PRECISIONS:
            raise ConfigError(f"precision {precision!r} is not supported on neuron; use auto or bf16 (bf16 autocast) "
                              "or fp32 (bf16_sr is the XLA backend's).")
        if self.fsdp and self.compile:
            raise ConfigError("fsdp with compile is not supported on neuron (under torch.compile Neuron shards only "
                              "with SimpleFSDP); use --compile false with --fsdp true, or DDP.")
        self.lnc = logical_core_config()
        load()
        self._chip = None

    def _set_device(self) -> None:
        self.device = torch.device("neuron", 0)  # the only core this rank sees

    def init_distributed(self) -> None:
        super().init_distributed()
        try:
            if self.world_size > 1 and (n := self.module.device_count()) != 1:
                raise ConfigError(f"under torchrun every rank must see one NeuronCore but this one sees {n} "
                                  f"({VISIBLE_CORES}={os.environ.get(VISIBLE_CORES)!r}); unset {VISIBLE_CORES}, "
                                  "and each rank gets the core of its LOCAL_RANK.")
            _ = self.chip
        except ConfigError:
            self.shutdown(failed=True)
            raise

    @property
    def chip(self) -> str:
        """The chip, trn2 or trn3, from the name the device reports; refuses any other."""
        if self._chip is None:
            name = str(self.module.get_device_properties(self.device).name)
            self._chip = hardware.neuron_chip(name)
            if self._chip is None:
                raise ConfigError(f"--device neuron trains on Trainium 2 or 3, but this device reports itself as "
                                  f"{name!r}; on trn1 use --device xla (./run.sh trn1), or pick another --device.")
        return self._chip

    def compile_options(self) -> dict:
        return {"backend": "neuron", "dynamic": False}

    def memory_stats(self):
        self.sync()  # the asynchronous allocator counts only finished work until then
        return super().memory_stats()

    def reset_peak_memory(self):
        self.sync()
        super().reset_peak_memory()

    def optimizer_state_dict(self, model, optimizer) -> dict:
        return _on_cpu(super().optimizer_state_dict(model, optimizer))

    def rng_state(self):
        return _on_cpu(super().rng_state())

    def peak_flops(self):
        return hardware.neuroncore_peak_flops(self.chip, self.lnc)

    def device_name(self) -> str:
        return hardware.neuron_detail(self.chip, self.lnc)
