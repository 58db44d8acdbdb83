"""Length-bucketed micro-batches on XLA (torch-xla's CPU runtime): one graph per bucket shape,
compiled once, then no more as the shapes recur; and the loss curve of --device cpu."""

from __future__ import annotations

import pytest

pytest.importorskip("torch_xla")
pytestmark = pytest.mark.xla

from test_xla_train import STEPS, curve, tiny_data, train  # noqa: E402,F401  (tiny_data: a fixture)

BUCKETS = ["--length_buckets", "4", "--eval_every", "0", "--save_every", "0"]


def shapes_by_step(data, steps: int) -> list[tuple[int, int]]:
    """The micro-batch shape of every step of the run, from the loader the run builds."""
    from data.datasets import resolve_dataset
    from data.loader import TrainLoader

    loader = TrainLoader(resolve_dataset(str(data), None).train, 4, 128, seed=3, length_buckets=4, prefetch=0)
    return [tuple(next(loader)["doc_ids"].shape) for _ in range(steps)]


def test_bucketed_steps_compile_one_graph_per_shape_and_match_the_cpu(tiny_data, tmp_path):  # noqa: F811
    records = train(tmp_path, tiny_data, "xla_buckets", "--device", "xla", *BUCKETS)
    steps = {r["step"]: r["compiles"] for r in records if r.get("kind") == "step"}
    shapes = shapes_by_step(tiny_data, STEPS)
    # the data picks the buckets: documents of 20-89 residues fill rows of 64 and 96 here
    assert len(set(shapes)) >= 2, f"the tiny run uses one shape only: {shapes}"
    # after the first two steps (the first creates the optimizer state), every new shape costs
    # graphs and a repeated one none
    for step in range(3, STEPS + 1):
        new_shape = shapes[step - 1] not in shapes[: step - 1]
        assert (steps[step] > steps[step - 1]) == new_shape, (step, steps, shapes)
    later = len(set(shapes[2:]) - set(shapes[:2]))  # shapes first seen after step 2
    assert later and (steps[STEPS] - steps[2]) / later <= 2, f"more than 2 graphs per bucket shape: {steps}"

    cpu = curve(train(tmp_path, tiny_data, "cpu_buckets", "--device", "cpu", *BUCKETS))
    xla = curve(records)
    assert sorted(xla) == sorted(cpu) == list(range(1, STEPS + 1))
    assert xla[1] == pytest.approx(cpu[1], rel=1e-5)
    worst = max(abs(xla[s] - cpu[s]) / cpu[s] for s in xla)
    assert worst < 2e-2, f"loss curves differ by {worst:.2%}: xla {xla} cpu {cpu}"
