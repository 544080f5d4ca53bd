# Sourced by the GPU scripts: regla_kernels (and regla_megatron) importable without an install,
# fla from its carried wheel when .whl/ has it, $OUT ready.
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
mkdir -p /tmp/pkgs && ln -sfn "$PWD/kernels" /tmp/pkgs/regla_kernels
export PYTHONPATH=/tmp/pkgs:$PWD
if ls .whl/fla_core*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"

# benchmarks/bench_mixer.py with megatron-core from the carried wheel (skipped without it).
run_mixer() {
  if ls .whl/megatron_core*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_mc .whl/megatron_core*.whl \
      && PYTHONPATH=$PYTHONPATH:/tmp/site_mc timeout 150 python3 benchmarks/bench_mixer.py 2>&1 | grep -v -i warn > "$OUT/bench_mixer.log"
  fi
}
