#!/usr/bin/env bash
# One device call (kind nvidia-h200), carry [".whl"]: the kernel check (17 cases: the 13 chunk
# cases, the segments path with slots, the decode step) and the one-GPU price of the segments path.
set -u
source benchmarks/gpu_env.sh
timeout 220 python3 benchmarks/gpu_check_kernels.py > "$OUT/check_kernels.log" 2>&1
timeout 120 python3 benchmarks/bench_segments.py 2>&1 | grep -v -i warn > "$OUT/bench_segments.log"
grep -E "PASS|FAIL|passed" "$OUT/check_kernels.log" | cut -c1-200; cat "$OUT/bench_segments.log"
