#!/usr/bin/env bash
# One device call (kind nvidia-h200), carry [".whl"], about 5 minutes: the diagnostics that
# benchmarks/NOTES_kernels.md ("Next", after v8) asks for before the next kernel changes.
#   1. Nsight Compute (full set) on the dq/dk and fast output kernels at T = 8K, second pass;
#   2. the same on the fast output and dv kernels of the long-sequence route at T = 32K (the
#      carried-state products: 1.21 ms against 0.74 at 8K);
#   3. the dq/dk tile that crashed (4 warps, 32-wide key blocks): five plain bf16 runs (exit
#      codes), then compute-sanitizer memcheck on one small run, if the machine has it.
set -u
source benchmarks/gpu_env.sh
cd benchmarks
timeout 170 ncu --clock-control none -k 'regex:dqk_fast|output_fast' --launch-skip 2 --launch-count 2 --set full \
  python3 ncu_kernels.py --iterations 2 > "$OUT/ncu_8k.log" 2>&1
timeout 170 ncu --clock-control none -k 'regex:output_fast|dv_fast' --launch-skip 2 --launch-count 2 --set full \
  python3 ncu_kernels.py --length 32768 --iterations 2 > "$OUT/ncu_32k.log" 2>&1
CRASHED="fast_dqk_block_k=32 fast_dqk_warps=4"
for run in 1 2 3 4 5; do
  timeout 40 python3 ncu_kernels.py --iterations 3 --launch $CRASHED > /dev/null 2>> "$OUT/crash_runs.log"
  echo "run $run exit $?" >> "$OUT/crash_runs.log"
done
if command -v compute-sanitizer > /dev/null; then
  timeout 150 compute-sanitizer --tool memcheck --print-limit 5 python3 ncu_kernels.py --tokens 8192 --length 1024 \
    --iterations 1 --launch $CRASHED > "$OUT/sanitizer.log" 2>&1
else
  echo "compute-sanitizer not on this machine" > "$OUT/sanitizer.log"
fi
grep -E "^  [a-z_]+_kernel|Duration|Registers Per|Achieved Occupancy|DRAM Throughput|L1/TEX Hit|Compute \(SM\) Throughput|Local Memory|spill|Stall" \
  "$OUT/ncu_8k.log" "$OUT/ncu_32k.log" | cut -c1-160
grep -E "exit" "$OUT/crash_runs.log"; head -20 "$OUT/sanitizer.log"
