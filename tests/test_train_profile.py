"""--profile_steps A:B: a torch.profiler trace and an operator table of exactly those steps,
written beside the log, without changing what the run computes; bad input refused."""

import json

import pytest
import torch
from train_support import assert_user_error, read_records, run_train, write_tiny_shards

from runtime.errors import ConfigError
from training.config import load_config
from training.profiling import StepProfiler, parse_steps


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_shards(tmp_path_factory.mktemp("profile") / "data")


def summary(records):
    return next(r for r in records if r["kind"] == "summary")


def test_a_profiled_run_writes_its_steps_and_computes_what_an_unprofiled_one_does(tmp_path, data):
    proc, profiled = run_train(tmp_path, data, "prof", "--num_steps", "6", "--log_every", "5",
                               "--profile_steps", "3:4")
    _, plain = run_train(tmp_path, data, "plain", "--num_steps", "6", "--log_every", "5")
    out = tmp_path / "logs" / "prof.profile"
    trace = json.loads((out / "trace_rank0.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "aten::mm" in names and any(n and n.startswith("Optimizer.step#") for n in names)
    table = (out / "ops_rank0.txt").read_text()
    assert table.startswith("# torch.profiler, rank 0, optimizer steps 3-4 (2 step(s))")
    assert "aten::mm" in table
    # the window's last step is logged, so writing the files falls outside train_time
    assert [r["step"] for r in profiled if r["kind"] == "step"] == [1, 4, 5, 6]
    assert "profile: " in (tmp_path / "logs" / "prof.txt").read_text()
    assert summary(profiled)["val_loss"] == summary(plain)["val_loss"]
    assert not (tmp_path / "logs" / "plain.profile").exists()


def test_the_profiler_watches_only_the_steps_asked(tmp_path):
    p = StepProfiler((2, 3), ("cpu",), tmp_path / "out", rank=1, sync=lambda: None)
    x = torch.randn(64, 64)
    for step in range(1, 6):
        p.before(step)
        torch.mm(x, x) if step != 2 else torch.tanh(x)  # step 2: tanh, the others: mm
        written = p.after(step)
        assert bool(written) == (step == 3)
    names = {e.get("name") for e in json.loads((tmp_path / "out" / "trace_rank1.json").read_text())["traceEvents"]}
    assert "aten::tanh" in names and "aten::mm" in names
    assert "optimizer steps 2-3 (2 step(s))" in (tmp_path / "out" / "ops_rank1.txt").read_text()
    assert p.close() == []  # already written


def test_a_run_that_stops_inside_the_window_still_writes_it(tmp_path):
    p = StepProfiler((2, 9), ("cpu",), tmp_path, rank=0, sync=lambda: None)
    p.before(2)
    torch.mm(torch.ones(8, 8), torch.ones(8, 8))
    assert p.after(2) == []
    trace, table = p.close()
    assert trace.is_file() and "optimizer steps 2 (1 step(s))" in table.read_text()


def test_no_profile_asked_costs_nothing(tmp_path):
    p = StepProfiler(None, (), tmp_path, rank=0, sync=lambda: pytest.fail("no sync without a profile"))
    for step in range(1, 4):
        p.before(step)
        assert p.after(step) == []
    assert p.close() == [] and p.last is None and not list(tmp_path.iterdir())


@pytest.mark.parametrize("text, steps", [("", None), ("3:4", (3, 4)), (" 1 : 10 ", (1, 10)), ("5:5", (5, 5))])
def test_parse_steps(text, steps):
    assert parse_steps(text, 10) == steps


@pytest.mark.parametrize("text", ["4:3", "0:2", "3:11", "3", "a:b", "3-4"])
def test_parse_steps_refuses_what_is_not_a_window_of_the_run(text):
    with pytest.raises(ValueError, match="--profile_steps"):
        parse_steps(text, 10)


def test_the_config_refuses_a_bad_window_and_a_profiled_submission():
    with pytest.raises(ConfigError, match="num_steps"):
        load_config(["--config", "config/sample.yaml", "--num_steps", "5", "--profile_steps", "4:6"])
    with pytest.raises(ConfigError, match="track 'cpu-sample'"):
        load_config(["--config", "config/cpu-speedrun.yaml", "--profile_steps", "4:6"])
    assert load_config(["--config", "config/cpu-speedrun.yaml", "--profile_steps", "4:6",
                        "--track", ""]).profile_steps == "4:6"


def test_train_py_refuses_a_bad_window_in_one_sentence(tmp_path, data):
    proc, records = run_train(tmp_path, data, "bad", "--num_steps", "3", "--profile_steps", "2:5", rc=None)
    assert_user_error(proc, "--profile_steps", "2:5", "num_steps (3)")
    assert records == [] and read_records(tmp_path / "logs" / "bad.jsonl") == []
