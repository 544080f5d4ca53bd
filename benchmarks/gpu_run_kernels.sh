#!/usr/bin/env bash
# One device call (kind nvidia-h200), carry [".whl"]: GPU check of the committed launch
# settings and of the next candidate (the final session-2 sweep's picks: dv value block 128,
# dq/dk key block 32), a per-kernel profile, and the benchmark of both against fla and SDPA.
#   bash benchmarks/gpu_run_kernels.sh          (about 6 minutes with fla)
# Everything lands in $OUT (check_*.log, bench_*/, bench.log).
set -u
source benchmarks/gpu_env.sh
CANDIDATE=(fast_dv_block_v=128 fast_dqk_block_k=32)
timeout 120 python3 benchmarks/gpu_check_kernels.py > "$OUT/check_default.log" 2>&1
timeout 120 python3 benchmarks/gpu_check_kernels.py --launch "${CANDIDATE[@]}" > "$OUT/check_candidate.log" 2>&1
timeout 200 python3 benchmarks/bench_kernels.py --out "$OUT/bench_default" --profile 2>&1 | grep -v -i warn > "$OUT/bench.log"
timeout 90 python3 benchmarks/bench_kernels.py --out "$OUT/bench_candidate" --methods regla --launch "${CANDIDATE[@]}" 2>&1 | grep -v -i warn >> "$OUT/bench.log"
tail -1 "$OUT"/check_*.log; grep FAIL "$OUT"/check_*.log; grep -E "profile|^\| [0-9]" "$OUT/bench.log"
