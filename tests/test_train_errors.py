"""Bad input to train.py: one clear sentence, a non-zero exit, nothing lost."""

import pytest
from train_support import assert_user_error, run_train, write_tiny_shards


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_shards(tmp_path_factory.mktemp("errors") / "data")


def test_corrupt_shard(tmp_path, data):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in data.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    shard = bad / "tiny_train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated
    proc, _ = run_train(tmp_path, bad, "corrupt", "--num_steps", "3", rc=None)
    assert_user_error(proc, "tiny_train_000000.bin", "truncated")
    assert not (tmp_path / "logs" / "corrupt.txt").exists()


def test_missing_data_directory(tmp_path):
    proc, _ = run_train(tmp_path, tmp_path / "nowhere", "missing", "--num_steps", "3", rc=None)
    assert_user_error(proc, "nowhere", "data.prepare")


@pytest.mark.parametrize("extra, words", [
    (["--num_stepz", "3"], ["num_stepz", "num_steps"]),
    (["--num_steps", "3", "--batch_size", "500"], ["batch_size=500", "divisible"]),
    (["--num_steps", "3", "--optim.lr", "fast"], ["lr"]),
    (["--num_steps", "3", "--resume", "/no/such/dir"], ["/no/such/dir", "--resume"]),
    (["--num_steps", "3", "--model_args.attn_impl", "flex"], ["flex", "cpu", "sdpa"]),
    (["--num_steps", "3", "--device", "xla", "--fsdp", "true"], ["fsdp", "xla"]),
])
def test_bad_config(tmp_path, data, extra, words):
    proc, _ = run_train(tmp_path, data, "badcfg", *extra, rc=None)
    assert_user_error(proc, *words)


def test_checkpoint_of_another_model(tmp_path, data):
    run_train(tmp_path, data, "a", "--num_steps", "6", "--steps_this_run", "3")
    proc, _ = run_train(tmp_path, data, "b", "--num_steps", "6", "--resume", str(tmp_path / "ckpt" / "a"),
                        "--model_args.d_model", "128", rc=None)
    assert_user_error(proc, "belongs to another run", "d_model=64 there vs 128 here")
    assert (tmp_path / "ckpt" / "a" / "step_000003" / "common.pt").is_file()  # untouched


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path, data, monkeypatch):
    """Gradients turn NaN from the 5th step on: those updates are skipped (weights unchanged),
    and after max_skipped_steps in a row the run stops with exit code 3, keeping its last
    good checkpoint (step 4) and writing no summary."""
    import torch
    from train_support import TINY, read_records

    import train
    from runtime.backend import Backend

    real_step = Backend.optimizer_step
    calls, snapshots = [], []

    def poisoned(self, model, optimizer, grad_clip, scale=1.0):
        calls.append(1)
        if len(calls) >= 5:
            next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("nan"))
            snapshots.append([p.detach().clone() for p in model.parameters()])
        return real_step(self, model, optimizer, grad_clip, scale)

    monkeypatch.setattr(Backend, "optimizer_step", poisoned)
    monkeypatch.setattr(train, "Stop", lambda: type("NoSignals", (), {"requested": False})())
    rc = train.main([*TINY, "--data", str(data), "--log_dir", str(tmp_path / "logs"), "--checkpoint_dir",
                     str(tmp_path / "ckpt"), "--log_name", "nan", "--num_steps", "30", "--save_every", "2",
                     "--max_skipped_steps", "3"])
    assert rc == 3 and len(calls) == 7
    for before, after in zip(snapshots[0], snapshots[-1]):
        assert torch.equal(before, after)  # skipped steps did not move the weights
    text = (tmp_path / "logs" / "nan.txt").read_text()
    skipped = [x for x in text.splitlines() if x.startswith("step:") and "skipped: non-finite gradient norm" in x]
    assert len(skipped) == 3 and "\nstopped: 3 steps in a row" in text
    assert not any(r["kind"] == "summary" for r in read_records(tmp_path / "logs" / "nan.jsonl"))
    assert sorted(p.name for p in (tmp_path / "ckpt" / "nan").iterdir()) == ["step_000002", "step_000004"]


def test_skipped_steps_between_log_lines_are_counted_and_the_log_verifies(tmp_path, data, monkeypatch):
    """Steps 3 and 4 non-finite, logging every 2 steps: one message for both, the run goes on,
    the summary counts 2, and leaderboard.py verify accepts the log."""
    from train_support import TINY

    import train
    from runtime.backend import Backend
    from submissions.logcheck import verify

    real_step, calls = Backend.optimizer_step, []

    def poisoned(self, model, optimizer, grad_clip, scale=1.0):
        calls.append(1)
        if len(calls) in (3, 4):
            next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("nan"))
        return real_step(self, model, optimizer, grad_clip, scale)

    monkeypatch.setattr(Backend, "optimizer_step", poisoned)
    rc = train.main([*TINY, "--data", str(data), "--log_dir", str(tmp_path / "logs"), "--checkpoint_dir",
                     str(tmp_path / "ckpt"), "--log_name", "gaps", "--num_steps", "6", "--log_every", "2"])
    assert rc == 0
    text = (tmp_path / "logs" / "gaps.txt").read_text()
    assert [x.split(" (")[0] for x in text.splitlines() if x.startswith("step:") and " skipped: " in x] == [
        "step:4 skipped: non-finite gradient norm in 2 step(s) since the last logged step"]
    assert "\nskipped_steps:2\n" in text
    verify(tmp_path / "logs" / "gaps.txt")  # raises Rejected if the count did not add up
