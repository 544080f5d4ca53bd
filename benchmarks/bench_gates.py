"""The kernel benchmark by gate distribution (`bench_kernels.py --gates model|adversarial`).

For each length: the input sets of `gate_inputs.py` (the adversarial kinds, or the inputs that
chosen ReGLA layers of a 12-layer GPT hand the kernels), each timed with ReGLA's Triton kernels
and fla's `chunk_gla` (fed ReGLA's log F), SDPA once per length (it does not see gates). Rows:
fwd / fwd+bwd ms, peak GB, the share of (chunk, head) pairs on the kernels' sub-chunk path, and
per length the spread (slowest over fastest ReGLA time across the sets).

    python benchmarks/bench_kernels.py --gates model --out DIR [--lengths 2048,8192] [--model-layers 1,7,12]
    python benchmarks/bench_kernels.py --gates adversarial --out DIR
"""

import json
import os
import time

import torch
from bench_kernels import DIM, HEADS, MEASURES, TOKENS, versions
from gate_inputs import capture_model_inputs, random_inputs, slow_chunk_share

MODEL = dict(layers=12, hidden=HEADS * DIM, heads=HEADS, ffn=4 * HEADS * DIM, vocab=32768)


def model_input_sets(length: int, layers_wanted: list) -> list:
    """The inputs of the wanted ReGLA layers (1-based) of an all-ReGLA 12-layer GPT (hidden 2048,
    Megatron's default initialization, bf16; `bench_model.gpt_model`) at TOKENS tokens of random
    text, T = length."""
    from argparse import Namespace

    from bench_model import gpt_model, init_megatron
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        init_megatron()
    batch = TOKENS // length
    tokens = torch.randint(0, MODEL["vocab"], (batch, length), device="cuda",
                           generator=torch.Generator(device="cuda").manual_seed(length))
    sets = capture_model_inputs(lambda: gpt_model(Namespace(**MODEL), "R", length)[1], tokens)
    return [sets[i - 1] for i in layers_wanted if 0 < i <= len(sets)]


def bench_gates(args, lengths: list, methods: list) -> list:
    """Rows per (length, input set); writes DIR/kernels_gates.json and kernels_gates.md."""
    meta = versions()
    meta["gates"] = args.gates
    rows = []
    for length in lengths:
        batch = TOKENS // length
        if args.gates == "model":
            sets = model_input_sets(length, [int(x) for x in args.model_layers.split(",")])
        else:
            sets = random_inputs(batch, length, HEADS, DIM, torch.bfloat16, "cuda", args.gates, seed=length)
        for name, inputs in sets:
            inputs = [x.requires_grad_(True) for x in inputs] + [None]
            row = {"T": length, "B": batch, "gates": name, "slow_chunks": slow_chunk_share(inputs[3], inputs[4])}
            for method in (m for m in methods if m != "sdpa"):
                started = time.time()
                try:
                    row[method] = MEASURES[method](inputs)
                except Exception as error:  # one method's failure must not lose the others' numbers
                    print(f"{method} T={length} {name}: {type(error).__name__}: {str(error)[:300]}", flush=True)
                    continue
                print(f"{method} T={length} {name}: {row[method]} ({time.time() - started:.0f} s)", flush=True)
            rows.append(row)
        if "sdpa" in methods:
            rows.append({"T": length, "B": batch, "gates": "(any)", "sdpa": MEASURES["sdpa"](sets[0][1] + [None])})
        del sets
        torch.cuda.empty_cache()
        write(args.out, meta, rows)
    print(markdown(meta, rows), flush=True)
    return rows


def markdown(meta: dict, rows: list) -> str:
    """The table: per length and input set, ReGLA and fla fwd+bwd ms, their ratio, the slow share."""
    cell = lambda r, m: f"{r[m][1]:.2f}" if m in r else "-"
    lines = [f"{meta.get('device')}, {meta.get('date')}; torch {meta.get('torch')}, triton {meta.get('triton')}, "
             f"fla {meta.get('fla')}; gates: {meta['gates']}", "",
             "| T | gates | sub-chunk pairs | ReGLA fwd+bwd ms | fla fwd+bwd ms | ReGLA / fla | SDPA ms |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['regla'][1] / r['fla'][1]:.3f}x" if "regla" in r and "fla" in r else "-"
        share = f"{100 * r['slow_chunks']:.0f}%" if "slow_chunks" in r else ""
        lines.append(f"| {r['T']} | {r['gates']} | {share} | {cell(r, 'regla')} | {cell(r, 'fla')} | {ratio} | {cell(r, 'sdpa')} |")
    lines.append("")
    for length in sorted({r["T"] for r in rows}):
        times = [r["regla"][1] for r in rows if r["T"] == length and "regla" in r]
        if times:
            lines.append(f"T = {length}: slowest / fastest ReGLA input set {max(times) / min(times):.2f}x")
    return "\n".join(lines) + "\n"


def write(out: str, meta: dict, rows: list) -> None:
    """DIR/kernels_gates.json and .md (rewritten after every length: partial results survive)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "kernels_gates.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(out, "kernels_gates.md"), "w") as f:
        f.write(markdown(meta, rows))
