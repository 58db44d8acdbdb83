"""Accelerator names, peaks and prices used by MFU, bench.py and the leaderboard."""

from types import SimpleNamespace

import pytest

from runtime import hardware


@pytest.mark.parametrize("line, label", [
    ("cuda x8 (NVIDIA H100 80GB HBM3)", "8x H100-SXM"),
    ("cuda x1 (NVIDIA H100 PCIe)", "1x H100-PCIe"),
    ("cuda x1 (NVIDIA GH200 480GB)", "1x GH200"),
    ("cuda x4 (NVIDIA GeForce RTX 4090)", "4x GeForce-RTX-4090"),
    ("xla x32 (NEURON, precision bf16)", "32x trn1-NeuronCore"),
    ("cpu x1", "1x CPU"),
    ("cpu x2 (AMD EPYC 7R13 Processor, 1 threads, no bf16 matrix units)",
     "2x CPU (AMD EPYC 7R13 Processor, 1 threads, no bf16 matrix units)"),
])
def test_hardware_label_from_the_device_line(line, label):
    assert hardware.hardware_label(line) == label


def test_a_malformed_device_line_is_refused_by_name():
    with pytest.raises(ValueError, match="gpu-ish"):
        hardware.accelerator("gpu-ish")


def test_peaks_follow_the_most_specific_name():
    assert hardware.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert hardware.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert hardware.peak_flops("AMD EPYC") is None


def test_cost_is_per_accelerator_hour_and_none_when_unpriced():
    # 8 H100 for half an hour on a p5.48xlarge is half the instance's hourly price.
    assert hardware.cost_usd(1800, 8, "H100-SXM") == pytest.approx(55.04 / 2)
    # trn1.2xlarge and trn1.32xlarge price a NeuronCore the same.
    assert hardware.INSTANCES["trn1.2xlarge"].usd_per_accelerator_hour == pytest.approx(
        hardware.INSTANCES["trn1.32xlarge"].usd_per_accelerator_hour)
    assert hardware.cost_usd(3600, 1, "CPU") is None
    assert hardware.usd_per_million(275_900, 3.29) == pytest.approx(0.00331, rel=1e-2)


AMX = {"amx_bf16": True, "avx512_bf16": True}  # torch.cpu.get_capabilities() on an Intel Sapphire Rapids
ZEN4 = {"amx_bf16": False, "avx512_bf16": True}  # on an AMD EPYC of Zen 4
ZEN3 = {"amx_bf16": False, "avx512_bf16": False}  # on an AMD EPYC of Zen 3: bf16 emulated


def test_a_cpu_run_names_its_processor_threads_and_bf16_units(monkeypatch):
    import torch

    from runtime.backend import CPUBackend

    monkeypatch.setattr(hardware, "_cpuinfo", lambda: ["processor\t: 0", "model name\t: Test CPU 9000"])
    for caps, units in ((AMX, "AMX bf16"), (ZEN4, "AVX512 bf16"), (ZEN3, "no bf16 matrix units")):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=caps: caps)
        line = CPUBackend().describe()
        assert line == f"cpu x1 (Test CPU 9000, {torch.get_num_threads()} threads, {units})"
        assert hardware.hardware_label(line) == f"1x CPU (Test CPU 9000, {torch.get_num_threads()} threads, {units})"


def test_bf16_on_a_cpu_without_bf16_units_is_advised_against(monkeypatch):
    import torch

    from runtime.backend import CPUBackend

    for precision, caps, advised in (("bf16", ZEN3, True), ("bf16", ZEN4, False), ("bf16", AMX, False),
                                     ("auto", ZEN3, False)):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=caps: caps)
        notes = CPUBackend(SimpleNamespace(precision=precision)).notes()
        assert bool(notes) == advised and all("--precision fp32" in n for n in notes)


def test_without_torchs_probe_the_bf16_units_come_from_the_cpu_flags(monkeypatch):
    import torch

    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)  # torch 2.9, the XLA lane's
    for flags, expected in (("fpu avx512f avx512_bf16 amx_bf16 amx_tile", "AMX bf16"),
                            ("fpu avx512f avx512_bf16", "AVX512 bf16"), ("fpu avx2 avx512f", "")):
        monkeypatch.setattr(hardware, "_cpuinfo", lambda flags=flags: ["model name\t: X", f"flags\t\t: {flags}"])
        assert hardware.cpu_bf16_units() == expected
