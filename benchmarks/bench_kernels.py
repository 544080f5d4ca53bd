"""ReGLA Triton kernels vs fla chunk_gla (fed ReGLA's log F) vs torch SDPA (FlashAttention).

bf16, 65,536 tokens per call (B = 65536 / T), H = 16, d = 128, causal. Forward ms and
forward+backward ms (median of triton.testing.do_bench), peak extra memory of one
forward+backward (outputs and gradients included), achieved GB/s over the fewest bytes
(inputs read once, outputs written once).

    python benchmarks/bench_kernels.py [--out DIR] [--lengths 2048,4096] [--sweep] [--methods regla,fla,sdpa]
                                       [--launch fast_dqk_warps=4] [--profile]
                                       [--gates randn|model|adversarial] [--model-layers 1,4,8,12]
Writes DIR/bench_kernels.json and DIR/kernels.md (--sweep: also DIR/kept_launch.txt, the picked
settings as --launch arguments; --lengths "" skips the table). `--gates` other than randn
measures ReGLA and fla per gate input set (`gate_inputs.py`: adversarial kinds, or the inputs of
a 12-layer GPT's ReGLA layers) and writes DIR/kernels_gates.json and .md.
"""

import argparse
import datetime
import json
import os
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

import regla_kernels
from regla_kernels import chunk_regla, refined_log_gate
from regla_kernels.triton.backend import fast_chunk_mask
from regla_kernels.triton.settings import LAUNCH

TOKENS, HEADS, DIM = 65536, 16, 128


GATE = {"mean": 2.0, "std": 1.0}  # gate logits z ~ N(mean, std^2); refine logits u ~ N(0, 1)


def make_inputs(batch, length, with_grad):
    gen = torch.Generator(device="cuda").manual_seed(length)
    r = lambda s=1.0, b=0.0: (s * torch.randn(batch, length, HEADS, DIM, generator=gen,
        device="cuda") + b).to(torch.bfloat16).requires_grad_(with_grad)
    return r(), r(), r(), r(GATE["std"], GATE["mean"]), r(), r()


def regla_chunk_call(inputs, low_memory=False):
    q, k, v, z, u, _ = inputs
    return chunk_regla(q, k, v, z, u, backend="triton", low_memory=low_memory)[0]


def regla_low_memory_call(inputs):
    return regla_chunk_call(inputs, low_memory=True)


def regla_low_memory_backward_call(inputs):
    return regla_chunk_call(inputs, low_memory="backward")


def fla_step(inputs, log_gate):
    from fla.ops.gla import chunk_gla

    q, k, v, _, _, _ = inputs
    return chunk_gla(q, k, v, log_gate, scale=regla_kernels.default_scale(DIM))[0]


def sdpa_step(inputs):
    q, k, v = (x.transpose(1, 2) for x in inputs[:3])
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def measure(step, inputs, grads_of):
    do = torch.randn_like(step(inputs).detach())

    def fwd():
        with torch.no_grad():
            step(inputs)

    def fwd_bwd():
        torch.autograd.grad(step(inputs), grads_of, do)

    fwd_ms = do_bench(fwd, warmup=25, rep=100, return_mode="median")
    fwd_bwd_ms = do_bench(fwd_bwd, warmup=25, rep=200, return_mode="median")
    return fwd_ms, fwd_bwd_ms, peak_extra_gb(fwd_bwd)


def peak_extra_gb(step):
    """GB of device memory one call of `step` allocates at its peak beyond what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


def bench(lengths, methods, on_row=None):
    """One row per length: (fwd ms, fwd+bwd ms, peak GB) per method, printed as each is measured;
    `on_row(rows)` after every length (partial results survive a timeout)."""
    rows = []
    unit = TOKENS * HEADS * DIM * 2  # bytes of one bf16 [B, T, H, d] tensor
    for length in lengths:
        batch = TOKENS // length
        inputs = make_inputs(batch, length, True)
        q, k, v, z, u, _ = inputs
        row = {"T": length, "B": batch, "fast_chunks": fast_chunk_mask(z.detach(), u.detach()).float().mean().item()}
        for method in methods:
            started = time.time()
            try:
                row[method] = MEASURES[method](inputs)
            except Exception as error:
                print(f"{method} T={length}: {type(error).__name__}: {str(error)[:300]}", flush=True)
                continue
            print(f"{method} T={length}: {row[method]} ({time.time() - started:.0f} s)", flush=True)
        if row.get("regla"):
            row["regla_fwd_GBps"] = 6 * unit / row["regla"][0] / 1e6
            row["regla_fwd_bwd_GBps"] = 17 * unit / row["regla"][1] / 1e6
        print(json.dumps(row), flush=True)
        rows.append(row)
        if on_row is not None:
            on_row(rows)
        del inputs, q, k, v, z, u
        torch.cuda.empty_cache()
    return rows


def measure_regla(inputs):
    return measure(regla_chunk_call, inputs, list(inputs[:5]))


def measure_regla_low_memory(inputs):
    return measure(regla_low_memory_call, inputs, list(inputs[:5]))


def measure_regla_low_memory_backward(inputs):
    return measure(regla_low_memory_backward_call, inputs, list(inputs[:5]))


def measure_fla(inputs):
    """fla chunk_gla fed log F in fp32 (bf16 if this fla refuses fp32 gates)."""
    z, u = inputs[3].detach(), inputs[4].detach()
    for dtype in (torch.float32, torch.bfloat16):
        log_gate = refined_log_gate(z, u).to(dtype).requires_grad_(True)
        try:
            return measure(lambda x: fla_step(x, log_gate), inputs, [*inputs[:3], log_gate])
        except Exception as error:
            if dtype == torch.bfloat16:
                raise
            print(f"fla with fp32 log F: {type(error).__name__}: {error}; retrying with bf16 log F", flush=True)


def measure_sdpa(inputs):
    return measure(sdpa_step, inputs, list(inputs[:3]))


MEASURES = {
    "regla": measure_regla, "regla_lm": measure_regla_low_memory, "regla_lmb": measure_regla_low_memory_backward,
    "fla": measure_fla, "sdpa": measure_sdpa,
}


# Greedy sweep: each launch setting in turn, its alternatives tried on top of the best so far
# (an alternative may be a dict: several settings changed together).
SWEEP = [  # launch settings a --sweep run tries (docs/kernels.md: what the committed settings beat)
    ("fast_dv_stages", [2]),
    ("fast_dqk_stages", [2]),
]


def sweep(length=8192, gain=0.01):
    """Greedy search over SWEEP at one length: keep a change when fwd+bwd drops by more than
    `gain` (relative). Leaves the result in LAUNCH and returns every run."""
    batch = TOKENS // length
    inputs = make_inputs(batch, length, True)
    best = dict(LAUNCH)

    def timed(settings):
        LAUNCH.clear()
        LAUNCH.update(settings)
        return measure(regla_chunk_call, inputs, list(inputs[:5]))[:2]

    out = []
    best_ms = timed(best)[1]
    print(f"sweep base: fwd+bwd {best_ms:.3f}", flush=True)
    for key, values in SWEEP:
        for value in values:
            trial = dict(best, **(value if isinstance(value, dict) else {key: value}))
            try:
                fwd_ms, fwd_bwd_ms = timed(trial)
            except Exception as error:
                print(f"sweep {key}={value}: {type(error).__name__}: {str(error)[:300]}", flush=True)
                continue
            out.append({"change": {key: value}, "fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms})
            kept = fwd_bwd_ms < best_ms * (1 - gain)
            print(f"sweep {key}={value}: fwd {fwd_ms:.3f} fwd+bwd {fwd_bwd_ms:.3f}{' kept' if kept else ''}", flush=True)
            if kept:
                best, best_ms = trial, fwd_bwd_ms
    LAUNCH.clear()
    LAUNCH.update(best)
    print(f"launch settings kept: {best}", flush=True)
    return {"runs": out, "kept": best}


def profile(length=8192, call=regla_chunk_call, label=""):
    """GPU kernel time of one forward+backward, per kernel (torch profiler), longest first."""
    batch = TOKENS // length
    inputs = make_inputs(batch, length, True)
    do = torch.randn_like(call(inputs).detach())
    for _ in range(3):
        torch.autograd.grad(call(inputs), list(inputs[:5]), do)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            torch.autograd.grad(call(inputs), list(inputs[:5]), do)
        torch.cuda.synchronize()
    table = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            table[event.name] = table.get(event.name, 0.0) + event.device_time / 5 / 1000
    rows = sorted(table.items(), key=lambda item: -item[1])
    for name, ms in rows[:14]:
        print(f"profile{label} T={length}: {ms:7.3f} ms  {name[:90]}", flush=True)
    return rows


def versions():
    try:
        import fla

        fla_version = fla.__version__
    except Exception:
        fla_version = "absent"
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, "fla": fla_version,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def markdown(meta, rows):
    fmt = lambda r, key: "n/a | n/a" if key not in r else f"{r[key][0]:.2f} / {r[key][1]:.2f} | {r[key][2]:.2f}"
    lines = [
        "# ReGLA kernel benchmark",
        "",
        f"{meta['device']}, {meta['date']}; torch {meta['torch']}, triton {meta['triton']}, fla {meta['fla']}.",
        f"bf16, {TOKENS} tokens per call (B = {TOKENS}/T), H = {HEADS}, dk = dv = {DIM}, causal; median of",
        "triton.testing.do_bench; peak = extra memory of one forward+backward (outputs and gradients included).",
        "fla `chunk_gla` is fed ReGLA's gate precomputed as log F (fp32), the paper's setup.",
        "",
        "| T | B | ReGLA fwd / fwd+bwd ms | peak GB | fla chunk_gla fwd / fwd+bwd ms | peak GB | SDPA fwd / fwd+bwd ms | peak GB "
        "| fwd+bwd vs fla | vs SDPA | ReGLA GB/s fwd / fwd+bwd | ReGLA low_memory fwd / fwd+bwd ms | peak GB | vs fla "
        "| low_memory=\"backward\" fwd / fwd+bwd ms | peak GB | vs fla |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = lambda key, of="regla": f"{r[of][1] / r[key][1]:.3f}x" if of in r and key in r else "n/a"
        gbps = f"{r['regla_fwd_GBps']:.0f} / {r['regla_fwd_bwd_GBps']:.0f}" if "regla" in r else "n/a"
        lines.append(
            f"| {r['T']} | {r['B']} | {fmt(r, 'regla')} | {fmt(r, 'fla')} | {fmt(r, 'sdpa')} | {ratio('fla')} | {ratio('sdpa')} | {gbps} "
            f"| {fmt(r, 'regla_lm')} | {ratio('fla', 'regla_lm')} | {fmt(r, 'regla_lmb')} | {ratio('fla', 'regla_lmb')} |"
        )
    lines.append("")
    lines.append(
        "Ratios are ReGLA fwd+bwd time over the other's (lower is better). low_memory: `chunk_regla(..., low_memory=True)` "
        "(the gate b and the states h computed again per window, neither saved); \"backward\": `low_memory=\"backward\"` "
        "(b and h kept from the forward, as by default)."
    )
    return "\n".join(lines) + "\n"


def apply_launch(settings):
    """KEY=VALUE overrides of LAUNCH (numbers as in the dict)."""
    for item in settings or []:
        key, value = item.split("=")
        if key not in LAUNCH:
            raise SystemExit(f"unknown launch setting {key!r}; have {sorted(LAUNCH)}")
        kind = type(LAUNCH[key])
        LAUNCH[key] = value == "True" if kind is bool else kind(float(value))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks"))
    parser.add_argument("--lengths", default="2048,4096,8192,16384,32768")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--methods", default="regla,regla_lm,regla_lmb,sdpa,fla", help="in this order per length")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-lengths", default="8192", help="lengths the --profile runs at")
    parser.add_argument("--gate", default="2,1", help="gate logit mean,std (default 2,1)")
    parser.add_argument("--launch", nargs="*", help="KEY=VALUE overrides of regla_kernels.triton.settings.LAUNCH")
    parser.add_argument("--gates", choices=("randn", "model", "adversarial"), default="randn")
    parser.add_argument("--model-layers", default="1,4,8,12", help="with --gates model: which ReGLA layers to time")
    args = parser.parse_args()
    apply_launch(args.launch)
    if args.gates != "randn":
        from bench_gates import bench_gates

        bench_gates(args, [int(x) for x in args.lengths.split(",") if x], [m for m in args.methods.split(",") if m])
        return
    GATE["mean"], GATE["std"] = (float(x) for x in args.gate.split(","))
    meta = versions()
    meta["gate_logits"] = dict(GATE)
    meta["launch"] = dict(LAUNCH)
    print(meta, flush=True)
    result = {"meta": meta}
    if args.sweep:
        result["sweep"] = sweep()
        meta["launch"] = dict(LAUNCH)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "kept_launch.txt"), "w") as f:  # --launch arguments of the pick
            f.write(" ".join(f"{key}={value}" for key, value in LAUNCH.items()) + "\n")

    def write(rows):
        result["rows"] = rows
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_kernels.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(args.out, "kernels.md"), "w") as f:
            f.write(markdown(meta, rows))

    rows = bench([int(x) for x in args.lengths.split(",") if x], [m for m in args.methods.split(",") if m], write)
    if args.profile:
        result["profile"] = {length: profile(int(length)) for length in args.profile_lengths.split(",")}
        for method, call, tag in (("regla_lm", regla_low_memory_call, "low_memory"), ("regla_lmb", regla_low_memory_backward_call,
            "low_memory_backward")):
            if method in args.methods.split(","):
                result[f"profile_{tag}"] = {length: profile(int(length), call, f" {tag}") for length in args.profile_lengths.split(",")}
        write(rows)
    print(markdown(meta, rows), flush=True)


if __name__ == "__main__":
    main()
