#!/usr/bin/env bash
# Named launch presets. Usage: ./run.sh PRESET [extra train.py flags...]
#   setup      create .venv (CPU torch) with the project and test dependencies
#   sample     setup, then train the sample model on the shipped sample (CPU, ~10 min)
#   cpu-speedrun  setup, then the cpu-sample speedrun (compiled; ~4 min of training + a warm-up compile)
#   test       setup both environments and run the whole test suite (CPU lane + XLA lane)
#   test-cpu   the CPU lane only;  test-xla  the XLA lane only (torch-xla, PJRT_DEVICE=CPU)
#   test-cuda  the CUDA lane, on a GPU machine (.venv-cuda: CUDA torch; fails where no GPU is visible)
#   test-neuron  the Neuron lane, on a trn2/trn3 instance (.venv-trn2: TorchNeuron; fails where no
#              Neuron device is visible)
#   cpu        train.py on the CPU (default config: sample)
#   cuda       train.py on every local GPU with torchrun (default config: speedrun)
#   h100x8     the 8xH100 speedrun
#   trn1 | trn1-32 | trn1-compile   Trainium 1 presets, torch-xla (see docs/trainium.md)
#   trn2 | trn2-3   Trainium 2/3 presets, native TorchNeuron: trn2.48xlarge | trn2.3xlarge
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
setup_trn2() { setup_venv .venv-trn2 requirements-trn2.txt; }  # torch 2.13 + torch-neuronx 2.13.3 (Neuron 2.33)
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
step_accum() {  # step_accum MICRO_BATCHES WORKERS_PER_NODE: the grad_accum that spreads a step's micro-batches over every worker of NNODES nodes
  local micro=$1 per_node=$2 nodes=${NNODES:-1} fits=() n
  if [ $((micro % (per_node * nodes))) -ne 0 ]; then
    for ((n = 1; n <= micro / per_node; n++)); do
      if [ $((micro % (per_node * n))) -eq 0 ]; then fits+=("$n"); fi
    done
    local list=${fits[*]}
    echo "run.sh: $((per_node * nodes)) workers (NNODES=$nodes x $per_node) do not divide the $micro micro-batches of a step; use NNODES in {${list// /, }}, or set NPROC to a divisor of $micro" >&2; exit 2
  fi
  echo $((micro / (per_node * nodes)))
}
trn1_32_accum() { step_accum 128 32; }  # config/trn1.yaml's 128 micro-batches per step, 32 workers per node
torchrun_nodes() {  # sets `nodes`: torchrun's arguments for one node, or for this one of NNODES nodes
  nodes=(--standalone)
  if [ "${NNODES:-1}" -gt 1 ]; then
    nodes=(--nnodes="$NNODES" --node_rank="${NODE_RANK:?set NODE_RANK}" --master_addr="${MASTER_ADDR:?set MASTER_ADDR to node 0}" --master_port="${MASTER_PORT:-29500}")
  fi
}

# Trainium 2/3 (docs/trainium.md): native PyTorch through TorchNeuron, run inside the venv of
# requirements-trn2.txt. One worker per logical NeuronCore (NPROC to choose another count);
# several nodes: NNODES, NODE_RANK, MASTER_ADDR (MASTER_PORT) on each node, EFA between them.
trn2_torchrun() {  # trn2_torchrun WORKERS_PER_NODE CONFIG [train.py flags...]
  local per_node=${NPROC:-$1} config=$2; shift 2
  torchrun_nodes
  if [ "${NNODES:-1}" -gt 1 ]; then
    export FI_PROVIDER=${FI_PROVIDER:-efa} FI_EFA_USE_DEVICE_RDMA=${FI_EFA_USE_DEVICE_RDMA:-1} FI_EFA_FORK_SAFE=${FI_EFA_FORK_SAFE:-1}
  fi
  # runtime/neuron.py gives each rank the NeuronCore of its LOCAL_RANK before it imports
  # torch_neuronx; PyTorch's backend autoload would import it with torch, before that.
  export TORCH_DEVICE_BACKEND_AUTOLOAD=0
  local accum
  accum=$(step_accum 128 "$per_node")  # both configs: 128 micro-batches of (4, 1024) per step
  exec "${TORCHRUN:-torchrun}" "${nodes[@]}" --nproc_per_node="$per_node" train.py --config "$config" --device neuron \
    --grad_accum "$accum" "$@"
}

case "$preset" in
  setup) setup_cpu ;;
  sample) setup_cpu; exec .venv/bin/python train.py --config config/sample.yaml "$@" ;;
  cpu-speedrun) setup_cpu; exec .venv/bin/python train.py --config config/cpu-speedrun.yaml "$@" ;;
  test) test_cpu "$@"; test_xla "$@" ;;
  test-cpu) test_cpu "$@" ;;
  test-xla) test_xla "$@" ;;
  # The CUDA lane stops with one sentence unless its torch is a CUDA build that sees a GPU.
  test-cuda) setup_cuda; .venv-cuda/bin/python tests/require_gpu.py; .venv-cuda/bin/python -m pytest -m cuda "$@" ;;
  # The Neuron lane likewise stops with one sentence where TorchNeuron sees no Trainium 2/3 device;
  # its tests touch the device only in child processes (tests/test_neuron.py says why).
  test-neuron) setup_trn2; .venv-trn2/bin/python tests/require_neuron.py
    TORCH_DEVICE_BACKEND_AUTOLOAD=0 TORCH_NEURONX_DISABLE_FALLBACK_EXECUTION=1 .venv-trn2/bin/python -m pytest -m neuron "$@" ;;
  cpu) setup_cpu; exec .venv/bin/python train.py --config config/sample.yaml --device cpu "$@" ;;
  # Every local GPU (NPROC to choose); several nodes: NNODES, NODE_RANK, MASTER_ADDR on each node.
  cuda)
    torchrun_nodes
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
  # trn2.48xlarge: 16 Trainium2 chips, 64 logical NeuronCores (LNC 2), so 64 workers per node.
  trn2) trn2_torchrun 64 config/trn2.yaml "$@" ;;
  # trn2.3xlarge: 1 Trainium2 chip, 4 logical NeuronCores (LNC 2), so 4 workers.
  trn2-3) trn2_torchrun 4 config/trn2-3.yaml "$@" ;;
  *) echo "run.sh: unknown preset '$preset'; see the comment at the top of run.sh for the list" >&2; exit 2 ;;
esac
