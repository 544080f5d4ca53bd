#!/usr/bin/env bash
# One device call: GPU check of the committed launch settings and of the product-diagonal
# variant with 8 backward warps, then the benchmark of both (fla and SDPA included when the
# fla wheel was carried). Use with the run tool, carry [".whl"] (optional), e.g.
#   bash benchmarks/gpu_run_kernels.sh          (about 4 minutes of device time with fla)
# Everything lands in $OUT (check_*.log, bench_*/, bench.log).
set -u
export PYTHONUNBUFFERED=1
mkdir -p /tmp/pkgs && ln -sfn "$PWD/kernels" /tmp/pkgs/regla_kernels
export PYTHONPATH=/tmp/pkgs
if ls .whl/fla_core*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl \
    && export PYTHONPATH=/tmp/pkgs:/tmp/site
fi
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 120 python3 benchmarks/gpu_check_kernels.py 2>&1 | tee "$OUT/check_default.log"
timeout 120 python3 benchmarks/gpu_check_kernels.py --launch diag_limit=40 bwd_warps=8 2>&1 | tee "$OUT/check_product_diag.log"
timeout 200 python3 benchmarks/bench_kernels.py --out "$OUT/bench_default" 2>&1 | grep -v -i warn | tee "$OUT/bench.log"
timeout 60 python3 benchmarks/bench_kernels.py --out "$OUT/bench_product_diag" --methods regla --launch diag_limit=40 bwd_warps=8 2>&1 | grep -v -i warn | tee -a "$OUT/bench.log"
