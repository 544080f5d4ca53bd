#!/usr/bin/env bash
# Pretrain a hybrid ReGLA / softmax GPT with Megatron-LM's pretrain_gpt.py, on one or many nodes.
#
# Setup (once):
#   pip install -e /path/to/regla-megatron             # this plugin (+ megatron-core, triton)
#   git clone https://github.com/NVIDIA/Megatron-LM    # core_v0.16.x .. core_v0.19.x or main
#   regla-megatron patch Megatron-LM                   # adds --spec regla and --regla-* (6 lines)
#   regla-megatron prepare-data data/ my_texts/        # -> data/corpus.bin/.idx (byte tokenizer)
#
# Run:
#   torchrun (one node, or one command per node):
#     MEGATRON_LM=Megatron-LM NNODES=1 GPUS_PER_NODE=8 examples/pretrain_regla_hybrid.sh
#   SLURM (sbatch; one task per node, torchrun spawns the GPU ranks):
#     sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=1 examples/pretrain_regla_hybrid.sh
#   Mock data (no dataset needed): DATA_PATH=mock examples/pretrain_regla_hybrid.sh
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
CHECKPOINTS=${CHECKPOINTS:-checkpoints/regla-hybrid}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}

# ---- Parallelism: world = TP x CP x PP x DP. ReGLA heads must divide by TP (whole heads per
# rank); under CP the ReGLA layers pass states between ranks (exact, any CP size), and the
# sequence length must divide by 2*CP (Megatron's load-balanced zigzag split).
TP=${TP:-2}          # tensor parallel; SP (sequence parallel) is on whenever TP > 1
CP=${CP:-2}          # context parallel
PP=${PP:-1}          # pipeline parallel; NUM_LAYERS must divide by PP
VPP=${VPP:-}         # layers per virtual pipeline stage (interleaved schedule), empty = off

# ---- Model: 24 layers, every other one ReGLA ('R') and softmax ('*'), like the paper's hybrid.
NUM_LAYERS=${NUM_LAYERS:-24}
PATTERN=${PATTERN:-$(printf 'R*%.0s' $(seq 1 $((NUM_LAYERS / 2))))}
HIDDEN=${HIDDEN:-2048}
HEADS=${HEADS:-16}
SEQ=${SEQ:-4096}

if [[ -n "${SLURM_JOB_ID:-}" && -z "${MASTER_ADDR:-}" ]]; then
  # Under sbatch, re-run this script once per node with srun; node 0 is the rendezvous host.
  export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  export MASTER_PORT=${MASTER_PORT:-29500} NNODES=$SLURM_JOB_NUM_NODES
  exec srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c \
    'NODE_RANK=$SLURM_NODEID exec "$0"' "$0"
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
if [[ "${ZERO_PATCH:-0}" == 1 ]]; then
  # Static ModuleSpec for core_v0.16.x-0.18.x; Megatron-LM main/0.19 may use regla_spec.
  export REGLA_PATTERN=$PATTERN REGLA_NORM=rmsnorm
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
PARALLEL_ARGS=(
  --tensor-model-parallel-size "$TP" --context-parallel-size "$CP"
  --pipeline-model-parallel-size "$PP" ${VPP:+--num-layers-per-virtual-pipeline-stage "$VPP"}
  --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
)
if ((TP > 1)); then PARALLEL_ARGS+=(--sequence-parallel); fi
TRAIN_ARGS=(
  --bf16 --micro-batch-size 1 --global-batch-size 256 --train-iters 50000
  --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2000
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --init-method-std 0.02
)
if [[ "$DATA_PATH" == mock ]]; then
  DATA_ARGS=(--mock-data --tokenizer-type NullTokenizer --vocab-size 256)
else
  # Byte-level data from `regla-megatron prepare-data` (EOD = 256 = NullTokenizer's);
  # for a BPE dataset use --tokenizer-type HuggingFaceTokenizer --tokenizer-model <dir>.
  DATA_ARGS=(--data-path "$DATA_PATH" --split 98,2,0 --tokenizer-type NullTokenizer --vocab-size 256)
fi
IO_ARGS=(
  --save "$CHECKPOINTS" --load "$CHECKPOINTS" --save-interval 1000
  --ckpt-format torch_dist      # distributed checkpoints: reload at another TP/PP/CP
  --log-interval 10 --eval-interval 1000 --eval-iters 20
)

export CUDA_DEVICE_MAX_CONNECTIONS=1   # keeps TP/SP communication ordered with compute
export PYTHONPATH="$MEGATRON_LM${PYTHONPATH:+:$PYTHONPATH}"
exec torchrun --nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  "$MEGATRON_LM/pretrain_gpt.py" \
  "${MODEL_ARGS[@]}" "${REGLA_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${TRAIN_ARGS[@]}" \
  "${DATA_ARGS[@]}" "${IO_ARGS[@]}" "$@"
