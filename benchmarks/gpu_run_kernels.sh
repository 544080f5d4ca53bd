#!/usr/bin/env bash
# One device call: GPU check of the kernels (default launch, then every chunk through the
# sub-chunk kernels), a per-kernel profile and launch sweep at T = 8192, and the benchmark
# against fla and SDPA (fla when its wheel was carried). Use with the run tool, carry [".whl"]:
#   bash benchmarks/gpu_run_kernels.sh          (about 5 minutes of device time with fla)
# Everything lands in $OUT (check_*.log, bench_*/, bench.log).
set -u
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
mkdir -p /tmp/pkgs && ln -sfn "$PWD/kernels" /tmp/pkgs/regla_kernels
export PYTHONPATH=/tmp/pkgs
if ls .whl/fla_core*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl \
    && export PYTHONPATH=/tmp/pkgs:/tmp/site
fi
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 120 python3 benchmarks/gpu_check_kernels.py 2>&1 | tee "$OUT/check_default.log"
timeout 80 python3 benchmarks/gpu_check_kernels.py --launch fast_limit=-1 2>&1 | tee "$OUT/check_sub_chunk_only.log"
timeout 170 python3 benchmarks/bench_kernels.py --out "$OUT/bench_sweep" --methods regla --lengths 8192 --profile --sweep 2>&1 | grep -v -i warn | tee "$OUT/sweep.log"
timeout 170 python3 benchmarks/bench_kernels.py --out "$OUT/bench_default" 2>&1 | grep -v -i warn | tee "$OUT/bench.log"
timeout 50 python3 benchmarks/bench_kernels.py --out "$OUT/bench_gate0" --methods regla --lengths 8192 --gate 0,1.5 2>&1 | grep -v -i warn | tee -a "$OUT/bench.log"
