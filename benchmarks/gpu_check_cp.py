"""Context parallelism on GPUs (NCCL): CP=n equals one GPU, and what CP costs per layer.

    torchrun --nproc-per-node N benchmarks/gpu_check_cp.py [--tokens-per-gpu 32768 ...]   (none: no timing;
    benchmarks/bench_cp.py is the CP benchmark)

Correctness: full-sequence inputs drawn on every rank from one seed, cut in Megatron's
zigzag layout; `context_parallel_regla` forward + backward on the shards; outputs and
every input gradient gathered and compared with `chunk_regla` on the whole sequence on
one GPU (same dtype, same kernels). Timing: one ReGLA token-mixing fwd+bwd per rank at
a per-GPU share of T tokens, against the same share on one GPU without CP; efficiency =
(CP=1 time for the share) / (CP=n time). Bytes sent are the all-gathered state summaries.
"""

import argparse
import json
import os

import torch
import torch.distributed as dist
from triton.testing import do_bench

from regla_kernels import chunk_regla
from regla_megatron.context_parallel import context_parallel_regla, cp_token_positions, get_batch_cp_slice

HEADS, DIM = 16, 128
# CP=n against one GPU, same dtype and kernels: only rounding differs (METHOD.md bounds: bf16
# operands 1e-3..1e-2; fp32 inputs take tf32 products)
BOUNDS = {torch.bfloat16: 1e-2, torch.float32: 3e-3}


def draw(total, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape = (1, total, HEADS, DIM)
    q, k, v = (torch.randn(shape, generator=gen, device="cuda") for _ in range(3))
    # Gate logits around 6 +- 3: most key dims keep memory over thousands of tokens (so the
    # passed states matter), some saturate either way.
    z = 6 + 3 * torch.randn(shape, generator=gen, device="cuda")
    u = torch.randn(shape, generator=gen, device="cuda")
    grad = torch.randn(shape, generator=gen, device="cuda")
    return [x.to(dtype) for x in (q, k, v, z, u)], grad.to(dtype)


OVERLAP = [False]  # --overlap-forward


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check(total, dtype, rank, world):
    inputs, grad = draw(total, dtype, seed=1000 + total)
    local = [get_batch_cp_slice(x, rank, world).requires_grad_(True) for x in inputs]
    out = context_parallel_regla(*local, cp_group=dist.group.WORLD, layout="zigzag", overlap_forward=OVERLAP[0])
    out.backward(get_batch_cp_slice(grad, rank, world))
    pieces = [out.detach()] + [x.grad for x in local]
    gathered = []
    positions = cp_token_positions("zigzag", rank, world, total // world, device="cuda")
    all_positions = [torch.empty_like(positions) for _ in range(world)]
    dist.all_gather(all_positions, positions)
    order = torch.cat(all_positions)
    for piece in pieces:
        parts = [torch.empty_like(piece) for _ in range(world)]
        dist.all_gather(parts, piece.contiguous())
        full = torch.empty((1, total) + piece.shape[2:], dtype=piece.dtype, device="cuda")
        full[:, order] = torch.cat(parts, dim=1)
        gathered.append(full)
    if rank != 0:
        return None
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    ref, _ = chunk_regla(*leaves)
    ref.backward(grad)
    names = ["o", "dq", "dk", "dv", "dz", "du"]
    refs = [ref.detach()] + [x.grad for x in leaves]
    errors = {name: rel(a, b) for name, a, b in zip(names, gathered, refs)}
    finite = all(torch.isfinite(a).all().item() for a in gathered)
    return {"T": total, "dtype": str(dtype), "finite": finite, **errors}


def time_layer(share, world, rank):
    inputs, grad = draw(share * world, torch.bfloat16, seed=7)
    local = [get_batch_cp_slice(x, rank, world).requires_grad_(True) for x in inputs]
    local_grad = get_batch_cp_slice(grad, rank, world)

    def cp_step():
        for x in local:
            x.grad = None
        context_parallel_regla(*local, cp_group=dist.group.WORLD, layout="zigzag", overlap_forward=OVERLAP[0]).backward(local_grad)

    def single_step():
        for x in local:
            x.grad = None
        chunk_regla(*local)[0].backward(local_grad)

    dist.barrier()
    cp_ms = do_bench(cp_step, warmup=50, rep=300, return_mode="median")
    single_ms = do_bench(single_step, warmup=50, rep=300, return_mode="median")
    segments = 2 * world
    bytes_sent = segments * HEADS * DIM * (DIM + 1) * 4  # fp32 (S_loc, Lambda), forward all-gather
    return {"tokens_per_gpu": share, "cp": world, "cp_ms": cp_ms, "one_gpu_share_ms": single_ms,
            "efficiency": single_ms / cp_ms, "allgather_bytes_fwd": bytes_sent}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--check-lengths", type=int, nargs="*", default=[8192, 32768 + 4096])
    parser.add_argument("--tokens-per-gpu", type=int, nargs="*", default=[32768, 65536])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--overlap-forward", action="store_true", help="the forward all-gather per zigzag segment")
    args = parser.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    results = {"device": torch.cuda.get_device_name(), "world": world, "torch": torch.__version__,
               "checks": [], "timings": []}
    for total in args.check_lengths:
        for dtype in (torch.bfloat16, torch.float32):
            row = check(total, dtype, rank, world)
            if rank == 0:
                bound = BOUNDS[dtype]
                row["pass"] = row["finite"] and all(row[n] < bound for n in ("o", "dq", "dk", "dv", "dz", "du"))
                print("check", "PASS" if row["pass"] else "FAIL", f"bound {bound:.0e}", json.dumps(row), flush=True)
                results["checks"].append(row)
    for share in args.tokens_per_gpu:
        row = time_layer(share, world, rank)
        if rank == 0:
            print("time", json.dumps(row), flush=True)
            results["timings"].append(row)
    if rank == 0:
        with open(os.path.join(args.out, f"cp{world}.json"), "w") as handle:
            json.dump(results, handle, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
