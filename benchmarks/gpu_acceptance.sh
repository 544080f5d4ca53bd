#!/usr/bin/env bash
# One call on a 2-GPU machine (device tool, kind nvidia-h200-x2, carry [".whl", ".mlm"]):
#   1. the test suite on megatron-core 0.19.2 / Python 3.12 (CPU paths; conftest hides GPUs)
#   2. CP=2 over NCCL vs one GPU (benchmarks/gpu_check_cp.py)
#   3. Megatron-LM core_v0.19 pretrain_gpt.py, 50 steps, mock data: patched (--spec regla, TP=2)
#      and zero-patch (--spec regla_megatron.specs regla_spec, CP=2)
# Logs go to $OUT.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import torch, triton, megatron.core as m; print('torch', torch.__version__, 'triton', triton.__version__, 'megatron-core', m.__version__)"

(timeout 420 python3 -m pytest -q -x -p no:cacheprovider > "$OUT/pytest.log" 2>&1; echo "pytest rc=$?" >> "$OUT/pytest.log") &
PYTEST=$!

timeout 150 torchrun --nproc-per-node 2 benchmarks/gpu_check_cp.py --out "$OUT" > "$OUT/cp.log" 2>&1; echo "cp rc=$?"
grep -E "^(check|time)" "$OUT/cp.log" || tail -20 "$OUT/cp.log"

mkdir -p /tmp/mlm && tar xzf .mlm/megatron-lm-core_v0.19.0.tgz -C /tmp/mlm
cp -r /tmp/mlm /tmp/mlm-patched && regla-megatron patch /tmp/mlm-patched
source benchmarks/mlm_small_args.sh
MEGATRON_LM=/tmp/mlm-patched TP=2 CP=1 CHECKPOINTS=/tmp/ck1 timeout 150 \
  bash examples/pretrain_regla_hybrid.sh "${SMALL[@]}" > "$OUT/mlm_patched_tp2.log" 2>&1; echo "patched rc=$?"
grep -E "iteration +[0-9]+/|Error|error" "$OUT/mlm_patched_tp2.log" | tail -14
MEGATRON_LM=/tmp/mlm ZERO_PATCH=1 SPEC_NAME=regla_spec TP=1 CP=2 CHECKPOINTS=/tmp/ck2 timeout 150 \
  bash examples/pretrain_regla_hybrid.sh "${SMALL[@]}" > "$OUT/mlm_zero_patch_cp2.log" 2>&1; echo "zero-patch rc=$?"
grep -E "iteration +[0-9]+/|Error|error" "$OUT/mlm_zero_patch_cp2.log" | tail -14
wait $PYTEST
tail -5 "$OUT/pytest.log"
