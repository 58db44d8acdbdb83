"""The Neuron backend (runtime/neuron.py) against a stand-in TorchNeuron, on the CPU: what it
asks of torch_neuronx and torch.neuron, and what it gives train.py and bench.py. The stand-in
registers torch.neuron, as `import torch_neuronx` does, and records the calls; the backend's
tensors stay on the CPU. Naming PrivateUse1 `neuron` (which the device string and autocast
need) cannot be undone and leaves torch asking for a device it cannot find, so that part runs
in a child process. What only a Trainium chip shows is in tests/test_neuron.py (pytest -m neuron)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from train_support import ROOT, TINY, read_records, write_tiny_shards

from runtime import hardware, neuron
from runtime.devices import get_backend
from runtime.errors import ConfigError
from runtime.neuron import NeuronBackend

GiB = 2**30


class FakeTorchNeuron(types.ModuleType):
    """torch.neuron as the docs describe it, with a device of the given name; records calls."""

    def __init__(self, name="trn2", available=True, cores=1):
        super().__init__("torch.neuron")
        self.name, self.available, self.cores, self.calls = name, available, cores, []
        self.rng = torch.arange(16, dtype=torch.uint8)

    def _call(self, what, value=None):
        self.calls.append(what)
        return value

    def is_available(self):
        return self.available

    def device_count(self):
        return self._call("device_count", self.cores)

    def get_device_properties(self, device):
        return self._call("get_device_properties", SimpleNamespace(name=self.name))

    def get_amp_supported_dtype(self):  # what torch.autocast asks of a PrivateUse1 device
        return [torch.bfloat16, torch.float16]

    def _is_in_bad_fork(self):  # with manual_seed_all, what torch.manual_seed asks of it
        return False

    def manual_seed_all(self, seed):
        self._call("manual_seed_all")

    def synchronize(self, device=None):
        self._call("synchronize")

    def max_memory_allocated(self, device=None):
        return self._call("max_memory_allocated", 3 * GiB)

    def reset_peak_memory_stats(self, device=None):
        self._call("reset_peak_memory_stats")

    def get_rng_state(self, device=None):
        return self._call("get_rng_state", self.rng)

    def set_rng_state(self, state, device=None):
        self.calls.append(("set_rng_state", state))


@pytest.fixture
def fake(monkeypatch):
    """A stand-in TorchNeuron for one test: torch_neuronx importable, torch.neuron a trn2 with
    one visible core, no torchrun and no Neuron variables in the environment. The backend's
    device is the CPU (the stand-in has no memory); test_the_device_and_autocast_are_neurons
    checks the real one."""
    module = FakeTorchNeuron()
    monkeypatch.setattr(NeuronBackend, "_set_device", lambda self: setattr(self, "device", torch.device("cpu")))
    monkeypatch.setattr(torch, "neuron", module, raising=False)
    monkeypatch.setitem(sys.modules, "torch_neuronx", types.ModuleType("torch_neuronx"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE", neuron.VISIBLE_CORES, neuron.LOGICAL_CORES):
        monkeypatch.setenv(var, "")  # recorded, so the teardown restores the variable's absence
        monkeypatch.delenv(var)
    return module


@pytest.fixture
def process_group(monkeypatch):
    """Two torchrun ranks, this one rank 1; init_process_group records its arguments."""
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(calls))
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroyed"))
    for var, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(var, value)
    return calls


def one_sentence(message: str) -> str:
    """A user-facing refusal: one line, one sentence, what is wrong; what to do."""
    assert "\n" not in message and message.endswith(".") and "; " in message, message
    return message


def cfg(**kw):
    return SimpleNamespace(**{"precision": "auto", "compile": "auto", "fsdp": False, **kw})


# ---------------------------------------------------------------------------- selection


def test_device_auto_picks_neuron_when_torch_neuron_sees_a_device(fake):
    assert isinstance(get_backend("auto", cfg()), NeuronBackend)
    fake.available = False
    assert type(get_backend("auto", cfg())).__name__ == "CPUBackend"


def test_device_auto_stays_on_the_cpu_without_torch_neuron(fake, monkeypatch):
    monkeypatch.delattr(torch, "neuron")
    assert type(get_backend("auto", cfg())).__name__ == "CPUBackend"
    assert not neuron.visible()


def test_train_py_bench_py_and_evaluate_py_take_the_device_to_the_backend(monkeypatch, capsys):
    """Without TorchNeuron each entry point gets as far as the backend, which says what is missing."""
    import bench
    import evaluate
    from training.config import load_config

    monkeypatch.setitem(sys.modules, "torch_neuronx", None)
    assert load_config(["--config", str(ROOT / "config/trn2.yaml")]).device == "neuron"
    assert bench.parse_args(["--device", "neuron"]).device == "neuron"
    assert evaluate.main(["--unigram", "--device", "neuron"]) == 2
    assert "evaluate.py: --device neuron needs torch_neuronx" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="device 'trn' is unknown; use one of auto, cpu, cuda, neuron, xla"):
        get_backend("trn")


# ---------------------------------------------------------------------------- ranks and devices


def test_each_rank_gets_the_core_of_its_local_rank_and_the_neuron_process_group(fake, process_group):
    backend = NeuronBackend(cfg())
    assert os.environ[neuron.VISIBLE_CORES] == "1"  # chosen before torch_neuronx is imported
    assert fake.calls == []  # the device is untouched before the process group exists
    backend.init_distributed()
    (args, kwargs), *_ = process_group
    assert args == ("neuron",) and "device_id" not in kwargs
    assert (backend.rank, backend.world_size, backend.local_rank) == (1, 2, 1)
    assert fake.calls == ["device_count", "get_device_properties"]  # read after the group formed


def test_a_core_the_user_chose_is_kept(fake, process_group, monkeypatch):
    monkeypatch.setenv(neuron.VISIBLE_CORES, "7")
    NeuronBackend(cfg()).init_distributed()
    assert os.environ[neuron.VISIBLE_CORES] == "7"


def test_a_rank_that_sees_several_cores_is_refused_and_leaves_the_group(fake, process_group, monkeypatch):
    monkeypatch.setenv(neuron.VISIBLE_CORES, "0-63")
    fake.cores = 64
    with pytest.raises(ConfigError) as e:
        NeuronBackend(cfg()).init_distributed()
    message = one_sentence(str(e.value))
    assert "sees 64" in message and "NEURON_RT_VISIBLE_CORES='0-63'" in message
    assert process_group[-1] == "destroyed"


# ---------------------------------------------------------------------------- what runs on the device


CHILD = """
import sys, types
import torch
sys.path[:0] = [{root!r}, {tests!r}]
from test_neuron_backend import FakeTorchNeuron, cfg
from runtime.neuron import NeuronBackend

torch.utils.rename_privateuse1_backend("neuron")  # what importing torch_neuronx does
torch.neuron = FakeTorchNeuron()
sys.modules["torch_neuronx"] = types.ModuleType("torch_neuronx")
for precision in ("auto", "bf16", "fp32"):
    backend = NeuronBackend(cfg(precision=precision))
    backend.init_distributed()
    with backend.autocast():
        print(precision, backend.device, torch.is_autocast_enabled("neuron"), torch.get_autocast_dtype("neuron"),
              torch.is_autocast_enabled("cpu"))
"""


def test_the_device_and_autocast_are_neurons():
    """Each rank's device is neuron:0, and autocast is bf16 there (torch.autocast("neuron") alone
    would give fp16), on the device type `neuron`, never the CPU's; none with fp32."""
    child = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), tests=str(ROOT / "tests"))],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.splitlines() == ["auto neuron:0 True torch.bfloat16 False",
                                         "bf16 neuron:0 True torch.bfloat16 False",
                                         "fp32 neuron:0 False torch.float16 False"]


def compiled_with(monkeypatch, backend, model) -> list[dict]:
    """prepare_model's torch.compile calls (the model stays on the CPU: the stand-in has no memory)."""
    calls = []

    def record(fn, **kwargs):
        calls.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", record)
    backend.device = torch.device("cpu")
    backend.prepare_model(model)
    return calls


@pytest.mark.parametrize("choice, compiled", [("auto", False), ("false", False), ("true", True)])
def test_compile_is_off_by_default_and_uses_the_neuron_compiler_when_asked(fake, monkeypatch, choice, compiled):
    calls = compiled_with(monkeypatch, NeuronBackend(cfg(compile=choice)), torch.nn.Linear(4, 4))
    assert calls == ([{"backend": "neuron", "dynamic": False}] if compiled else [])


def test_cuda_still_compiles_with_torchs_default_compiler(fake, monkeypatch):
    from runtime.cuda import CUDABackend

    calls = compiled_with(monkeypatch, CUDABackend(cfg(compile="true")), torch.nn.Linear(4, 4))
    assert calls == [{}]


def test_memory_is_read_and_its_peak_reset_after_a_synchronize(fake):
    backend = NeuronBackend(cfg())
    assert backend.memory_stats() == {"mem": 3.0}
    backend.reset_peak_memory()
    assert fake.calls == ["synchronize", "max_memory_allocated", "synchronize", "reset_peak_memory_stats"]


class DeviceTensor(torch.Tensor):
    """Stands for a tensor on the Neuron device: cpu() gives a plain CPU tensor."""

    def cpu(self, *args, **kwargs):
        return torch.Tensor(self.as_subclass(torch.Tensor).clone())


def on_device(t: torch.Tensor) -> DeviceTensor:
    return t.as_subclass(DeviceTensor)


def test_checkpoints_hold_cpu_tensors_only(fake):
    backend = NeuronBackend(cfg())
    fake.rng = on_device(fake.rng)
    optimizer = SimpleNamespace(state_dict=lambda: {
        "state": {0: {"step": on_device(torch.tensor(3.0)), "exp_avg": on_device(torch.ones(2))}},
        "param_groups": [{"lr": 0.1, "params": [0]}]})
    saved = {"optimizer": backend.optimizer_state_dict(None, optimizer), "rng": backend.rng_state()}
    tensors = [saved["rng"]["cpu"], saved["rng"]["neuron"], *saved["optimizer"]["state"][0].values()]
    assert [type(t) for t in tensors] == [torch.Tensor] * 4
    assert torch.equal(saved["rng"]["neuron"], torch.arange(16, dtype=torch.uint8))
    assert saved["optimizer"]["param_groups"] == [{"lr": 0.1, "params": [0]}]
    backend.set_rng_state(saved["rng"])
    assert fake.calls[-1][0] == "set_rng_state" and fake.calls[-1][1] is saved["rng"]["neuron"]


@pytest.mark.parametrize("name, lnc, peak, label", [
    ("trn2", "2", 667e12 / 4, "trn2-NeuronCore-LNC2"),
    ("Trainium2", "1", 667e12 / 8, "trn2-NeuronCore-LNC1"),
    ("NC_v3d", None, 667e12 / 4, "trn2-NeuronCore-LNC2"),
    ("trn3", None, 671e12 / 4, "trn3-NeuronCore-LNC2"),
])
def test_mfu_peak_is_the_chips_bf16_peak_per_logical_core(fake, monkeypatch, name, lnc, peak, label):
    fake.name = name
    if lnc:
        monkeypatch.setenv(neuron.LOGICAL_CORES, lnc)
    backend = NeuronBackend(cfg())
    backend.init_distributed()
    assert backend.peak_flops() == pytest.approx(peak)
    assert hardware.hardware_label(backend.describe()) == f"1x {label}"


# ---------------------------------------------------------------------------- refusals


def test_no_torch_neuronx_is_refused_in_one_sentence(fake, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_neuronx", None)  # `import torch_neuronx` fails
    with pytest.raises(ConfigError) as e:
        get_backend("neuron", cfg())
    assert one_sentence(str(e.value)).startswith("--device neuron needs torch_neuronx")
    assert "requirements-trn2.txt" in str(e.value)


def test_the_xla_torch_neuronx_of_trn1_is_refused_in_one_sentence(fake, monkeypatch):
    monkeypatch.delattr(torch, "neuron")
    sys.modules["torch_neuronx"].__version__ = "2.9.0.2.14.27725"
    with pytest.raises(ConfigError) as e:
        get_backend("neuron", cfg())
    assert "2.9.0.2.14.27725" in one_sentence(str(e.value)) and "--device xla" in str(e.value)


def test_no_visible_device_is_refused_in_one_sentence(fake):
    fake.available = False
    with pytest.raises(ConfigError) as e:
        get_backend("neuron", cfg())
    assert "found no Neuron device" in one_sentence(str(e.value))


@pytest.mark.parametrize("name", ["trn1", "NC_v2", "inf2"])
def test_a_chip_that_is_not_trainium_2_or_3_is_refused_in_one_sentence(fake, name):
    fake.name = name
    backend = NeuronBackend(cfg())
    with pytest.raises(ConfigError) as e:
        backend.init_distributed()
    assert repr(name) in one_sentence(str(e.value)) and "--device xla" in str(e.value)


@pytest.mark.parametrize("settings, words", [
    (dict(precision="bf16_sr"), ["bf16_sr", "fp32"]),
    (dict(fsdp=True, compile="true"), ["fsdp", "SimpleFSDP", "--compile false"]),
])
def test_what_neuron_cannot_do_is_refused_in_one_sentence(fake, settings, words):
    with pytest.raises(ConfigError) as e:
        NeuronBackend(cfg(**settings))
    assert all(w in one_sentence(str(e.value)) for w in words)


def test_a_bad_logical_core_configuration_is_refused_in_one_sentence(fake, monkeypatch):
    monkeypatch.setenv(neuron.LOGICAL_CORES, "4")
    with pytest.raises(ConfigError) as e:
        NeuronBackend(cfg())
    assert "NEURON_LOGICAL_NC_CONFIG='4'" in one_sentence(str(e.value))


# ---------------------------------------------------------------------------- through train.py and bench.py


def test_train_py_runs_through_the_neuron_backend(fake, tmp_path):
    import train

    data = write_tiny_shards(tmp_path / "data")
    rc = train.main([*TINY, "--device", "neuron", "--precision", "fp32", "--data", str(data), "--num_steps", "4",
                     "--save_every", "4", "--log_dir", str(tmp_path / "logs"),
                     "--checkpoint_dir", str(tmp_path / "ckpt"), "--log_name", "neuron"])
    assert rc == 0
    records = read_records(tmp_path / "logs" / "neuron.jsonl")
    header = next(r for r in records if r["kind"] == "header")
    assert header["environment"]["device"] == "neuron x1 (trn2, lnc 2)"
    steps = [r for r in records if r["kind"] == "step"]
    assert steps and all(r["mem"] == 3.0 and r["mfu"] > 0 for r in steps)  # mfu from trn2's peak
    common = torch.load(next((tmp_path / "ckpt" / "neuron").glob("step_*/common.pt")), weights_only=True)
    mine = torch.load(next((tmp_path / "ckpt" / "neuron").glob("step_*/rank_0.pt")), weights_only=True)
    assert torch.equal(mine["rng"]["neuron"], fake.rng)
    adamw = common["optimizer"]["adamw"]["param_groups"]
    assert adamw and all(g["fused"] for g in adamw)  # fused AdamW, which honours found_inf


def test_bench_py_reaches_the_backend_through_the_same_code(fake, tmp_path):
    import csv

    import bench

    threads = torch.get_num_threads()
    try:
        path = bench.main(["--device", "neuron", "--dtype", "fp32", "--model_args", "n_layers=1", "d_model=32",
                           "n_heads=2", "d_ff=64", "--presets", "esm2_8m", "--batches", "2", "--lengths", "64",
                           "--modes", "train", "--reps", "1", "--no_hf", "--threads", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    with open(path, newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["status"] == "ok" and row["device"] == "neuron x1 (trn2, lnc 2)"
    assert float(row["mfu"]) > 0 and float(row["mem_gib"]) == 3.0 and row["compiled"] == "False"
    assert "synchronize" in fake.calls


# ---------------------------------------------------------------------------- run.sh


@pytest.fixture
def run_sh(tmp_path):
    """A copy of run.sh whose torchrun records its arguments and the Neuron environment."""
    shutil.copy(ROOT / "run.sh", tmp_path)
    recorder = tmp_path / "torchrun"
    recorder.write_text(f'#!/bin/sh\necho "$* | $TORCH_DEVICE_BACKEND_AUTOLOAD ${{FI_PROVIDER:-}}" > "{tmp_path}/calls"\n')
    recorder.chmod(0o755)

    def run(preset, *args, **env):
        proc = subprocess.run(["./run.sh", preset, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "TORCHRUN": str(recorder), **env})
        calls = tmp_path / "calls"
        return proc, calls.read_text().strip() if calls.exists() else None

    return run


@pytest.mark.parametrize("preset, env, expected", [
    ("trn2", {}, "--standalone --nproc_per_node=64 train.py --config config/trn2.yaml --device neuron "
                 "--grad_accum 2 --num_steps 5 | 0"),
    ("trn2-3", {}, "--standalone --nproc_per_node=4 train.py --config config/trn2-3.yaml --device neuron "
                   "--grad_accum 32 --num_steps 5 | 0"),
    ("trn2", {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1"},
     "--nnodes=2 --node_rank=1 --master_addr=10.0.0.1 --master_port=29500 --nproc_per_node=64 train.py "
     "--config config/trn2.yaml --device neuron --grad_accum 1 --num_steps 5 | 0 efa"),
])
def test_the_trainium2_presets_launch_a_worker_per_logical_core(run_sh, preset, env, expected):
    proc, calls = run_sh(preset, "--num_steps", "5", **env)
    assert proc.returncode == 0, proc.stderr
    assert calls == expected


def test_a_node_count_that_does_not_divide_the_step_is_refused_in_one_sentence(run_sh):
    proc, calls = run_sh("trn2", NNODES="3", NODE_RANK="0", MASTER_ADDR="10.0.0.1")
    assert proc.returncode == 2 and calls is None
    assert proc.stderr.strip().count("\n") == 0 and "use NNODES in {1, 2}" in proc.stderr


def test_the_config_of_each_preset_is_the_one_the_preset_sizes(run_sh):
    """The grad_accum in each config is what run.sh passes on one node: the files describe the run."""
    from training.config import load_config

    for preset, path in (("trn2", "config/trn2.yaml"), ("trn2-3", "config/trn2-3.yaml")):
        _, calls = run_sh(preset)
        accum = int(calls.split("--grad_accum ")[1].split()[0])
        nproc = int(calls.split("--nproc_per_node=")[1].split()[0])
        config = load_config(["--config", str(ROOT / path)])
        assert config.grad_accum == accum and config.device == "neuron" and config.compile == "false"
        assert config.micro_batch_rows(nproc) == 4  # rows of every batch on every worker


def test_the_neuron_lane_stops_with_one_sentence_where_torchneuron_is_missing(tmp_path):
    """`./run.sh test-neuron` without TorchNeuron exits 1 with one sentence before pytest runs.
    It runs in a copy of run.sh whose .venv-trn2 python is a stand-in: pip installs nothing, the
    rest runs on this interpreter (with the project on its path)."""
    (tmp_path / "tests").mkdir()
    shutil.copy(ROOT / "run.sh", tmp_path)
    shutil.copy(ROOT / "tests" / "require_neuron.py", tmp_path / "tests")
    python = tmp_path / ".venv-trn2" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\necho "$*" >> "{tmp_path}/calls"\n'
                      f'if [ "$1 $2" = "-m pip" ]; then exit 0; fi\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    run = subprocess.run(["./run.sh", "test-neuron"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 1 and run.stdout == ""
    assert (tmp_path / "calls").read_text().splitlines() == [
        "-m pip install -q --disable-pip-version-check -r requirements-trn2.txt", "tests/require_neuron.py"]
    message = run.stderr.strip()
    assert message.startswith("run.sh test-neuron: --device neuron needs torch_neuronx")
    assert "\n" not in message and message.endswith(".")


def test_the_names_a_trainium_2_or_3_device_may_report():
    """The chips the backend accepts are the rows of hardware.py's table and nothing else."""
    assert [hardware.neuron_chip(n) for n in ("trn2", "TRN3", "NC_v3d", "NC_v4", "trn1", "NC_v2", "")] == [
        "trn2", "trn3", "trn2", "trn3", None, None, None]


def test_profiling_is_refused_with_neurons_own_tool_named(fake):
    with pytest.raises(ConfigError) as e:
        NeuronBackend(cfg()).profiler_activities()
    assert all(w in one_sentence(str(e.value)) for w in ["--profile_steps", "--device neuron", "Neuron Explorer"])
