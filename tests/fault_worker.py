"""Worker of test_cuda_path: train.py where rank 1 raises at its third step.

    torchrun --nproc_per_node=2 tests/fault_worker.py TRAIN_ARGS...
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train  # noqa: E402
from runtime.backend import leave  # noqa: E402

real_step, calls = train.train_step, []


def failing_step(*args, **kwargs):
    calls.append(1)
    if os.environ.get("RANK") == "1" and len(calls) == 3:
        raise RuntimeError("injected fault on rank 1")
    return real_step(*args, **kwargs)


train.train_step = failing_step
leave(train.main(sys.argv[1:]))
