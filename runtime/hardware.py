"""Names, peak FLOP/s and prices of the accelerators, shared by the trainer (MFU), bench.py
(cost per 1M tokens) and leaderboard.py (hardware names and cost of a run).

Hardware is named `<count>x <accelerator>`: the count is the run's world size (GPUs, or
NeuronCores on Trainium) and the accelerator comes from the `device:` line of the run log,
e.g. "cuda x8 (NVIDIA H100 80GB HBM3)" -> "8x H100-SXM".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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


def accelerator(device_line: str) -> tuple[int, str]:
    """(count, accelerator) from a run log's `device:` value ("cuda x8 (NVIDIA H100 80GB HBM3)")."""
    m = _DEVICE_LINE.match(device_line.strip())
    if not m:
        raise ValueError(f"device line {device_line!r} is not '<backend> x<count> (<name>)'")
    count, kind, detail = int(m["count"]), m["kind"], m["detail"] or ""
    if kind == "cuda":
        hit = _match(detail)
        return count, hit[0] if hit else detail.replace("NVIDIA ", "").replace(" ", "-") or "GPU"
    if kind == "xla":
        hw = detail.split(",")[0].strip().upper()
        return count, NEURONCORE if hw in ("NEURON", "TRN") else f"XLA-{hw or 'device'}"
    return count, "CPU"


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
