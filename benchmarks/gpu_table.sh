#!/usr/bin/env bash
# One device call (kind nvidia-h200), carry [".whl"]: the kernel table (ReGLA, SDPA, fla per
# length, files rewritten after each length) and the per-kernel profile, committed settings.
# Use after a call whose GPU check passed with the same kernels and settings (gpu_run_kernels.sh).
set -u
source benchmarks/gpu_env.sh
timeout "${LIMIT:-540}" python3 benchmarks/bench_kernels.py --out "$OUT/bench" --profile 2>&1 | grep -v -i warn > "$OUT/bench.log"
grep -E "^(regla|sdpa|fla) T=|profile|^\| [0-9]" "$OUT/bench.log" | cut -c1-200
