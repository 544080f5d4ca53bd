#!/usr/bin/env bash
# One device call (kind nvidia-h200), carry [".whl", ".baseline"], about 4-6 minutes: the working
# tree's kernels, each launch candidate in its own process (a CUDA error in one cannot poison the
# next), and a baseline's kernels, in one run.
#   1. the GPU check (default settings) unless CHECK=0;
#   2. ReGLA and SDPA at LENGTHS, the per-kernel profile at PROFILE lengths;
#   3. ReGLA for every CANDIDATES entry (`run_candidates` in gpu_env.sh; T = CAND_LENGTHS, 8K,
#      where an entry names none);
#   4. the baseline's ReGLA (defaults) at LENGTHS when .baseline/regla_kernels exists;
#   5. with MIXER=1 (megatron-core from .whl), benchmarks/bench_mixer.py.
# Prepare the baseline here first (ignored folder):
#   rm -rf .baseline && mkdir -p .baseline/regla_kernels && git archive <commit> kernels | tar -x -C .baseline \
#     && cp -r .baseline/kernels/. .baseline/regla_kernels/ && rm -rf .baseline/kernels
set -u
source benchmarks/gpu_env.sh
LENGTHS=${LENGTHS:-4096,8192,32768}
PROFILE=${PROFILE:-8192}
if [ "${CHECK:-1}" = 1 ]; then timeout 150 python3 benchmarks/gpu_check_kernels.py > "$OUT/check.log" 2>&1; fi
timeout 150 python3 benchmarks/bench_kernels.py --out "$OUT/new" --lengths "$LENGTHS" --methods regla,sdpa --profile \
  --profile-lengths "$PROFILE" 2>&1 | grep -v -i warn > "$OUT/new.log"
run_candidates
if [ -d .baseline/regla_kernels ]; then
  PYTHONPATH=$PWD/.baseline:$PYTHONPATH timeout 90 python3 benchmarks/bench_kernels.py --out "$OUT/base" --lengths "$LENGTHS" --methods regla \
    2>&1 | grep -v -i warn > "$OUT/base.log"
fi
if [ "${MIXER:-0}" = 1 ]; then run_mixer; fi
echo "== check"; grep -E "FAIL|passed" "$OUT/check.log" 2>/dev/null | cut -c1-300
echo "== new"; grep -E "^(regla|sdpa) T=|profile|Error" "$OUT/new.log" | cut -c1-160
cat "$OUT/candidates.log" 2>/dev/null | cut -c1-200
echo "== baseline"; grep -E "^regla T=|Error" "$OUT/base.log" 2>/dev/null | cut -c1-200
grep -E "mixer" "$OUT/bench_mixer.log" 2>/dev/null | cut -c1-300
