"""The warm-up precompile (training/precompile.py): one step of every kind of micro-batch the
loader can yield, traced in the warm-up step and undone, so the run goes on exactly as without it.
The XLA lane shows what it is for (tests/test_xla_buckets.py: no graph compiled after warm-up)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
from train_support import ROOT, TWO_RANKS, assert_user_error, losses, run_train, write_tiny_shards

sys.path.insert(0, str(ROOT))

from data.datasets import resolve_dataset  # noqa: E402
from data.loader import TrainLoader  # noqa: E402
from data.masking import MaskingConfig  # noqa: E402
from training.precompile import precompile_wanted  # noqa: E402

# masked diffusion from step 3 on: two masking phases, whose batches have the same fields
DIFFUSION = MaskingConfig(rule="all_mask", rate=0.2, diffusion="sequence", diffusion_from=3)


def kind_of(batch: dict) -> tuple[int, int, bool]:
    return (*batch["doc_ids"].shape, bool(batch.get("whole_rows")))


def fields(batch: dict) -> dict:
    return {k: (v.dtype, v.shape) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@pytest.fixture(scope="module")
def train_files(tmp_path_factory):
    return resolve_dataset(str(write_tiny_shards(tmp_path_factory.mktemp("data"))), None).train


def test_the_loader_names_every_kind_it_yields(train_files):
    loader = TrainLoader(train_files, 4, 128, seed=1, prefetch=0, length_buckets=4, whole_rows=True)
    kinds = loader.kinds()
    # rows of 32, 64, 96, 128 filling 4 x 128 token slots, then whole rows of 128
    assert kinds == [(16, 32, False), (8, 64, False), (5, 96, False), (4, 128, False), (4, 128, True)]
    seen = {kind_of(next(loader)) for _ in range(300)}
    assert seen <= set(kinds) and len(seen) >= 4, seen
    assert TrainLoader(train_files, 4, 128, prefetch=0).kinds() == [(4, 128, False)]


def test_examples_have_the_fields_of_real_batches_and_leave_the_loader_as_it_was(train_files):
    loader = TrainLoader(train_files, 4, 128, seed=1, prefetch=0, length_buckets=4, whole_rows=True,
                         masking=DIFFUSION, micro_steps_per_step=2)
    real = {}  # (kind, diffusing) -> a real batch
    for index in range(400):
        batch = next(loader)
        real.setdefault((kind_of(batch), index // 2 >= 3), batch)
    state = loader.state_dict()
    for (kind, diffusing), batch in real.items():
        example = loader.example(kind, step=3 if diffusing else 0)
        assert kind_of(example) == kind
        assert fields(example) == fields(batch), (kind, diffusing)
        assert (example["labels"] != -100).any()  # something to learn from: a real loss and gradient
    assert {d for _, d in real} == {True, False} and len({k for k, _ in real}) >= 4
    assert loader.state_dict() == state
    twin = TrainLoader(train_files, 4, 128, seed=1, prefetch=0, length_buckets=4, whole_rows=True,
                       masking=DIFFUSION, micro_steps_per_step=2)
    for _ in range(400):
        next(twin)
    after, expected = next(loader), next(twin)
    assert all(after[k].equal(expected[k]) for k in ("input_ids", "labels", "doc_ids", "loss_weights"))


def test_auto_is_on_where_shapes_compile():
    backend = lambda static, compiled: SimpleNamespace(static_shapes=static, compile=compiled)  # noqa: E731
    assert precompile_wanted("auto", backend(True, False), 1)  # XLA, Neuron: even one kind
    assert precompile_wanted("auto", backend(False, True), 2)  # torch.compile, several kinds
    assert not precompile_wanted("auto", backend(False, True), 1)
    assert not precompile_wanted("auto", backend(False, False), 5)  # eager CPU/CUDA: nothing to compile
    assert precompile_wanted("true", backend(False, False), 1)
    assert not precompile_wanted("false", backend(True, True), 5)


def test_a_precompiled_run_trains_exactly_like_one_without(tmp_path):
    """Buckets, whole rows, two micro-batches a step, auto-clip's history and masked diffusion
    after a warm-up: every state a step changes must come back exactly."""
    from submissions.logcheck import verify

    data = write_tiny_shards(tmp_path / "data")
    args = ["--num_steps", "8", "--eval_every", "4", "--length_buckets", "4", "--whole_rows", "true",
            "--grad_accum", "2", "--optim.grad_clip", "auto", "--masked_diffusion", "true", "--mask_rate_steps", "3"]
    _, plain = run_train(tmp_path, data, "plain", *args, "--precompile", "false")
    _, pre = run_train(tmp_path, data, "pre", *args, "--precompile", "true")
    assert losses(pre) == losses(plain) and sorted(losses(pre)) == list(range(1, 9))
    val = lambda records: [r["val_loss"] for r in records if r["kind"] == "eval" and "val_loss" in r]  # noqa: E731
    assert val(pre) == val(plain) and len(val(pre)) == 2
    said = lambda name: [ln for ln in (tmp_path / "logs" / f"{name}.txt").read_text().splitlines()  # noqa: E731
                         if ln.startswith("precompile: ") and "step(s)" in ln]
    # 5 kinds: 4 buckets and whole rows
    assert said("pre") == ["precompile: 5 step(s) of every kind of micro-batch (8x32, 4x64, 2x96, 2x128, 2x128 "
                           "whole rows) traced in the warm-up step, then undone"]
    assert said("plain") == []
    warm = lambda records: [r["warmup_time"] for r in records if r["kind"] == "summary"][0]  # noqa: E731
    assert warm(pre) > warm(plain)  # the precompile is warm-up time, not train time
    verify(tmp_path / "logs" / "pre.txt")  # its log is a valid run log: the times add up


def test_an_unknown_precompile_setting_is_refused(tmp_path):
    proc, _ = run_train(tmp_path, write_tiny_shards(tmp_path / "data"), "bad", "--precompile", "maybe", rc=None)
    assert_user_error(proc, "precompile", "maybe")


@pytest.mark.parametrize("fsdp", ["false", "true"])
def test_two_ranks_precompile_in_step_and_train_exactly_like_without(tmp_path, fsdp):
    """Two gloo ranks (DDP, or FSDP2 whose parameters and optimizer state are each rank's
    shards) run the precompile's steps together, their all-reduces paired, and restore their
    own state: the run repeats the one without it."""
    data = write_tiny_shards(tmp_path / "data")
    args = ["--num_steps", "5", "--length_buckets", "2", "--whole_rows", "true", "--fsdp", fsdp]
    _, plain = run_train(tmp_path, data, "plain", *args, "--precompile", "false", launcher=TWO_RANKS)
    _, pre = run_train(tmp_path, data, "pre", *args, "--precompile", "true", launcher=TWO_RANKS)
    assert losses(pre) == losses(plain) and sorted(losses(pre)) == [1, 2, 3, 4, 5]
    assert "precompile: 3 step(s)" in (tmp_path / "logs" / "pre.txt").read_text()
