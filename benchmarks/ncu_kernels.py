"""Forward+backward passes for Nsight Compute: bench_kernels.py's
shape at one length, `--iterations` times, committed LAUNCH settings unless --launch.

    ncu --clock-control none -k regex:KERNELS --launch-skip 7 --launch-count 7 python3 benchmarks/ncu_kernels.py
"""

import argparse

import torch
from bench_kernels import TOKENS, apply_launch, make_inputs, regla_chunk_call


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=TOKENS, help="tokens per call (B = tokens / length)")
    parser.add_argument("--launch", nargs="*", help="KEY=VALUE overrides of regla_kernels.triton.settings.LAUNCH")
    args = parser.parse_args()
    apply_launch(args.launch)
    inputs = make_inputs(max(1, args.tokens // args.length), args.length, True)
    for _ in range(args.iterations):
        o = regla_chunk_call(inputs)
        torch.autograd.grad(o, list(inputs[:5]), torch.ones_like(o))
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
