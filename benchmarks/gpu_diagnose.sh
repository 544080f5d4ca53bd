#!/usr/bin/env bash
# One device call (kind nvidia-h200), carry [".whl"] (and ".variants" for V= candidates), about
# 6-8 minutes: what the next kernel changes depend on (benchmarks/NOTES_kernels.md, "Next").
#   1. the GPU check of the working tree's kernels (CHECK_LAUNCH: LAUNCH overrides for it);
#   2. the per-kernel profile at 8K, 16K and 32K (ReGLA alone; METHODS=regla,regla_lm adds the
#      low-memory backward, BENCH_LIMIT its time limit, BENCH_LAUNCH LAUNCH overrides for it);
#   3. launch candidates and code variants (CANDIDATES, `run_candidates` in gpu_env.sh);
#   4. Nsight Compute (launch, occupancy, memory, warp-state sections) on dq/dk at 8K and on the
#      carried-state output kernel at 32K: local-memory (spill) traffic against DRAM traffic;
#   5. the dq/dk tile that crashed (4 warps, 32-wide key blocks) once under compute-sanitizer.
set -u
source benchmarks/gpu_env.sh
if [ "${CHECK:-1}" = 1 ]; then timeout "${CHECK_LIMIT:-150}" python3 benchmarks/gpu_check_kernels.py ${CHECK_LAUNCH:+--launch $CHECK_LAUNCH} > "$OUT/check.log" 2>&1; fi
PROFILE=${PROFILE-8192,16384,32768}
timeout "${BENCH_LIMIT:-120}" python3 benchmarks/bench_kernels.py --out "$OUT/new" --lengths "${LENGTHS:-8192,16384,32768}" --methods "${METHODS:-regla}" ${BENCH_LAUNCH:+--launch $BENCH_LAUNCH} \
  ${PROFILE:+--profile --profile-lengths $PROFILE} 2>&1 | grep -v -i warn > "$OUT/new.log"
run_candidates
SECTIONS="--section LaunchStats --section Occupancy --section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --section WarpStateStats --section SchedulerStats"
if [ "${NCU:-1}" = 1 ]; then
  cd benchmarks
  timeout 90 ncu --clock-control none -k 'regex:dqk_fast' --launch-skip 1 --launch-count 1 $SECTIONS \
    python3 ncu_kernels.py --iterations 2 > "$OUT/ncu_dqk_8k.log" 2>&1
  timeout 90 ncu --clock-control none -k 'regex:output_fast' --launch-skip 1 --launch-count 1 $SECTIONS \
    python3 ncu_kernels.py --length 32768 --iterations 2 > "$OUT/ncu_output_32k.log" 2>&1
  if command -v compute-sanitizer > /dev/null; then
    timeout 90 compute-sanitizer --tool memcheck --print-limit 5 python3 ncu_kernels.py --tokens 8192 --length 1024 \
      --iterations 1 --launch fast_dqk_block_k=32 fast_dqk_warps=4 > "$OUT/sanitizer.log" 2>&1
    echo "exit $?" >> "$OUT/sanitizer.log"
  else
    echo "compute-sanitizer not on this machine" > "$OUT/sanitizer.log"
  fi
  cd ..
fi
echo "== check"; grep -E "FAIL|passed" "$OUT/check.log" 2>/dev/null | cut -c1-300
echo "== new"; grep -E "^regla(_lmb?)? T=|profile|Error" "$OUT/new.log" | cut -c1-130
cat "$OUT/candidates.log" 2>/dev/null | cut -c1-200
for f in "$OUT"/ncu_*.log; do
  echo "== $f"; grep -E "Duration|Registers Per|Local Memory|Achieved Occupancy|Theoretical Occupancy|DRAM Throughput|Memory Throughput|L1/TEX Hit|L2 Hit|Compute \(SM\) Throughput|Issue Slots Busy|No Eligible|Block Limit" "$f" | cut -c1-130
done
tail -8 "$OUT/sanitizer.log" 2>/dev/null
