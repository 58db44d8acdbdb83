"""`--profile_steps A:B`: torch.profiler over optimizer steps A..B of a training run.

The steps are the log's step numbers (1-based, inclusive). The profile starts just before step
A's micro-batches reach the model and stops after step B's optimizer step, once the device has
finished it (the backend's sync), so device work is inside the window. Each rank writes into
`<log_dir>/<log_name>.profile/`:
  trace_rank<r>.json   Chrome trace format: open it in Perfetto (ui.perfetto.dev) or chrome://tracing
  ops_rank<r>.txt      the operators sorted by their own time, summed over the profiled steps
The profiler slows the steps it watches, so a profiled run claims no leaderboard track, and
the run log says which steps were profiled. What the backend lets torch.profiler see is its
`profiler_activities` (runtime/): the host everywhere it is allowed, CUDA kernels on CUDA.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

_SPEC = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_ACTIVITIES = {"cpu": ProfilerActivity.CPU, "cuda": ProfilerActivity.CUDA}
TOP_OPS = 40  # rows of ops_rank<r>.txt


def parse_steps(text: str, num_steps: int) -> tuple[int, int] | None:
    """(A, B) of `--profile_steps A:B`, or None for "" (no profile). Raises ValueError naming
    the option and what to write when the text is not two step numbers 1 <= A <= B <= num_steps."""
    if not text:
        return None
    m = _SPEC.match(str(text))
    if not m:
        raise ValueError(f"--profile_steps {text!r} is not A:B; give the first and last step to profile, "
                         "e.g. --profile_steps 10:12")
    first, last = int(m.group(1)), int(m.group(2))
    if not 1 <= first <= last <= num_steps:
        raise ValueError(f"--profile_steps {text!r} must satisfy 1 <= A <= B <= num_steps ({num_steps}); "
                         f"e.g. --profile_steps {min(10, num_steps)}:{min(12, num_steps)}. Step 1 is the warm-up "
                         "step, which holds compilation: start after it to see the steady step")
    return first, last


class StepProfiler:
    """Starts torch.profiler before step `first` and writes its trace and table after `last`.
    `before(step)` and `after(step)` take the 1-based number of the step being run; `sync` waits
    for the device (the backend's). A run that ends inside the window is written by `close()`."""

    def __init__(self, steps: tuple[int, int] | None, activities: tuple[str, ...], out_dir: Path,
                 rank: int, sync):
        self.steps, self.out_dir, self.rank, self.sync = steps, Path(out_dir), rank, sync
        self.activities = [_ACTIVITIES[a] for a in activities]
        self.sort_key = "self_device_time_total" if "cuda" in activities else "self_cpu_time_total"
        self._prof = None
        self._ran: list[int] = []

    @property
    def last(self) -> int | None:
        return self.steps[1] if self.steps else None

    def before(self, step: int) -> None:
        if self.steps and self._prof is None and self.steps[0] <= step <= self.steps[1]:
            self.sync()  # earlier steps' device work stays outside the window
            self._prof = profile(activities=self.activities)
            self._prof.__enter__()
        if self._prof is not None:
            self._ran.append(step)

    def after(self, step: int) -> list[Path]:
        """The files written when `step` ends the window, else []."""
        if self._prof is None or step < self.steps[1]:
            return []
        return self.close()

    def close(self) -> list[Path]:
        if self._prof is None:
            return []
        self.sync()
        self._prof.__exit__(None, None, None)
        prof, self._prof = self._prof, None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace = self.out_dir / f"trace_rank{self.rank}.json"
        table = self.out_dir / f"ops_rank{self.rank}.txt"
        prof.export_chrome_trace(str(trace))
        steps = f"{self._ran[0]}-{self._ran[-1]}" if len(self._ran) > 1 else str(self._ran[0])
        header = (f"# torch.profiler, rank {self.rank}, optimizer steps {steps} ({len(self._ran)} step(s)), "
                  f"torch {torch.__version__}; times are sums over those steps, sorted by {self.sort_key}\n")
        table.write_text(header + prof.key_averages().table(sort_by=self.sort_key, row_limit=TOP_OPS) + "\n")
        return [trace, table]
