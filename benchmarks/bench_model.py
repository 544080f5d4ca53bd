"""What users buy: training speed and memory of whole GPT models built from this plugin's specs.

A Megatron-Core GPTModel per layer pattern ('*' softmax attention, 'R' ReGLA), one training
step = forward + backward (Megatron's schedule) + optimizer step (Megatron's optimizer: bf16
parameters, fp32 main copies, Adam), the same tokens per step at every sequence length. The
ReGLA kernels see the gates the model's own projections produce, not random ones. Reports
tokens/s, peak memory, and (at one length) where one step's GPU time goes by kind of kernel.

    python benchmarks/bench_model.py --out DIR                   # GPU: the table (defaults below)
    python benchmarks/bench_model.py --smoke                     # CPU: tiny, one step, checks it runs

Defaults: 12 layers, hidden 2048, 16 heads of 128, FFN 8192, vocab 32768, 32K tokens per step,
patterns '*' (softmax GPT), 'R*', 'RRR*', 'R' (all ReGLA), lengths 2K, 8K, 32K. A pattern is
repeated to the layer count. Softmax layers use the plugin's local spec (SDPA flash attention)
unless TransformerEngine is importable.
"""

import argparse
import datetime
import gc
import json
import os
import re
import socket
import time

import torch
import torch.distributed as dist

KINDS = (
    ("ReGLA kernels", re.compile(r"^chunk_|regla|_states_|gates|copy_rows", re.I)),
    ("flash attention", re.compile(r"flash|fmha|cudnn|attention|sdpa", re.I)),
    ("matrix products", re.compile(r"gemm|cutlass|xmma|nvjet|matmul|cublas|aten::(add|b)?mm\b", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach", re.I)),
    ("copies / layout", re.compile(r"copy|cat_|transpose|contiguous|clone", re.I)),
)


def kind(name: str) -> str:
    """The kind of a kernel, by its name (str) -> one of KINDS' labels or 'other elementwise'."""
    for label, pattern in KINDS:
        if pattern.search(name):
            return label
    return "other elementwise / reductions"


def init_megatron(seed: int = 1234) -> None:
    """One process, model-parallel sizes 1 (NCCL on a GPU, gloo with the CPU shim otherwise)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not torch.cuda.is_available():
        from regla_megatron.cpu_shim import apply_cpu_shim

        apply_cpu_shim()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(seed)


def full_pattern(pattern: str, layers: int) -> str:
    """'R*' repeated to `layers` symbols; a pattern that does not divide the layer count is an error."""
    if layers % len(pattern):
        raise SystemExit(f"pattern {pattern!r} does not repeat evenly over {layers} layers")
    return pattern * (layers // len(pattern))


def gpt_model(args, pattern: str, length: int):
    """(config, GPTModel) from this plugin's specs for one pattern, on this process's device: bf16
    on a GPU, fp32 on the CPU. args: layers, hidden, heads, ffn, vocab, recompute."""
    from megatron.core.models.gpt import GPTModel

    from regla_megatron.config import ReGLAConfig
    from regla_megatron.specs import get_hybrid_block_spec

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    recompute = getattr(args, "recompute", None)
    config = ReGLAConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads, ffn_hidden_size=args.ffn,
        regla_pattern=full_pattern(pattern, args.layers), params_dtype=dtype, bf16=cuda, pipeline_dtype=dtype,
        use_cpu_initialization=not cuda, hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False,
        masked_softmax_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        recompute_granularity=recompute, recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=1 if recompute == "full" else None,
    )
    model = GPTModel(config, get_hybrid_block_spec(config), vocab_size=args.vocab, max_sequence_length=length,
                     position_embedding_type="rope")
    return config, (model.cuda() if cuda else model)


def build(args, pattern: str, length: int):
    """GPTModel + Megatron DDP + Megatron optimizer for one pattern, on this process's device."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    cuda = torch.cuda.is_available()
    config, model = gpt_model(args, pattern, length)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False)
    model = DistributedDataParallel(config, ddp_config, model)
    # clip_grad 0 on the CPU: Megatron's gradient clipping asserts CUDA tensors.
    optimizer_config = OptimizerConfig(optimizer="adam", lr=1e-4, bf16=cuda, clip_grad=1.0 if cuda else 0.0,
                                       params_dtype=config.params_dtype, use_distributed_optimizer=False)
    optimizer = get_megatron_optimizer(optimizer_config, [model])
    return config, model, optimizer


def training_step(config, model, optimizer, tokens, labels) -> float:
    """One forward + backward through Megatron's schedule and one optimizer step; returns the loss."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model_chunk):
        out = model_chunk(tokens, None, None, labels=labels)

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"loss": loss.detach()}

        return out, loss_func

    model.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([None]), model=[model], num_microbatches=1,
        seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], forward_only=False,
    )
    optimizer.step()
    return float(losses[0]["loss"]) if losses else float("nan")


def profile_step(step) -> dict:
    """GPU kernel time (ms) of one training step, summed by kind of kernel."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    totals = {}
    for event in prof.key_averages():
        if event.device_time_total > 0:
            label = kind(event.key)
            totals[label] = totals.get(label, 0.0) + event.device_time_total / 1000
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def measure(args, pattern: str, length: int, profile: bool) -> dict:
    """tokens/s, peak GB and (optionally) the per-kind profile of one (pattern, length) cell."""
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    batch = max(1, args.tokens // length)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    config, model, optimizer = build(args, pattern, length)
    gen = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(0, args.vocab, (batch, length), device=device, generator=gen)
    labels = torch.roll(tokens, -1, dims=1)
    step = lambda: training_step(config, model, optimizer, tokens, labels)
    for _ in range(args.warmup):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    row = {"pattern": pattern, "length": length, "batch": batch, "step_ms": 1000 * seconds,
           "tokens_per_s": batch * length / seconds, "loss": loss,
           "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None}
    if profile and cuda:
        row["profile_ms"] = profile_step(step)
    return row


def markdown(rows: list, patterns: list, lengths: list) -> str:
    """The results table: tokens/s and peak memory per (length, pattern), ratios to the softmax GPT."""
    by = {(r["pattern"], r["length"]): r for r in rows}
    head = "| T (batch) | " + " | ".join(f"`{p}`" for p in patterns) + " |"
    lines = [head, "|" + "---|" * (len(patterns) + 1)]
    for length in lengths:
        cells, base = [], by.get(("*", length))
        for pattern in patterns:
            r = by.get((pattern, length))
            if r is None or "error" in r:
                cells.append("error" if r else "-")
                continue
            ratio = f" ({r['tokens_per_s'] / base['tokens_per_s']:.2f}x)" if base and "error" not in base and pattern != "*" else ""
            peak = f", {r['peak_gb']:.1f} GB" if r.get("peak_gb") else ""
            cells.append(f"{r['tokens_per_s'] / 1000:.1f}K tok/s{ratio}{peak}")
        batch = next((r["batch"] for r in rows if r["length"] == length), "?")
        lines.append(f"| {length} ({batch}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def profile_markdown(rows: list) -> str:
    """GPU kernel time (ms) of one step by kind of kernel, for the profiled rows ('' when none)."""
    profiled = [r for r in rows if "profile_ms" in r]
    if not profiled:
        return ""
    kinds = [label for label, _ in KINDS] + ["other elementwise / reductions"]
    lines = [f"One step at T = {profiled[0]['length']}, GPU kernel time by kind of kernel (ms):", "",
             "| pattern | step ms | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
    for r in profiled:
        cells = " | ".join(f"{r['profile_ms'].get(kind, 0.0):.0f}" for kind in kinds)
        lines.append(f"| `{r['pattern']}` | {r['step_ms']:.0f} | {cells} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patterns", nargs="+", default=["*", "R*", "RRR*", "R"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[2048, 8192, 32768])
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per step (batch = tokens / length)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--ffn", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--recompute", choices=["selective", "full"], default=None)
    parser.add_argument("--profile-length", type=int, default=8192, help="profile one step at this length")
    parser.add_argument("--out", default=None, help="folder for model.json and model.md")
    parser.add_argument("--smoke", action="store_true", help="CPU-sized: 2 layers, hidden 64, one step")
    args = parser.parse_args()
    if args.smoke:
        args.layers, args.hidden, args.heads, args.ffn, args.vocab = 2, 64, 4, 128, 256
        args.lengths, args.tokens, args.steps, args.warmup = [64], 128, 1, 1
        args.patterns = [p for p in args.patterns if 2 % len(p) == 0] or ["R*"]
    init_megatron()
    rows = []
    for length in args.lengths:
        for pattern in args.patterns:
            try:
                row = measure(args, pattern, length, profile=length == args.profile_length)
            except torch.cuda.OutOfMemoryError as err:
                row = {"pattern": pattern, "length": length, "error": f"out of memory: {str(err)[:120]}"}
                torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
            gc.collect()
    table = markdown(rows, args.patterns, args.lengths)
    profile = profile_markdown(rows)
    print(table)
    if profile:
        print(profile)
    if args.out:
        import megatron.core
        import triton

        os.makedirs(args.out, exist_ok=True)
        meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                "torch": torch.__version__, "triton": triton.__version__, "megatron_core": megatron.core.__version__,
                "args": vars(args)}
        with open(os.path.join(args.out, "model.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "model.md"), "w") as f:
            f.write(f"{meta['device']}, {meta['date']}; torch {meta['torch']}, triton {meta['triton']}, "
                    f"megatron-core {meta['megatron_core']}\n\n{table}\n\n{profile}\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
