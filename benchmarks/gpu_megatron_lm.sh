#!/usr/bin/env bash
# Megatron-LM's pretrain_gpt.py with ReGLA layers on a real corpus, on one GPU:
#
#   OUT=/tmp/out bash benchmarks/gpu_megatron_lm.sh
#
# Carried inputs (git-ignored): .whl/ (megatron-core 0.19.2 for Python 3.12: ../shared/tools/gpu_wheels.sh),
# .megatron-lm/ (a Megatron-LM core_v0.19.0 checkout: megatron/, pretrain_gpt.py, gpt_builders.py,
# model_provider.py, ...) and .corpus/ (big.txt and docs/*.txt: benchmarks/megatron_lm_corpus.py).
# Stages, each logged under $OUT and reported with its log's tail when it fails (the next
# stage still runs where it can):
#   setup     install the wheels, copy the checkout twice (megatron-core then comes from the
#             wheel), patch one copy with `regla-megatron patch`
#   data      `regla-megatron prepare-data` of the one large file and of the folder, and the
#             launcher's data check on each (the --vocab-size and --split mistakes rejected)
#   patched   examples/pretrain_regla_hybrid.sh through the patched copy (--spec regla): ITERS
#             iterations, save, resume to 2*ITERS, validation at the end of each
#   zero-patch the same through the unpatched copy (--spec regla_megatron.specs regla_spec, REGLA_*)
#   distopt   Megatron alone (no plugin, plain GPT, mock data): the distributed optimizer saved
#             and resumed from torch_dist without TransformerEngine/apex, which megatron-core
#             rejects (the example leaves it off there: DIST_OPT=auto)
#   summary   versions, iterations/s, losses around the resume (benchmarks/megatron_lm_summary.py)
# Small model: 4 layers (R*R*), hidden 512, 8 heads, sequence 2048, TP1 CP1, global batch 8.
# Budget: BUDGET seconds in all (default 400); a stage that would start with too little left is
# skipped and said so. Logs: $OUT/mlm_{setup,data,patched,zero_patch,distopt}.log, $OUT/mlm_summary.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-/tmp/regla-mlm}; mkdir -p "$OUT"; rm -f "$OUT"/mlm_*.log "$OUT/mlm_summary.md"
WORK=${WORK:-/tmp/regla-mlm-work}
ITERS=${ITERS:-40}
BUDGET=${BUDGET:-400}  # run_gpu.sh gives a stage 420 s (STAGE_LIMIT)
FORMS=${FORMS:-patched zero-patch}  # which forms of the plugin run: patched, zero-patch
SOURCE=${MEGATRON_LM_SOURCE:-$ROOT/.megatron-lm}
CORPUS=${CORPUS:-$ROOT/.corpus}
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
FAILED=()

left() { echo $((BUDGET - SECONDS)); }
# stage NAME LOG COMMAND...: run COMMAND with its output appended to LOG; on failure print
# the log's tail and remember the stage, but go on. (Inside COMMAND `set -e` is off, as in any
# function called from a `||` list: the stage functions return on their own failures.)
stage() {
  local name=$1 log=$2 rc=0; shift 2
  if (($(left) < 45)); then echo "[$name] skipped: $(left) s of the ${BUDGET} s budget left"; FAILED+=("$name(skipped)"); return 1; fi
  echo "[$name] started at ${SECONDS} s"
  "$@" >>"$log" 2>&1 || rc=$?
  if ((rc != 0)); then
    echo "[$name] FAILED (exit $rc); the end of $log:"; grep -v -i "warn" "$log" | tail -25 | cut -c1-300
    FAILED+=("$name"); return 1
  fi
  echo "[$name] ok at ${SECONDS} s"
}
limit() { local l; l=$(($(left) - 20)); ((l > ${1:-180})) && l=${1:-180}; echo $((l > 30 ? l : 30)); }

# ---------------------------------------------------------------------------------- setup
setup() {
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || return 1
  fi
  local datasets=/tmp/site/megatron/core/datasets
  if [[ -d $datasets && ! -f $datasets/Makefile ]] && ls $datasets/helpers_cpp*.so >/dev/null 2>&1; then
    # Megatron-LM's initialize runs `make -C` in megatron/core/datasets to build the dataset
    # helpers; the wheel ships them built, without the Makefile.
    printf 'default:\n\t@ls helpers_cpp*.so >/dev/null\n' > $datasets/Makefile || return 1
  fi
  [[ -f $SOURCE/pretrain_gpt.py ]] || { echo "no Megatron-LM checkout at $SOURCE"; return 1; }
  rm -rf "$WORK" && mkdir -p "$WORK" || return 1
  local copy
  for copy in plain patched; do
    cp -r "$SOURCE" "$WORK/mlm-$copy" || return 1
  done
  python3 -m regla_megatron patch "$WORK/mlm-patched" || return 1
  # With the wheel installed, its megatron-core is the one used (the checkout's would shadow it);
  # removed after patching, which checks that the copy is a whole Megatron-LM checkout.
  if [[ -d /tmp/site/megatron/core ]]; then rm -rf "$WORK/mlm-plain/megatron/core" "$WORK/mlm-patched/megatron/core"; fi
  (cd "$WORK/mlm-plain" && python3 -c 'import megatron.core as m, megatron.training as t, torch, triton
print("megatron-core", m.__version__, m.__file__); print("megatron.training", t.__file__)
print("torch", torch.__version__, "| triton", triton.__version__, "|", torch.cuda.get_device_name(0))')
}
if [[ -d /tmp/site || -n "$(ls .whl/*.whl 2>/dev/null)" ]]; then export PYTHONPATH=/tmp/site:$ROOT; else export PYTHONPATH=$ROOT; fi
stage setup "$OUT/mlm_setup.log" setup && grep -E "^(megatron|torch)" "$OUT/mlm_setup.log" || true

# ---------------------------------------------------------------------------------- data
DATA_BIG=$WORK/data/big/big
DATA_DOCS=$WORK/data/docs/docs
DATA_PATCHED=$DATA_DOCS
check_data() {  # the launcher's check (pretrain_regla_hybrid.sh runs it before torchrun)
  python3 -c 'import sys
from regla_megatron.megatron_lm.hooks import check_data, read_index_header
prefix, split, vocab = sys.argv[1], sys.argv[2], int(sys.argv[3])
print(prefix, read_index_header(prefix + ".idx"), open(prefix + ".json").read().strip()[:300] if __import__("os").path.exists(prefix + ".json") else "(no .json)")
try:
    check_data([prefix], split, "NullTokenizer", vocab)
except ValueError as error:
    sys.exit(f"rejected: {error}")
print(f"accepted: --split {split} --vocab-size {vocab}")' "$@"
}
data() {
  python3 -m regla_megatron prepare-data "$WORK/data/big" "$CORPUS/big.txt" --name big --split 98,2,0 --force \
    || return 1
  python3 -m regla_megatron prepare-data "$WORK/data/docs" "$CORPUS/docs" --name docs --split 98,2,0 --force \
    || return 1
  check_data "$DATA_DOCS" 98,2,0 257 || return 1
  if check_data "$DATA_DOCS" 98,2,0 256; then echo "the vocabulary check let --vocab-size 256 through"; return 1; fi
  if check_data "$DATA_DOCS" 1000,1,0 257; then echo "the split check let an empty validation set through"; return 1; fi
  if check_data "$DATA_BIG" 98,2,0 257; then DATA_PATCHED=$DATA_BIG; fi
  echo "patched run data: $DATA_PATCHED"
}
if stage data "$OUT/mlm_data.log" data; then
  grep -E "^wrote|accepted|rejected|patched run data" "$OUT/mlm_data.log" | cut -c1-400
  DATA_PATCHED=$(sed -n 's/^patched run data: //p' "$OUT/mlm_data.log" | tail -1)
fi

# ---------------------------------------------------------------------------------- runs
NO_FUSION=(--transformer-impl local --no-gradient-accumulation-fusion --no-masked-softmax-fusion
           --no-bias-swiglu-fusion --no-bias-dropout-fusion --no-rope-fusion --no-persist-layer-norm)
launch() {  # launch NAME LOG CHECKPOINTS ITERATIONS ENV...: one example launch, marked in LOG
  local name=$1 log=$2 checkpoints=$3 iterations=$4; shift 4
  echo "=== run $name: to iteration $iterations, $*" >> "$log"
  env TP=1 CP=1 PP=1 GPUS_PER_NODE=1 NUM_LAYERS=4 PATTERN='R*R*' HIDDEN=512 HEADS=8 SEQ=2048 \
    GLOBAL_BATCH=8 MICRO_BATCH=4 LR_WARMUP_ITERS=4 LR_DECAY_ITERS=$((2 * ITERS)) SAVE_INTERVAL=$ITERS \
    EVAL_INTERVAL=$((4 * ITERS)) EVAL_ITERS=4 LOG_INTERVAL=1 CHECKPOINTS=$checkpoints \
    TRAIN_ITERS=$iterations MASTER_PORT=$((29500 + RANDOM % 1000)) "$@" \
    timeout "$(limit 170)" bash examples/pretrain_regla_hybrid.sh "${NO_FUSION[@]}"
}
train_and_resume() {  # NAME LOG ENV...
  local name=$1 log=$2; shift 2
  rm -rf "$WORK/ck-$name"
  stage "$name" "$log" launch "$name-train" "$log" "$WORK/ck-$name" "$ITERS" "$@" || return 0
  stage "$name-resume" "$log" launch "$name-resume" "$log" "$WORK/ck-$name" $((2 * ITERS)) "$@" || true
}
: > "$OUT/mlm_patched.log"; : > "$OUT/mlm_zero_patch.log"
if [[ " $FORMS " == *" patched "* ]]; then
  train_and_resume patched "$OUT/mlm_patched.log" MEGATRON_LM="$WORK/mlm-patched" DATA_PATH="$DATA_PATCHED"
fi
if [[ " $FORMS " == *" zero-patch "* ]]; then
  train_and_resume zero-patch "$OUT/mlm_zero_patch.log" MEGATRON_LM="$WORK/mlm-plain" DATA_PATH="$DATA_DOCS" \
    ZERO_PATCH=1 SPEC_NAME=regla_spec
fi

# ---------------------------------------------------------------------------------- distopt
distopt() {  # Megatron-LM alone: plain GPT, distributed optimizer, torch_dist, save then resume
  local iterations=$1
  echo "=== run distopt-$iterations: plain GPT (no plugin), --use-distributed-optimizer, to $iterations"
  (cd "$WORK/mlm-plain" && CUDA_DEVICE_MAX_CONNECTIONS=1 timeout "$(limit 120)" torchrun --nproc-per-node 1 \
    --master-port $((30500 + RANDOM % 1000)) pretrain_gpt.py \
    --num-layers 2 --hidden-size 256 --num-attention-heads 4 --seq-length 512 --max-position-embeddings 512 \
    --micro-batch-size 2 --global-batch-size 2 --train-iters "$iterations" --lr 1e-4 --lr-decay-iters 8 \
    --override-opt_param-scheduler --bf16 --mock-data --tokenizer-type NullTokenizer --vocab-size 256 \
    --use-distributed-optimizer --ckpt-format torch_dist --save "$WORK/ck-distopt" --load "$WORK/ck-distopt" \
    --save-interval 4 --eval-interval 1000 --eval-iters 0 --log-interval 1 "${NO_FUSION[@]}")
}
: > "$OUT/mlm_distopt.log"
if python3 -c 'import importlib.util as u, sys; sys.exit(bool(u.find_spec("transformer_engine") or u.find_spec("apex")))'; then
  rm -rf "$WORK/ck-distopt"
  if stage distopt-save "$OUT/mlm_distopt.log" distopt 4; then
    if distopt 8 >> "$OUT/mlm_distopt.log" 2>&1; then
      echo "[distopt] the distributed optimizer resumed without TE/apex: megatron-core's assertion did not fire"
    elif grep -q "assert len(steps) == 1" "$OUT/mlm_distopt.log"; then
      echo "[distopt] reproduced without the plugin: resuming fails in megatron-core:"
      grep -E "distrib_optimizer.py|assert len\(steps\)|AssertionError" "$OUT/mlm_distopt.log" | sort -u | head -4
    else
      echo "[distopt] resume failed otherwise:"; grep -v -i warn "$OUT/mlm_distopt.log" | tail -15
    fi
  fi
else
  echo "[distopt] skipped: TransformerEngine or apex is installed (their Adam has no such check)"
fi

# ---------------------------------------------------------------------------------- summary
HEADER="## Megatron-LM pretrain_gpt.py on a prepared corpus ($(date -u '+%Y-%m-%d %H:%M UTC'), ${SECONDS} s)
$(grep -E '^(megatron|torch)' "$OUT/mlm_setup.log" 2>/dev/null | sed 's/^/    /')
Data: patched $DATA_PATCHED, zero-patch $DATA_DOCS. Failed or skipped stages: ${FAILED[*]:-none}."
python3 benchmarks/megatron_lm_summary.py "$OUT/mlm_patched.log" "$OUT/mlm_zero_patch.log" \
  --out "$OUT/mlm_summary.md" --header "$HEADER" || echo "[summary] FAILED"
((${#FAILED[@]} == 0))
