#!/usr/bin/env bash
# Second call (nvidia-h200-x2, carry [".whl", ".mlm"]): the suite on megatron-core 0.19.2,
# CP=2 vs one GPU with long-memory gates, and the zero-patch Megatron-LM run at CP=2.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>/dev/null || exit 1
(timeout 300 python3 -m pytest -q -p no:cacheprovider > "$OUT/pytest.log" 2>&1; echo "pytest rc=$?" >> "$OUT/pytest.log") &
PYTEST=$!
timeout 120 torchrun --nproc-per-node 2 benchmarks/gpu_check_cp.py --tokens-per-gpu 32768 --out "$OUT" > "$OUT/cp.log" 2>&1; echo "cp rc=$?"
grep -E "^(check|time)" "$OUT/cp.log" || tail -20 "$OUT/cp.log"
mkdir -p /tmp/mlm && tar xzf .mlm/megatron-lm-core_v0.19.0.tgz -C /tmp/mlm
source benchmarks/mlm_small_args.sh
MEGATRON_LM=/tmp/mlm ZERO_PATCH=1 SPEC_NAME=regla_spec TP=1 CP=2 CHECKPOINTS=/tmp/ck2 timeout 150 \
  bash examples/pretrain_regla_hybrid.sh "${SMALL[@]}" > "$OUT/mlm_zero_patch_cp2.log" 2>&1; echo "zero-patch rc=$?"
grep -E "iteration +[0-9]+/|Error" "$OUT/mlm_zero_patch_cp2.log" | cut -c1-250 | tail -12
wait $PYTEST
tail -4 "$OUT/pytest.log"
