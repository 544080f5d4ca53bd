# Sourced by the gpu_acceptance*.sh scripts: the small Megatron-LM pretrain_gpt.py run (50 steps,
# mock data, 4 layers, hidden 512, 8 heads, sequence 2048, 2 GPUs) on a machine without TE/apex.
SMALL=(--train-iters 50 --global-batch-size 16 --micro-batch-size 4 --lr-warmup-iters 5
       --save-interval 100000 --eval-interval 25 --eval-iters 2 --log-interval 5
       --transformer-impl local --no-gradient-accumulation-fusion --no-masked-softmax-fusion
       --no-bias-swiglu-fusion --no-bias-dropout-fusion --no-rope-fusion --no-persist-layer-norm)
export DATA_PATH=mock GPUS_PER_NODE=2 NUM_LAYERS=4 HIDDEN=512 HEADS=8 SEQ=2048
