#!/usr/bin/env bash
# Third Megatron call (nvidia-h200-x2, carry [".whl", ".mlm"]), now that backend "auto" is the
# Triton kernels on GPUs: Megatron-LM core_v0.19 pretrain_gpt.py, 50 steps, mock data, the
# patched form at TP=2+SP and the zero-patch form at CP=2 (the Triton state-passing path);
# the test suite on megatron-core 0.19.2 meanwhile; and the key-max reduction timed three ways.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TRITON_DEFAULT_FP_FUSION=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>/dev/null || exit 1
(OMP_NUM_THREADS=2 timeout 330 python3 -m pytest -q -p no:cacheprovider > "$OUT/pytest.log" 2>&1; echo "pytest rc=$?" >> "$OUT/pytest.log") &
PYTEST=$!
python3 - <<'PY' > "$OUT/key_max.log" 2>&1
import torch
from triton.testing import do_bench
k = torch.randn(8, 8192, 16, 128, device="cuda", dtype=torch.bfloat16)
ways = {"amax(1,3)": lambda: k.amax(dim=(1, 3)), "amax(-1).amax(1)": lambda: k.amax(dim=-1).amax(dim=1),
        "amax(1).amax(-1)": lambda: k.amax(dim=1).amax(dim=-1)}
ref = ways["amax(1,3)"]()
for name, f in ways.items():
    assert torch.equal(f(), ref)
    print(f"key max {name}: {do_bench(f, warmup=25, rep=100, return_mode='median'):.3f} ms")
PY
cat "$OUT/key_max.log"
mkdir -p /tmp/mlm && tar xzf .mlm/megatron-lm-core_v0.19.0.tgz -C /tmp/mlm
cp -r /tmp/mlm /tmp/mlm-patched && regla-megatron patch /tmp/mlm-patched > /dev/null
source benchmarks/mlm_small_args.sh
MEGATRON_LM=/tmp/mlm-patched TP=2 CP=1 CHECKPOINTS=/tmp/ck1 timeout 130 \
  bash examples/pretrain_regla_hybrid.sh "${SMALL[@]}" > "$OUT/mlm_patched_tp2_triton.log" 2>&1; echo "patched rc=$?"
grep -E "iteration +[0-9]+/|Error" "$OUT/mlm_patched_tp2_triton.log" | cut -c1-250 | tail -11
MEGATRON_LM=/tmp/mlm ZERO_PATCH=1 SPEC_NAME=regla_spec TP=1 CP=2 CHECKPOINTS=/tmp/ck2 timeout 130 \
  bash examples/pretrain_regla_hybrid.sh "${SMALL[@]}" > "$OUT/mlm_zero_patch_cp2_triton.log" 2>&1; echo "zero-patch rc=$?"
grep -E "iteration +[0-9]+/|Error" "$OUT/mlm_zero_patch_cp2_triton.log" | cut -c1-250 | tail -11
wait $PYTEST
tail -4 "$OUT/pytest.log"
