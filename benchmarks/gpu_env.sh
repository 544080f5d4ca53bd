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

# Launch candidates, each in its own process (a CUDA error in one cannot poison the next):
# CANDIDATES "[V=<variant>] [T=<length>] key=value ...;..." (';'-separated). T defaults to
# CAND_LENGTHS (8192), the methods CAND_METHODS (regla); V=name runs .variants/name/regla_kernels (an ignored copy of kernels/ with
# a code change) instead of the working tree's. Appends to $OUT/candidates.log.
run_candidates() {
  local cand length variant settings path
  IFS=';' read -ra CANDS <<< "${CANDIDATES:-}"
  for cand in "${CANDS[@]}"; do
    length=$(sed -n 's/.*T=\([0-9]*\).*/\1/p' <<< "$cand"); length=${length:-${CAND_LENGTHS:-8192}}
    variant=$(sed -n 's/.*V=\([A-Za-z0-9_]*\).*/\1/p' <<< "$cand")
    settings=$(sed 's/T=[0-9]*//; s/V=[A-Za-z0-9_]*//' <<< "$cand")
    path=$PYTHONPATH; [ -n "$variant" ] && path=$PWD/.variants/$variant:$PYTHONPATH
    echo "== candidate ${variant:+V=$variant }T=$length $settings" >> "$OUT/candidates.log"
    PYTHONPATH=$path timeout 60 python3 benchmarks/bench_kernels.py --out "$OUT/cand" --lengths "$length" --methods "${CAND_METHODS:-regla}" \
      --launch $settings 2>&1 | grep -E "^regla(_lmb?)? T=|Error" >> "$OUT/candidates.log"
  done
}
