"""Names, peak FLOP/s and prices of the accelerators, shared by the trainer (MFU), bench.py
(cost per 1M tokens) and leaderboard.py (hardware names and cost of a run).

Hardware is named `<count>x <accelerator>`: the count is the run's world size (GPUs, or
NeuronCores on Trainium: physical ones on trn1, logical ones on trn2/trn3) and the accelerator
comes from the `device:` line of the run log, e.g. "cuda x8 (NVIDIA H100 80GB HBM3)" ->
"8x H100-SXM", "neuron x64 (trn2, lnc 2)" -> "64x trn2-NeuronCore-LNC2".
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from pathlib import Path

# (substring of the device name, accelerator, dense BF16 peak FLOP/s per accelerator; the
# peaks are torchtitan's get_peak_flops table). Order matters: the first substring found in
# the name wins, so "GH200" comes before "H200" and "H100 PCIe"/"H100 NVL" before "H100".
ACCELERATORS = (
    ("GH200", "GH200", 989e12),
    ("H200", "H200", 989e12),
    ("H100 PCIe", "H100-PCIe", 756e12),
    ("H100 NVL", "H100-NVL", 835e12),
    ("H100", "H100-SXM", 989e12),
    ("A100-SXM4-40GB", "A100-40GB", 312e12),
    ("A100", "A100", 312e12),
    ("B200", "B200", 2250e12),
    ("B300", "B300", 2250e12),
)
NEURONCORE = "trn1-NeuronCore"  # world size counts NeuronCores: trn1.2xlarge has 2, trn1.32xlarge 32

# Trainium 2 and 3 (--device neuron, runtime/neuron.py): (names the device may report itself by,
# chip, dense BF16 FLOP/s of the whole chip, physical NeuronCores per chip). The Neuron docs:
# Trainium2 has "Eight NeuronCore-v3 that collectively deliver ... 667 BF16/FP16/TF32 TFLOPS",
# Trainium3 "Eight NeuronCore-v4 cores that collectively deliver ... 671 BF16/FP16/TF32 TFLOPS":
#   https://awsdocs-neuron.readthedocs-hosted.com/en/latest/about-neuron/arch/neuron-hardware/trainium2.html
#   https://awsdocs-neuron.readthedocs-hosted.com/en/latest/about-neuron/arch/neuron-hardware/trainium3.html
# A rank owns one logical NeuronCore of LNC physical cores (LNC is 1 or 2, 2 by default):
#   https://awsdocs-neuron.readthedocs-hosted.com/en/latest/about-neuron/arch/neuron-features/logical-neuroncore-config.html
# so its peak is the chip's x LNC / 8: 166.75 TFLOP/s on trn2 at LNC 2. Upstream TorchTitan
# counts 2 x 79 = 158 TFLOP/s per such device; we use the figure Neuron states.
NEURON_CHIPS = (
    (("trn2", "trainium2", "nc_v3"), "trn2", 667e12, 8),
    (("trn3", "trainium3", "nc_v4"), "trn3", 671e12, 8),
)


@dataclass(frozen=True)
class Price:
    accelerator: str
    instance: str
    accelerators_per_instance: int
    usd_per_hour: float  # the whole instance
    terms: str
    date: str
    source: str

    @property
    def usd_per_accelerator_hour(self) -> float:
        return self.usd_per_hour / self.accelerators_per_instance


# The price table: one row per accelerator, the instance it is priced from, its date and
# source. Add a row (with its source) rather than guessing; an accelerator with no row has no
# cost estimate ("n/a"). AWS rows: us-east-1 Linux on-demand, anycloud-sh/catalog aws/vms.csv at
# its 2026-05-20 HEAD (see ../shared/reference/trainium-xla.md section 8).
PRICE_TABLE_DATE = "2026-05-20"
PRICES = {p.accelerator: p for p in (
    Price("H100-SXM", "AWS p5.48xlarge (8x H100 SXM)", 8, 55.04, "on-demand, us-east-1",
          "2026-05-20", "anycloud-sh/catalog aws/vms.csv"),
    Price("A100-40GB", "AWS p4d.24xlarge (8x A100 40GB)", 8, 21.957642, "on-demand, us-east-1",
          "2026-05-20", "anycloud-sh/catalog aws/vms.csv"),
    Price(NEURONCORE, "AWS trn1.32xlarge (16 Trainium chips, 32 NeuronCores)", 32, 21.50,
          "on-demand, us-east-1", "2026-05-20", "anycloud-sh/catalog aws/vms.csv"),
    Price("GH200", "Lambda 1x GH200 96GB", 1, 1.49, "on-demand",
          "undated", "Synthyra/SpeedrunningPLMs README (Lambda rate it quotes)"),
)}
# Per-instance prices users often pick (bench.py --instance): the same sources as above.
INSTANCES = {
    "p5.48xlarge": PRICES["H100-SXM"],
    "p5.4xlarge": Price("H100-SXM", "AWS p5.4xlarge (1x H100 SXM)", 1, 6.88, "on-demand, us-east-1",
                        "2026-05-20", "anycloud-sh/catalog aws/vms.csv"),
    "p4d.24xlarge": PRICES["A100-40GB"],
    "trn1.2xlarge": Price(NEURONCORE, "AWS trn1.2xlarge (1 Trainium chip, 2 NeuronCores)", 2, 1.34375,
                          "on-demand, us-east-1", "2026-05-20", "anycloud-sh/catalog aws/vms.csv"),
    "trn1.32xlarge": PRICES[NEURONCORE],
}

_DEVICE_LINE = re.compile(r"^(?P<kind>\w+) x(?P<count>\d+)(?: \((?P<detail>.*)\))?$")


def _match(name: str):
    return next(((acc, peak) for key, acc, peak in ACCELERATORS if key in name), None)


def peak_flops(device_name: str) -> float | None:
    """Dense BF16 peak FLOP/s of one accelerator from its device name (None when unknown)."""
    hit = _match(device_name)
    return hit[1] if hit else None


def neuron_chip(device_name: str) -> str | None:
    """The chip of NEURON_CHIPS ("trn2", "trn3") a Neuron device's name denotes, else None."""
    name = device_name.lower()
    return next((chip for keys, chip, _, _ in NEURON_CHIPS if any(k in name for k in keys)), None)


def neuron_detail(chip: str, lnc: int) -> str:
    """The bracketed part of a Neuron run's `device:` line, which accelerator() reads back."""
    return f"{chip}, lnc {lnc}"


def neuroncore_peak_flops(chip: str, lnc: int) -> float:
    """Dense BF16 peak FLOP/s of one logical NeuronCore (one rank) of `chip` at LNC `lnc`."""
    _, _, peak, cores = next(row for row in NEURON_CHIPS if row[1] == chip)
    return peak * lnc / cores


def cpu_detail() -> str:
    """The bracketed part of a CPU run's `device:` line: the processor, torch's threads, and
    which bf16 units it has (cpu_bf16_units), which decide whether `--precision bf16` pays on it
    (BENCHMARKS.md, "bf16 on the CPU"). A CPU score is only comparable on the same processor."""
    import torch

    name = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), "")
    units = cpu_bf16_units() or "no bf16 matrix units"
    return f"{name or platform.processor() or 'unknown processor'}, {torch.get_num_threads()} threads, {units}"


# The CPU features that run bf16 matmuls in hardware, best first, with the device line's name
# for each: Intel's AMX tiles, then AVX512_BF16's dot products (Intel Cooper Lake, AMD Zen 4).
# Without either, oneDNN emulates bf16 and it runs slower than fp32 (BENCHMARKS.md).
BF16_FEATURES = (("amx_bf16", "AMX bf16"), ("avx512_bf16", "AVX512 bf16"))


def cpu_bf16_units() -> str:
    """The device line's name of this CPU's bf16 units ("AMX bf16", "AVX512 bf16"), or "" where
    it has none (torch's own probe where this torch has one; 2.9 has none: then /proc/cpuinfo)."""
    import torch

    probe = getattr(torch.cpu, "get_capabilities", None)
    if probe is not None:
        present = {flag for flag, on in probe().items() if on is True}
    else:
        present = set(next((line.split(":", 1)[1].split() for line in _cpuinfo() if line.startswith("flags")), []))
    return next((name for flag, name in BF16_FEATURES if flag in present), "")


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux
        return []


def accelerator(device_line: str) -> tuple[int, str]:
    """(count, accelerator) from a run log's `device:` value ("cuda x8 (NVIDIA H100 80GB HBM3)")."""
    m = _DEVICE_LINE.match(device_line.strip())
    if not m:
        raise ValueError(f"device line {device_line!r} is not '<backend> x<count> (<name>)'")
    count, kind, detail = int(m["count"]), m["kind"], m["detail"] or ""
    if kind == "cuda":
        hit = _match(detail)
        return count, hit[0] if hit else detail.replace("NVIDIA ", "").replace(" ", "-") or "GPU"
    if kind == "neuron":  # one rank = one logical NeuronCore
        chip, _, lnc = detail.partition(", lnc ")
        return count, f"{chip.strip() or 'neuron'}-NeuronCore-LNC{lnc.strip() or '?'}"
    if kind == "xla":
        hw = detail.split(",")[0].strip().upper()
        return count, NEURONCORE if hw in ("NEURON", "TRN") else f"XLA-{hw or 'device'}"
    return count, f"CPU ({detail})" if detail else "CPU"  # a CPU score holds on its processor only


def hardware_label(device_line: str) -> str:
    count, acc = accelerator(device_line)
    return f"{count}x {acc}"


def price(accelerator_name: str) -> Price | None:
    return PRICES.get(accelerator_name)


def cost_usd(seconds: float, count: int, accelerator_name: str) -> float | None:
    """Estimated cost of `count` accelerators for `seconds` at the table's rate, None if unpriced."""
    p = price(accelerator_name)
    return None if p is None else seconds / 3600 * count * p.usd_per_accelerator_hour


def usd_per_million(items_per_second: float, usd_per_hour: float) -> float:
    """$ per 1M tokens (or inferences) = 1e6 / throughput * ($/h) / 3600 (Neuron's formula)."""
    return 1e6 / items_per_second * usd_per_hour / 3600
