"""A training step that does not log never waits for the device: counted on the CPU, through the
code path the CUDA backend takes (the base Backend's optimizer step: fused AdamW and Muon with
found_inf, the gradient scale and clipping on the device, skip counters on the device)."""

from __future__ import annotations

import threading
import traceback

import pytest
import torch
from train_support import TINY, write_tiny_shards

READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
FRESH = ("tensor", "as_tensor", "from_numpy")  # on CUDA each would be a host-to-device copy
LOG_EVERY, STEPS = 4, 12
# The attention an accelerator runs: the eager CPU's default, varlen, cuts each batch into its
# documents on the host, where the batch already is, which only the CPU backend allows.
ACCELERATOR_ATTENTION = ["--model_args.attn_impl", "sdpa"]


@pytest.fixture
def counted(monkeypatch):
    """Every host read (and fresh host tensor) on the main thread, with the loop iteration it
    happened in (the loader's thread builds batches on the host by design)."""
    import train

    main, now, seen = threading.get_ident(), {"step": 0}, []

    def record(what):
        if threading.get_ident() == main and now["step"]:
            seen.append((now["step"], what, "".join(traceback.format_stack(limit=6)[:-2])))

    real_schedule = train.apply_schedule

    def schedule(optimizer, step, *args, **kwargs):  # called once per iteration, before the step
        now["step"] = step + 1
        return real_schedule(optimizer, step, *args, **kwargs)

    monkeypatch.setattr(train, "apply_schedule", schedule)
    for name in READS:
        method = getattr(torch.Tensor, name)

        def read(self, *args, _method=method, _name=name, **kwargs):
            record(f"Tensor.{_name}")
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)
    for name in FRESH:
        factory = getattr(torch, name)

        def fresh(*args, _factory=factory, _name=name, **kwargs):
            record(f"torch.{_name}")
            return _factory(*args, **kwargs)

        monkeypatch.setattr(torch, name, fresh)
    return train, seen


@pytest.mark.parametrize("extra", [[], ["--grad_accum", "2"], ["--optim.grad_clip", "0.5"]],
                         ids=["plain", "grad-accum", "clipping"])
def test_steps_that_do_not_log_read_nothing_from_the_device(tmp_path, counted, extra):
    train, seen = counted
    data = write_tiny_shards(tmp_path / "data", n_train=80)
    rc = train.main([*TINY, *ACCELERATOR_ATTENTION, "--data", str(data), "--log_dir", str(tmp_path / "logs"),
                     "--checkpoint_dir", str(tmp_path / "ckpt"), "--log_name", "reads",
                     "--num_steps", str(STEPS), "--log_every", str(LOG_EVERY), *extra])
    assert rc == 0
    logging = {1, *range(LOG_EVERY, STEPS + 1, LOG_EVERY)}  # the warm-up step logs too
    quiet = [(step, what, where) for step, what, where in seen if step not in logging]
    assert not quiet, "host reads in steps that do not log:\n" + "\n".join(
        f"step {s}: {w}\n{where}" for s, w, where in quiet[:3])
    # the counting works: logging steps do read (the loss, the token counts, the skip counters)
    assert {step for step, _, _ in seen} >= {LOG_EVERY, 2 * LOG_EVERY}
