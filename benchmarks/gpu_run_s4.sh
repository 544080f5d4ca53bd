#!/usr/bin/env bash
# One device call (kind nvidia-h200), carry [".whl"], about 9 minutes (session 4):
#   1. greedy sweep at T = 8K over bench_kernels.SWEEP (the key-block-loop output kernel, the
#      fused backward kernel, the rolled gates loop, register caps) and the profile of the pick;
#   2. the GPU check with the new kernels forced on, then with the pick;
#   3. T = 16K and 32K at the pick with chunk_regla's long-sequence route off / 132 / 264 programs.
set -u
source benchmarks/gpu_env.sh
timeout 260 python3 benchmarks/bench_kernels.py --out "$OUT/sweep" --sweep --profile --lengths "" --methods regla 2>&1 | grep -v -i warn > "$OUT/sweep.log"
KEPT=$(cat "$OUT/sweep/kept_launch.txt" 2>/dev/null)
timeout 150 python3 benchmarks/gpu_check_kernels.py --launch fast_output_block_k=32 fast_bwd_block_k=32 gates_block_k=32 > "$OUT/check_new.log" 2>&1
timeout 150 python3 benchmarks/gpu_check_kernels.py ${KEPT:+--launch $KEPT} > "$OUT/check_kept.log" 2>&1
for programs in 0 132 264; do
  timeout 60 python3 benchmarks/bench_kernels.py --out "$OUT/seg$programs" --lengths 16384,32768 --methods regla \
    --launch $KEPT segment_min_programs=$programs 2>&1 | grep -E "^\| [0-9]" | sed "s/^/segment_min_programs=$programs /" >> "$OUT/segments.log"
done
grep -E "sweep|profile" "$OUT/sweep.log" | cut -c1-200
for f in check_new check_kept; do echo "== $f"; grep -E "FAIL|passed" "$OUT/$f.log" | cut -c1-300; done
cat "$OUT/segments.log"
