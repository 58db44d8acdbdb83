"""The CUDA backend's compiled paths, exercised on the CPU: torch.compile of the training step
(inductor's C++ backend) and flex attention's block mask built inside a compiled graph."""

import pytest
import torch
from train_support import TWO_RANKS, losses, run_train, write_tiny_shards

from model import build_model, get_config


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compile")
    data = write_tiny_shards(tmp / "data")
    _, records = run_train(tmp, data, "eager", "--num_steps", "6", "--grad_accum", "2", launcher=TWO_RANKS)
    return tmp, data, losses(records)


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_compiled_training_under_torchrun_follows_eager(eager, sharding):
    """The CUDA launch's composition (2 processes, compiled model inside DDP or over FSDP2,
    gradient accumulation, evaluation, checkpoint) on the CPU: the eager loss curve."""
    tmp, data, expected = eager
    name = f"compiled-{sharding}"
    _, records = run_train(tmp, data, name, "--num_steps", "6", "--grad_accum", "2", "--compile", "true",
                           "--fsdp", str(sharding == "fsdp").lower(), launcher=TWO_RANKS, timeout=900)
    assert sorted(losses(records)) == list(range(1, 7))
    # Inductor fuses and reorders float sums: equal up to round-off, not bitwise.
    assert losses(records) == pytest.approx(expected, rel=1e-4)
    assert len(set(expected.values())) == 6  # the model moved at every step
    header = next(r for r in records if r["kind"] == "header")
    assert header["config"]["compile"] == "true"
    assert any(r["kind"] == "summary" for r in records)  # evaluated the compiled model too
    # The checkpoint names the plain model's parameters, not the compile or DDP wrapper's.
    saved = [torch.load(tmp / "ckpt" / n / "step_000006" / "common.pt")["model"] for n in ("eager", name)]
    assert saved[0].keys() == saved[1].keys()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_flex_attention_in_a_compiled_model_matches_sdpa():
    torch.manual_seed(0)
    ids = torch.randint(4, 24, (2, 128))
    doc_ids = torch.zeros(2, 128, dtype=torch.long)
    doc_ids[0, 60:], doc_ids[1, 100:] = 1, -1  # two documents, then a padded row
    logits = {}
    for impl in ("sdpa", "flex"):
        torch.manual_seed(0)
        model = build_model(get_config("sample", n_layers=2, d_model=64, n_heads=4, d_ff=128, attn_impl=impl)).eval()
        with torch.no_grad():  # flex attention has no CPU backward: the forward is what runs here
            logits[impl], _ = (torch.compile(model) if impl == "flex" else model)(ids, doc_ids)
    real = doc_ids >= 0
    torch.testing.assert_close(logits["flex"][real], logits["sdpa"][real], rtol=1e-5, atol=1e-5)
