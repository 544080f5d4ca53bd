#!/usr/bin/env bash
# One device call (kind nvidia-h200), carry [".whl"]: the kernel table (ReGLA, SDPA, fla per
# length, files rewritten after each length) and the per-kernel profile, committed settings;
# then (megatron-core from .whl) benchmarks/bench_mixer.py: the whole ReGLAMixer against the
# bare kernels, its time by kind of kernel (layout copies included).
# Use after a call whose GPU check passed with the same kernels and settings (gpu_run_kernels.sh).
set -u
source benchmarks/gpu_env.sh
timeout "${LIMIT:-420}" python3 benchmarks/bench_kernels.py --out "$OUT/bench" --profile 2>&1 | grep -v -i warn > "$OUT/bench.log"
run_mixer
grep -E "^(regla|sdpa|fla) T=|profile|^\| [0-9]" "$OUT/bench.log" | cut -c1-200; grep -E "mixer" "$OUT/bench_mixer.log" 2>/dev/null | cut -c1-300
