#!/usr/bin/env bash
# One device call (kind nvidia-h200), carry [".whl"]:
#   SWEEP=1: greedy launch-setting sweep at T = 8K (ReGLA only) -> sweep/kept_launch.txt, then
#            the GPU check of the picked settings (about 5 minutes with the table);
#   the GPU check of the committed settings (when there is no checked pick), the per-kernel
#   profile and the table ReGLA vs fla vs SDPA at 2K-32K with the checked settings (about 7).
# Everything lands in $OUT (sweep.log, check_*.log, bench/).
set -u
source benchmarks/gpu_env.sh
USE=""
if [ "${SWEEP:-0}" = 1 ]; then
  timeout 200 python3 benchmarks/bench_kernels.py --out "$OUT/sweep" --sweep --lengths "" --methods regla 2>&1 | grep -v -i warn > "$OUT/sweep.log"
  KEPT=$(cat "$OUT/sweep/kept_launch.txt" 2>/dev/null)
  if [ -n "$KEPT" ] && timeout 240 python3 benchmarks/gpu_check_kernels.py --launch $KEPT > "$OUT/check_kept.log" 2>&1; then
    USE="$KEPT"
  fi
  grep -E "sweep" "$OUT/sweep.log"
fi
if [ -z "$USE" ]; then
  timeout 200 python3 benchmarks/gpu_check_kernels.py > "$OUT/check_default.log" 2>&1
fi
echo "table with: ${USE:-committed defaults}"
timeout 330 python3 benchmarks/bench_kernels.py --out "$OUT/bench" --profile ${USE:+--launch $USE} 2>&1 | grep -v -i warn > "$OUT/bench.log"
tail -n 2 "$OUT"/check_*.log; grep -h FAIL "$OUT"/check_*.log | cut -c1-250
grep -E "profile|^\| [0-9]|Error" "$OUT/bench.log"
