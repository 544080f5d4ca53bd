#!/usr/bin/env bash
# The GPU runner: correctness and benchmarks on a CUDA machine, in stages.
#
#   bash benchmarks/run_gpu.sh STAGE [STAGE ...]
#
# Stages (each writes its log to $OUT, default /tmp/regla-gpu, and prints a short summary):
#   gpu-tests    the GPU tests (tests/gpu, REGLA_TESTS_SEE_GPU=1)
#   cpu-tests    the CPU suite on this machine's Python and megatron-core (GPUs hidden, as in CI)
#   kernels      benchmarks/bench_kernels.py: ReGLA against fla chunk_gla and SDPA, 2K-32K
#                (results/kernels.md, .json, .png)
#   kernel-gates bench_kernels.py --gates model, then --gates adversarial: ReGLA and fla on the
#                inputs a 12-layer GPT's ReGLA layers produce, and on adversarial gates
#   model        benchmarks/bench_model.py: whole GPT models (softmax, hybrids, all ReGLA) training
#                tokens/s, peak memory and a per-kind profile (results/model.md)
#   mixer        benchmarks/bench_mixer.py: one ReGLAMixer forward+backward by kind of kernel
#   segments     benchmarks/bench_segments.py: the segments path and the long-sequence route
#   cp           context parallelism over NCCL (2+ GPUs): CP=n against one GPU, and bench_cp.py
#   megatron-lm  benchmarks/gpu_megatron_lm.sh: Megatron-LM pretrain_gpt.py on a prepared corpus
#
# Python packages the machine lacks come as wheels in .whl/ (../shared/tools/gpu_wheels.sh
# downloads megatron-core and fla-core for Python 3.12); Megatron-LM as a checkout in .megatron-lm/.
# Each stage has a time limit (STAGE_LIMIT seconds, default 420) so that one stuck stage cannot
# take the others' time.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/regla-gpu}; mkdir -p "$OUT"
LIMIT=${STAGE_LIMIT:-420}

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name(0))"
python3 -c "import megatron.core as m; print('megatron-core', m.__version__)" 2>/dev/null || echo "megatron-core: not importable"

stage_gpu-tests() {
  REGLA_TESTS_SEE_GPU=1 timeout "$LIMIT" python3 -m pytest -q -p no:cacheprovider tests/gpu -rfE > "$OUT/tests_gpu.log" 2>&1
  echo "gpu tests rc=$?"; grep -E "passed|failed|error|Error" "$OUT/tests_gpu.log" | tail -15
}

stage_cpu-tests() {
  timeout "$LIMIT" python3 -m pytest -q -p no:cacheprovider -rfE > "$OUT/tests_cpu.log" 2>&1
  echo "cpu suite rc=$?"; grep -E "^FAILED|^ERROR" "$OUT/tests_cpu.log" | head -10; tail -2 "$OUT/tests_cpu.log"
}

stage_kernels() {
  timeout "$LIMIT" python3 benchmarks/bench_kernels.py --out "$OUT/kernels" --profile 2>&1 | grep -v -i warn > "$OUT/kernels.log"
  echo "kernels rc=$?"; grep -E "^(regla|regla_lm|regla_lmb|sdpa|fla) T=|^\| [0-9]|Error" "$OUT/kernels.log" | cut -c1-200
}

stage_kernel-gates() {
  local gates
  for gates in model adversarial; do
    timeout "$LIMIT" python3 benchmarks/bench_kernels.py --gates "$gates" --out "$OUT/gates_$gates" --methods regla,fla,sdpa \
      ${GATE_LENGTHS:+--lengths $GATE_LENGTHS} 2>&1 | grep -v -i warn > "$OUT/kernel_gates_$gates.log"
    echo "kernel-gates $gates rc=$?"; grep -E "^\||slowest|Error" "$OUT/kernel_gates_$gates.log" | cut -c1-200
  done
}

stage_model() {
  timeout "$LIMIT" python3 benchmarks/bench_model.py --out "$OUT/model" ${MODEL_ARGS:-} 2>&1 | grep -v -i warn > "$OUT/model.log"
  echo "model rc=$?"; grep -E '^\{|^\||Error' "$OUT/model.log" | cut -c1-700
}

stage_mixer() {
  timeout "$LIMIT" python3 benchmarks/bench_mixer.py 2>&1 | grep -v -i warn > "$OUT/mixer.log"
  echo "mixer rc=$?"; grep -E "mixer|Error" "$OUT/mixer.log" | cut -c1-300
}

stage_segments() {
  timeout "$LIMIT" python3 benchmarks/bench_segments.py 2>&1 | grep -v -i warn > "$OUT/segments.log"
  echo "segments rc=$?"; cat "$OUT/segments.log"
}

stage_cp() {
  local gpus; gpus=$(nvidia-smi -L | wc -l)
  if [ "$gpus" -lt 2 ]; then echo "cp: needs 2 or more GPUs, this machine has $gpus"; return; fi
  mkdir -p "$OUT/cp"
  timeout "$LIMIT" torchrun --nproc-per-node "$gpus" benchmarks/gpu_check_cp.py --out "$OUT/cp" > "$OUT/cp_check.log" 2>&1
  echo "cp check rc=$?"; grep -E "^check|Error" "$OUT/cp_check.log" | cut -c1-300
  local n
  for n in $(seq 1 "$gpus"); do
    timeout "$LIMIT" torchrun --nproc-per-node "$n" benchmarks/bench_cp.py --out "$OUT/cp" > "$OUT/cp_bench_n$n.log" 2>&1
  done
  python3 benchmarks/collect_cp.py "$OUT/cp" --out "$OUT/context_parallel.md" && grep "^|" "$OUT/context_parallel.md"
}

stage_megatron-lm() {
  OUT=$OUT timeout "$LIMIT" bash benchmarks/gpu_megatron_lm.sh > "$OUT/megatron_lm.log" 2>&1
  echo "megatron-lm rc=$?"; tail -40 "$OUT/megatron_lm.log"
}

[ $# -gt 0 ] || { sed -n '2,20p' "$0"; exit 2; }
for stage in "$@"; do
  if ! declare -F "stage_$stage" >/dev/null; then echo "unknown stage '$stage' (see the header of $0)"; exit 2; fi
done
for stage in "$@"; do
  echo "== $stage ($(date -u +%H:%M:%S) UTC)"
  "stage_$stage"
done
