#!/usr/bin/env bash
# Pretrain a hybrid ReGLA / softmax GPT with Megatron-LM's pretrain_gpt.py, on one or many nodes.
#
# Setup (once):
#   pip install -e /path/to/regla-megatron             # this plugin (+ megatron-core, triton)
#   git clone https://github.com/NVIDIA/Megatron-LM    # core_v0.16.x .. core_v0.19.x or main
#   pip install six regex pyyaml pydantic einops       # Megatron-LM's own needs (patches/README.md)
#   regla-megatron patch Megatron-LM                   # adds --spec regla and --regla-* (6 lines)
#   regla-megatron prepare-data data/ my_texts/        # -> data/corpus.bin/.idx/.json (byte tokenizer)
#
# Run:
#   torchrun (one node, or one command per node):
#     MEGATRON_LM=Megatron-LM NNODES=1 GPUS_PER_NODE=8 examples/pretrain_regla_hybrid.sh
#   SLURM (sbatch; one task per node, torchrun spawns the GPU ranks):
#     sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=1 examples/pretrain_regla_hybrid.sh
#   Mock data (no dataset needed): DATA_PATH=mock examples/pretrain_regla_hybrid.sh
#   DRY_RUN=1: print the torchrun command(s) it would run (under SLURM one per node) and exit.
#   Extra arguments go to pretrain_gpt.py last (they win over the ones below).
#
# Resuming: run the same command with a larger TRAIN_ITERS; keep LR_DECAY_ITERS fixed so the
# learning-rate schedule is the same (the schedule on the command line is used on resume).
#
# Unpatched Megatron-LM (zero-patch form): set ZERO_PATCH=1. Megatron-LM then rejects the
# --regla-* flags, so the ReGLA options travel as REGLA_* environment variables instead
# (REGLA_PATTERN, REGLA_NORM, REGLA_GATE_RANK, ... one per flag, same values).
#SBATCH --job-name=regla-hybrid
#SBATCH --exclusive
#SBATCH --time=04:00:00
set -euo pipefail

MEGATRON_LM=${MEGATRON_LM:-Megatron-LM}
DATA_PATH=${DATA_PATH:-data/corpus}          # prefix of .bin/.idx, or "mock"
SPLIT=${SPLIT:-98,2,0}                       # train,validation,test weights (whole documents)
VOCAB_SIZE=${VOCAB_SIZE:-257}                # byte data: ids 0..255 + EOD 256 (PREFIX.json's vocab_size)
CHECKPOINTS=${CHECKPOINTS:-checkpoints/regla-hybrid}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
PY=${PYTHON:-python3}

# ---- Parallelism: world = TP x CP x PP x DP. ReGLA heads must divide by TP (whole heads per
# rank); under CP the ReGLA layers pass states between ranks (exact, any CP size), and the
# sequence length must divide by 2*CP (Megatron's load-balanced zigzag split).
TP=${TP:-2}          # tensor parallel; SP (sequence parallel) is on whenever TP > 1
CP=${CP:-2}          # context parallel
PP=${PP:-1}          # pipeline parallel; NUM_LAYERS must divide by PP
VPP=${VPP:-}         # layers per virtual pipeline stage (interleaved schedule), empty = off
# Distributed optimizer: auto = on where TransformerEngine or apex is installed. Without them
# megatron-core (0.16 to 0.19) cannot resume it from a torch_dist checkpoint: its
# DistributedOptimizer.state_dict() asserts one common Adam step over a still empty optimizer
# state (AssertionError in distrib_optimizer.py, `assert len(steps) == 1`).
DIST_OPT=${DIST_OPT:-auto}

# ---- Model: 24 layers, every other one ReGLA ('R') and softmax ('*'), like the paper's hybrid.
NUM_LAYERS=${NUM_LAYERS:-24}
PATTERN=${PATTERN:-$(printf 'R*%.0s' $(seq 1 $((NUM_LAYERS / 2))))}
HIDDEN=${HIDDEN:-2048}
HEADS=${HEADS:-16}
SEQ=${SEQ:-4096}

# ---- Training length and logging.
TRAIN_ITERS=${TRAIN_ITERS:-50000}
LR_DECAY_ITERS=${LR_DECAY_ITERS:-$TRAIN_ITERS}
LR_WARMUP_ITERS=${LR_WARMUP_ITERS:-2000}
GLOBAL_BATCH=${GLOBAL_BATCH:-256}
MICRO_BATCH=${MICRO_BATCH:-1}
SAVE_INTERVAL=${SAVE_INTERVAL:-1000}
EVAL_INTERVAL=${EVAL_INTERVAL:-1000}
EVAL_ITERS=${EVAL_ITERS:-20}
LOG_INTERVAL=${LOG_INTERVAL:-10}

if [[ -n "${SLURM_JOB_ID:-}" && -z "${MASTER_ADDR:-}" ]]; then
  # Under sbatch, re-run this script once per node with srun; node 0 is the rendezvous host.
  export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  export MASTER_PORT=${MASTER_PORT:-29500} NNODES=$SLURM_JOB_NUM_NODES
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "# srun --ntasks-per-node=1 runs this script on each of $NNODES nodes:"
    for ((rank = 0; rank < NNODES; rank++)); do NODE_RANK=$rank bash "$0" "$@"; done
    exit 0
  fi
  exec srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c \
    'NODE_RANK=$SLURM_NODEID exec "$0" "$@"' "$0" "$@"
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}

MODEL_ARGS=(
  --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN" --num-attention-heads "$HEADS"
  --ffn-hidden-size $((HIDDEN * 4)) --seq-length "$SEQ" --max-position-embeddings "$SEQ"
  --position-embedding-type rope --normalization RMSNorm --swiglu
  --untie-embeddings-and-output-weights --disable-bias-linear
  --attention-dropout 0 --hidden-dropout 0
)
REGLA_ENV=()
if [[ "${ZERO_PATCH:-0}" == 1 ]]; then
  # Static ModuleSpec for core_v0.16.x-0.18.x; Megatron-LM main/0.19 may use regla_spec.
  REGLA_ENV=(REGLA_PATTERN="$PATTERN" REGLA_NORM=rmsnorm)
  REGLA_ARGS=(--spec regla_megatron.specs "${SPEC_NAME:-regla_hybrid_spec}")
else
  REGLA_ARGS=(
    --spec regla                 # the plugin's hybrid spec (patched Megatron-LM)
    --regla-pattern "$PATTERN"   # one symbol per layer: R = ReGLA, * = softmax attention
    --regla-norm rmsnorm         # per-head output norm (rmsnorm | layernorm)
    --regla-gate-rank 0          # 0 = full-rank forget/refine gates (paper default)
    --regla-backend auto         # Triton kernels on GPU
  )
fi
if [[ "$DIST_OPT" == auto ]]; then
  DIST_OPT=0
  "$PY" -c 'import importlib.util as u, sys; sys.exit(not (u.find_spec("transformer_engine") or u.find_spec("apex")))' \
    2>/dev/null && DIST_OPT=1
fi
PARALLEL_ARGS=(
  --tensor-model-parallel-size "$TP" --context-parallel-size "$CP"
  --pipeline-model-parallel-size "$PP" ${VPP:+--num-layers-per-virtual-pipeline-stage "$VPP"}
  --overlap-grad-reduce
)
if [[ "$DIST_OPT" == 1 ]]; then PARALLEL_ARGS+=(--use-distributed-optimizer --overlap-param-gather); fi
if ((TP > 1)); then PARALLEL_ARGS+=(--sequence-parallel); fi
TRAIN_ARGS=(
  --bf16 --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --train-iters "$TRAIN_ITERS"
  --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters "$LR_WARMUP_ITERS"
  --lr-decay-iters "$LR_DECAY_ITERS"
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --init-method-std 0.02
)
if [[ "$DATA_PATH" == mock ]]; then
  DATA_ARGS=(--mock-data --tokenizer-type NullTokenizer --vocab-size "$VOCAB_SIZE")
else
  # Byte-level data from `regla-megatron prepare-data` (ids 0..255, EOD 256): NullTokenizer
  # builds exactly --vocab-size embedding rows, so 257. For a BPE dataset use
  # --tokenizer-type HuggingFaceTokenizer --tokenizer-model <dir>.
  DATA_ARGS=(--data-path "$DATA_PATH" --split "$SPLIT" --tokenizer-type NullTokenizer --vocab-size "$VOCAB_SIZE")
fi
IO_ARGS=(
  --save "$CHECKPOINTS" --load "$CHECKPOINTS" --save-interval "$SAVE_INTERVAL"
  --ckpt-format torch_dist      # distributed checkpoints: reload at another TP/PP/CP
  --override-opt_param-scheduler  # on resume, the schedule given here (a larger --train-iters)
  --log-interval "$LOG_INTERVAL" --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS"
)

export CUDA_DEVICE_MAX_CONNECTIONS=1   # keeps TP/SP communication ordered with compute
export PYTHONPATH="$MEGATRON_LM${PYTHONPATH:+:$PYTHONPATH}"
COMMAND=(torchrun --nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK"
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
  "$MEGATRON_LM/pretrain_gpt.py"
  "${MODEL_ARGS[@]}" "${REGLA_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${TRAIN_ARGS[@]}"
  "${DATA_ARGS[@]}" "${IO_ARGS[@]}" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  echo "# node $NODE_RANK of $NNODES:"
  printf '%q ' env CUDA_DEVICE_MAX_CONNECTIONS=1 "${REGLA_ENV[@]}" "${COMMAND[@]}"
  echo
  exit 0
fi
if [[ "$DATA_PATH" != mock && "$NODE_RANK" == 0 ]]; then
  # The data mistakes Megatron-LM reports late (a CUDA assert) or never (a hang), checked now.
  "$PY" -c 'import sys
from regla_megatron.megatron_lm.hooks import check_data
try:
    check_data([sys.argv[1]], sys.argv[2], "NullTokenizer", int(sys.argv[3]))
except ValueError as error:
    sys.exit(f"pretrain_regla_hybrid.sh: {error}")' "$DATA_PATH" "$SPLIT" "$VOCAB_SIZE"
fi
if ((${#REGLA_ENV[@]})); then export "${REGLA_ENV[@]}"; fi
exec "${COMMAND[@]}"
