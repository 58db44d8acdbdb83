#!/usr/bin/env bash
# Named launch presets. Usage: ./run.sh PRESET [extra train.py flags...]
#   setup      create .venv (CPU torch) with the project and test dependencies
#   sample     setup, then train the sample model on the shipped sample (CPU, ~10 min)
#   test       setup both environments and run the whole test suite (CPU lane + XLA lane)
#   test-cpu   the CPU lane only;  test-xla  the XLA lane only (torch-xla, PJRT_DEVICE=CPU)
#   test-cuda  the CUDA lane, on a GPU machine (.venv-cuda: CUDA torch; fails where no GPU is visible)
#   cpu        train.py on the CPU (default config: sample)
#   cuda       train.py on every local GPU with torchrun (default config: speedrun)
#   h100x8     the 8xH100 speedrun
#   trn1 | trn1-32 | trn1-compile   Trainium presets (see docs/trainium.md)
set -euo pipefail
cd "$(dirname "$0")"
preset="${1:-}"; shift || true
PY=${PYTHON:-python3}

setup_venv() {  # setup_venv DIR REQUIREMENTS: create the venv once, then install what is missing
  if [ ! -x "$1/bin/python" ]; then "$PY" -m venv "$1"; fi
  "$1/bin/python" -m pip install -q --disable-pip-version-check -r "$2"
}
setup_cpu() { setup_venv .venv requirements-dev.txt; }
setup_xla() { setup_venv .venv-xla requirements-xla.txt; }
setup_cuda() { setup_venv .venv-cuda requirements-cuda.txt; }  # a CUDA build of torch, not the CPU lane's
test_cpu() { setup_cpu; .venv/bin/python -m pytest -m "not xla" "$@"; }
test_xla() { setup_xla; PJRT_DEVICE=CPU .venv-xla/bin/python -m pytest -m xla "$@"; }

# Trainium (docs/trainium.md): run inside the Neuron venv (requirements-neuron.txt) or
# the Dockerfile.neuron image. Env: PRECISION=bf16 (autocast, default) | bf16_sr | fp32;
# NEURON_CACHE (compile cache); for several trn1.32xlarge nodes NNODES, NODE_RANK, MASTER_ADDR.
trn1_env() {
  local cache=${NEURON_CACHE:-/var/tmp/neuron-compile-cache}
  # A shared file system must not hold one cache for several hosts.
  if [ "${NNODES:-1}" -gt 1 ]; then cache="$cache/$(hostname)"; fi
  # --auto-cast is explicit because its default is documented both ways; autocast (or bf16
  # weights) already picks the matmul dtype, so the compiler must cast nothing more.
  NEURON_CC_FLAGS="${NEURON_CC_FLAGS:---model-type=transformer --auto-cast=none}"
  case "$NEURON_CC_FLAGS" in *--cache_dir*) ;; *) NEURON_CC_FLAGS="$NEURON_CC_FLAGS --cache_dir=$cache" ;; esac
  export NEURON_CC_FLAGS XLA_NO_SPECIAL_SCALARS=1
  # Stochastic rounding only with bf16 weights; it must be set before the runtime starts.
  if [ "${PRECISION:-bf16}" = bf16_sr ]; then export NEURON_RT_STOCHASTIC_ROUNDING_EN=1; fi
}
trn1_torchrun() {  # trn1_torchrun WORKERS_PER_NODE [train.py flags...]; one worker per NeuronCore
  local nproc=$1; shift
  local nodes=(--nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}")
  if [ "${NNODES:-1}" -gt 1 ]; then
    nodes+=(--master_addr="${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}" --master_port="${MASTER_PORT:-41000}")
    export FI_PROVIDER=efa FI_EFA_USE_DEVICE_RDMA=1 FI_EFA_FORK_SAFE=1 XLA_TRANSFER_SEED_ASYNC=1
  fi
  # TRN1_LAUNCHER: a wrapper command such as neuron_parallel_compile (word-split on purpose).
  ${TRN1_LAUNCHER:-} torchrun --nproc_per_node="$nproc" "${nodes[@]}" train.py --config config/trn1.yaml --device xla \
    --precision "${PRECISION:-bf16}" "$@"
}
trn1_32_accum() {  # config/trn1.yaml's 128 micro-batches per step, over 32 workers per node
  local workers=$((32 * ${NNODES:-1}))
  if [ $((128 % workers)) -ne 0 ]; then
    echo "run.sh: NNODES=${NNODES} does not divide the 128 micro-batches of a step; use 1, 2 or 4 nodes, or pass --batch_size" >&2; exit 2
  fi
  echo $((128 / workers))
}

case "$preset" in
  setup) setup_cpu ;;
  sample) setup_cpu; exec .venv/bin/python train.py --config config/sample.yaml "$@" ;;
  test) test_cpu "$@"; test_xla "$@" ;;
  test-cpu) test_cpu "$@" ;;
  test-xla) test_xla "$@" ;;
  # The CUDA lane stops with one sentence unless its torch is a CUDA build that sees a GPU.
  test-cuda) setup_cuda; .venv-cuda/bin/python tests/require_gpu.py; .venv-cuda/bin/python -m pytest -m cuda "$@" ;;
  cpu) setup_cpu; exec .venv/bin/python train.py --config config/sample.yaml --device cpu "$@" ;;
  # Every local GPU (NPROC to choose); several nodes: NNODES, NODE_RANK, MASTER_ADDR on each node.
  cuda)
    nodes=(--standalone)
    if [ "${NNODES:-1}" -gt 1 ]; then
      nodes=(--nnodes="$NNODES" --node_rank="${NODE_RANK:?set NODE_RANK}" --master_addr="${MASTER_ADDR:?set MASTER_ADDR to node 0}" --master_port="${MASTER_PORT:-29500}")
    fi
    exec "${TORCHRUN:-torchrun}" "${nodes[@]}" --nproc_per_node="${NPROC:-$(nvidia-smi -L | wc -l)}" train.py --device cuda "$@" ;;
  h100x8) exec "${TORCHRUN:-torchrun}" --standalone --nproc_per_node=8 train.py --config config/speedrun.yaml --device cuda "$@" ;;
  # trn1.2xlarge: 2 NeuronCores, so 2 workers (the runtime supports 1 or 2 there).
  trn1) trn1_env; trn1_torchrun 2 "$@" ;;
  # trn1.32xlarge: 32 NeuronCores per node (1, 2, 8 or 32 workers are supported); EFA between nodes.
  trn1-32) trn1_env; accum=$(trn1_32_accum); trn1_torchrun 32 --grad_accum "$accum" "$@" ;;
  # Pre-compile every graph of TARGET (trn1 | trn1-32) with neuron_parallel_compile: the same
  # shapes and flags, a few steps (every value reads 0 during extraction), one short evaluation.
  # Several nodes: run it on every node with the NNODES, NODE_RANK and MASTER_ADDR of the real
  # run (the graphs hold the collectives of the whole world; each node fills its own cache).
  trn1-compile)
    trn1_env
    target=${TARGET:-trn1}; nproc=2; accum_flags=()
    case "$target" in
      trn1) # 32 GiB of host memory for all the parallel compiles: retry a failed one once (Neuron's advice)
        export NEURON_PARALLEL_COMPILE_MAX_RETRIES=${NEURON_PARALLEL_COMPILE_MAX_RETRIES:-1} ;;
      trn1-32) nproc=32; accum_flags=(--grad_accum "$(trn1_32_accum)") ;;
      *) echo "run.sh: TARGET=$target is not a Trainium preset; use TARGET=trn1 or TARGET=trn1-32" >&2; exit 2 ;;
    esac
    # train.py copes with the zeros; should it still fail after tracing, compile what it traced.
    export NEURON_IGNORE_TRAINING_SCRIPT_ERROR_AND_COMPILE=1
    TRN1_LAUNCHER=neuron_parallel_compile trn1_torchrun "$nproc" "${accum_flags[@]}" --steps_this_run 10 --eval_every 5 --eval_max_batches 2 \
      --max_skipped_steps 1000 --log_dir logs/neuron-compile --checkpoint_dir checkpoints/neuron-compile \
      --log_name "compile-$target-$(date +%Y%m%d-%H%M%S)" "$@" ;;
  *) echo "run.sh: unknown preset '$preset'; see the comment at the top of run.sh for the list" >&2; exit 2 ;;
esac
