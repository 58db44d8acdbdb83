"""Every kind of micro-batch compiled in the warm-up, so no graph is compiled in timed steps.

Where each new input shape compiles a graph (XLA on trn1, the Neuron backend, torch.compile),
a run with length buckets or whole rows meets a new kind of micro-batch whenever the data
first picks it, possibly hundreds of steps in: that compile lands in train_time, and a
`neuron_parallel_compile` trial run of a few steps never traces it. Even with one kind, the
step after the first is a graph of its own on XLA (the first creates the optimizer state).

So after the process's first step (its warm-up step), `precompile` runs one optimizer step
per kind of micro-batch the loader can yield (TrainLoader.kinds: each bucket shape, whole rows),
grad_accum micro-batches of that kind, on synthetic batches of exactly the real fields, dtypes
and masking phase (TrainLoader.example). Each step's graphs depend on one micro-batch kind and
its place in the step (first, later, last with the update), so these steps trace every graph
the run's steps can need. Around them the backend copies the model, optimizer and random
states to the host and back (Backend.snapshot_training / restore_training), so the run goes on
exactly as without them: the same losses to the last bit (tests/test_precompile.py). Every rank
runs the same kinds in the same order, so their collectives pair. The time counts as warm-up.
"""

from __future__ import annotations


def precompile_wanted(choice: str, backend, kinds: int) -> bool:
    """`precompile: auto` is on where new shapes compile a graph: XLA and the Neuron backend
    always (the second step's graph is new even with one kind), torch.compile with several
    kinds of micro-batch."""
    if choice != "auto":
        return choice == "true"
    return backend.static_shapes or (backend.compile and kinds > 1)


def kinds_text(kinds: list[tuple[int, int, bool]]) -> str:
    """'8x128, 4x256, 2x512 whole rows' for the log."""
    return ", ".join(f"{rows}x{length}" + (" whole rows" if whole else "") for rows, length, whole in kinds)


def precompile(loader, step: int, grad_accum: int, run_step, backend, model, optimizer, auto_clip=None) -> int:
    """Runs `run_step(batches)` (one optimizer step over the micro-batches) once per kind of
    micro-batch of `loader`, on batches as optimizer step `step` (0-based) gets them, then
    restores the training state as it was. (Masking phases need nothing more: masked diffusion
    and its warm-up give batches of the same fields.) Returns the number of steps run."""
    snapshot = backend.snapshot_training(model, optimizer)
    if auto_clip is not None:  # its history, and the threshold the warm-up step's log line reads
        clip_state, threshold = backend.host_copy(auto_clip.state_dict()), auto_clip.threshold
    kinds = loader.kinds()
    for kind in kinds:
        run_step([loader.example(kind, step)] * grad_accum)
    backend.restore_training(model, optimizer, snapshot)
    if auto_clip is not None:
        auto_clip.load_state_dict(clip_state)
        auto_clip.threshold = threshold
    return len(kinds)
