#!/usr/bin/env bash
# One device call (kind nvidia-h200), carry [".whl"], at most about 9 minutes:
#   1. greedy launch-setting sweep at T = 8K (ReGLA only) -> sweep/kept_launch.txt;
#   2. the GPU check (17 cases) with the picked settings;
#   3. benchmarks/bench_segments.py: the segments path and chunk_regla's long-sequence route.
# Then commit the checked picks as LAUNCH defaults and run benchmarks/gpu_table.sh (the table
# with fla and SDPA: fla's first call autotunes for about 4 minutes, so it gets its own call).
# Everything lands in $OUT (sweep.log, check_kept.log, bench_segments.log).
set -u
source benchmarks/gpu_env.sh
timeout 180 python3 benchmarks/bench_kernels.py --out "$OUT/sweep" --sweep --lengths "" --methods regla 2>&1 | grep -v -i warn > "$OUT/sweep.log"
KEPT=$(cat "$OUT/sweep/kept_launch.txt" 2>/dev/null)
timeout 240 python3 benchmarks/gpu_check_kernels.py ${KEPT:+--launch $KEPT} > "$OUT/check_kept.log" 2>&1
timeout 120 python3 benchmarks/bench_segments.py 2>&1 | grep -v -i warn > "$OUT/bench_segments.log"
grep -E "sweep" "$OUT/sweep.log"; grep -E "PASS|FAIL|passed" "$OUT/check_kept.log" | cut -c1-200; cat "$OUT/bench_segments.log"
