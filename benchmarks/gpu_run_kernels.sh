#!/usr/bin/env bash
# One device call (kind nvidia-h200), carry [".whl"], about 6 minutes: the tuning call.
#   1. greedy sweep at T = 8K over bench_kernels.SWEEP (ReGLA only) -> sweep/kept_launch.txt,
#      and the per-kernel profile of the pick;
#   2. the GPU check (18 cases) with the pick;
#   3. Nsight Compute on one forward+backward at 8K with the pick (throughput, occupancy, stalls);
#   4. benchmarks/bench_segments.py: the segments path and chunk_regla's long-sequence route.
# A CUDA error in one candidate (an illegal address, say) poisons the sweep's process: every
# later candidate then fails too, so read sweep.log from its first error.
# Then commit the checked picks as LAUNCH defaults and run benchmarks/gpu_table.sh (the table
# with fla and SDPA: fla's first call autotunes for about 4 minutes, so it gets its own call).
set -u
source benchmarks/gpu_env.sh
timeout 200 python3 benchmarks/bench_kernels.py --out "$OUT/sweep" --sweep --profile --lengths "" --methods regla 2>&1 | grep -v -i warn > "$OUT/sweep.log"
KEPT=$(cat "$OUT/sweep/kept_launch.txt" 2>/dev/null)
timeout 150 python3 benchmarks/gpu_check_kernels.py ${KEPT:+--launch $KEPT} > "$OUT/check_kept.log" 2>&1
(cd benchmarks && timeout 150 ncu --clock-control none -k 'regex:gates|states|fast' --launch-skip 7 --launch-count 7 \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
  python3 ncu_kernels.py --iterations 2 ${KEPT:+--launch $KEPT}) > "$OUT/ncu.log" 2>&1
timeout 60 python3 benchmarks/bench_segments.py --tokens 65536 2>&1 | grep -v -i warn > "$OUT/bench_segments.log"
grep -E "sweep|profile" "$OUT/sweep.log" | cut -c1-200
echo "== check"; grep -E "FAIL|passed" "$OUT/check_kept.log" | cut -c1-300
grep -E "^  [a-z_]+_kernel|Duration|DRAM Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Compute \(SM\) Throughput" "$OUT/ncu.log" | cut -c1-120
cat "$OUT/bench_segments.log"
