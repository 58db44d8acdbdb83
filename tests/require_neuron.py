"""The Neuron lane's gate: `./run.sh test-neuron` runs it with the lane's Python before
`pytest -m neuron`, so that the lane fails (exit 1, one sentence) instead of passing by skipping
every test where this Python has no TorchNeuron or sees no Trainium 2/3 device. The sentences
are the backend's own refusals (runtime/neuron.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime import neuron  # noqa: E402
from runtime.errors import ConfigError  # noqa: E402


def main() -> int:
    try:
        backend = neuron.NeuronBackend()
        backend.init_distributed()  # one process, so no process group: it reads and checks the chip
    except ConfigError as e:
        print(f"run.sh test-neuron: {e}", file=sys.stderr)
        return 1
    print(f"run.sh test-neuron: {backend.module.device_count()} NeuronCore(s) visible, {backend.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
