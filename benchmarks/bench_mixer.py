"""Where a ReGLAMixer's time goes in Megatron-Core (one process, TP = 1): forward+backward of
the whole mixer against the bare `chunk_regla` on the same tokens, and the mixer's GPU time
by kind of kernel (ReGLA's Triton kernels, matrix products, copies and other elementwise
passes). Prices the layout copies between Megatron's [s, b, h] and the kernels' [b, s, h].

    python benchmarks/bench_mixer.py [--tokens 65536 --length 8192]      # GPU, bf16, Triton
    python benchmarks/bench_mixer.py --smoke                             # CPU, tiny, torch path
"""

import argparse

import torch
import torch.distributed as dist
from bench_model import init_megatron, kind

HEADS, DIM = 16, 128


def build(dtype, backend):
    from megatron.core.transformer.spec_utils import build_module

    from regla_megatron.config import ReGLAConfig
    from regla_megatron.specs import get_regla_layer_spec

    config = ReGLAConfig(
        num_layers=1, hidden_size=HEADS * DIM, num_attention_heads=HEADS, regla_head_dim_k=DIM, regla_head_dim_v=DIM,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, use_cpu_initialization=not torch.cuda.is_available(),
        regla_backend=backend,
    )
    mixer = build_module(get_regla_layer_spec("local").submodules.self_attention, config=config, layer_number=1)
    return mixer.to("cuda") if torch.cuda.is_available() else mixer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, torch path")
    args = parser.parse_args()
    global HEADS, DIM
    if args.smoke:
        HEADS, DIM, args.tokens, args.length = 2, 16, 256, 128
    init_megatron()
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    mixer = build(dtype, "triton" if cuda else "torch")
    batch = args.tokens // args.length
    device = "cuda" if cuda else "cpu"
    hidden = torch.randn(args.length, batch, HEADS * DIM, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(hidden)

    def mixer_step():
        out, _ = mixer(hidden, attention_mask=None)
        torch.autograd.grad(out, [hidden] + list(mixer.parameters()), grad, allow_unused=True)

    from regla_kernels import chunk_regla

    qkvzu = [torch.randn(batch, args.length, HEADS, DIM, device=device, dtype=dtype, requires_grad=True) for _ in range(5)]
    do = torch.randn(batch, args.length, HEADS, DIM, device=device, dtype=dtype)

    def core_step():
        torch.autograd.grad(chunk_regla(*qkvzu, backend="triton" if cuda else "torch")[0], qkvzu, do)

    if cuda:
        from triton.testing import do_bench

        mixer_ms = do_bench(mixer_step, warmup=10, rep=100, return_mode="median")
        core_ms = do_bench(core_step, warmup=10, rep=100, return_mode="median")
        print(f"{args.tokens} tokens (B={batch}, T={args.length}), H={HEADS}, d={DIM}, bf16: mixer fwd+bwd {mixer_ms:.2f} ms, "
              f"chunk_regla alone {core_ms:.2f} ms", flush=True)
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    mixer_step()
    with torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(3):
            mixer_step()
        if cuda:
            torch.cuda.synchronize()
    totals, names = {}, {}
    for event in prof.key_averages():
        time_us = (event.device_time_total if cuda else event.self_cpu_time_total) / 3
        if time_us <= 0 or (not cuda and event.key.startswith("aten::") is False):
            continue
        group = kind(event.key)
        totals[group] = totals.get(group, 0.0) + time_us / 1000
        names.setdefault(group, []).append((time_us / 1000, event.key[:80]))
    for group, ms in sorted(totals.items(), key=lambda item: -item[1]):
        top = ", ".join(f"{name} {t:.2f}" for t, name in sorted(names[group], reverse=True)[:4])
        print(f"mixer fwd+bwd, {group}: {ms:.2f} ms ({top})", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
