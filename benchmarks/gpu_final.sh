#!/usr/bin/env bash
# One device call on a 2- or 4-GPU machine (kinds nvidia-h200-x2 / -x4), carry [".whl"]: the
# context-parallel acceptance run (about 9 minutes).
#   GPU 0: kernel correctness check (meanwhile, with 4 GPUs, GPUs 2-3 check CP=2);
#   then CP correctness at CP = 2 (and 4, also with the per-segment forward overlap) against one
#   GPU, and the CP benchmark at CP = 1, 2 (, 4; and CP = max with the forward overlap).
# Everything lands in $OUT; results_cp.md is the table for benchmarks/.
set -u
source benchmarks/gpu_env.sh
export NCCL_NVLS_ENABLE=0 OMP_NUM_THREADS=4
mkdir -p "$OUT/cp"
GPUS=$(nvidia-smi -L | wc -l)
CUDA_VISIBLE_DEVICES=0 timeout 220 python3 benchmarks/gpu_check_kernels.py > "$OUT/check_kernels.log" 2>&1 &
if [ "$GPUS" -ge 4 ]; then
  CUDA_VISIBLE_DEVICES=2,3 timeout 200 torchrun --nproc-per-node 2 --master-port 29511 benchmarks/gpu_check_cp.py --out "$OUT/cp" --tokens-per-gpu > "$OUT/check_cp2.log" 2>&1 &
fi
wait
if [ "$GPUS" -ge 4 ]; then SIZES="1 2 4"; CHECK=4; else SIZES="1 2"; CHECK=2; fi
timeout 100 torchrun --nproc-per-node $CHECK --master-port 29512 benchmarks/gpu_check_cp.py --out "$OUT/cp" --tokens-per-gpu > "$OUT/check_cp$CHECK.log" 2>&1
timeout 100 torchrun --nproc-per-node $CHECK --master-port 29513 benchmarks/gpu_check_cp.py --out "$OUT/cp_overlap" --tokens-per-gpu --overlap-forward > "$OUT/check_cp${CHECK}_overlap.log" 2>&1
for n in $SIZES; do
  timeout 75 torchrun --nproc-per-node $n --master-port 2952$n benchmarks/bench_cp.py --out "$OUT/cp" > "$OUT/bench_cp_n$n.log" 2>&1
done
timeout 75 torchrun --nproc-per-node $CHECK --master-port 29530 benchmarks/bench_cp.py --out "$OUT/cp" --overlap-forward > "$OUT/bench_cp_n${CHECK}_overlap.log" 2>&1
python3 benchmarks/collect_cp.py "$OUT/cp" --out "$OUT/results_cp.md" > /dev/null 2>&1
tail -3 "$OUT/check_kernels.log"; grep -h "^check\|Error" "$OUT"/check_cp*.log | cut -c1-300
grep "^|" "$OUT/results_cp.md" 2>/dev/null; grep -h -i "error" "$OUT"/bench_cp_n*.log | head -5
