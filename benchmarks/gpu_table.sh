#!/usr/bin/env bash
# One device call (kind nvidia-h200), carry [".whl"]: the kernel table (ReGLA, SDPA, fla per
# length, files rewritten after each length) and the per-kernel profile, committed settings;
# then (megatron-core from .whl; MIXER=0 skips it) benchmarks/bench_mixer.py: the whole ReGLAMixer against the
# bare kernels, its time by kind of kernel (layout copies included).
# The GPU check of the same kernels runs first (CHECK=0 skips it), so the table's numbers
# come from kernels checked in the same call.
set -u
source benchmarks/gpu_env.sh
if [ "${CHECK:-1}" = 1 ]; then
  timeout "${CHECK_LIMIT:-240}" python3 benchmarks/gpu_check_kernels.py > "$OUT/check.log" 2>&1
  grep -E "FAIL|passed" "$OUT/check.log" | cut -c1-300
fi
timeout "${LIMIT:-420}" python3 benchmarks/bench_kernels.py --out "$OUT/bench" --profile 2>&1 | grep -v -i warn > "$OUT/bench.log"
if [ "${MIXER:-1}" = 1 ]; then run_mixer; fi
grep -E "^(regla|regla_lm|regla_lmb|sdpa|fla) T=|profile|^\| [0-9]" "$OUT/bench.log" | cut -c1-200; grep -E "mixer" "$OUT/bench_mixer.log" 2>/dev/null | cut -c1-300
