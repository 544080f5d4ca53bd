"""Per-layer cost of context parallelism for the ReGLA token mixing on GPUs (NCCL).

    torchrun --nproc-per-node N benchmarks/bench_cp.py --out DIR [--tokens-per-gpu 32768 65536 131072 262144]

Every rank holds P tokens of one sequence of N * P tokens in Megatron's zigzag layout
(B = 1, H = 16, dk = dv = 128, bf16; gate logits ~ N(2, 1), as in bench_kernels.py).
Timed: one forward+backward of `context_parallel_regla` (key-max all-reduce, the local
Triton passes, the state all-gathers), median of triton.testing.do_bench, and on the same
GPU the CP=1 run of a P-token sequence (`chunk_regla`). Efficiency = CP=1 time for the
per-GPU share / CP=N time. Bytes: what the collectives carry per layer (forward+backward),
counted by wrapping torch.distributed's functions during one step. Rank 0 writes
DIR/bench_cp_n{N}.json.
"""

import argparse
import datetime
import json
import os

import torch
import torch.distributed as dist
import triton
from bench_kernels import peak_extra_gb
from triton.testing import do_bench

from regla_kernels import chunk_regla
from regla_megatron.context_parallel import context_parallel_regla, get_batch_cp_slice

HEADS, DIM = 16, 128
COLLECTIVES = ("all_gather_into_tensor", "all_reduce", "reduce_scatter_tensor", "all_gather")


def draw(total, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape = (1, total, HEADS, DIM)
    r = lambda mean=0.0: (torch.randn(shape, generator=gen, device="cuda") + mean).to(torch.bfloat16)
    return [r(), r(), r(), r(2.0), r()], r()


class ByteCounter:
    """Counts the bytes each torch.distributed collective receives into its output (per rank)."""

    def __init__(self):
        self.bytes = {}
        self.saved = {}

    def __enter__(self):
        for name in COLLECTIVES:
            original = getattr(dist, name)
            self.saved[name] = original

            def counted(*args, _name=name, _original=original, **kwargs):
                first = args[0]
                size = sum(t.numel() * t.element_size() for t in first) if isinstance(first, list) else first.numel() * first.element_size()
                self.bytes[_name] = self.bytes.get(_name, 0) + size
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(dist, name, original)


OVERLAP = [False]  # --overlap-forward


def measure(step, warmup=10, rep=60):
    return do_bench(step, warmup=warmup, rep=rep, return_mode="median")


def row_for(share, world, rank):
    inputs, grad = draw(share * world, seed=share)
    local = [get_batch_cp_slice(x, rank, world).requires_grad_(True) for x in inputs]
    local_grad = get_batch_cp_slice(grad, rank, world)
    del inputs, grad

    def cp_forward():
        with torch.no_grad():
            context_parallel_regla(*local, cp_group=dist.group.WORLD, layout="zigzag", overlap_forward=OVERLAP[0])

    def cp_step():
        out = context_parallel_regla(*local, cp_group=dist.group.WORLD, layout="zigzag", overlap_forward=OVERLAP[0])
        torch.autograd.grad(out, local, local_grad)

    def one_gpu_forward():
        with torch.no_grad():
            chunk_regla(*local)

    def one_gpu_step():
        torch.autograd.grad(chunk_regla(*local)[0], local, local_grad)

    with ByteCounter() as counter:
        cp_step()
    peak = peak_extra_gb(cp_step)
    dist.barrier()
    cp_fwd, cp_ms = measure(cp_forward), measure(cp_step)
    dist.barrier()
    single_fwd, single_ms = measure(one_gpu_forward), measure(one_gpu_step)
    dist.barrier()
    segments = 2 * world if world > 1 else 1
    # forward: (S_loc, Lambda) of every segment; backward: the state gradients; the key max
    expected = segments * HEADS * DIM * (2 * DIM + 1) * 4 + HEADS * 4 if world > 1 else 0
    return {
        "tokens_per_gpu": share, "cp": world, "cp_fwd_ms": cp_fwd, "cp_fwd_bwd_ms": cp_ms,
        "one_gpu_share_fwd_ms": single_fwd, "one_gpu_share_fwd_bwd_ms": single_ms,
        "efficiency": single_ms / cp_ms, "efficiency_fwd": single_fwd / cp_fwd,
        "bytes_received_per_layer": sum(counter.bytes.values()), "bytes_by_collective": counter.bytes,
        "bytes_expected_per_layer": expected, "peak_gb": peak,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--tokens-per-gpu", type=int, nargs="*", default=[32768, 65536, 131072, 262144])
    parser.add_argument("--overlap-forward", action="store_true", help="the forward all-gather per zigzag segment")
    args = parser.parse_args()
    OVERLAP[0] = args.overlap_forward
    dist.init_process_group("nccl")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    rank, world = dist.get_rank(), dist.get_world_size()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, "cp": world,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "rows": [],
            "overlap_forward": args.overlap_forward}
    for share in args.tokens_per_gpu:
        try:
            row = row_for(share, world, rank)
        except Exception as error:  # one size that does not fit must not hide the others
            row = {"tokens_per_gpu": share, "cp": world, "error": f"{type(error).__name__}: {str(error)[:200]}"}
        torch.cuda.empty_cache()
        if rank == 0:
            print(json.dumps(row), flush=True)
            meta["rows"].append(row)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        suffix = "_overlap" if args.overlap_forward else ""
        with open(os.path.join(args.out, f"bench_cp_n{world}{suffix}.json"), "w") as handle:
            json.dump(meta, handle, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
