"""Length-bucketed micro-batches on XLA (torch-xla's CPU runtime): one graph per bucket shape,
compiled once, then no more as the shapes recur; and the loss curve of --device cpu. The same
for whole rows (--whole_rows): the mask-free micro-batches are one more graph, compiled once.
With the precompile (on by default on XLA) every one of those graphs is compiled in the warm-up
step, so the count stays flat from the first step line on; without it each kind compiles when
the data first picks it."""

from __future__ import annotations

import pytest

pytest.importorskip("torch_xla")
pytestmark = pytest.mark.xla

from test_xla_train import STEPS, curve, tiny_data, train  # noqa: E402,F401  (tiny_data: a fixture)

BUCKETS = ["--length_buckets", "4", "--eval_every", "0", "--save_every", "0"]


def shapes_by_step(data, steps: int, rows: int = 4, length: int = 128, **kw) -> list[tuple]:
    """(rows, length, whole rows?) of the micro-batch of every step of the run, from the loader
    the run builds (the tiny run's 512 token slots, seed 3)."""
    from data.datasets import resolve_dataset
    from data.loader import TrainLoader

    loader = TrainLoader(resolve_dataset(str(data), None).train, rows, length, seed=3, prefetch=0, **kw)
    batches = (next(loader) for _ in range(steps))
    return [(*b["doc_ids"].shape, bool(b.get("whole_rows"))) for b in batches]


def assert_graphs_follow_new_kinds(records, kinds: list[tuple]) -> None:
    """After the first two steps, every kind of micro-batch new since step 1 costs graphs (at
    most 2) and a repeated one none. (Step 1 creates the optimizer state, so its graphs are its
    own: its kind is new again when it next comes.)"""
    steps = {r["step"]: r["compiles"] for r in records if r.get("kind") == "step"}
    new = {step: kinds[step - 1] not in kinds[1 : step - 1] for step in range(3, STEPS + 1)}
    for step, new_kind in new.items():
        assert (steps[step] > steps[step - 1]) == new_kind, (step, steps, kinds)
    later = sum(new.values())
    assert later and (steps[STEPS] - steps[2]) / later <= 2, f"more than 2 graphs per kind: {steps}"


def assert_flat_after_warmup(records) -> None:
    """Every step graph compiled in the warm-up step (the precompile's steps traced each kind):
    after it comes one graph at step 2, the log line's values (at step 1 the skip counters enter
    it as constants; PT_XLA_DEBUG_LEVEL=1 names the step closure), and then none."""
    steps = {r["step"]: r["compiles"] for r in records if r.get("kind") == "step"}
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert steps[2] - steps[1] <= 1 and set(steps[s] for s in range(2, STEPS + 1)) == {steps[2]}, \
        f"graphs compiled after the warm-up step: {steps}"


def assert_curves_agree(records, cpu_records) -> None:
    cpu, xla = curve(cpu_records), curve(records)
    assert sorted(xla) == sorted(cpu) == list(range(1, STEPS + 1))
    assert xla[1] == pytest.approx(cpu[1], rel=1e-5)
    worst = max(abs(xla[s] - cpu[s]) / cpu[s] for s in xla)
    assert worst < 2e-2, f"loss curves differ by {worst:.2%}: xla {xla} cpu {cpu}"


def test_bucketed_steps_compile_one_graph_per_shape_and_match_the_cpu(tiny_data, tmp_path):  # noqa: F811
    records = train(tmp_path, tiny_data, "xla_buckets", "--device", "xla", *BUCKETS, "--precompile", "false")
    shapes = shapes_by_step(tiny_data, STEPS, length_buckets=4)
    # the data picks the buckets: documents of 20-89 residues fill rows of 64 and 96 here
    assert len(set(shapes)) >= 2, f"the tiny run uses one shape only: {shapes}"
    assert_graphs_follow_new_kinds(records, shapes)
    cpu = train(tmp_path, tiny_data, "cpu_buckets", "--device", "cpu", *BUCKETS)
    assert_curves_agree(records, cpu)
    # the precompile (XLA's default) compiles every bucket in the warm-up step, the same curve
    precompiled = train(tmp_path, tiny_data, "xla_buckets_pre", "--device", "xla", *BUCKETS)
    assert_flat_after_warmup(precompiled)
    assert curve(precompiled) == curve(records)


def test_whole_rows_compile_one_more_graph_once_and_match_the_cpu(tiny_data, tmp_path):  # noqa: F811
    """Rows of 64: documents of 63-89 residues are cropped to fill a row alone, and their
    micro-batches run attention with no mask, one more graph of the same shape."""
    whole = ["--max_length", "64", "--whole_rows", "true", "--eval_every", "0", "--save_every", "0"]
    records = train(tmp_path, tiny_data, "xla_whole", "--device", "xla", *whole)
    kinds = shapes_by_step(tiny_data, STEPS, rows=8, length=64, whole_rows=True)
    assert {k[2] for k in kinds[2:]} == {True, False}, f"the run needs both kinds after warm-up: {kinds}"
    assert_flat_after_warmup(records)
    assert_curves_agree(records, train(tmp_path, tiny_data, "cpu_whole", "--device", "cpu", *whole))


def test_precompile_covers_mixed_kinds_within_a_step_of_two_micro_batches(tiny_data, tmp_path):  # noqa: F811
    """With grad_accum 2 a step's micro-batches may be of two kinds, and each micro-batch is a
    graph of its own kind and place (first, or last with the update): the precompile's steps of
    one kind each cover every mix. The run matches the one without it."""
    args = [*BUCKETS, "--grad_accum", "2"]
    kinds = shapes_by_step(tiny_data, 2 * STEPS, rows=2, length_buckets=4)
    steps = list(zip(kinds[::2], kinds[1::2]))
    assert any(a != b for a, b in steps[1:]), f"no step mixes two kinds: {steps}"
    precompiled = train(tmp_path, tiny_data, "xla_accum_pre", "--device", "xla", *args)
    assert_flat_after_warmup(precompiled)
    plain = train(tmp_path, tiny_data, "xla_accum", "--device", "xla", *args, "--precompile", "false")
    assert curve(precompiled) == curve(plain)
