"""Counts cross the ranks in float32 on XLA (neuronx-cc may refuse an integer all-reduce), and
still add up exactly, far past float32's 2**24."""

import pytest
import torch

pytestmark = pytest.mark.xla
pytest.importorskip("torch_xla")  # collected in the CPU lane too: import nothing of XLA there
xla = pytest.importorskip("runtime.xla")


class FakeRanks:
    """xm.all_reduce over `world` ranks that all hold the same tensor, in float32 as sent."""

    REDUCE_SUM = "sum"

    def __init__(self, world: int):
        self.world, self.dtypes = world, []

    def all_reduce(self, op, tensors):
        for t in tensors:
            self.dtypes.append(t.dtype)
            t.mul_(self.world)


@pytest.mark.parametrize("world", [2, 32, 256])
def test_integer_sums_are_exact_and_travel_as_float32(world):
    values = torch.tensor([0, 1, 2**16 - 1, 2**16, 123_456_789, 2**31 + 17, 2**40 // world - 1])
    ranks = FakeRanks(world)
    got = xla._all_reduce_counts(ranks, values.clone())
    assert ranks.dtypes == [torch.float32]
    assert got.dtype == values.dtype and torch.equal(got, values * world)
    # the plain float32 all-reduce this replaces loses such counts
    assert not torch.equal((values.float() * world).long(), values * world)
